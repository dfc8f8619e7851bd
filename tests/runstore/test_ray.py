"""The ray engine on a local Ray of 2 CPUs: indexing equals the local engine bit for bit, survives
a killed worker and a killed driver, resumes across engines; TextSpan, ablation and faithfulness
as a map over shards and a reduce equal the local figures; clear errors."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray

from clip_interpret import load_model
from clip_interpret.ablation import ablation_study
from clip_interpret.cli import main
from clip_interpret.engine import Engine
from clip_interpret.errors import ClipInterpretError
from clip_interpret.faithfulness import head_ablation_drops
from clip_interpret.runstore import ImageSource, build, index_images, open_source, store
from clip_interpret.pools import load_pool, text_embeddings
from clip_interpret.textspan import textspan, textspan_run

TINY = "open_clip:test-vit-tiny"
SPEC = "toyworld:600:3"
SHARD = 50  # 12 shards


@dataclass
class SlowSource(ImageSource):
    """A toy-world source that takes ``delay`` seconds per image (the same items, names and hash)."""

    delay: float = 0.0

    def load(self, i: int):
        time.sleep(self.delay)
        return super().load(i)


def slow(spec: str, delay: float) -> SlowSource:
    return SlowSource(**vars(open_source(spec)), delay=delay)


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The single-process run everything is compared with."""
    return index_images(model, SPEC, tmp_path_factory.mktemp("ref") / "run", shard_size=SHARD, progress=False)


def same_bits(a, b) -> None:
    """Two runs hold the same shards: records, pieces and embeddings, bit for bit."""
    assert a.complete and b.complete and a.names == b.names
    for x, y in zip(a.shards, b.shards):
        assert (x.shard, x.kept, x.failures, x.decoder) == (y.shard, y.kept, y.failures, y.decoder)
    assert np.array_equal(a.piece("heads"), b.piece("heads")) and np.array_equal(a.embeddings(), b.embeddings())
    assert np.array_equal(a.sum_of_pieces(), b.sum_of_pieces())


def no_partial_shard(run_dir: Path) -> None:
    shards = run_dir / "shards"
    records = {p.name.split(".")[0] for p in shards.glob("*.json")}
    arrays = {p.name.split(".")[0] for p in shards.glob("*.npy")}
    assert records == arrays and not list(shards.glob(".*")) and not (run_dir / "writer.lock").exists()


# ----------------------------------------------------- without a Ray running here
def test_ray_index_equals_the_local_index_bit_for_bit_and_its_local_ray_is_stopped(model, reference, tmp_path):
    assert not ray.is_initialized()
    run = index_images(model, SPEC, tmp_path / "run", shard_size=SHARD, progress=False, engine="ray", workers=2)
    assert not ray.is_initialized()  # the local Ray started for the call is stopped
    same_bits(reference, run)
    no_partial_shard(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]


def test_ray_not_installed_names_the_extra(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ClipInterpretError, match=r"pip install 'clip-interpret\[ray\]'"):
        index_images(model, SPEC, tmp_path / "run", engine="ray")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_an_address_that_does_not_answer_fails_within_seconds(model, tmp_path, capsys):
    start = time.monotonic()
    code = main(["index", "--model", TINY, "--images", SPEC, "--out", str(tmp_path / "run"), "--engine", "ray",
                 "--ray-address", "127.0.0.1:9"])
    assert code == 2 and time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "no Ray cluster answers at 127.0.0.1:9" in err and "Traceback" not in err
    assert main(["index", "--model", TINY, "--images", SPEC, "--out", str(tmp_path / "r"),
                 "--ray-address", "127.0.0.1:9"]) == 2
    assert "need --engine ray" in capsys.readouterr().err


def test_interventions_refuse_the_ray_engine(reference, capsys):
    assert main(["ablate", str(reference.path), "--heads", "L2.H1", "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "interventions re-run the model here: drop --engine ray" in err and err.count("\n") == 1


# --------------------------------------------------------- on one local Ray cluster
@pytest.fixture(scope="module")
def cluster():
    """A local Ray of 2 CPUs for the tests below; its workers import what this process imports."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=200 << 20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if before is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = before


def _actor_processes(method: str) -> list[int]:
    """Pids of Ray actor processes of ShardWorker running ``method`` (not their reading children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(f"ray::ShardWorker.{method}"):
            found[int(entry.name)] = parent
    return [pid for pid, parent in found.items() if parent not in found]


def test_a_worker_killed_mid_shard_leaves_every_image_exactly_once(cluster, model, reference, tmp_path):
    out = tmp_path / "run"
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("run", index_images(
        model, slow(SPEC, 0.01), out, shard_size=SHARD, progress=False, engine="ray", workers=2)))
    thread.start()
    deadline = time.monotonic() + 60
    victims = []
    while not victims and time.monotonic() < deadline:
        victims = _actor_processes("write") if list((out / "shards").glob("*.json")) else []
        time.sleep(0.05)
    assert victims, "no Ray worker was writing"
    os.kill(victims[0], signal.SIGKILL)
    assert len(list((out / "shards").glob("*.json"))) < 12  # killed with work left
    thread.join(timeout=120)
    assert not thread.is_alive()
    same_bits(reference, result["run"])  # every image exactly once, the same bytes
    no_partial_shard(out)


def test_a_killed_driver_is_resumed_by_another(cluster, model, reference, tmp_path):
    out = tmp_path / "run"
    code = ("import sys, tests.runstore.test_ray as t; from clip_interpret import load_model; "
            "from clip_interpret.runstore import index_images; "
            f"index_images(load_model('{TINY}'), t.slow('{SPEC}', 0.01), r'{out}', shard_size={SHARD}, "
            f"progress=False, engine='ray', ray_address='{cluster}', workers=2)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                            cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(list((out / "shards").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list((out / "shards").glob("*.json"))) < 12 and (out / "writer.lock").exists()
    resumed = index_images(model, SPEC, out, shard_size=SHARD, progress=False, engine="ray", workers=2)
    same_bits(reference, resumed)
    no_partial_shard(out)


def test_runs_resume_across_engines(cluster, model, reference, tmp_path):
    local_first = tmp_path / "local-first"
    partial = index_images(model, SPEC, local_first, shard_size=SHARD, progress=False, stop_after_shards=3)
    assert not partial.complete and len(partial.shards) == 3
    same_bits(reference, index_images(model, SPEC, local_first, shard_size=SHARD, progress=False, engine="ray"))
    ray_first = tmp_path / "ray-first"
    partial = index_images(model, SPEC, ray_first, shard_size=SHARD, progress=False, engine="ray",
                           stop_after_shards=2)
    assert not partial.complete and 2 <= len(partial.shards) < 12
    same_bits(reference, index_images(model, SPEC, ray_first, shard_size=SHARD, progress=False))


def test_workers_that_cannot_see_the_run_folder_are_detected_before_any_work(cluster, model, tmp_path,
                                                                             monkeypatch):
    class Elsewhere(store.RunLock):  # the workers find a folder at this path, but not the driver's
        def __enter__(self):
            super().__enter__()
            self.token, self.real = "another-folder", self.token
            return self

        def __exit__(self, *exc):
            self.token = self.real
            super().__exit__(*exc)

    monkeypatch.setattr(build, "RunLock", Elsewhere)
    out = tmp_path / "run"
    with pytest.raises(ClipInterpretError, match=f"cannot see the run folder {out}.*shares"):
        index_images(model, SPEC, out, shard_size=SHARD, progress=False, engine="ray", workers=2)
    assert not list((out / "shards").iterdir()) and not (out / "writer.lock").exists()


def test_more_workers_than_the_cluster_fits_are_refused(cluster, model, tmp_path):
    with pytest.raises(ClipInterpretError, match="2 CPUs and 0 GPUs: 3 worker.*at most 2"):
        index_images(model, SPEC, tmp_path / "run", engine="ray", workers=3)
    with pytest.raises(ClipInterpretError, match="at most 0"):
        index_images(model, SPEC, tmp_path / "run", engine=Engine("ray", gpus_per_worker=1))


def test_textspan_ablation_and_faithfulness_on_ray_equal_the_local_figures(cluster, model, reference):
    pool = load_pool("toy")
    texts = text_embeddings(model, pool)
    rank = reference.dim  # the full rank: a cut inside the noise floor makes the top-r subspace arbitrary
    on_ray = textspan_run(reference, model, pool, m=4, rank=rank, check_ms=[1, 3], progress=False, engine="ray")
    local = textspan_run(reference, model, pool, m=4, rank=rank, check_ms=[1, 3], progress=False)
    for name, head in on_ray["heads"].items():
        layer, h = map(int, name[1:].split(".H"))
        in_memory = textspan(reference.heads(layer, h), texts, pool.texts, m=4, rank=rank)
        assert head["indices"] == in_memory.indices == local["heads"][name]["indices"]
        assert np.allclose(head["variance"], in_memory.variance, rtol=1e-6)
        assert np.allclose(head["explained"], in_memory.explained, rtol=1e-6)
    assert on_ray["reconstruction"] == local["reconstruction"]
    assert ablation_study(reference, model, engine="ray") == ablation_study(reference, model)
    drops, local_drops = head_ablation_drops(reference, model, engine="ray"), head_ablation_drops(reference, model)
    assert drops["accuracy_drops"] == local_drops["accuracy_drops"]
    for head, row in drops["drops"].items():
        assert np.allclose(list(row.values()), list(local_drops["drops"][head].values()), rtol=1e-6, atol=1e-9)


def test_cli_index_and_the_study_on_ray(cluster, tmp_path, capsys):
    from tests.helpers import write_tars

    write_tars(tmp_path)
    out = tmp_path / "run"
    assert main(["index", "--model", TINY, "--images", f"tars:{tmp_path}/shard-{{0..2}}.tar", "--out", str(out),
                 "--engine", "ray", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "indexed 11 images" in printed and "on Ray" in printed and "sample0005.jpg" in printed
    assert main(["analyze", "--model", TINY, "--images", f"tars:{tmp_path}/shard-{{0..2}}.tar", "--out", str(out),
                 "--pool", "toy", "--engine", "ray", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "index: up to date" in printed and "ablate: done" in printed and "faithfulness: done" in printed
    assert json.loads((out / "textspan-toy.json").read_text())["run"]["n_images"] == 11
    assert json.loads((out / "ablation.json").read_text())["tasks"] == ["cls", "json.color"]
