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

from ..decompose import DEFAULT_CONVENTION
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
        for info_path in sorted((self.path / "shards").glob("[0-9]*.json")):
            self.shards.append(_shard_info(info_path, n_items))
        self.shards.sort(key=lambda s: s.shard)
        self.source_indices = np.asarray([i for s in self.shards for i in s.kept], dtype=np.int64)
        self.failures = [f for s in self.shards for f in s.failures]
        if check_files:
            for shard in self.shards:
                for kind in ("pieces", "emb"):
                    self._check_array(shard, kind)

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
        return self.path / "shards" / f"{shard:05d}.{kind}.npy"

    def _unreadable(self, shard: int, kind: str, err: Exception) -> ClipInterpretError:
        path, fix = self._array_path(shard, kind), _redo_shard(self.path, shard)
        if isinstance(err, FileNotFoundError):
            return ClipInterpretError(f"{path} is missing; {fix}")
        return ClipInterpretError(f"{path} is not a readable .npy array (truncated or corrupt: {err}); {fix}")

    def _check_array(self, shard: ShardInfo, kind: str) -> None:
        """A shard array's header and size against its record (rows) and the manifest (shape,
        dtype), read without mapping the array (a run of many shards holds no maps)."""
        path = self._array_path(shard.shard, kind)
        row_shape = (max(stop for _, stop in self.layout.values()), self.dim) if kind == "pieces" else (self.dim,)
        dtype = np.dtype(np.float16 if kind == "pieces" and self.manifest["dtype"] == "fp16" else np.float32)
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
            raise self._unreadable(shard.shard, kind, err) from None
        expected = (len(shard.kept), *row_shape)
        if tuple(shape) != expected or found != dtype:
            raise ClipInterpretError(f"{path} holds a {found} array of shape {list(shape)}, the run expects "
                                     f"{dtype} {list(expected)}; {_redo_shard(self.path, shard.shard)}")

    def _map(self, shard: int, kind: str) -> np.ndarray:
        """A shard's array as a memory map (mapped on demand: a run of many shards holds no maps)."""
        try:
            return np.load(self._array_path(shard, kind), mmap_mode="r")
        except (OSError, ValueError) as err:
            raise self._unreadable(shard, kind, err) from None

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
            yield start, torch.from_numpy(np.ascontiguousarray(pieces)).to(device).float()

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


def read_json(path: Path, fix: str):
    """A run file's JSON; a missing, unreadable, empty or truncated file is an error naming it, ending with ``fix``."""
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


def _redo_shard(run_dir: Path, shard: int) -> str:
    return (f"delete {run_dir / 'shards' / f'{shard:05d}.json'} and run the same `clip-interpret index` command "
            "again to redo that shard")


def _shard_info(path: Path, n_items: int) -> ShardInfo:
    """A shard record, checked: its number, its item range and the items it kept."""
    try:
        number = int(path.name.split(".")[0])
    except ValueError:
        number = None
    fix = _redo_shard(path.parent.parent, number) if number is not None else f"delete {path}"
    data = read_json(path, fix)
    ok = (isinstance(data, dict) and data.get("shard") == number and _int_list([data.get("start"), data.get("stop")])
          and 0 <= data["start"] <= data["stop"] <= n_items and _int_list(data.get("kept"))
          and all(data["start"] <= i < data["stop"] for i in data["kept"]) and isinstance(data.get("failures"), list))
    if not ok:
        raise ClipInterpretError(f"{path} is not a valid shard record (shard {number}: items start..stop of the "
                                 f"run's {n_items}, the kept ones, the failures); {fix}")
    return ShardInfo(number, data["start"], data["stop"], data["kept"], data["failures"], str(data.get("decoder", "")))


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


def open_run(path: str | Path, model=None) -> Run:
    """Open a run directory; with ``model``, check that it was made with that model."""
    run = Run(path)
    if model is not None:
        run.check_model(model)
    return run
