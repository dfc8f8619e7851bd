"""The input pipeline: worker processes, decoders, hostile files, dead and stuck workers, resume."""

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from clip_interpret import decompose, load_model
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images, open_run, open_source
from clip_interpret.runstore.sources import ImageSource
from clip_interpret import pipeline
from clip_interpret.pipeline import ListSource, pixel_batches, reader_start_method, resolve_workers
from clip_interpret.toyworld import generate

TINY = "open_clip:test-vit-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


def photo(seed: int, size=(150, 110)) -> Image.Image:
    """A photo-like image: smooth shapes plus texture (JPEG behaves as on real photos)."""
    rng = np.random.default_rng(seed)
    base = generate(seed, seed=7).image.resize(size, Image.BICUBIC)
    noisy = np.asarray(base).astype(np.int16) + rng.integers(-15, 16, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """12 JPEG photos, a broken file in the middle (name order), a PNG and a grey JPEG."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(12):
        photo(i).save(root / f"{i:02d}.jpg", quality=90)
    (root / "05b-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photo(20).save(root / "07b.png")
    photo(21).convert("L").save(root / "08b-grey.jpg")
    return root


def crops(source, preprocess, **kw):
    batches = [list(range(s, min(len(source), s + 5))) for s in range(0, len(source), 5)]
    out = list(pixel_batches(source, preprocess, batches, **kw))
    indices = [i for b in out for i in b.indices]
    failures = [f for b in out for f in b.failures]
    return indices, torch.cat([b.pixels for b in out]), failures


def grey_levels(a: torch.Tensor, b: torch.Tensor, preprocess) -> torch.Tensor:
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (a - b).abs() * std * 255


# ------------------------------------------------------------------ decoders
def test_any_number_of_workers_gives_the_same_pixels_and_failures(model, jpeg_folder):
    source = open_source(str(jpeg_folder))
    reference = crops(source, model.preprocess, workers=0, decode="pil")
    for workers in (1, 2):
        indices, pixels, failures = crops(source, model.preprocess, workers=workers, decode="pil")
        assert indices == reference[0] and torch.equal(pixels, reference[1]) and failures == reference[2]
    broken = source.names.index(str(jpeg_folder / "05b-broken.jpg"))
    assert [f["index"] for f in reference[2]] == [broken] and broken not in reference[0]
    assert len(reference[0]) == len(source) - 1


def test_pil_pipeline_equals_the_reference_preprocessing(model, jpeg_folder):
    source = open_source(str(jpeg_folder))
    indices, pixels, _ = crops(source, model.preprocess, workers=2, decode="pil")
    expected = torch.stack([model.preprocess(Image.open(source.names[i]).convert("RGB")) for i in indices])
    assert torch.equal(pixels, expected)


@pytest.mark.parametrize("decoder", ["torch", "device"])
def test_torchvision_decoders_agree_with_pillow_within_two_grey_levels(model, jpeg_folder, decoder):
    source = open_source(str(jpeg_folder))
    ref_indices, ref, ref_failures = crops(source, model.preprocess, workers=0, decode="pil")
    indices, pixels, failures = crops(source, model.preprocess, workers=2, decode=decoder)
    assert indices == ref_indices and failures == ref_failures  # the broken file: refused the same way
    diff = grey_levels(pixels, ref, model.preprocess)
    assert diff.max() <= 2.0 and diff.mean() < 0.05
    png = indices.index(source.names.index(str(jpeg_folder / "07b.png")))
    assert torch.equal(pixels[png], ref[png])  # other formats take the Pillow path


def test_torch_decoder_applies_exif_orientation_and_refuses_truncated_files(model, tmp_path):
    image = photo(3, size=(120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    data = io.BytesIO()
    image.save(data, "JPEG", quality=95)
    (tmp_path / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    source = ListSource([str(tmp_path / "rotated.jpg"), str(tmp_path / "truncated.jpg")])
    _, ref, _ = crops(source, model.preprocess, workers=0, decode="pil", )
    indices, pixels, failures = crops(ListSource(source.items), model.preprocess, workers=0, decode="torch")
    assert indices == [0] and grey_levels(pixels, ref, model.preprocess).max() <= 2.0
    assert failures[0]["index"] == 1 and "truncated" in failures[0]["reason"]


@pytest.mark.parametrize("decoder", ["device", "torch"])
def test_torchvision_paths_turn_jpegs_by_their_exif_tag_even_when_the_decoder_ignores_it(model, tmp_path,
                                                                                         monkeypatch, decoder):
    """torchvision's CUDA decoder has no EXIF option; on the CPU, make its decoder ignore the option the
    same way: the orientation must come from the header (all 8), and the crops match Pillow's."""
    import torchvision.io

    real = torchvision.io.decode_jpeg

    def like_cuda(data, *args, apply_exif_orientation=False, **kwargs):
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", like_cuda)
    image = photo(6, size=(120, 80))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(tmp_path / f"o{orientation}.jpg", quality=95, exif=exif)
    source = ListSource([str(tmp_path / f"o{o}.jpg") for o in range(1, 9)])
    ref_indices, ref, _ = crops(source, model.preprocess, workers=0, decode="pil")
    indices, pixels, failures = crops(source, model.preprocess, workers=0, decode=decoder)
    assert indices == ref_indices == list(range(8)) and not failures
    diff = grey_levels(pixels, ref, model.preprocess)
    assert diff.amax(dim=(1, 2, 3)).max() <= 2.0
    assert all(grey_levels(ref[k:k + 1], ref[:1], model.preprocess).mean() > 5 for k in range(1, 8))  # all differ


def test_draft_mode_decodes_big_jpegs_smaller_within_a_documented_error(model, tmp_path):
    big = photo(4, size=(640, 480))
    big.save(tmp_path / "big.jpg", quality=92)
    photo(5, size=(40, 40)).save(tmp_path / "small.jpg", quality=92)
    source = ListSource([str(tmp_path / "big.jpg"), str(tmp_path / "small.jpg")])
    _, exact, _ = crops(source, model.preprocess, workers=0, decode="pil")
    _, drafted, _ = crops(source, model.preprocess, workers=0, decode="pil", draft=True)
    diff = grey_levels(drafted, exact, model.preprocess)
    assert 0 < diff[0].mean() < 3.0  # a different, close decode of the big photo
    assert torch.equal(drafted[1], exact[1])  # too small to draft: unchanged
    opened = Image.open(tmp_path / "big.jpg")
    opened.draft(None, (32, 32))
    assert min(opened.size) >= 32 and opened.size[0] < 640  # what draft mode does to this file


def test_workers_beyond_the_cores_are_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="more than the .* CPU cores"):
        assert resolve_workers(10_000) < 10_000
    assert resolve_workers(None, n_items=3) == 0 and resolve_workers(None) >= 1
    with pytest.raises(ClipInterpretError, match="0 or more"):
        resolve_workers(-1)


def test_unknown_decoder_is_refused(model):
    with pytest.raises(ClipInterpretError, match="unknown decoder"):
        next(pixel_batches(ListSource([photo(1)]), model.preprocess, [[0]], decode="gpu-please"))


# ------------------------------------------------------------ how the readers start
def test_readers_are_forked_only_while_cuda_is_not_initialised(monkeypatch):
    assert reader_start_method(cuda_initialised=False) == "fork"
    assert reader_start_method(cuda_initialised=True) == "forkserver"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert reader_start_method() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a model on a GPU
    assert reader_start_method() == "forkserver"


def _record_pools(monkeypatch) -> list:
    """The start methods of the pools made from now on (as used, after any fall-back)."""
    pools = []

    class Recorded(pipeline.DecodePool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(pipeline, "DecodePool", Recorded)
    return pools


def test_readers_started_by_a_fork_server_give_the_same_run_as_no_workers(model, jpeg_folder, monkeypatch):
    """As on a GPU (the workers read, the model runs here), after the model made CUDA initialised."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    pools = _record_pools(monkeypatch)
    source = open_source(str(jpeg_folder))
    for decoder in ("torch", "pil"):
        reference = crops(source, model.preprocess, workers=0, decode=decoder)
        indices, pixels, failures = crops(source, model.preprocess, workers=2, decode=decoder)
        assert indices == reference[0] and torch.equal(pixels, reference[1]) and failures == reference[2]
        assert len(failures) == 1
    assert [p.method for p in pools] == ["forkserver", "forkserver"] and not any(p.restarts for p in pools)


def test_a_file_that_kills_its_fork_server_worker_is_skipped_and_named(model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    pools = _record_pools(monkeypatch)
    source = _Hostile(24, item=9, behaviour="crash")
    batches = [list(range(s, s + 4)) for s in range(0, 24, 4)]
    out = list(pixel_batches(source, model.preprocess, batches, workers=2, timeout=10.0))
    assert [p.method for p in pools] == ["forkserver"]
    assert [i for b in out for i in b.indices] == [i for i in range(24) if i != 9]
    failures = [f for b in out for f in b.failures]
    assert [f["source"] for f in failures] == ["item-9"] and "died twice" in failures[0]["reason"]
    clean = torch.cat([b.pixels for b in pixel_batches(_Hostile(24, item=-1, behaviour="none"), model.preprocess,
                                                        batches, workers=0)])
    assert torch.equal(torch.cat([b.pixels for b in out]), clean[[i for i in range(24) if i != 9]])


def _rebuilt_here_only(items, pid):
    if os.getpid() != pid:
        raise RuntimeError("this source cannot be rebuilt in another process (a class from a notebook)")
    return _Unportable(items)


class _Unportable(ListSource):
    """A source that pickles, but that a new process cannot unpickle."""

    def __reduce__(self):
        return _rebuilt_here_only, (self.items, os.getpid())


class _Unpicklable(ListSource):
    def __init__(self, items):
        super().__init__(items)
        self.hook = lambda: None  # lambdas do not pickle


@pytest.mark.parametrize("kind", [_Unportable, _Unpicklable])
def test_a_source_a_new_process_cannot_take_falls_back_to_forked_readers(model, monkeypatch, kind):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    pools = _record_pools(monkeypatch)
    images = [generate(i, seed=2).image for i in range(6)]
    reference = crops(ListSource(images), model.preprocess, workers=0, decode="pil")
    with pytest.warns(RuntimeWarning, match="forking them instead"):
        indices, pixels, failures = crops(kind(images), model.preprocess, workers=2, decode="pil")
    assert pools[0].method == "fork" and pools[0].restarts == 0
    assert indices == reference[0] and torch.equal(pixels, reference[1]) and failures == reference[2] == []


def test_fork_server_readers_stay_while_idle_and_exit_when_the_main_process_dies():
    code = ("import time, numpy as np\n"
            "from clip_interpret.images import Preprocess\n"
            "from clip_interpret.pipeline import DecodePool, ListSource, _Reader\n"
            "reader = _Reader(ListSource([np.zeros((8, 8, 3), np.uint8)] * 4), Preprocess((8, 8)), 'pil', False)\n"
            "pool = DecodePool(reader, 1, start_method='forkserver')\n"
            "list(pool.map([[0, 1]]))\n"
            "time.sleep(6.5)\n"  # longer than a worker's 5 s wait for a task: it checks on its parent
            "list(pool.map([[2, 3]]))\n"
            "print(pool.restarts, pool.workers[0].process.pid, flush=True)\n"
            "time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        restarts, worker = map(int, proc.stdout.readline().split())
    finally:
        proc.kill()
        proc.wait()
    assert restarts == 0  # the idle worker found its parent alive (its OS parent is the fork server)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _running(worker):
        time.sleep(0.2)
    assert not _running(worker)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return "State:\tZ" not in handle.read()
    except OSError:
        return False


# ------------------------------------------------------------ index with workers
def test_index_with_workers_is_bit_identical_and_names_stay_aligned(model, jpeg_folder, tmp_path):
    runs = [index_images(model, str(jpeg_folder), tmp_path / f"w{w}", workers=w, decode="torch", shard_size=4,
                         batch_size=3, progress=False) for w in (0, 2)]
    a, b = runs
    assert a.names == b.names and a.failures == b.failures and len(a.failures) == 1
    assert np.array_equal(a.embeddings(), b.embeddings()) and np.array_equal(a.piece("heads"), b.piece("heads"))
    # every row is the image its name says (the broken file sits in the middle of the list)
    d = decompose(model, a.names, decode="torch")
    assert np.allclose(a.embeddings(), d.embedding.numpy(), atol=1e-6)
    assert {s.decoder for s in a.shards} == {"torch"}


class _Hostile(ImageSource):
    """Toy images, except one item whose reading kills or blocks the reading process."""

    def __init__(self, n, item, behaviour, delay=0.0):
        super().__init__(f"hostile:{n}", [f"item-{i}" for i in range(n)], {}, kind="test")
        self.item, self.behaviour, self.delay = item, behaviour, delay

    def load(self, i):
        if i == self.item and multiprocessing.parent_process() is not None:  # only ever in a worker
            if self.behaviour == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        time.sleep(self.delay)
        return generate(i, seed=4).image


@pytest.mark.parametrize("behaviour", ["crash", "hang"])
def test_a_file_that_kills_or_blocks_its_worker_is_skipped_and_named(model, tmp_path, behaviour):
    source = _Hostile(40, item=17, behaviour=behaviour)
    start = time.monotonic()
    run = index_images(model, source, tmp_path / "run", workers=2, shard_size=16, batch_size=4, progress=False,
                       timeout=3.0)
    assert time.monotonic() - start < 60
    assert run.complete and len(run) == 39 and "item-17" not in run.names
    assert [f["source"] for f in run.failures] == ["item-17"]
    assert ("died twice" if behaviour == "crash" else "longer than 3 s") in run.failures[0]["reason"]
    clean = index_images(model, _Hostile(40, item=-1, behaviour=behaviour), tmp_path / "clean", workers=0,
                         shard_size=16, batch_size=4, progress=False)
    keep = [i for i, name in enumerate(clean.names) if name != "item-17"]
    assert run.names == [clean.names[i] for i in keep]
    assert np.allclose(run.embeddings(), clean.embeddings()[keep], atol=1e-6)  # one batch is one image short


def test_a_worker_killed_from_outside_is_replaced_and_no_image_is_lost(model, tmp_path):
    source = _Hostile(60, item=-1, behaviour="none", delay=0.02)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("run", index_images(
        model, source, tmp_path / "run", workers=2, shard_size=16, batch_size=4, progress=False)))
    thread.start()
    deadline = time.monotonic() + 30
    victims = []
    while not victims and time.monotonic() < deadline:
        victims = [p for p in multiprocessing.active_children() if p.name.startswith("clip-interpret-reader")]
        time.sleep(0.05)
    assert victims, "no reading worker started"
    time.sleep(0.3)
    os.kill(victims[0].pid, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    run = result["run"]
    assert run.complete and len(run) == 60 and len(set(run.names)) == 60 and not run.failures


def test_resume_after_the_main_process_is_killed_with_workers(model, tmp_path):
    out = tmp_path / "killed"
    code = ("from clip_interpret import load_model; from clip_interpret.runstore import index_images;"
            f"index_images(load_model('{TINY}'), 'toyworld:1200:3', r'{out}', shard_size=100, workers=2, "
            "progress=False)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "shards").glob("0000[2-9].json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not open_run(out).complete
    resumed = index_images(model, "toyworld:1200:3", out, shard_size=100, workers=2, progress=False)
    reference = index_images(model, "toyworld:1200:3", tmp_path / "ref", shard_size=100, workers=0, progress=False)
    assert resumed.complete and resumed.names == reference.names
    assert np.array_equal(resumed.embeddings(), reference.embeddings())
    # the killed run's workers notice their parent is gone and exit
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _orphans(proc.pid):
        time.sleep(0.2)
    assert not _orphans(proc.pid)


def _orphans(parent_pid: int) -> list[str]:
    """Reading workers of the given (dead) parent that are still running."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/status") as handle:
                status = handle.read()
        except OSError:
            continue
        if b"toyworld:1200:3" in cmdline and "State:\tZ" not in status and int(entry) != parent_pid:
            found.append(entry)
    return found


def test_decompose_of_many_files_uses_workers_and_keeps_failure_indices(model, jpeg_folder):
    files = sorted(str(p) for p in jpeg_folder.iterdir())
    many = files * 6  # 90 items: workers by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = decompose(model, many, on_error="skip")
        one_by_one = decompose(model, many, on_error="skip", workers=0)
    broken = [i for i, f in enumerate(many) if f.endswith("broken.jpg")]
    assert [f.index for f in d.failures] == broken
    assert d.sources == [f for f in many if not f.endswith("broken.jpg")]
    assert torch.equal(d.embedding, one_by_one.embedding)


class _Broken:
    def __call__(self, pixels):
        raise ValueError("a bug in the computation")


def test_an_error_in_the_workers_computation_is_raised_not_blamed_on_files(model):
    source = ListSource([generate(i, seed=1).image for i in range(8)])
    stream = pixel_batches(source, model.preprocess, [[0, 1, 2, 3], [4, 5, 6, 7]], workers=2, compute=_Broken())
    with pytest.raises(RuntimeError, match="ValueError: a bug in the computation"):
        list(stream)
