"""The five CLIP-InterpreT analyses, as plain functions over a loaded model and a run.

* ``property_neighbours``: query image + property -> the run's top-k images (default 4)
  under the mean contribution of the heads labelled with that property;
* ``topic_segmentation``: image + text + heads -> a map over the image of the text's
  similarity with those heads' per-patch contributions;
* ``contrastive_segmentation``: image + texts A, B -> the A-B and B-A maps on one scale;
* ``image_neighbours``: image + head(s) -> top-k images (default 8) by that head's contribution;
* ``text_neighbours``: text + head(s) -> top-k images (default 3).

Scores are dot products of contributions in the joint space (docs/analyses.md
defines each one). A head selection is one head (``"L5.H3"``), a list, or
``"all"``: a set of heads always means the *sum* of their contributions.
Nearest neighbours are exact: one matrix-vector product over the run's head
contributions (read shard by shard from the fp16 memory maps and kept as float32
matrices in a ``ContributionStore``) and ``np.argpartition``; a run too large for
the cache is scored shard by shard, and very large runs are served by a FAISS
index per head set stored in the run folder (``search.py``; ``ApproximateIndex``
is the in-memory one over any matrix). Every function returns data;
``render`` draws any result as a PNG and ``overlay`` draws a heat map for the web app.
"""

from __future__ import annotations

import io
import re
import textwrap
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conventions import DEFAULT_CONVENTION
from .decompose import decompose, parse_head, resolve_layers, select_heads
from .errors import ClipInterpretError
from .images import describe, load_image
from .labels import head_labels, heads_with_property, normalise_property
from .search import HeadSet, RunSearch, matvec, top_k

DEFAULT_K = {"property": 4, "image": 8, "text": 3}
MAX_K = 64  # neighbours per result: each is loaded and drawn
METRICS = ("dot", "cosine")
_TOY_NAME = re.compile(r"^toyworld:(\d+):(\d+)$")


# ---------------------------------------------------------------- inputs
def run_image(run, index: int) -> Image.Image:
    """Image ``index`` of a run as RGB (toy-world items are regenerated; others read from their files).

    Only the run's own images can be named this way: by position, never by a path.
    """
    name = run.names[check_index(run, index)]
    if run.source_kind == "toyworld":
        from .toyworld import generate

        match = _TOY_NAME.match(name)
        if not match:
            raise ClipInterpretError(f"run {run.path}: {name!r} is not a toy-world item name")
        return generate(int(match.group(2)), seed=int(match.group(1))).image
    from .runstore.sources import read_item, table_image

    if run.source_kind == "table-bytes":  # the image's bytes are in the table, its name is only a name
        return load_image(table_image(run.source_spec, int(run.source_indices[index])))
    return load_image(read_item(name))


def check_index(run, index) -> int:
    """A run image's position, checked."""
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise ClipInterpretError(f"run image index must be an integer, got {index!r}") from None
    if not 0 <= index < len(run):
        raise ClipInterpretError(f"run {run.path} has images 0-{len(run) - 1}; there is no image {index}")
    return index


def _query_image(run, image) -> tuple[Image.Image, str]:
    """(RGB image, description) for a path, bytes, PIL image, array, or a run image index."""
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        if run is None:
            raise ClipInterpretError("an image given by its index needs a run")
        return run_image(run, int(image)), f"run image {int(image)} ({run.names[int(image)]})"
    if image is None:
        raise ClipInterpretError("no image given: upload an image or pick one from the run")
    return load_image(image), describe(image)


def check_text(text, what: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ClipInterpretError(f"the {what} is empty; type a short description, e.g. 'a red circle'")
    return text.strip()


def check_k(k, n: int | None = None) -> int:
    """k as a whole number from 1 to ``MAX_K`` (and to ``n``, the run's images when given): a larger
    k is capped with a warning (every neighbour is loaded and drawn)."""
    try:
        value = int(k)
    except (TypeError, ValueError):
        raise ClipInterpretError(f"k must be a whole number, got {k!r}") from None
    if n == 0:
        raise ClipInterpretError("the run holds no image, so there is nothing to search; index a source with "
                                 "readable images (`clip-interpret index`)")
    if value < 1:
        raise ClipInterpretError(f"k must be at least 1, got {k}")
    limit = MAX_K if n is None else min(MAX_K, n)
    if value > limit:
        why = f"the run has {n} images" if limit == n else f"at most {MAX_K} neighbours are shown"
        warnings.warn(f"k={value} is more than {limit} ({why}); showing the top {limit}", stacklevel=2)
    return min(value, limit)


def _layers(model, run) -> tuple[list[int], int]:
    """The analysed layers and heads per layer: the run's, or the model's last 4 layers without a run."""
    if run is not None:
        return run.layers, run.n_heads
    return resolve_layers(None, model.vit.cfg.layers), model.vit.cfg.heads


def run_heads(run, heads) -> list[str]:
    return select_heads(heads, run.layers, run.n_heads, where=f" of run {run.path}")


def format_scores(scores) -> list[str]:
    """Scores as signed text with 4 significant digits, more where different scores would print alike
    (a ranking of +0.0010, +0.0010, +0.0010 says nothing)."""
    values = [float(s) for s in scores]
    for digits in range(4, 10):
        shown = [f"{v:+.{digits}g}" for v in values]
        if len(set(shown)) == len(set(values)):
            break
    return shown


def heads_label(heads: list[str], layers: list[int], n_heads: int) -> str:
    """``all heads`` when the selection is every analysed head, else the names."""
    return "all heads" if len(heads) == len(layers) * n_heads else ", ".join(heads)


class ContributionStore:
    """A run's head contributions as float32 matrices [N, D], for nearest-neighbour search.

    ``matrix(heads)`` is the sum (``reduce="sum"``) or mean of the heads' contributions,
    read shard by shard from the fp16 memory maps (never every head at once) and kept
    in a thread-safe LRU cache bounded by ``max_bytes`` (0: nothing is kept). A head
    set whose matrix is larger than ``max_bytes`` is searched exactly by streaming the
    shards instead (memory of one shard). With ``approximate=True``, runs of at least
    ``ann_min_rows`` rows are searched through a FAISS index per head set and metric,
    built on demand from the shards and stored in the run folder (``search.RunIndex``);
    ``None`` (default): so are runs of that size whose matrices do not fit ``max_bytes``,
    when FAISS is installed (runs larger than memory), while the others stay exact.
    """

    def __init__(self, run, max_bytes: int = 2 << 30, approximate: bool | None = None,
                 ann_min_rows: int = 100_000):
        from importlib.util import find_spec

        self.run = run
        self.max_bytes = int(max_bytes)
        if approximate is None:
            approximate = len(run) * run.dim * 4 > self.max_bytes and find_spec("faiss") is not None
        self.approximate = approximate
        self.ann_min_rows = ann_min_rows
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._large = RunSearch(run)

    def _read(self, heads: list[str], reduce: str) -> np.ndarray:
        out = np.empty((len(self.run), self.run.dim), np.float32)
        for first, block in HeadSet(self.run, heads, reduce).blocks():
            out[first:first + block.shape[0]] = block
        return out

    def _entry(self, heads: list[str], reduce: str) -> dict:
        key = (tuple(sorted(heads)), reduce)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        matrix = self._read(heads, reduce)
        entry = {"matrix": matrix, "norms": None}
        if matrix.nbytes <= self.max_bytes:
            with self._lock:
                self._cache[key] = entry
                while sum(e["matrix"].nbytes for e in self._cache.values()) > self.max_bytes:
                    self._cache.popitem(last=False)
        return entry

    def matrix(self, heads: list[str], reduce: str = "sum") -> np.ndarray:
        return self._entry(heads, reduce)["matrix"]

    def search(self, heads: list[str], query: np.ndarray, k: int, reduce: str = "sum",
               metric: str = "dot") -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (indices, scores) of the heads' matrix against ``query`` [D]."""
        if metric not in METRICS:
            raise ClipInterpretError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if self.approximate and len(self.run) >= self.ann_min_rows:
            return self._large.approximate(heads, query, k, reduce, metric)
        if len(self.run) * self.run.dim * 4 > self.max_bytes:  # not kept: stream the shards
            return self._large.exact(heads, query, k, reduce, metric)
        entry = self._entry(heads, reduce)
        matrix = entry["matrix"]
        query = np.asarray(query, np.float32)
        if metric == "cosine":
            if entry["norms"] is None:
                entry["norms"] = np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
            query = query / max(float(np.linalg.norm(query)), 1e-12)
        scores = matvec(matrix, query)
        if metric == "cosine":
            scores /= entry["norms"]
        idx = top_k(scores, k)
        return idx, scores[idx]


class ApproximateIndex:
    """FAISS inverted-file index (inner product) over a matrix [N, D]; needs ``pip install faiss-cpu``
    (the ``ann`` extra). ``nprobe`` of ``nlist`` lists are searched; recall is measured in bench/analyses.py."""

    def __init__(self, matrix: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0):
        try:
            import faiss
        except ImportError:
            raise ClipInterpretError("approximate search needs FAISS: pip install 'clip-interpret[ann]' "
                                     "(faiss-cpu), or use exact search") from None
        matrix = np.ascontiguousarray(matrix, np.float32)
        n, dim = matrix.shape
        self.nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
        quantiser = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFFlat(quantiser, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        self.index.train(matrix)
        self.index.add(matrix)
        self.index.nprobe = nprobe or max(1, self.nlist // 4)
        self._quantiser = quantiser  # keep alive: the IVF index refers to it

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(query), np.float32)
        scores, idx = self.index.search(queries, int(k))
        keep = idx[0] >= 0
        return idx[0][keep].astype(np.int64), scores[0][keep]


def recall_at_k(exact: np.ndarray, approximate: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by the approximate search ([Q, k] index arrays)."""
    hits = [len(set(a.tolist()) & set(e.tolist())) / max(1, len(e)) for e, a in zip(exact, approximate)]
    return float(np.mean(hits)) if hits else 1.0


# ------------------------------------------------------------------ results
@dataclass
class Neighbours:
    """Top-k images of a run for one query, best first."""

    analysis: str  # "property", "image" or "text"
    query: str  # the image's description, or the text
    heads: list[str]
    indices: np.ndarray
    scores: np.ndarray
    names: list[str]
    images: list[Image.Image]  # the neighbours as the model sees them (crops)
    query_image: Image.Image | None = None
    property: str | None = None
    metric: str = "dot"
    run: str = ""

    def to_dict(self) -> dict:
        out = {"analysis": self.analysis, "run": self.run, "query": self.query, "heads": self.heads,
               "metric": self.metric,
               "neighbours": [{"rank": r + 1, "index": int(i), "name": n, "score": float(s)}
                              for r, (i, n, s) in enumerate(zip(self.indices, self.names, self.scores))]}
        if self.property is not None:
            out["property"] = self.property
        return out


@dataclass
class Segmentation:
    """Heat maps over the image the model sees: ``maps`` [n, H, W] (upsampled), ``grid`` [n, gh, gw]."""

    analysis: str  # "segment" or "contrast"
    image: Image.Image
    query: str
    texts: list[str]
    heads: list[str]
    heads_label: str
    layers: list[int]
    maps: np.ndarray
    grid: np.ndarray
    titles: list[str]
    vmax: float  # one colour scale for every map of the result
    shares: list[float] = field(default_factory=list)  # the heads' share of each text's similarity

    def to_dict(self) -> dict:
        return {"analysis": self.analysis, "image": self.query, "texts": self.texts, "heads": self.heads,
                "heads_label": self.heads_label, "layers": self.layers, "vmax": self.vmax,
                "shares": dict(zip(self.texts, self.shares)),
                "maps": [{"title": t, "min": float(m.min()), "max": float(m.max()),
                          "grid": np.round(g, 7).tolist()} for t, m, g in zip(self.titles, self.maps, self.grid)]}


# ---------------------------------------------------------------- analyses
def _decompose_query(model, run, image, spatial: bool = False):
    pil, name = _query_image(run, image)
    layers, _ = _layers(model, run)
    if run is not None:
        run.check_model(model)
    convention = run.convention if run is not None else DEFAULT_CONVENTION  # comparable with the run's stored pieces
    return pil, name, decompose(model, [pil], layers=layers, spatial=spatial, convention=convention)


def _neighbours(model, run, analysis, query, heads, idx, scores, query_image=None, prop=None, metric="dot"):
    images = [model.preprocess.crop(run_image(run, int(i))) for i in idx]  # as the model saw them
    return Neighbours(analysis, query, heads, np.asarray(idx), np.asarray(scores, np.float32),
                      [run.names[int(i)] for i in idx], images, query_image, prop, metric, str(run.path))


def _head_sum(d, heads: list[str], reduce: str = "sum") -> np.ndarray:
    """Sum (or mean) of the chosen heads' contributions of the first image [D]."""
    contrib = d.head_contributions()[0]  # [L, H, D]
    rows = [contrib[d.layers.index(layer), h] for layer, h in map(parse_head, heads)]
    total = torch.stack(rows).sum(0)
    return (total / len(rows) if reduce == "mean" else total).float().numpy()


def property_heads(run, prop: str, labels: dict | None = None) -> list[str]:
    """The run's heads labelled ``prop`` (labels: the run's ``labels.json`` unless given)."""
    if not isinstance(prop, str) or not prop.strip():
        raise ClipInterpretError("the property is empty; name one, e.g. 'color'")
    if labels is None:
        labels = head_labels(run.path)
    heads = heads_with_property(labels, prop)
    if not heads:
        known = sorted({normalise_property(v) for v in labels.values()})
        raise ClipInterpretError(f"no head of run {run.path} carries the property {prop!r}; labelled properties: "
                                 f"{', '.join(known) if known else 'none (no head is labelled)'}")
    return run_heads(run, heads)


def property_neighbours(model, run, image, prop: str, k: int = DEFAULT_K["property"], labels: dict | None = None,
                        store: ContributionStore | None = None, metric: str = "dot") -> Neighbours:
    """Images of ``run`` closest to ``image`` in the heads labelled ``prop``.

    score(i) = mean_h c_q,h . mean_h c_i,h over the heads h labelled ``prop`` (c: a head's
    contribution to the unit image embedding; q: the query image).
    """
    k = check_k(k, len(run))
    heads = property_heads(run, prop, labels)
    pil, name, d = _decompose_query(model, run, image)
    store = store or ContributionStore(run, max_bytes=0)
    idx, scores = store.search(heads, _head_sum(d, heads, "mean"), k, reduce="mean", metric=metric)
    return _neighbours(model, run, "property", name, heads, idx, scores, model.preprocess.crop(pil),
                       normalise_property(prop), metric)


def image_neighbours(model, run, image, heads, k: int = DEFAULT_K["image"], store: ContributionStore | None = None,
                     metric: str = "dot") -> Neighbours:
    """Images of ``run`` closest to ``image`` in one head (or the sum of a set of heads):
    score(i) = c_q,S . c_i,S with c_S the sum of the heads' contributions."""
    k = check_k(k, len(run))
    heads = run_heads(run, heads)
    pil, name, d = _decompose_query(model, run, image)
    store = store or ContributionStore(run, max_bytes=0)
    idx, scores = store.search(heads, _head_sum(d, heads), k, metric=metric)
    return _neighbours(model, run, "image", name, heads, idx, scores, model.preprocess.crop(pil), None, metric)


def text_neighbours(model, run, text: str, heads, k: int = DEFAULT_K["text"],
                    store: ContributionStore | None = None) -> Neighbours:
    """Images of ``run`` whose head contribution (sum over a set) has the largest share of the
    similarity with ``text``: score(i) = c_i,S . t, with t the unit text embedding."""
    k = check_k(k, len(run))
    text = check_text(text)
    heads = run_heads(run, heads)
    run.check_model(model)
    query = model.encode_text([text])[0].float().numpy()
    store = store or ContributionStore(run, max_bytes=0)
    idx, scores = store.search(heads, query, k)
    return _neighbours(model, run, "text", text, heads, idx, scores)


def _maps(model, run, image, texts: list[str], heads):
    layers, n_heads = _layers(model, run)
    chosen = select_heads(heads, layers, n_heads, where="" if run is None else f" of run {run.path}")
    pil, name, d = _decompose_query(model, run, image, spatial=True)
    text_emb = model.encode_text(texts)
    grid = d.similarity_maps(text_emb, heads=chosen, upsample=False)[0].numpy()  # [n, gh, gw]
    maps = d.similarity_maps(text_emb, heads=chosen)[0].numpy()  # [n, H, W]
    shares = d.token_similarity(text_emb, heads=chosen)[0].sum(0).tolist()  # over every token
    return model.preprocess.crop(pil), name, chosen, layers, n_heads, grid, maps, shares


def topic_segmentation(model, image, text: str, heads="all", run=None) -> Segmentation:
    """Map over ``image`` of ``text``'s similarity with the chosen heads' per-patch contributions
    (a set of heads, or ``"all"``, sums them). Layers: the run's, or the model's last 4."""
    text = check_text(text)
    crop, name, chosen, layers, n_heads, grid, maps, shares = _maps(model, run, image, [text], heads)
    label = heads_label(chosen, layers, n_heads)
    vmax = float(max(np.abs(maps).max(), 1e-12))
    return Segmentation("segment", crop, name, [text], chosen, label, layers, maps, grid,
                        [f"{text!r} ({label})"], vmax, shares)


def contrastive_segmentation(model, image, text_a: str, text_b: str, heads="all", run=None) -> Segmentation:
    """The maps of A-B and B-A (exact negatives of each other) on one shared colour scale."""
    text_a, text_b = check_text(text_a, "first text"), check_text(text_b, "second text")
    crop, name, chosen, layers, n_heads, grid, maps, shares = _maps(model, run, image, [text_a, text_b], heads)
    label = heads_label(chosen, layers, n_heads)
    diff, diff_grid = maps[0] - maps[1], grid[0] - grid[1]
    vmax = float(max(np.abs(diff).max(), 1e-12))
    return Segmentation("contrast", crop, name, [text_a, text_b], chosen, label, layers,
                        np.stack([diff, -diff]), np.stack([diff_grid, -diff_grid]),
                        [f"{text_a!r} - {text_b!r}", f"{text_b!r} - {text_a!r}"], vmax, shares)


# ---------------------------------------------------------------- rendering
def overlay(image: Image.Image, heat: np.ndarray, vmax: float, size: int = 256, alpha: float = 0.55,
            colour_bar: bool = False) -> Image.Image:
    """The image with a heat map blended over it (red raises the similarity, blue lowers it),
    scaled so that its longer side is ``size`` pixels; with ``colour_bar``, the scale beside it."""
    from matplotlib import colormaps

    heat = np.asarray(heat, np.float32)
    rgb = colormaps["RdBu_r"](np.clip(heat / max(vmax, 1e-12) * 0.5 + 0.5, 0, 1))[..., :3]
    heat_image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    scale = size / max(image.size)
    shape = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    base = image.convert("RGB").resize(shape, Image.BICUBIC)
    shown = Image.blend(base, heat_image.resize(shape, Image.BILINEAR), alpha)
    return _with_colour_bar(shown, vmax) if colour_bar else shown


def _with_colour_bar(image: Image.Image, vmax: float) -> Image.Image:
    """``image`` with the heat maps' colour scale on its right: +vmax (red) at the top, -vmax at the bottom."""
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    width, height = image.size
    font = ImageFont.load_default(size=max(10, height // 18))
    labels = [(f"{vmax:+.3g}", 0.0), ("0", 0.5), (f"{-vmax:+.3g}", 1.0)]
    text_width = max(int(ImageDraw.Draw(image).textlength(text, font=font)) for text, _ in labels)
    bar_width, gap = max(8, height // 16), max(4, height // 40)
    out = Image.new("RGB", (width + 2 * gap + bar_width + gap + text_width + gap, height), "white")
    out.paste(image, (0, 0))
    ramp = colormaps["RdBu_r"](np.linspace(1, 0, height))[:, :3]  # row 0: +vmax
    out.paste(Image.fromarray((np.repeat(ramp[:, None], bar_width, axis=1) * 255).round().astype(np.uint8)),
              (width + 2 * gap, 0))
    draw = ImageDraw.Draw(out)
    for text, where in labels:
        anchor = "lt" if where == 0 else "lb" if where == 1 else "lm"
        draw.text((width + 3 * gap + bar_width, round(where * (height - 1))), text, fill="black", font=font,
                  anchor=anchor)
    return out


def _title(text: str, width_inches: float) -> str:
    """A figure title wrapped to the figure's width (never cut)."""
    return textwrap.fill(text, width=max(40, int(width_inches * 14)))


def _figure(result):
    from .viz import pyplot

    plt = pyplot()
    if isinstance(result, Segmentation):
        n = len(result.maps)
        fig, axes = plt.subplots(1, n + 1, figsize=(3.3 * (n + 1) + 0.6, 3.8), dpi=100, layout="constrained")
        axes[0].imshow(result.image)
        axes[0].set_title("image", fontsize=9)
        for ax, heat, title in zip(axes[1:], result.maps, result.titles):
            ax.imshow(result.image)
            shown = ax.imshow(heat, cmap="RdBu_r", vmin=-result.vmax, vmax=result.vmax, alpha=0.6)
            ax.set_title(textwrap.fill(title, 40), fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.colorbar(shown, ax=list(axes[1:]), fraction=0.046, pad=0.04)
        fig.suptitle(_title(f"{result.heads_label} (layers {result.layers})", fig.get_figwidth()), fontsize=9)
        return fig
    tiles = ([(result.query_image, "query")] if result.query_image is not None else []) + \
        [(im, f"#{r + 1}: image {i}\nscore {s}")
         for r, (im, i, s) in enumerate(zip(result.images, result.indices, format_scores(result.scores)))]
    columns = min(len(tiles), 9)  # up to the query and 8 neighbours in a row, then a grid
    rows = -(-len(tiles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.6 * rows + 0.4), dpi=100, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (im, title) in zip(axes.flat, tiles):
        ax.imshow(im)
        ax.set_title(title, fontsize=8)
    heads = f"heads {', '.join(result.heads)}"
    what = {"property": f"property {result.property!r} (mean of {heads})", "image": heads,
            "text": f"text {result.query!r}, {heads}"}
    fig.suptitle(_title(f"nearest neighbours by {what[result.analysis]}", fig.get_figwidth()), fontsize=9)
    return fig


def render(result: Neighbours | Segmentation, path: str | Path | None = None) -> Image.Image:
    """Draw a result as a PNG (written to ``path`` when given); returns the image."""
    from .viz import pyplot

    fig = _figure(result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    if path is not None:
        Path(path).write_bytes(buffer.getvalue())
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image
