"""Indexing into run directories: sources, exactness, resume after interruption, checks."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_interpret import decompose, load_image, load_model
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images, open_run, open_source
from clip_interpret.runstore import store
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


def test_fp16_storage_at_vit_b16_size_keeps_pieces_and_ablation_figures(tmp_path):
    """ViT-B/16's image tower (12 layers x 12 heads, width 768, 512-d joint space; 64 px images to keep
    it quick, a one-layer text tower): the fp16 run's pieces and mean-ablation table match fp32."""
    from clip_interpret.ablation import ablation_study

    from tests.helpers import make_open_clip

    text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1)
    b16 = load_model(make_open_clip("ViT-B-16", force_image_size=64, text_cfg=text))
    assert (b16.vit.cfg.layers, b16.vit.cfg.heads, b16.vit.cfg.width, b16.vit.cfg.output_dim) == (12, 12, 768, 512)
    half = index_images(b16, "toyworld:64:1", tmp_path / "fp16", progress=False)  # the default: last 4 layers
    full = index_images(b16, "toyworld:64:1", tmp_path / "fp32", dtype="fp32", progress=False)
    heads16, heads32 = half.piece("heads"), full.piece("heads")  # [64, 48, 512]
    relative = np.linalg.norm(heads16 - heads32, axis=-1) / np.linalg.norm(heads32, axis=-1)
    assert relative.max() < 5e-4  # fp16 rounding: 2.4e-4 measured; bf16 storage would give 1.9e-3
    assert np.abs(half.sum_of_pieces() - full.embeddings()).max() < 2e-4  # 74 pieces summed back
    a16, a32 = ablation_study(half, b16)["accuracy"], ablation_study(full, b16)["accuracy"]
    assert a16.keys() == a32.keys()
    for variant in a32:  # the same predictions, up to one image flipping on a near-tie
        assert all(abs(a16[variant][t] - a32[variant][t]) <= 1 / 64 for t in a32[variant]), variant


def _folder(tmp_path):
    root = tmp_path / "photos"
    for cls, colour in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(root / cls / f"{i}.png")
    # broken files in the middle of the list (and of a shard): every later item must keep its own label
    (root / "cat" / "1-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "dog" / "0-empty.png").write_bytes(b"")
    return root


def test_folder_source_labels_and_skips_bad_files(model, tmp_path):
    root = _folder(tmp_path)
    src = open_source(str(root))
    assert src.kind == "folder" and len(src) == 8 and set(src.labels["class"]) == {"cat", "dog"}
    run = index_images(model, str(root), tmp_path / "run", shard_size=3, progress=False)
    assert len(run) == 6 and run.labels["class"].count("dog") == 3
    for i, name in enumerate(run.names):  # names, labels and stored rows stay aligned after skipped files
        assert run.labels["class"][i] == Path(name).parent.name, i
        assert src.names[run.source_indices[i]] == name
    images = [load_image(name) for name in run.names]
    assert np.allclose(run.embeddings(), decompose(model, images).embedding.numpy(), atol=1e-6)
    assert [Path(f["source"]).name for f in run.failures] == ["1-broken.jpg", "0-empty.png"]
    assert "corrupt" in run.failures[0]["reason"] or "not an image" in run.failures[0]["reason"]
    assert run.manifest["n_failed"] == 2


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
    code = ("import sys; from clip_interpret import load_model; from clip_interpret.runstore import index_images;"
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


@pytest.fixture(scope="module")
def good_run(model, tmp_path_factory):
    """A finished two-shard run (with labels) to copy and damage."""
    out = tmp_path_factory.mktemp("good") / "run"
    index_images(model, "toyworld:40:1", out, shard_size=25, progress=False)
    (out / "labels.json").write_text(json.dumps({"labeller": "manual", "heads": {"L2.H1": {"label": "color"}}}))
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _cut_short(run, shard):
    """A shard rewritten, consistently, with its last row gone (its record and both arrays)."""
    stem = run / "shards" / f"{shard:05d}"
    record = json.loads(stem.with_suffix(".json").read_text())
    record["kept"] = record["kept"][:-1]
    stem.with_suffix(".json").write_text(json.dumps(record))
    for kind in ("pieces", "emb"):
        path = stem.with_name(f"{stem.name}.{kind}.npy")
        np.save(path, np.load(path)[:-1])


def _edit_json(name, change):
    def edit(run):
        data = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps(change(data)))
    return edit


CORRUPTIONS = {
    "manifest truncated": (lambda r: _truncate(r / "manifest.json"), r"manifest\.json is not valid JSON"),
    "manifest empty": (lambda r: (r / "manifest.json").write_text(""), r"manifest\.json is empty"),
    "manifest a list": (lambda r: (r / "manifest.json").write_text("[]"), r"manifest\.json is not a run manifest"),
    "manifest version only": (lambda r: (r / "manifest.json").write_text('{"version": 1}'),
                              r"manifest\.json lacks or has malformed fields: model, preprocess"),
    "manifest layout": (_edit_json("manifest.json", lambda m: {**m, "n_heads": m["n_heads"] + 1}),
                        r"manifest\.json has a piece layout that does not match"),
    "images truncated": (lambda r: _truncate(r / "images.json"), r"images\.json is not valid JSON"),
    "images missing": (lambda r: (r / "images.json").unlink(), r"images\.json is missing"),
    "images short": (_edit_json("images.json", lambda d: {**d, "names": d["names"][:-1]}),
                     r"images\.json lists 39 images, the manifest's source has 40"),
    "labels short": (_edit_json("images.json", lambda d: {**d, "labels": {"color": d["labels"]["color"][:3]}}),
                     r"images\.json has labels that are not one list of 40"),
    "record truncated": (lambda r: _truncate(r / "shards" / "00001.json"), r"00001\.json is not valid JSON"),
    "record fields": (lambda r: (r / "shards" / "00001.json").write_text('{"shard": 1}'),
                      r"00001\.json is not a valid shard record"),
    "record items": (_edit_json("shards/00000.json", lambda d: {**d, "kept": d["kept"] + [30]}),
                     r"00000\.json is not a valid shard record"),
    "array shape": (lambda r: np.save(r / "shards" / "00000.pieces.npy", np.zeros((25, 3, 8), np.float16)),
                    r"00000\.pieces\.npy holds a float16 array of shape \[25, 3, 8\], the run expects float16 "
                    r"\[25, \d+, \d+\]; to redo that shard, run the index command again, `clip-interpret index --model "
                    r"open_clip:test-vit-tiny --images toyworld:40:1 --out \S+/run --shard-size 25`: it resumes"),
    "array dtype": (lambda r: np.save(r / "shards" / "00001.emb.npy",
                                      np.load(r / "shards" / "00001.emb.npy").astype(np.float64)),
                    r"00001\.emb\.npy holds a float64 array"),
    "array truncated": (lambda r: _truncate(r / "shards" / "00001.pieces.npy"),
                        r"00001\.pieces\.npy is not a readable \.npy array"),
    "array missing": (lambda r: (r / "shards" / "00000.emb.npy").unlink(), r"00000\.emb\.npy is missing"),
    "shard deleted": (lambda r: [p.unlink() for p in (r / "shards").glob("00001.*")],
                      r"run \S+ is missing shard 00001 \(of 2\): source items 25-39 \(15 of 40\) have no shard, "
                      r"although its manifest says the run is complete; run the index command again, `clip-interpret "
                      r"index --model open_clip:test-vit-tiny --images toyworld:40:1 --out \S+ --shard-size 25`"),
    "first shard deleted": (lambda r: [p.unlink() for p in (r / "shards").glob("00000.*")],
                            r"missing shard 00000 \(of 2\): source items 0-24 \(25 of 40\)"),
    "shard cut short": (lambda r: _cut_short(r, 1), r"00001\.json lists 14 images, the manifest recorded 15 for that "
                                                   r"shard when the run was completed; to redo that shard, run"),
    "array bytes": (lambda r: (r / "shards" / "00001.emb.npy").open("ab").write(b"\0" * 64),
                    r"00001\.emb\.npy is \d+ bytes, the manifest recorded \d+ when the run was completed"),
    "record moved": (_edit_json("shards/00001.json", lambda d: {**d, "start": 20}),
                     r"00001\.json is not a valid shard record"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_damaged_run_is_a_one_line_error_naming_the_file(good_run, tmp_path, case, capsys):
    from clip_interpret.cli import main

    damage, message = CORRUPTIONS[case]
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage(run)
    with pytest.raises(ClipInterpretError, match=message):
        open_run(run)
    assert main(["text-nn", str(run), "--text", "a red circle", "--heads", "L2.H1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


SHARD_DAMAGE = ["record truncated", "record fields", "record items", "array shape", "array dtype", "array truncated",
                "array missing", "shard deleted", "first shard deleted", "shard cut short", "array bytes",
                "record moved"]


@pytest.mark.parametrize("case", SHARD_DAMAGE)
def test_the_index_command_repairs_a_damaged_or_missing_shard(good_run, tmp_path, case, capsys):
    """The repair the errors name: the same index command checks every shard and redoes the bad ones,
    whatever the manifest says; the run is then the same as before the damage."""
    from clip_interpret.cli import main

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    CORRUPTIONS[case][0](run)
    with pytest.raises(ClipInterpretError):
        open_run(run)
    argv = ["index", "--model", TINY, "--images", "toyworld:40:1", "--out", str(run), "--shard-size", "25",
            "--workers", "0"]
    assert main(argv) == 0
    assert "indexed 40 images" in capsys.readouterr().out
    repaired, good = open_run(run), open_run(good_run)
    assert repaired.complete and repaired.manifest["n_indexed"] == 40
    assert repaired.manifest["shard_files"] == good.manifest["shard_files"]
    _same_runs(repaired, good)


def test_a_repair_interrupted_leaves_the_run_incomplete(model, good_run, tmp_path):
    """While a missing shard is redone the manifest no longer says complete: a repair stopped
    half-way is a run in progress, not a complete run with a hole."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    for path in (run / "shards").glob("0000[01].*"):
        path.unlink()
    partial = index_images(model, "toyworld:40:1", run, shard_size=25, progress=False, stop_after_shards=1)
    assert not partial.complete and len(partial) == 25
    assert "shard_files" not in json.loads((run / "manifest.json").read_text())


@pytest.mark.parametrize("labels, message", [
    ('{"heads": {"L2.H1": "color"}}', r"labels\.json has malformed entries for heads L2\.H1"),
    ('{"heads": {"L2.H1": {"label": ', r"labels\.json is not valid JSON"),
    ("", r"labels\.json is empty"),
])
def test_damaged_labels_are_a_one_line_error(good_run, tmp_path, labels, message, capsys):
    from clip_interpret.cli import main
    from clip_interpret.labels import head_labels

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "labels.json").write_text(labels)
    with pytest.raises(ClipInterpretError, match=message):
        head_labels(run)
    for argv in (["property-nn", str(run), "--run-image", "0", "--property", "color"],
                 ["report", str(run), "--out", str(tmp_path / "report.html")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "labels.json" in err


def test_a_trusted_open_reads_neither_images_json_nor_the_arrays_until_used(good_run, tmp_path):
    """How a Ray task opens a run its driver has checked: no images.json, no array headers, no maps."""
    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir)
    (run_dir / "images.json").unlink()
    np.save(run_dir / "shards" / "00001.emb.npy", np.zeros((3, 2), np.float64))  # not looked at
    run = store.Run(run_dir, check_files=False)
    assert len(run) == 40 and [s.shard for s in run.shards] == [0, 1]
    first, pieces = next(run.iter_pieces([1]))
    assert first == 25 and isinstance(pieces, np.memmap) and pieces.shape[0] == 15
    with pytest.raises(ClipInterpretError, match=r"images\.json is missing"):
        run.names
    with pytest.raises(ClipInterpretError, match=r"images\.json is missing"):
        open_run(run_dir)  # the checked open still refuses it
