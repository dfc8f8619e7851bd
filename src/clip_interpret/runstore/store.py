"""The run directory: a manifest plus fixed-size shards of decomposition pieces.

    RUN/manifest.json          model spec + weight fingerprint, preprocessing, source
                               (spec, kind, size, hash), layers, dtype, shapes, layout
    RUN/images.json            the source's item names and labels
    RUN/shards/00000.pieces.npy  [rows, P, D]  pieces (fp16 or fp32), layout in the manifest
    RUN/shards/00000.emb.npy     [rows, D]     unit image embeddings (fp32)
    RUN/shards/00000.json        which source items the rows are, and the failures;
                                 written last: a shard without it is not done
    RUN/writer.lock              while an index call writes the run: who (host, pid, since when)

Every file is written to a temporary name and renamed into place, so an
interrupted run (even kill -9) never leaves a half-written shard that looks
complete; the next run redoes only unfinished shards. Readers memory-map the
shards and check the run against the model they are given.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..conventions import DEFAULT_CONVENTION
from ..errors import ClipInterpretError

MANIFEST_VERSION = 1


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary file, fsync, then rename over ``path``.

    Disk-full and other OS errors remove the temporary file and raise a clear error.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if err.errno == errno.ENOSPC:
            raise ClipInterpretError(f"disk full while writing {path}; nothing partial was kept. Free some space "
                                     "and run the same command again to resume") from None
        raise ClipInterpretError(f"cannot write {path}: {err.strerror or err}") from None


def ensure_writable_dir(folder: Path, what: str = "output folder") -> None:
    """Make ``folder`` (and its parents) and check a file can be written there: one clear error up front
    rather than a traceback after the work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ClipInterpretError(f"cannot write to {what} {folder}: {err.strerror or err}") from None


def atomic_write_json(path: Path, data) -> None:
    payload = json.dumps(data, indent=1).encode()
    atomic_write_bytes(path, lambda handle: handle.write(payload))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, lambda handle: np.save(handle, array, allow_pickle=False))


LOCK_NAME = "writer.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """One indexing driver per run folder at a time. ``RUN/writer.lock`` names the holder (host,
    pid, start time) and carries a random token (Ray workers check it to prove they see this very
    folder). A second driver refuses, naming the first; a lock left by a process of this host that
    no longer exists (kill -9) is taken over. A lock from another host is never guessed stale."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": self.token}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: not ours to take

    def __enter__(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int) \
                        and not pid_alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # its process is gone (killed): stale
                    continue
                raise ClipInterpretError(
                    f"run folder {self.path.parent} is being written by another index process (pid "
                    f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}); "
                    f"wait for it to finish, or if it is gone, delete {self.path} and run again") from None
            except OSError as err:
                raise ClipInterpretError(f"cannot write to run folder {self.path.parent}: {err.strerror or err}") \
                    from None
            with os.fdopen(fd, "w") as handle:
                json.dump(self.info, handle)
                handle.flush()
                os.fsync(handle.fileno())
            return self
        raise ClipInterpretError(f"cannot take {self.path}: other processes keep taking it; run again")

    def __exit__(self, *exc) -> None:
        if (self._holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def piece_layout(layers: list[int], other_layers: list[int], n_layers: int, n_heads: int,
                 pooled: bool = False) -> dict[str, list[int]]:
    """Row ranges [start, stop) of each named piece inside a shard's P axis. ``pooled``: the tower
    pools by attention (SigLIP), whose pooling MLP is one more piece (``pool_mlp``)."""
    sizes = [("heads", len(layers) * n_heads), ("attn_bias", len(layers)), ("other_attn", len(other_layers)),
             ("mlps", n_layers), ("cls_embed", 1)] + [("pool_mlp", 1)] * pooled + [("constant", 1)]
    layout, start = {}, 0
    for name, size in sizes:
        layout[name] = [start, start + size]
        start += size
    return layout


@dataclass
class ShardInfo:
    shard: int
    start: int  # first source item
    stop: int
    kept: list[int]  # source indices of the rows
    failures: list[dict]
    decoder: str = ""  # how its images were decoded (pil, torch or device; "" before it was recorded)


class ManifestFacts:
    """Typed reads of a run manifest (``self.manifest``, checked by ``read_manifest``): what the
    rest of the package asks of a run, so that nothing outside the run store indexes the raw JSON."""

    manifest: dict

    @property
    def layers(self) -> list[int]:
        """The analysed layers (their heads are stored one by one)."""
        return list(self.manifest["layers"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def other_layers(self) -> list[int]:
        """The layers whose attention is stored as one piece per layer."""
        return list(self.manifest["other_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.manifest["n_heads"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def layout(self) -> dict[str, list[int]]:
        return self.manifest["layout"]

    @property
    def convention(self) -> str:
        """How the pieces were split (``centred`` or ``published``; see ``clip_interpret.decompose``)."""
        return self.manifest.get("convention", DEFAULT_CONVENTION)

    @property
    def precision(self) -> str:
        """The compute precision the run was made in."""
        return self.manifest.get("precision", "fp32")

    @property
    def storage(self) -> str:
        """The dtype its shards are stored in."""
        return self.manifest["dtype"]

    @property
    def model_spec(self) -> str:
        return self.manifest["model"]["spec"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model's weights."""
        return self.manifest["model"]["fingerprint"]

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["model"].get("random_weights"))

    @property
    def source_spec(self) -> str:
        return self.manifest["source"]["spec"]

    @property
    def source_kind(self) -> str:
        return self.manifest["source"]["kind"]

    @property
    def source_hash(self) -> str:
        return self.manifest["source"]["hash"]

    def stamp(self) -> dict:
        """What a result made from this run is stamped with: the weights and the image list."""
        return {"fingerprint": self.fingerprint, "source_hash": self.source_hash}

    def vit_config(self):
        """The image tower's configuration (``ViTConfig``), without loading the model."""
        from ..models.hooked_vit import ViTConfig

        cfg = dict(self.manifest["model"]["vit"])
        cfg["image_size"], cfg["patch_size"] = tuple(cfg["image_size"]), tuple(cfg["patch_size"])
        return ViTConfig(**cfg)


class RunManifest(ManifestFacts):
    """A run's checked manifest, read without opening its shards (``read_run_manifest``)."""

    def __init__(self, manifest: dict):
        self.manifest = manifest


class Run(ManifestFacts):
    """Read access to a finished (or partly finished) run directory.

    Every file is checked as it is opened: a missing, empty, truncated or malformed file
    (manifest, images.json, a shard record or array) is a ``ClipInterpretError`` naming
    the file, what is wrong with it and what to do.
    """

    def __init__(self, path: str | Path, check_files: bool = True):
        """``check_files=False`` trusts the files a driver has just checked (a Ray task opening
        the run): ``images.json`` is then read on first use and shard arrays when mapped."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        n_items = self.manifest["source"].get("n") if not check_files else None
        if n_items is None:
            n_items = len(self._images["names"])
        self.shards: list[ShardInfo] = []
        shard_size = self.manifest.get("shard_size")
        for info_path in sorted((self.path / "shards").glob("[0-9]*.json")):
            self.shards.append(read_shard_info(info_path, n_items, shard_size, self.manifest))
        self.shards.sort(key=lambda s: s.shard)
        if self.complete:
            self._check_all_shards(n_items)
        self.source_indices = np.asarray([i for s in self.shards for i in s.kept], dtype=np.int64)
        self.failures = [f for s in self.shards for f in s.failures]
        if check_files:
            for shard in self.shards:
                for kind in ("pieces", "emb"):
                    self._check_array(shard, kind)
            self._check_recorded_sizes()

    def _check_all_shards(self, n_items: int) -> None:
        """A complete run's shard records cover its source's items, each once: a missing shard
        (its files deleted) would shift every later row number and go unnoticed."""
        missing, covered = [], 0
        for shard in self.shards:
            if shard.start > covered:
                missing.append((covered, shard.start))
            covered = max(covered, shard.stop)
        if covered < n_items:
            missing.append((covered, n_items))
        if not missing:
            return
        size = self.manifest.get("shard_size")
        if isinstance(size, int) and size > 0:
            numbers = [n for start, stop in missing for n in range(start // size, (stop + size - 1) // size)]
            what = (f"shard{'s' * (len(numbers) > 1)} {', '.join(f'{n:05d}' for n in numbers[:10])}"
                    f"{' ...' if len(numbers) > 10 else ''} (of {(n_items + size - 1) // size})")
        else:
            what = "shards"
        lost = sum(stop - start for start, stop in missing)
        spans = ", ".join(f"{start}-{stop - 1}" for start, stop in missing[:5])
        raise ClipInterpretError(f"run {self.path} is missing {what}: source items {spans} ({lost} of {n_items}) "
                                 f"have no shard, although its manifest says the run is complete; "
                                 f"{repair_hint(self.path, self.manifest)}")

    def _check_recorded_sizes(self) -> None:
        for shard in self.shards:
            check_recorded_shard(self.path, self.manifest, shard)

    @functools.cached_property
    def _images(self) -> dict:
        """The source's item names and labels, checked (a pass over the shards needs neither)."""
        images = read_json(self.path / "images.json", REINDEX)
        problem = _images_problem(images, self.manifest)
        if problem:
            raise ClipInterpretError(f"{self.path / 'images.json'} {problem}; {REINDEX}")
        return images

    @functools.cached_property
    def names(self) -> list[str]:
        """The item name of each row."""
        names = self._images["names"]
        return [names[i] for i in self.source_indices]

    @functools.cached_property
    def labels(self) -> dict[str, list[str]]:
        """Label set -> the label of each row."""
        return {k: [v[i] for i in self.source_indices] for k, v in self._images.get("labels", {}).items()}

    def _array_path(self, shard: int, kind: str) -> Path:
        return shard_array_path(self.path, shard, kind)

    def _check_array(self, shard: ShardInfo, kind: str) -> None:
        check_shard_array(self.path, self.manifest, shard, kind)

    def _map(self, shard: int, kind: str) -> np.ndarray:
        """A shard's array as a memory map (mapped on demand: a run of many shards holds no maps)."""
        try:
            return np.load(self._array_path(shard, kind), mmap_mode="r")
        except (OSError, ValueError) as err:
            raise _unreadable(self.path, self.manifest, shard, kind, err) from None

    # --------------------------------------------------------------- facts
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return len(self.source_indices)

    def head_names(self) -> list[str]:
        return [f"L{layer}.H{h}" for layer in self.layers for h in range(self.n_heads)]

    # ------------------------------------------------------------- checks
    def check_model(self, model) -> None:
        """Refuse a model whose weights or preprocessing differ from the run's."""
        ours = self.manifest["model"]
        if model.fingerprint() != ours["fingerprint"]:
            raise ClipInterpretError(
                f"run {self.path} was made with other weights: it records {ours['spec']!r} (fingerprint "
                f"{ours['fingerprint']}), the model given is {model.spec!r} (fingerprint {model.fingerprint()}). "
                "Use the run's model, or index the images again with this one")
        if model.preprocess.to_dict() != _preprocess_from_json(self.manifest["preprocess"]):
            raise ClipInterpretError(f"run {self.path} was made with other preprocessing "
                                     f"({self.manifest['preprocess']}); index the images again")

    # ------------------------------------------------------------ reading
    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Pieces rows [N, stop-start, D] as float32, across shards."""
        parts = [pieces[:, start:stop].astype(np.float32) for _, pieces in self.iter_pieces()]
        return np.concatenate(parts) if parts else np.zeros((0, stop - start, self.dim), np.float32)

    def piece(self, name: str) -> np.ndarray:
        """A named piece [N, k, D] (``heads`` is [N, L*H, D])."""
        if name not in self.layout:
            raise ClipInterpretError(f"unknown piece {name!r}; the run has {', '.join(self.layout)}")
        return self._rows(*self.layout[name])

    def head_index(self, layer: int, head: int) -> int:
        if layer not in self.layers:
            raise ClipInterpretError(f"layer {layer} is not among the run's analysed layers {self.layers}")
        if not 0 <= head < self.n_heads:
            raise ClipInterpretError(f"head {head} does not exist: layers have heads 0-{self.n_heads - 1}")
        return self.layers.index(layer) * self.n_heads + head

    def heads(self, layer: int, head: int) -> np.ndarray:
        """One head's contributions over all images [N, D] (float32)."""
        row = self.layout["heads"][0] + self.head_index(layer, head)
        return self._rows(row, row + 1)[:, 0]

    def all_heads(self) -> np.ndarray:
        """Every analysed head [N, L, H, D] (float32; memory N*L*H*D*4 bytes)."""
        n = len(self)
        return self.piece("heads").reshape(n, len(self.layers), self.n_heads, self.dim)

    def embeddings(self) -> np.ndarray:
        """Unit image embeddings [N, D] (float32)."""
        parts = [self._map(s.shard, "emb").astype(np.float32) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def iter_pieces(self, positions=None):
        """(first row, pieces [S, P, D] memory map in the storage dtype) for each shard, in order
        (``positions``: only the shards at these indices into ``shards``). Each shard is mapped
        afresh and unmapped when the caller lets it go: a pass over a large run does not keep
        every page it read mapped into the process (its resident memory stays flat)."""
        starts = np.cumsum([0] + [len(s.kept) for s in self.shards])
        for k in range(len(self.shards)) if positions is None else positions:
            yield int(starts[k]), self._map(self.shards[k].shard, "pieces")

    def iter_rows(self, device="cpu", positions=None):
        """(first row, pieces [S, P, D] as a float32 tensor on ``device``) per shard: ``iter_pieces``
        for torch passes (one shard in memory at a time)."""
        import torch

        for start, pieces in self.iter_pieces(positions):
            # a copy: the map is read-only, which torch warns about (and .float() copies fp16 anyway)
            yield start, torch.from_numpy(np.array(pieces)).to(device).float()

    def layer_parts(self, rows):
        """Shard rows [S, P, D] (a tensor) -> (attention per layer [S, L, D], MLP per layer [S, L, D],
        analysed heads [S, La, H, D], the rest [S, D]: token embedding + pooling MLP (attention-pooled
        towers) + constant)."""
        layout = self.layout
        s, _, d = rows.shape
        n_layers = self.n_layers
        heads = rows[:, slice(*layout["heads"])].reshape(s, len(self.layers), self.n_heads, d)
        attn = rows.new_zeros((s, n_layers, d))
        attn[:, self.layers] = heads.sum(dim=2) + rows[:, slice(*layout["attn_bias"])]
        other = self.other_layers
        if other:
            attn[:, other] = rows[:, slice(*layout["other_attn"])]
        mlps = rows[:, slice(*layout["mlps"])]
        rest = sum(rows[:, slice(*layout[name])].sum(dim=1) for name in ("cls_embed", "pool_mlp", "constant")
                   if name in layout)
        return attn, mlps, heads, rest

    def sum_of_pieces(self) -> np.ndarray:
        """The sum of every stored piece [N, D]; equals ``embeddings()`` up to the storage dtype."""
        parts = [np.asarray(pieces, dtype=np.float32).sum(axis=1) for _, pieces in self.iter_pieces()]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


REINDEX = "index the images again into a new folder (`clip-interpret index ... --out NEW_FOLDER`)"


def read_json(path: Path, fix):
    """A run file's JSON; a missing, unreadable, empty or truncated file is an error naming it, ending with ``fix``
    (a string, or a function that makes it: called only when there is an error)."""
    if callable(fix):
        try:
            return read_json(path, "")
        except ClipInterpretError as err:
            raise ClipInterpretError(f"{err}{fix()}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipInterpretError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ClipInterpretError(f"{path} cannot be read ({getattr(err, 'strerror', None) or err}); {fix}") from None
    if not text.strip():
        raise ClipInterpretError(f"{path} is empty; {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ClipInterpretError(f"{path} is not valid JSON (truncated or corrupt: {err.msg} at line {err.lineno}); "
                                 f"{fix}") from None


def _int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) for i in value)


def _count(value) -> bool:
    return isinstance(value, int) and value > 0


_MANIFEST_FIELDS = {
    "model": lambda v: isinstance(v, dict) and isinstance(v.get("spec"), str) and isinstance(v.get("fingerprint"), str),
    "preprocess": lambda v: isinstance(v, dict),
    "source": lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str),
    "layers": _int_list, "other_layers": _int_list, "n_layers": _count, "n_heads": _count, "dim": _count,
    "dtype": lambda v: v in ("fp16", "fp32"),
    "layout": lambda v: isinstance(v, dict),
}


def manifest_pooled(manifest: dict) -> bool:
    """Whether a run's tower pools by attention (its manifest records the HookedViT config)."""
    vit = manifest["model"].get("vit")
    return isinstance(vit, dict) and vit.get("pool") == "map"


def read_run_manifest(run_dir: str | Path) -> RunManifest:
    """A run's checked manifest as typed facts (``ManifestFacts``)."""
    return RunManifest(read_manifest(run_dir))


def read_manifest(run_dir: str | Path) -> dict:
    """A run's manifest, checked: every field that readers use is there and consistent."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not path.is_file() and not (run_dir / "images.json").is_file():
        raise ClipInterpretError(f"{run_dir} is not a run directory (no manifest.json); create one with "
                                 "`clip-interpret index`")
    manifest = read_json(path, REINDEX)
    if not isinstance(manifest, dict) or "version" not in manifest:
        raise ClipInterpretError(f"{path} is not a run manifest (a JSON object with a version); {REINDEX}")
    if manifest["version"] != MANIFEST_VERSION:
        raise ClipInterpretError(f"{run_dir} was written by another version of clip-interpret "
                                 f"(manifest version {manifest['version']}); index it again")
    bad = [key for key, valid in _MANIFEST_FIELDS.items() if not valid(manifest.get(key))]
    if bad:
        raise ClipInterpretError(f"{path} lacks or has malformed fields: {', '.join(bad)}; {REINDEX}")
    layout = piece_layout(manifest["layers"], manifest["other_layers"], manifest["n_layers"], manifest["n_heads"],
                          pooled=manifest_pooled(manifest))
    if manifest["layout"] != layout:
        raise ClipInterpretError(f"{path} has a piece layout that does not match its layers and heads; {REINDEX}")
    return manifest


def _images_problem(images, manifest: dict) -> str | None:
    """What is wrong with a run's images.json, if anything."""
    if not isinstance(images, dict) or not isinstance(images.get("names"), list) \
            or not all(isinstance(n, str) for n in images["names"]):
        return "is not an image list (a JSON object with a list of names)"
    n = len(images["names"])
    if manifest["source"].get("n", n) != n:
        return f"lists {n} images, the manifest's source has {manifest['source']['n']}"
    labels = images.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, list) and len(v) == n for v in labels.values()):
        return f"has labels that are not one list of {n} values per label set"
    return None


def index_command(run_dir: Path, manifest: dict) -> str:
    """The ``clip-interpret index`` command that made (and so resumes or repairs) a run, from its manifest."""
    import shlex

    from ..decompose import resolve_layers

    words = ["clip-interpret", "index", "--model", manifest["model"]["spec"], "--images",
             str(manifest["source"].get("spec", "?")), "--out", str(run_dir)]
    if manifest["layers"] != resolve_layers(None, manifest["n_layers"]):
        words += ["--layers", ",".join(map(str, manifest["layers"]))]
    for option, key, default in (("--storage", "dtype", "fp16"), ("--shard-size", "shard_size", 1024),
                                 ("--precision", "precision", "fp32"), ("--convention", "convention", DEFAULT_CONVENTION)):
        value = manifest.get(key, default)
        if value != default and value is not None:
            words += [option, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def repair_hint(run_dir: Path, manifest: dict | None) -> str:
    """What repairs a run whose shards are missing or damaged: its own index command, which resumes."""
    command = f"`{index_command(run_dir, manifest)}`" if manifest else "the same `clip-interpret index` command"
    return f"run the index command again, {command}: it resumes, and redoes every missing or damaged shard"


def _redo_shard(run_dir: Path, shard: int, manifest: dict | None = None) -> str:
    return f"to redo that shard, {repair_hint(run_dir, manifest)}"


def read_shard_info(path: Path, n_items: int, shard_size=None, manifest: dict | None = None) -> ShardInfo:
    """A shard record, checked: its number, its item range (that of its number, when the run's
    shard size is known) and the items it kept."""
    try:
        number = int(path.name.split(".")[0])
    except ValueError:
        number = None
    def fix() -> str:  # made only for an error: a run of many shards opens quickly
        return _redo_shard(path.parent.parent, number, manifest) if number is not None else f"delete {path}"

    data = read_json(path, fix)
    ok = (isinstance(data, dict) and data.get("shard") == number and _int_list([data.get("start"), data.get("stop")])
          and 0 <= data["start"] <= data["stop"] <= n_items and _int_list(data.get("kept"))
          and all(data["start"] <= i < data["stop"] for i in data["kept"]) and isinstance(data.get("failures"), list))
    if ok and isinstance(shard_size, int) and shard_size > 0:
        ok = data["start"] == number * shard_size and data["stop"] == min(n_items, (number + 1) * shard_size)
    if not ok:
        raise ClipInterpretError(f"{path} is not a valid shard record (shard {number}: items start..stop of the "
                                 f"run's {n_items}, the kept ones, the failures); {fix()}")
    return ShardInfo(number, data["start"], data["stop"], data["kept"], data["failures"], str(data.get("decoder", "")))


def shard_array_path(run_dir: Path, shard: int, kind: str) -> Path:
    return Path(run_dir) / "shards" / f"{shard:05d}.{kind}.npy"


def _unreadable(run_dir: Path, manifest: dict, shard: int, kind: str, err: Exception) -> ClipInterpretError:
    path, fix = shard_array_path(run_dir, shard, kind), _redo_shard(run_dir, shard, manifest)
    if isinstance(err, FileNotFoundError):
        return ClipInterpretError(f"{path} is missing; {fix}")
    return ClipInterpretError(f"{path} is not a readable .npy array (truncated or corrupt: {err}); {fix}")


def check_shard_array(run_dir: Path, manifest: dict, shard: ShardInfo, kind: str) -> None:
    """A shard array's header and size against its record (rows) and the manifest (shape,
    dtype), read without mapping the array (a run of many shards holds no maps)."""
    path = shard_array_path(run_dir, shard.shard, kind)
    dim = int(manifest["dim"])
    row_shape = (max(stop for _, stop in manifest["layout"].values()), dim) if kind == "pieces" else (dim,)
    dtype = np.dtype(np.float16 if kind == "pieces" and manifest["dtype"] == "fp16" else np.float32)
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, found = read_header(handle)
            size = int(np.prod(shape)) * found.itemsize
            if os.fstat(handle.fileno()).st_size < handle.tell() + size:
                raise ValueError(f"the file is shorter than its {size}-byte array")
    except (OSError, ValueError) as err:
        raise _unreadable(run_dir, manifest, shard.shard, kind, err) from None
    expected = (len(shard.kept), *row_shape)
    if tuple(shape) != expected or found != dtype:
        raise ClipInterpretError(f"{path} holds a {found} array of shape {list(shape)}, the run expects "
                                 f"{dtype} {list(expected)}; {_redo_shard(run_dir, shard.shard, manifest)}")


def check_recorded_shard(run_dir: Path, manifest: dict, shard: ShardInfo) -> None:
    """A shard against what a complete run's manifest recorded when the run was completed: its rows
    and its files' byte sizes (a shard replaced, cut short or truncated since). A run in progress,
    or one completed before sizes were recorded, has nothing to check against."""
    recorded = manifest.get("shard_files") if manifest.get("complete") else None
    entry = recorded.get(f"{shard.shard:05d}") if isinstance(recorded, dict) else None
    if not isinstance(entry, dict):
        return
    fix = _redo_shard(run_dir, shard.shard, manifest)
    if entry.get("rows") != len(shard.kept):
        raise ClipInterpretError(f"{Path(run_dir) / 'shards' / f'{shard.shard:05d}.json'} lists {len(shard.kept)} "
                                 f"images, the manifest recorded {entry.get('rows')} for that shard when the run was "
                                 f"completed; {fix}")
    for kind in ("pieces", "emb"):
        path = shard_array_path(run_dir, shard.shard, kind)
        found, expected = path.stat().st_size, entry.get(f"{kind}_bytes")
        if isinstance(expected, int) and found != expected:
            raise ClipInterpretError(f"{path} is {found} bytes, the manifest recorded {expected} when the run was "
                                     f"completed (truncated or replaced); {fix}")


def _preprocess_from_json(data: dict) -> dict:
    """JSON turns tuples into lists; compare like with like."""
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in data.items()}


def check_same_convention(runs) -> None:
    """Refuse runs (Runs or run folders) whose pieces were split by different conventions:
    their heads' values, and so their TextSpan texts and labels, are not comparable."""
    found = {}
    for run in runs:
        manifest = run.manifest if isinstance(run, Run) else read_manifest(run)
        found[str(run.path if isinstance(run, Run) else run)] = manifest.get("convention", DEFAULT_CONVENTION)
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{path} ({convention})" for path, convention in found.items())
        raise ClipInterpretError(f"these runs split their pieces by different conventions: {listed}; index them "
                                 "again with one --convention")


def empty_run_error(run: "Run") -> ClipInterpretError:
    """Why a run without a single image row is of no use, and what to do."""
    n = run.manifest["source"].get("n", "?")
    if run.complete or (run.shards and len(run.failures) >= (n if isinstance(n, int) else 1)):
        first = f"{run.failures[0].get('source')}: {run.failures[0].get('reason')}; " if run.failures else ""
        return ClipInterpretError(
            f"run {run.path} holds no image: none of the {n} images of its source {run.source_spec!r} could be read "
            f"({first}the reason for each is listed under \"failures\" in {run.path / 'shards'}/*.json); fix the "
            "images and index them into a new folder")
    return ClipInterpretError(f"run {run.path} holds no image yet: its indexing stopped before any image was stored; "
                              f"{repair_hint(run.path, run.manifest)}")


def open_run(path: str | Path, model=None) -> Run:
    """Open a run directory; with ``model``, check that it was made with that model. A run that
    holds no image (none could be read, or its indexing stopped before the first shard) is refused."""
    run = Run(path)
    if not len(run):
        raise empty_run_error(run)
    if model is not None:
        run.check_model(model)
    return run
