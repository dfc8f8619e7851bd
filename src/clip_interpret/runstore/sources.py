"""Image sources for indexing: a folder, a list or table of paths, WebDataset tar shards, the toy world.

* a folder: searched recursively for image files; when images sit in class
  sub-folders (``root/<class>/...``, as torchvision's ImageFolder expects), the
  sub-folder names become labels under the label set ``class``;
* a text file: one image path per line (relative paths are relative to the file;
  blank lines and ``#`` comments are ignored);
* a CSV or Parquet table: an image column (``image``, ``file``, ``path`` or
  ``filename``) of paths (relative to the table), every other column whose values
  repeat a label set (one zero-shot task each); in a Parquet table the image
  column may instead hold the images' bytes (binary, or the ``{bytes, path}``
  structs that Hugging Face datasets write), read in place from the table;
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

import functools
import hashlib
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ClipInterpretError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


IMAGE_COLUMNS = ("image", "file", "path", "filename")  # a table's image column: the first of these it has


@dataclass
class ImageSource:
    """A list of images with optional labels; ``load(i)`` returns what ``load_image`` accepts."""

    spec: str
    names: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)  # label set -> one label per item
    kind: str = "files"
    generated: object = None  # generated images: an indexable whose item i has the PIL image as ``.image``
    _tar: "TarMembers | None" = None
    _table: "TableImages | None" = None  # images whose bytes a Parquet table holds

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int):
        if self.generated is not None:
            return self.generated[i].image
        if self._tar is not None:
            return self._tar.read(i)
        if self._table is not None:
            return self._table.read(i)
        return self.names[i]

    def location(self) -> str | None:
        """A file every reader of this source must see (None for generated images)."""
        if self.generated is not None:
            return None
        if self._table is not None:
            return self._table.path
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


def _image_column(path: Path, names, parquet: bool = False) -> str:
    """The table's image column (the first of ``IMAGE_COLUMNS`` it has), or one error naming them all."""
    column = next((c for c in IMAGE_COLUMNS if c in names), None)
    if column is None:
        holds = "image paths relative to the table, or the images' bytes" if parquet \
            else "image paths relative to the table"
        accepted = f"{', '.join(map(repr, IMAGE_COLUMNS[:-1]))} or {IMAGE_COLUMNS[-1]!r}"
        raise ClipInterpretError(f"image table {path} needs an image column named {accepted} ({holds}); it has "
                                 f"{', '.join(map(str, names)) or 'no columns'}")
    return column


def _resolve(path: Path, value) -> str:
    """An image path from a table, relative to the table's folder."""
    candidate = Path(str(value or "").strip()).expanduser()
    return str(candidate if candidate.is_absolute() else (path.parent / candidate))


def _table(path: Path, spec: str, columns: dict[str, list]) -> ImageSource:
    """A table whose image column (``IMAGE_COLUMNS``) lists images (relative to the table's folder)
    and whose other columns label them (``_label_sets``)."""
    if not columns or not len(next(iter(columns.values()))):
        raise ClipInterpretError(f"image table {path} has no rows")
    column = _image_column(path, list(columns))
    names = [_resolve(path, value) for value in columns[column]]
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


def _image_column_type(path: Path, column: str, kind) -> str:
    """What a Parquet image column holds: ``paths`` (strings), ``bytes`` (binary) or ``struct``
    (``{bytes, path}`` as Hugging Face datasets write images); anything else is one error."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or getattr(pa.types, "is_string_view",
                                                                            lambda _: False)(kind):
        return "paths"
    if _is_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 \
            and _is_binary(kind.field("bytes").type):
        path_field = kind.get_field_index("path")
        if path_field < 0 or pa.types.is_string(kind.field("path").type) \
                or pa.types.is_large_string(kind.field("path").type):
            return "struct"
    raise ClipInterpretError(f"image table {path}: column {column!r} holds {kind} values; an image column holds "
                             "image paths (strings), image bytes (binary), or {bytes, path} structs as Hugging Face "
                             "datasets write them")


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) \
        or getattr(pa.types, "is_binary_view", lambda _: False)(kind)


def _scalar(kind) -> bool:
    """Whether a column's values can label images (not bytes, lists or structs)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return not (_is_binary(kind) or pa.types.is_nested(kind) or pa.types.is_null(kind))


@dataclass
class TableImages:
    """Images whose bytes a Parquet table holds (column ``column``; ``struct``: ``{bytes, path}``
    structs): read in place, one row group at a time (the last one read is kept)."""

    path: str
    column: str
    struct: bool
    starts: list[int]  # first row of each row group, then the number of rows
    _group: tuple | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}  # a worker reads its own row groups

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, i: int):
        """Row ``i``'s image bytes (or, for a struct without bytes, the file its ``path`` names)."""
        import bisect

        import pyarrow.parquet as pq

        from ..errors import ImageLoadError

        group = bisect.bisect_right(self.starts, i) - 1
        if self._group is None or self._group[0] != group:
            try:
                column = pq.ParquetFile(self.path).read_row_group(group, columns=[self.column]).column(0)
            except Exception as err:  # noqa: BLE001 - the table changed or vanished since it was opened
                raise ImageLoadError(f"{self.path}#{i}", f"cannot read its table ({err})") from None
            column = column.combine_chunks()
            if self.struct:
                names = [f.name for f in column.type]
                paths = column.field("path").to_pylist() if "path" in names else None
                self._group = (group, column.field("bytes").to_pylist(), paths)
            else:
                self._group = (group, column.to_pylist(), None)
        _, data, paths = self._group
        row = i - self.starts[group]
        if data[row] is not None:
            return bytes(data[row])
        if paths is not None and paths[row]:
            return _resolve(Path(self.path), paths[row])  # Hugging Face: an image left in its file
        return b""  # no image in this row: load_image names it empty


def _table_images(path: Path, parquet, column: str, struct: bool) -> TableImages:
    meta = parquet.metadata
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    return TableImages(str(path), column, struct, starts)


def _open_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipInterpretError(f"reading the Parquet table {path} needs pyarrow: pip install "
                                 "'clip-interpret[ray]' (or pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
        raise ClipInterpretError(f"cannot read image table {path}: {err}") from None


def _parquet_file(path: Path, spec: str) -> ImageSource:
    """A Parquet table: type-checked before anything is read, the image column's paths or bytes,
    the scalar columns as label sets. Embedded images are named by their struct's ``path`` where it
    is given (and no other row has the same), else ``TABLE#ROW``."""
    parquet = _open_parquet(path)
    schema = parquet.schema_arrow
    if not parquet.metadata.num_rows:
        raise ClipInterpretError(f"image table {path} has no rows")
    column = _image_column(path, schema.names, parquet=True)
    holds = _image_column_type(path, column, schema.field(column).type)
    others = [f.name for f in schema if f.name != column and _scalar(f.type)]
    try:
        labels = _label_sets(parquet.read(columns=others).to_pydict(), column) if others else {}
        if holds == "paths":
            names = [_resolve(path, v) for v in parquet.read(columns=[column]).column(0).to_pylist()]
            return ImageSource(spec, names, labels, kind="table")
        given = [None] * parquet.metadata.num_rows
        if holds == "struct" and schema.field(column).type.get_field_index("path") >= 0:
            given = parquet.read(columns=[f"{column}.path"]).column(0).combine_chunks().field("path").to_pylist()
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as any of pyarrow's errors
        raise ClipInterpretError(f"cannot read image table {path}: {err}") from None
    given = [str(g).strip() if g is not None else "" for g in given]
    counts = Counter(given)
    names = [name if name and counts[name] == 1 else f"{path}#{row}" for row, name in enumerate(given)]
    return ImageSource(spec, names, labels, kind="table-bytes",
                       _table=_table_images(path, parquet, column, holds == "struct"))


def table_image(spec: str, index: int):
    """Item ``index`` of a Parquet table holding its images' bytes (a ``table-bytes`` run's source),
    as ``load_image`` takes it: what shows a run's image, without reading the table's other rows."""
    path = Path(spec).expanduser()
    try:
        stat = path.stat()
    except OSError as err:
        raise ClipInterpretError(f"the run's image table {spec} cannot be read ({err.strerror or err}); its images "
                                 "are stored in it") from None
    return _table_reader(str(path), stat.st_mtime_ns, stat.st_size).read(index)


@functools.lru_cache(maxsize=4)
def _table_reader(path: str, mtime_ns: int, size: int) -> TableImages:
    parquet = _open_parquet(Path(path))
    column = _image_column(Path(path), parquet.schema_arrow.names, parquet=True)
    holds = _image_column_type(Path(path), column, parquet.schema_arrow.field(column).type)
    if holds == "paths":
        raise ClipInterpretError(f"image table {path} now lists image paths, not the images' bytes; index it again")
    return _table_images(Path(path), parquet, column, holds == "struct")


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
