"""Nearest neighbours over runs larger than memory (the analyses' search, past the in-memory cache).

A *head set* is one head or the sum (or mean) of several heads' contributions;
its vectors are read from the shards' memory maps, one shard at a time, never as
a float32 copy of the whole run.

* ``exact_search``: streams the shards, scores each one and keeps the best k
  (exact; memory of one shard).
* ``RunIndex``: a FAISS index of a head set for one metric, built on demand by
  streaming the shards (trained on an even sample of rows, then filled shard by
  shard) and stored in ``RUN/search/<key>.faiss`` beside ``<key>.json``, which
  records what it was made from (the run's weights fingerprint, image list and
  shards, the heads, reduce, metric and index kind). It is reused while that
  matches and rebuilt when not (e.g. after the run was resumed with more shards).
  Kind by size: an inverted file (``nlist`` = sqrt N lists) with 8-bit scalar
  codes (D bytes a row) below ``PQ_FROM_ROWS`` rows, and with product-quantised
  codes (D/8 bytes a row) from there on. A query scans ``nprobe`` lists for
  ``rerank`` candidates whose exact scores are then computed from the shards: the
  top k of those are returned, with exact scores. Recall against exact search at
  1,000,000 x 512: bench/scale.py, docs/scale.md. Needs ``faiss-cpu`` (extra ``ann``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .decompose import parse_head
from .errors import ClipInterpretError

PQ_FROM_ROWS = 1_000_000
TRAIN_PER_LIST = 50  # training rows per inverted list (FAISS wants 39 to 256)
INDEX_VERSION = 1


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (exact; O(n) selection, then sorting k)."""
    k = min(int(k), scores.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    return idx[np.argsort(-scores[idx], kind="stable")]


def matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` through torch's BLAS, without copies. (numpy's OpenBLAS threads keep
    spinning after a call and starve torch's own threads on small machines: 10x slower analyses.)"""
    return (torch.from_numpy(matrix) @ torch.from_numpy(np.ascontiguousarray(vector, matrix.dtype))).numpy()


class HeadSet:
    """The vectors of a head set over a run: per shard, or gathered by row (float32 [., D])."""

    def __init__(self, run, heads: list[str], reduce: str = "sum"):
        if reduce not in ("sum", "mean"):
            raise ClipInterpretError(f"unknown reduce {reduce!r}; choose sum or mean")
        start = run.layout["heads"][0]
        self.run, self.reduce = run, reduce
        self.heads = sorted(heads, key=lambda h: run.head_index(*parse_head(h)))
        self.rows = sorted(start + run.head_index(*parse_head(h)) for h in heads)
        self.starts = np.cumsum([0] + [len(s.kept) for s in run.shards])

    def block(self, pieces) -> np.ndarray:
        """The head set's vectors of shard rows ``pieces`` [S, P, D] -> [S, D] float32."""
        rows = self.rows
        if rows == list(range(rows[0], rows[-1] + 1)):
            selected = pieces[:, rows[0]:rows[-1] + 1]  # a slice: the memory map reads less
        else:
            selected = pieces[:, rows]
        out = selected.sum(axis=1, dtype=np.float32)
        return out / len(rows) if self.reduce == "mean" else out

    def blocks(self):
        """(first row, vectors [S, D]) shard by shard."""
        for first, pieces in self.run.iter_pieces():
            yield first, self.block(pieces)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """The vectors of the run rows ``indices`` [k] -> [k, D], read from their shards only."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.run.dim), np.float32)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        positions = np.unique(shard_of)
        for position, (_, pieces) in zip(positions, self.run.iter_pieces(positions.tolist())):
            mine = np.flatnonzero(shard_of == position)
            local = indices[mine] - self.starts[position]
            order = np.argsort(local)
            out[mine[order]] = self.block(pieces[local[order]])
        return out


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def _scores(vectors: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    scores = matvec(np.ascontiguousarray(vectors), query)
    if metric == "cosine":
        scores /= np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return scores


def _query(query, metric: str) -> np.ndarray:
    query = np.asarray(query, np.float32)
    return _unit(query) if metric == "cosine" else query


def exact_search(heads: HeadSet, query, k: int, metric: str = "dot") -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows (indices, scores) of the head set against ``query`` [D], shard by shard (exact)."""
    query = _query(query, metric)
    found, found_scores = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for first, vectors in heads.blocks():
        scores = _scores(vectors, query, metric)
        best = top_k(scores, k)
        found.append(best + first)
        found_scores.append(scores[best])
    idx, scores = np.concatenate(found), np.concatenate(found_scores)
    best = top_k(scores, k)
    return idx[best], scores[best]


def index_kind(n: int, dim: int) -> str:
    """The FAISS factory string for n rows of dimension ``dim`` (see the module doc)."""
    nlist = max(1, min(int(round(math.sqrt(n))), n // 39))
    if n < PQ_FROM_ROWS:
        return f"IVF{nlist},SQ8"
    m = max(s for s in range(1, max(1, dim // 8) + 1) if dim % s == 0)  # sub-vectors: D/8 (a divisor of D)
    return f"IVF{nlist},PQ{m}np"  # np: no polysemous training (its Hamming filter is not used here)


class RunIndex:
    """A stored FAISS index of a head set over a run for one metric (see the module doc)."""

    def __init__(self, heads: HeadSet, metric: str = "dot", nprobe: int | None = None, rerank: int = 256):
        try:
            import faiss
        except ImportError:
            raise ClipInterpretError("approximate search needs FAISS: pip install 'clip-interpret[ann]' "
                                     "(faiss-cpu), or use exact search") from None
        self.faiss, self.heads, self.metric, self.rerank = faiss, heads, metric, rerank
        run = heads.run
        self.kind = index_kind(len(run), run.dim)
        ident = {"heads": heads.heads, "reduce": heads.reduce, "metric": metric}
        key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        self.path = Path(run.path) / "search" / f"{key}.faiss"
        shards = hashlib.sha256(json.dumps([[s.shard, len(s.kept)] for s in run.shards]).encode()).hexdigest()[:16]
        self.stamp = {"version": INDEX_VERSION, **ident, "kind": self.kind, "rows": len(run),
                      **run.stamp(), "shards": shards}
        self.index = self._load() or self._build()
        nlist = self.faiss.extract_index_ivf(self.index).nlist
        self.index.nprobe = nprobe or min(nlist, max(16, nlist // 16))  # small indexes: probe 16 lists at least

    def _load(self):
        try:
            stored = json.loads(self.path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if stored != self.stamp or not self.path.is_file():
            return None
        index = self.faiss.read_index(str(self.path))
        return index if index.ntotal == len(self.heads.run) else None

    def _build(self):
        from .runstore.store import atomic_write_json

        faiss, run = self.faiss, self.heads.run
        n, dim = len(run), run.dim
        index = faiss.index_factory(dim, self.kind, faiss.METRIC_INNER_PRODUCT)
        nlist = faiss.extract_index_ivf(index).nlist
        sample = np.unique(np.linspace(0, n - 1, min(n, TRAIN_PER_LIST * nlist)).astype(np.int64))
        train = self.heads.gather(sample)
        index.train(_unit(train) if self.metric == "cosine" else train)
        del train
        for _, vectors in self.heads.blocks():
            index.add(_unit(vectors) if self.metric == "cosine" else vectors)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(exist_ok=True)
            faiss.write_index(index, str(tmp))
            os.replace(tmp, self.path)
            atomic_write_json(self.path.with_suffix(".json"), self.stamp)  # last: the index counts from now
        except (OSError, RuntimeError, ClipInterpretError) as err:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"cannot store the search index in {self.path.parent} ({err}); it is kept in memory "
                          "and built again next time", stacklevel=3)
        return index

    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (indices, exact scores): ``rerank`` candidates from the index, scored exactly."""
        query = _query(query, self.metric)
        _, found = self.index.search(np.ascontiguousarray(query[None], np.float32), max(int(k), self.rerank))
        found = found[0][found[0] >= 0]
        scores = _scores(self.heads.gather(found), query, self.metric)
        best = top_k(scores, k)
        return found[best], scores[best]


class RunSearch:
    """Search of one run's head sets: exact by streaming, or through stored ``RunIndex``es
    (loaded once per head set and metric, built at most once at a time)."""

    def __init__(self, run):
        self.run = run
        self._indexes: dict = {}
        self._lock = threading.Lock()
        self._building: dict = {}

    def exact(self, heads: list[str], query, k: int, reduce: str = "sum", metric: str = "dot"):
        return exact_search(HeadSet(self.run, heads, reduce), query, k, metric)

    def approximate(self, heads: list[str], query, k: int, reduce: str = "sum", metric: str = "dot"):
        key = (tuple(sorted(heads)), reduce, metric)
        with self._lock:
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one build per head set; other requests for it wait for that build
            if key not in self._indexes:
                self._indexes[key] = RunIndex(HeadSet(self.run, heads, reduce), metric)
        return self._indexes[key].search(query, k)
