"""The run directory: a manifest plus fixed-size shards of decomposition pieces.

    RUN/manifest.json          model spec + weight fingerprint, preprocessing, source
                               (spec, kind, size, hash), layers, dtype, shapes, layout
    RUN/images.json            the source's item names and labels
    RUN/shards/00000.pieces.npy  [rows, P, D]  pieces (fp16 or fp32), layout in the manifest
    RUN/shards/00000.emb.npy     [rows, D]     unit image embeddings (fp32)
    RUN/shards/00000.json        which source items the rows are, and the failures;
                                 written last: a shard without it is not done

Every file is written to a temporary name and renamed into place, so an
interrupted run (even kill -9) never leaves a half-written shard that looks
complete; the next run redoes only unfinished shards. Readers memory-map the
shards and check the run against the model they are given.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class Run:
    """Read access to a finished (or partly finished) run directory.

    Every file is checked as it is opened: a missing, empty, truncated or malformed file
    (manifest, images.json, a shard record or array) is a ``ClipInterpretError`` naming
    the file, what is wrong with it and what to do.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        images = read_json(self.path / "images.json", REINDEX)
        problem = _images_problem(images, self.manifest)
        if problem:
            raise ClipInterpretError(f"{self.path / 'images.json'} {problem}; {REINDEX}")
        n_items = len(images["names"])
        self.shards: list[ShardInfo] = []
        for info_path in sorted((self.path / "shards").glob("[0-9]*.json")):
            self.shards.append(_shard_info(info_path, n_items))
        self.shards.sort(key=lambda s: s.shard)
        kept = [i for s in self.shards for i in s.kept]
        self.source_indices = np.asarray(kept, dtype=np.int64)
        self.names = [images["names"][i] for i in kept]
        self.labels = {k: [v[i] for i in kept] for k, v in images.get("labels", {}).items()}
        self.failures = [f for s in self.shards for f in s.failures]
        n_pieces = max(stop for _, stop in self.layout.values())
        dtype = np.float16 if self.manifest["dtype"] == "fp16" else np.float32
        self._pieces = [self._map(s, "pieces", (n_pieces, self.dim), dtype) for s in self.shards]
        self._emb = [self._map(s, "emb", (self.dim,), np.float32) for s in self.shards]

    def _map(self, shard: ShardInfo, kind: str, row_shape: tuple, dtype) -> np.ndarray:
        """A shard array, memory-mapped, checked against its record (rows) and the manifest (shape, dtype)."""
        path = self.path / "shards" / f"{shard.shard:05d}.{kind}.npy"
        fix = _redo_shard(self.path, shard.shard)
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise ClipInterpretError(f"{path} is missing; {fix}") from None
        except (OSError, ValueError) as err:
            raise ClipInterpretError(f"{path} is not a readable .npy array (truncated or corrupt: {err}); "
                                     f"{fix}") from None
        expected = (len(shard.kept), *row_shape)
        if array.shape != expected or array.dtype != dtype:
            raise ClipInterpretError(f"{path} holds a {array.dtype} array of shape {list(array.shape)}, the run "
                                     f"expects {np.dtype(dtype)} {list(expected)}; {fix}")
        return array

    # --------------------------------------------------------------- facts
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

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
        return self.manifest.get("convention", "centred")

    def __len__(self) -> int:
        return len(self.names)

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
        parts = [p[:, start:stop] for p in self._pieces]
        if not parts:
            return np.zeros((0, stop - start, self.dim), np.float32)
        return np.concatenate(parts).astype(np.float32)

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
        if not self._emb:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([np.asarray(e) for e in self._emb]).astype(np.float32)

    def iter_pieces(self):
        """(first row, pieces [S, P, D] memory map in the storage dtype) for each shard, in order."""
        start = 0
        for pieces in self._pieces:
            yield start, pieces
            start += pieces.shape[0]

    def sum_of_pieces(self) -> np.ndarray:
        """The sum of every stored piece [N, D]; equals ``embeddings()`` up to the storage dtype."""
        return np.concatenate([np.asarray(p, dtype=np.float32).sum(axis=1) for p in self._pieces]) \
            if self._pieces else np.zeros((0, self.dim), np.float32)


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
        found[str(run.path if isinstance(run, Run) else run)] = manifest.get("convention", "centred")
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
