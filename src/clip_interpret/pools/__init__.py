"""Description pools for TextSpan, and their text embeddings (cached per model and pool).

A pool is a list of short descriptions, each optionally tagged with a category:

* ``general``: the built-in pool written for this project (``general.tsv``);
* ``toy``: descriptions of every toy-world property value, tagged with the property;
* a text file: one description a line, optionally ``category<TAB>description``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipInterpretError

HERE = Path(__file__).resolve().parent


def pool_slug(pool_spec: str) -> str:
    """A pool's short name in file names: ``general``, ``toy``, or a user file's stem made safe."""
    import re

    stem = pool_spec if pool_spec in ("general", "toy") else Path(pool_spec).stem
    return re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:40] or "pool"


@dataclass
class Pool:
    name: str
    texts: list[str]
    categories: list[str | None]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def tagged(self) -> bool:
        return all(c for c in self.categories)

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for category, text in zip(self.categories, self.texts):
            digest.update(f"{category or ''}\t{text}\n".encode())
        return digest.hexdigest()[:16]


def parse_pool_lines(lines: list[str], name: str) -> Pool:
    texts, categories, blank = [], [], []
    for number, line in enumerate(lines, start=1):
        raw = line.rstrip("\n").rstrip("\r")
        if not raw.strip():
            if number < len(lines):  # a final newline is not a blank entry
                blank.append(number)
            continue
        if "\t" in raw:
            category, text = raw.split("\t", 1)
            category, text = category.strip(), text.strip()
            if not text:
                blank.append(number)
                continue
            categories.append(category or None)
        else:
            text = raw.strip()
            categories.append(None)
        texts.append(text)
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
        warnings.warn(f"pool {name}: skipped {len(blank)} empty line(s) (line {shown})", stacklevel=3)
    if not texts:
        raise ClipInterpretError(f"pool {name} holds no descriptions")
    seen, dup = set(), []
    for text in texts:
        if text in seen:
            dup.append(text)
        seen.add(text)
    if dup:
        warnings.warn(f"pool {name}: {len(dup)} duplicate description(s), e.g. {dup[0]!r}", stacklevel=3)
    return Pool(name, texts, categories)


def load_pool(spec: str) -> Pool:
    """``general``, ``toy``, or a path to a pool file."""
    if spec == "general":
        path = HERE / "general.tsv"
        if not path.is_file():
            raise ClipInterpretError(f"the built-in general pool is missing ({path}); reinstall clip-interpret")
        return parse_pool_lines(path.read_text(encoding="utf-8").splitlines(keepends=True), "general")
    if spec == "toy":
        from ..toyworld.pool import toy_pool

        entries = toy_pool()
        return Pool("toy", [t for _, _, t in entries], [p for p, _, _ in entries])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ClipInterpretError(f"pool not found: {spec!r}; use general, toy, or a text file with one "
                                 "description a line (optionally category<TAB>description)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as err:
        raise ClipInterpretError(f"cannot read pool file {path}: {err}") from None
    return parse_pool_lines(lines, str(path))


def cache_dir() -> Path:
    root = os.environ.get("CLIP_INTERPRET_CACHE")
    return Path(root).expanduser() if root else Path("~/.cache/clip-interpret").expanduser()


def text_embeddings(model, pool: Pool, batch_size: int = 256) -> np.ndarray:
    """Unit text embeddings of a pool [M, D] (float32), cached on disk per (model, pool)."""
    path = cache_dir() / "text" / f"{model.fingerprint()}-{pool.content_hash()}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape[0] == len(pool):
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed
    emb = model.encode_text(pool.texts, batch_size=batch_size).cpu().numpy().astype(np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, emb)
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop the work
    return emb
