"""Image sources for indexing: a folder, a list or table of paths, WebDataset tar shards, the toy world.

* a folder: searched recursively for image files; when images sit in class
  sub-folders (``root/<class>/...``, as torchvision's ImageFolder expects), the
  sub-folder names become labels under the label set ``class``;
* a text file: one image path per line (relative paths are relative to the file;
  blank lines and ``#`` comments are ignored);
* a CSV or Parquet table: an ``image`` column of paths (relative to the table),
  every other column whose values repeat a label set (one zero-shot task each);
* ``tars:PATTERN``: WebDataset tar shards, e.g. ``tars:data/{00000..00099}.tar``
  (brace ranges and ``{a,b}`` lists; a plain ``.tar`` path works too): each sample
  (the members sharing a key) is one image, named ``SHARD.tar/KEY.EXT``; its text
  members (``.cls``, ...) and the fields of its ``.json`` become label sets when
  their values repeat, as a table's columns do;
* a registered prefix (``register_source``): e.g. ``toyworld:N[:seed]``, N images
  of the known-answer world labelled with every toy property, which the toy world
  registers (``clip_interpret.toyworld.source``): the run store does not import
  the sources that generate their images.

Order and indices are deterministic (sorted folder walk, file or table order,
tar files in pattern order and samples in tar order), so runs resume and compare.
A source has a stable list of item names and a hash of that list, recorded in
the run manifest so that a resumed or re-read run is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ClipInterpretError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSource:
    """A list of images with optional labels; ``load(i)`` returns what ``load_image`` accepts."""

    spec: str
    names: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)  # label set -> one label per item
    kind: str = "files"
    generated: object = None  # generated images: an indexable whose item i has the PIL image as ``.image``
    _tar: "TarMembers | None" = None

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int):
        if self.generated is not None:
            return self.generated[i].image
        if self._tar is not None:
            return self._tar.read(i)
        return self.names[i]

    def location(self) -> str | None:
        """A file every reader of this source must see (None for generated images)."""
        if self.generated is not None:
            return None
        return self._tar.paths[0] if self._tar is not None else self.names[0]

    def name(self, i: int) -> str:
        return self.names[i]

    def list_hash(self) -> str:
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(name.encode("utf-8", "surrogateescape"))
            digest.update(b"\n")
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "n": len(self.names), "hash": self.list_hash(),
                "label_sets": sorted(self.labels)}


def _folder(root: Path, spec: str) -> ImageSource:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ClipInterpretError(f"no image files found under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    names = [str(p) for p in files]
    labels = {}
    parents = [p.relative_to(root).parts for p in files]
    if all(len(parts) >= 2 for parts in parents):
        labels["class"] = [parts[0] for parts in parents]
    return ImageSource(spec, names, labels, kind="folder")


def _list_file(path: Path, spec: str) -> ImageSource:
    names = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ClipInterpretError(f"cannot read image list {path}: {err}") from None
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        candidate = Path(text).expanduser()
        names.append(str(candidate if candidate.is_absolute() else (path.parent / candidate)))
    if not names:
        raise ClipInterpretError(f"image list {path} names no images (it is empty or only comments)")
    return ImageSource(spec, names, {}, kind="list")


def _label_sets(columns: dict[str, list], skip: str) -> dict[str, list[str]]:
    """The columns that label items: every item has a value and the values repeat (2 to 1000
    distinct values, fewer than the items); free text such as captions is left out."""
    labels = {}
    for key, column in columns.items():
        if key == skip or key is None:
            continue
        values = ["" if v is None else str(v).strip() for v in column]
        distinct = set(values)
        if all(values) and 2 <= len(distinct) <= 1000 and len(distinct) < len(values):
            labels[str(key).strip()] = values
    return labels


def _table(path: Path, spec: str, columns: dict[str, list]) -> ImageSource:
    """A table whose ``image`` (or ``file``/``path``/``filename``) column lists images (relative
    to the table's folder) and whose other columns label them (``_label_sets``)."""
    if not columns or not len(next(iter(columns.values()))):
        raise ClipInterpretError(f"image table {path} has no rows")
    column = next((c for c in ("image", "file", "path", "filename") if c in columns), None)
    if column is None:
        raise ClipInterpretError(f"image table {path} needs an 'image' column (image paths, relative to the file); "
                                 f"it has {', '.join(map(str, columns))}")
    names = []
    for value in columns[column]:
        candidate = Path(str(value or "").strip()).expanduser()
        names.append(str(candidate if candidate.is_absolute() else (path.parent / candidate)))
    return ImageSource(spec, names, _label_sets(columns, column), kind="table")


def _csv_file(path: Path, spec: str) -> ImageSource:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ClipInterpretError(f"cannot read image table {path}: {err}") from None
    columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {})}
    return _table(path, spec, columns)


def _parquet_file(path: Path, spec: str) -> ImageSource:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipInterpretError(f"reading the Parquet table {path} needs pyarrow: pip install "
                                 "'clip-interpret[ray]' (or pyarrow)") from None
    try:
        columns = pq.read_table(path).to_pydict()
    except (OSError, ValueError) as err:
        raise ClipInterpretError(f"cannot read image table {path}: {err}") from None
    return _table(path, spec, columns)


# ----------------------------------------------------------- WebDataset tars
def expand_braces(pattern: str) -> list[str]:
    """``data/{000..002}.tar`` -> data/000.tar, data/001.tar, data/002.tar; ``{a,b}`` lists too
    (zero padding when both ends of a range have the same width, as braceexpand does)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        first, last = span.groups()
        width = len(first) if len(first) == len(last) else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
        if not options:
            raise ClipInterpretError(f"the range {{{body}}} in {pattern!r} is empty (write it low..high)")
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for option in options for name in expand_braces(head + option + tail)]


@dataclass
class TarMembers:
    """Where each item's image lies: (tar file, offset of its data, size), read without unpacking."""

    paths: list[str]
    tar: np.ndarray  # [N] index into ``paths``
    offset: np.ndarray  # [N]
    size: np.ndarray  # [N]

    def read(self, i: int) -> bytes:
        with open(self.paths[int(self.tar[i])], "rb") as handle:
            handle.seek(int(self.offset[i]))
            return handle.read(int(self.size[i]))


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_samples(path: str) -> list[dict]:
    """The samples of one tar file in order: {key, image: (name, offset, size) or None, fields}."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_member(info.name)
                sample = samples.setdefault(key, {"key": key, "image": None, "fields": {}})
                if "." + ext in IMAGE_SUFFIXES:
                    if sample["image"] is None:
                        sample["image"] = (info.name, info.offset_data, info.size)
                elif info.size <= 1 << 16:  # labels and metadata are small
                    text = tar.extractfile(info).read().decode("utf-8", "replace").strip()
                    if ext == "json":
                        try:
                            data = json.loads(text)
                        except ValueError:
                            data = None
                        if isinstance(data, dict):
                            sample["fields"].update({f"json.{k}": v for k, v in data.items()
                                                     if isinstance(v, (str, int, bool))})
                    else:
                        sample["fields"][ext] = text
    except (OSError, tarfile.TarError) as err:
        raise ClipInterpretError(f"cannot read tar file {path} ({err}); WebDataset shards must be plain, "
                                 "uncompressed .tar files (their images are read in place)") from None
    return list(samples.values())


def _tars(spec: str) -> ImageSource:
    pattern = spec[len("tars:"):] if spec.startswith("tars:") else spec
    paths = [str(Path(p).expanduser()) for p in expand_braces(pattern)]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ClipInterpretError(f"{len(missing)} of the {len(paths)} tar files of {spec!r} do not exist, e.g. "
                                 f"{missing[0]}")
    names, where, fields = [], [], []
    for t, path in enumerate(paths):
        for sample in _tar_samples(path):
            if sample["image"] is None:
                continue  # metadata without an image (e.g. a failed download)
            member, offset, size = sample["image"]
            names.append(f"{path}/{member}")
            where.append((t, offset, size))
            fields.append(sample["fields"])
    if not names:
        raise ClipInterpretError(f"the tar files of {spec!r} hold no images (looked for "
                                 f"{', '.join(sorted(IMAGE_SUFFIXES))} members)")
    keys = sorted({k for f in fields for k in f})
    labels = _label_sets({k: [f.get(k) for f in fields] for k in keys}, skip="")
    index = np.asarray(where, dtype=np.int64)
    return ImageSource(spec, names, labels, kind="tars", _tar=TarMembers(paths, index[:, 0], index[:, 1], index[:, 2]))


def read_item(name: str):
    """What ``load_image`` takes for a run's item name: the path itself, or the bytes of an image
    inside a tar file (``SHARD.tar/KEY.jpg``)."""
    match = re.match(r"(.+?\.tar)/(.+)$", name)
    if match and Path(match.group(1)).is_file():
        try:
            with tarfile.open(match.group(1), "r:") as tar:
                return tar.extractfile(match.group(2)).read()
        except (OSError, KeyError, AttributeError, tarfile.TarError):
            return name  # load_image names the problem
    return name


SOURCE_PREFIXES: dict = {}  # spec prefix -> opener(spec) -> ImageSource (register_source)
# prefixes whose module registers its opener when imported: imported by name on first use, so that the
# store never imports the world that generates the images, and `import clip_interpret` stays light
REGISTERING_MODULES = {"toyworld:": "clip_interpret.toyworld.source"}


def register_source(prefix: str, opener) -> None:
    """Make ``open_source`` hand specs starting with ``prefix`` (e.g. ``"toyworld:"``) to ``opener``."""
    SOURCE_PREFIXES[prefix] = opener


def open_source(spec: str) -> ImageSource:
    """Parse an image source spec: ``toyworld:N[:seed]``, ``tars:PATTERN``, a folder, a CSV or
    Parquet table of labelled images, or a text file of paths."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClipInterpretError("no image source given; pass a folder, a text file of paths, a table, "
                                 "tars:PATTERN or toyworld:N[:seed]")
    for prefix, module in REGISTERING_MODULES.items():
        if spec.startswith(prefix) and prefix not in SOURCE_PREFIXES:
            import_module(module)
    for prefix, opener in SOURCE_PREFIXES.items():
        if spec.startswith(prefix):
            return opener(spec)
    if spec.startswith("tars:"):
        return _tars(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ClipInterpretError(f"image source not found: {spec} (expected a folder, a text file of image paths, "
                                 "a CSV or Parquet table, tars:PATTERN or toyworld:N[:seed])")
    if path.is_dir():
        return _folder(path, spec)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(spec, [str(path)], {}, kind="files")
    if path.suffix.lower() == ".csv":
        return _csv_file(path, spec)
    if path.suffix.lower() == ".parquet":
        return _parquet_file(path, spec)
    if path.suffix.lower() == ".tar":
        return _tars(spec)
    try:
        with Image.open(path):
            return ImageSource(spec, [str(path)], {}, kind="files")
    except Exception:  # noqa: BLE001 - not an image: treat as a list of paths
        return _list_file(path, spec)
