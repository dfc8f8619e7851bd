"""Indexing into run directories: sources, exactness, resume after interruption, checks."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clip_interpret import decompose, load_model
from clip_interpret.errors import ClipInterpretError
from clip_interpret.index import index_images, open_run, open_source
from clip_interpret.index import store
from clip_interpret.toyworld import generate

TINY = "open_clip:test-vit-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


def test_toyworld_run_is_exact_and_labelled(model, tmp_path):
    run = index_images(model, "toyworld:150:1", tmp_path / "run", shard_size=64, dtype="fp32", progress=False)
    assert run.complete and len(run) == 150 and len(run.shards) == 3
    images = [generate(i, 1).image for i in range(150)]
    d = decompose(model, images)
    assert np.allclose(run.embeddings(), d.embedding.numpy(), atol=1e-6)
    assert np.allclose(run.sum_of_pieces(), run.embeddings(), atol=1e-5)
    assert np.allclose(run.heads(2, 3), d.heads[:, 2, 3].numpy(), atol=1e-6)
    assert np.allclose(run.all_heads(), d.heads.numpy(), atol=1e-6)
    assert run.labels["color"] == [generate(i, 1).attributes["color"] for i in range(150)]
    assert run.names[5] == "toyworld:1:5"


def test_fp16_storage_is_close_and_half_the_bytes(model, tmp_path):
    a = index_images(model, "toyworld:64:1", tmp_path / "a", dtype="fp16", progress=False)
    b = index_images(model, "toyworld:64:1", tmp_path / "b", dtype="fp32", progress=False)
    assert np.abs(a.sum_of_pieces() - b.embeddings()).max() < 5e-3
    size = lambda run: (run.path / "shards" / "00000.pieces.npy").stat().st_size  # noqa: E731
    assert size(a) < 0.55 * size(b)


def _folder(tmp_path):
    root = tmp_path / "photos"
    for cls, colour in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return root


def test_folder_source_labels_and_skips_bad_files(model, tmp_path):
    root = _folder(tmp_path)
    src = open_source(str(root))
    assert src.kind == "folder" and len(src) == 7 and set(src.labels["class"]) == {"cat", "dog"}
    run = index_images(model, str(root), tmp_path / "run", progress=False)
    assert len(run) == 6 and run.labels["class"].count("dog") == 3
    assert len(run.failures) == 1 and run.failures[0]["source"].endswith("broken.jpg")
    assert "corrupt" in run.failures[0]["reason"] or "not an image" in run.failures[0]["reason"]
    assert run.manifest["n_failed"] == 1


def test_list_file_source(model, tmp_path):
    root = _folder(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n{root / 'cat' / '0.png'}\n\nphotos/dog/1.png\n")
    src = open_source(str(listing))
    assert src.names == [str(root / "cat" / "0.png"), str(tmp_path / "photos" / "dog" / "1.png")]


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "image source not found"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no image files"),
    (lambda p: (p / "l.txt").write_text("# nothing\n\n") and str(p / "l.txt"), "names no images"),
    (lambda p: "", "no image source"),
    (lambda p: "toyworld:0", "n > 0"),
])
def test_source_errors(tmp_path, make, message):
    with pytest.raises(ClipInterpretError, match=message):
        open_source(make(tmp_path))


def _same_runs(a, b):
    assert a.names == b.names
    assert np.array_equal(a.embeddings(), b.embeddings())
    assert np.array_equal(a.piece("heads"), b.piece("heads"))


def test_interrupted_run_resumes_without_loss_or_duplicates(model, tmp_path):
    straight = index_images(model, "toyworld:200:2", tmp_path / "straight", shard_size=50, progress=False)
    partial = index_images(model, "toyworld:200:2", tmp_path / "resumed", shard_size=50, progress=False,
                           stop_after_shards=2)
    assert not partial.complete and len(partial) == 100
    # a crash between writing a shard's arrays and its marker, and a stale temporary file
    shards = tmp_path / "resumed" / "shards"
    np.save(shards / "00002.pieces.npy", np.zeros((3, 1, 1), np.float16))
    (shards / ".00003.emb.npy.tmp").write_bytes(b"partial")
    resumed = index_images(model, "toyworld:200:2", tmp_path / "resumed", shard_size=50, progress=False)
    assert resumed.complete and len(resumed) == 200
    assert not list(shards.glob(".*.tmp"))
    _same_runs(straight, resumed)


def test_kill_9_during_indexing_then_resume(model, tmp_path):
    out = tmp_path / "killed"
    code = ("import sys; from clip_interpret import load_model; from clip_interpret.index import index_images;"
            f"index_images(load_model('{TINY}'), 'toyworld:3000:3', r'{out}', shard_size=100, progress=False)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "shards").glob("0000[2-9].json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = open_run(out)
    assert not interrupted.complete and 0 < len(interrupted) < 3000
    resumed = index_images(model, "toyworld:3000:3", out, shard_size=100, progress=False)
    assert resumed.complete and len(resumed) == 3000 and len(set(resumed.names)) == 3000
    reference = index_images(model, "toyworld:3000:3", tmp_path / "ref", shard_size=100, progress=False)
    _same_runs(reference, resumed)


def test_run_made_with_other_settings_is_refused(model, tmp_path):
    index_images(model, "toyworld:20:1", tmp_path / "run", progress=False)
    with pytest.raises(ClipInterpretError, match="other settings.*layers"):
        index_images(model, "toyworld:20:1", tmp_path / "run", layers=[2], progress=False)
    with pytest.raises(ClipInterpretError, match="image source"):
        index_images(model, "toyworld:21:1", tmp_path / "run", progress=False)
    other = load_model(TINY)
    with torch.no_grad():
        other.vit.proj.add_(0.01)
    other._fingerprint = None
    with pytest.raises(ClipInterpretError, match="other settings.*fingerprint"):
        index_images(other, "toyworld:20:1", tmp_path / "run", progress=False)
    with pytest.raises(ClipInterpretError, match="made with other weights"):
        open_run(tmp_path / "run", other)
    open_run(tmp_path / "run", model)  # the right model is accepted


def test_disk_full_leaves_no_corrupt_shard(model, tmp_path, monkeypatch):
    real_save = np.save
    calls = {"n": 0}

    def failing_save(handle, array, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second array file: the first shard's embeddings
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(handle, array, **kw)

    monkeypatch.setattr(store.np, "save", failing_save)
    with pytest.raises(ClipInterpretError, match="disk full"):
        index_images(model, "toyworld:30:1", tmp_path / "run", shard_size=10, progress=False)
    shards = tmp_path / "run" / "shards"
    assert not list(shards.glob("*.json")) and not list(shards.glob(".*.tmp"))
    monkeypatch.setattr(store.np, "save", real_save)
    run = index_images(model, "toyworld:30:1", tmp_path / "run", shard_size=10, progress=False)
    assert run.complete and len(run) == 30


def test_not_a_run(tmp_path):
    with pytest.raises(ClipInterpretError, match="not a run directory"):
        open_run(tmp_path)


def test_manifest_records_what_the_run_came_from(model, tmp_path):
    run = index_images(model, "toyworld:10:1", tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == model.fingerprint()
    assert manifest["source"]["hash"] == open_source("toyworld:10:1").list_hash()
    assert manifest["preprocess"]["image_size"] == [32, 32]
    assert manifest["layers"] == run.layers == [0, 1, 2] and manifest["dtype"] == "fp16"


def test_a_second_driver_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with store.RunLock(out):  # a driver (this process) writes the run
        with pytest.raises(ClipInterpretError, match=rf"being written by another index process \(pid {os.getpid()} "
                                                     rf"on host {socket.gethostname()}.*delete .*writer.lock"):
            index_images(model, "toyworld:20:1", out, progress=False)
    assert not (out / "writer.lock").exists()  # released on exit
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "writer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "since": "x"}))
    run = index_images(model, "toyworld:20:1", out, progress=False)  # killed driver: its lock is stale
    assert run.complete and not (out / "writer.lock").exists()
    (out / "writer.lock").write_text(json.dumps({"host": "another-node", "pid": 1, "since": "x"}))
    with pytest.raises(ClipInterpretError, match="pid 1 on host another-node"):
        index_images(model, "toyworld:20:1", out, progress=False)  # never guessed stale across hosts
