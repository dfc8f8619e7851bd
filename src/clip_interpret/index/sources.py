"""Image sources for indexing: a folder, a text file listing paths, or the toy world.

* a folder: searched recursively for image files; when images sit in class
  sub-folders (``root/<class>/...``, as torchvision's ImageFolder expects), the
  sub-folder names become labels under the label set ``class``;
* a text file: one image path per line (relative paths are relative to the file;
  blank lines and ``#`` comments are ignored);
* ``toyworld:N[:seed]``: N images of the known-answer world, labelled with every
  toy property (``shape``, ``color``, ...).

A source has a stable list of item names and a hash of that list, recorded in
the run manifest so that a resumed or re-read run is checked against it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
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
    _toy: object = None

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int):
        if self._toy is not None:
            return self._toy[i].image
        return self.names[i]

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


def _csv_file(path: Path, spec: str) -> ImageSource:
    """A CSV whose ``image`` (or ``file``/``path``) column lists images (relative to the CSV) and whose
    other columns label them. A column is a label set when every row has a value and the values
    repeat (2 to 1000 distinct values, fewer than the rows); free text such as captions is left out."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ClipInterpretError(f"cannot read image table {path}: {err}") from None
    if not rows:
        raise ClipInterpretError(f"image table {path} has no rows")
    column = next((c for c in ("image", "file", "path", "filename") if c in rows[0]), None)
    if column is None:
        raise ClipInterpretError(f"image table {path} needs an 'image' column (image paths, relative to the file); "
                                 f"it has {', '.join(rows[0])}")
    names = []
    for row in rows:
        candidate = Path(row[column].strip()).expanduser()
        names.append(str(candidate if candidate.is_absolute() else (path.parent / candidate)))
    labels = {}
    for key in rows[0]:
        if key == column or key is None:
            continue
        values = [(row.get(key) or "").strip() for row in rows]
        distinct = set(values)
        if all(values) and 2 <= len(distinct) <= 1000 and len(distinct) < len(values):
            labels[key.strip()] = values
    return ImageSource(spec, names, labels, kind="table")


def _toyworld(spec: str) -> ImageSource:
    from ..toyworld import PROPERTIES, ToyWorld
    from ..toyworld.world import sample_attributes

    world = ToyWorld.from_source(spec)
    names = [f"toyworld:{world.seed}:{world.offset + i}" for i in range(len(world))]
    labels = {prop: [] for prop in PROPERTIES}
    for i in range(len(world)):
        # the attributes are the first draws of the image's generator: no need to render it
        attributes = sample_attributes(np.random.default_rng([world.seed, world.offset + i]))
        for prop in PROPERTIES:
            labels[prop].append(attributes[prop])
    return ImageSource(spec, names, labels, kind="toyworld", _toy=world)


def open_source(spec: str) -> ImageSource:
    """Parse an image source spec: ``toyworld:N[:seed]``, a folder, a CSV table of labelled images,
    or a text file of paths."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClipInterpretError("no image source given; pass a folder, a text file of paths, or toyworld:N[:seed]")
    if spec.startswith("toyworld:"):
        return _toyworld(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ClipInterpretError(f"image source not found: {spec} (expected a folder, a text file of image paths, "
                                 "or toyworld:N[:seed])")
    if path.is_dir():
        return _folder(path, spec)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(spec, [str(path)], {}, kind="files")
    if path.suffix.lower() == ".csv":
        return _csv_file(path, spec)
    try:
        with Image.open(path):
            return ImageSource(spec, [str(path)], {}, kind="files")
    except Exception:  # noqa: BLE001 - not an image: treat as a list of paths
        return _list_file(path, spec)
