"""What the web app serves, without the web: runs, their models (loaded once per process and
shared between runs with the same model), head labels, and the five analyses as handlers
that turn user input into display-ready results or a clear message.

Nothing here names a file from user input: run images are chosen by position, uploads
arrive as files that the web layer has already received; each is checked by its content,
decoded once and shrunk to what the models see. Messages for the browser go through
``Registry.public``: no server path reaches it.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import analyses
from ..errors import ClipInterpretError, ImageLoadError
from ..images import load_image
from ..labels import LABELS_FILE, head_labels, normalise_property

ALL_HEADS = "all heads"
ALL_LAYERS = "all layers"
SPECTRA_POOLS = ("toy", "general")  # the pools the app computes spectra with; a run's own files add theirs
SPECTRA_COLUMNS = ["direction", "singular value", "sign", "fit", "texts (weight)"]
UPLOAD_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF", "PPM")  # by content, not by name
MAX_UPLOAD_PIXELS = 50_000_000  # a 50 MP photo; below the library's guard (89 MP): decoding is what takes memory
_DECODING = threading.BoundedSemaphore(2)  # uploads decoded at once, whatever the number of sessions
_SERVER_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"`,;()]+/)*([^\s/'\"`,;()]+)")


@dataclass
class RunEntry:
    """One run as the app serves it; ``error`` says why it cannot be used (then the rest is empty)."""

    key: str
    path: Path
    run: object = None
    model: object = None
    store: analyses.ContributionStore | None = None
    labels: dict[str, str] = field(default_factory=dict)
    labels_note: str = ""
    error: str | None = None
    _name_root: str | None = field(default=None, repr=False)

    def shown_name(self, name: str) -> str:
        """An image's name for the page: a file of a folder or list run relative to the folder all the
        run's files share (``cat/001.jpg``), never the server path; other names as they are."""
        if not os.path.isabs(name):
            return name
        if self._name_root is None:
            files = [n for n in self.run.names if os.path.isabs(n)]
            try:
                root = os.path.commonpath(files) if files else ""
            except ValueError:
                root = ""
            self._name_root = root if root not in files else os.path.dirname(root)
        return os.path.relpath(name, self._name_root) if self._name_root else Path(name).name

    @property
    def usable(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error:
            return f"**{self.key}** cannot be used: {self.error}"
        run = self.run
        layers = run.layers
        text = (f"**{self.key}**: {len(run):,} images, model `{run.model_spec}`, "
                f"layers {layers[0]}-{layers[-1]} x {run.n_heads} heads. ")
        return text + (self.labels_note or f"{len(self.labels)} heads labelled ({LABELS_FILE}).")

    def head_choices(self, layer=ALL_LAYERS, with_all: bool = True) -> list[tuple[str, str]]:
        """(shown, value) pairs: ``L10.H3 (color)`` for labelled heads, bare names otherwise."""
        names = self.run.head_names() if self.usable else []
        if layer not in (None, ALL_LAYERS):
            names = [n for n in names if n.startswith(f"L{int(layer)}.")]
        choices = [(f"{n} ({self.labels[n]})" if n in self.labels else n, n) for n in names]
        if with_all:
            scope = ALL_HEADS if layer in (None, ALL_LAYERS) else f"all heads of layer {int(layer)}"
            choices.insert(0, (scope, ALL_HEADS if layer in (None, ALL_LAYERS) else f"layer:{int(layer)}"))
        return choices

    def layer_choices(self) -> list[tuple[str, str]]:
        layers = self.run.layers if self.usable else []
        return [(ALL_LAYERS, ALL_LAYERS)] + [(f"layer {layer}", str(layer)) for layer in layers]

    def default_head(self) -> str:
        """The first labelled head (the interesting ones), else the first head."""
        names = self.run.head_names() if self.usable else []
        labelled = [n for n in names if n in self.labels]
        return (labelled or names or [ALL_HEADS])[0]

    def spectra_files(self) -> dict[str, Path]:
        """The run folder's spectra results (``clip-interpret spectra --run``) by pool:
        ``{"toy": RUN/spectra-toy.json}``."""
        if not self.usable:
            return {}
        return {p.stem[len("spectra-"):]: p for p in sorted(self.path.glob("spectra-*.json")) if p.is_file()}

    def spectra_pools(self) -> list[str]:
        """The pools the Spectra tab offers: the run's own spectra files first, then the built-in pools."""
        return list(dict.fromkeys([*self.spectra_files(), *SPECTRA_POOLS])) if self.usable else []

    def default_spectra_pool(self) -> str | None:
        """The toy pool for the toy model, else the run's first spectra file, else the general pool."""
        if not self.usable:
            return None
        if self.run.model_spec == "toy":
            return "toy"
        return next(iter(self.spectra_files()), "general")

    def properties(self) -> list[str]:
        return sorted({normalise_property(label) for label in self.labels.values()})

    def heads(self, choice) -> str | list[str]:
        """A head chooser's value(s) -> a head selection for the analyses."""
        values = choice if isinstance(choice, (list, tuple)) else [choice]
        values = [str(v) for v in values if v not in (None, "")]
        if not values:
            raise ClipInterpretError("no head chosen; pick a head, or 'all heads'")
        if ALL_HEADS in values:
            return "all"
        heads = []
        for value in values:
            if value.startswith("layer:"):  # every head of one layer
                layer = whole_number(value[6:], "a layer")
                heads += [f"L{layer}.H{h}" for h in range(self.run.n_heads)]
            else:
                heads.append(value)
        return heads


class _Serialised:
    """A model's text encoder called by one request at a time (Hugging Face fast tokenizers are
    not thread-safe: "Already borrowed"); image work and search stay concurrent."""

    def __init__(self, encoder):
        self._encoder = encoder
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._encoder(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._encoder, name)


class Registry:
    """The runs of one app process. Models are loaded once (at start) and shared by spec."""

    def __init__(self, paths, model: str | None = None, loader=None, cache_bytes: int = 2 << 30):
        from ..runstore import open_run
        from ..models import load_model

        self._loader = loader or load_model
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()
        self._spectra: dict[tuple[str, str], dict] = {}  # (weights fingerprint, pool) -> spectra JSON
        self._spectra_lock = threading.Lock()
        self.spectra_computed = 0  # how many spectra this process computed (the rest came from the cache or files)
        self.entries: dict[str, RunEntry] = {}
        for raw in paths:
            path = Path(raw)
            key = path.name or str(path)
            while key in self.entries:
                key = f"{key}'"
            entry = RunEntry(key, path)
            try:
                entry.run = open_run(path)
                spec = model or entry.run.model_spec
                entry.model = self._model(spec)
                entry.run.check_model(entry.model)
                entry.store = analyses.ContributionStore(entry.run, max_bytes=cache_bytes)
                try:
                    entry.labels = head_labels(path)
                except ClipInterpretError as err:
                    entry.labels_note = (f"No head labels: head choosers show bare names; property neighbours "
                                         f"need them ({err})." if (path / LABELS_FILE).exists() else
                                         f"No head labels yet: head choosers show bare names; run "
                                         f"`clip-interpret label {path}` for property neighbours.")
            except Exception as err:  # noqa: BLE001 - any failure makes this run unavailable, not the app
                entry.error = str(err) if isinstance(err, ClipInterpretError) else f"{type(err).__name__}: {err}"
                entry.run = entry.model = entry.store = None
            self.entries[key] = entry

    def _model(self, spec: str):
        with self._lock:
            if spec not in self._models:
                try:
                    model = self._loader(spec)
                    model.text = _Serialised(model.text)
                    self._models[spec] = model
                except Exception as err:  # noqa: BLE001 - remembered, so every run of this model says why
                    self._models[spec] = err
            found = self._models[spec]
        if isinstance(found, Exception):
            raise found
        return found

    @property
    def n_models(self) -> int:
        return sum(not isinstance(m, Exception) for m in self._models.values())

    def keys(self) -> list[str]:
        return list(self.entries)

    def first_usable(self) -> str | None:
        return next((k for k, e in self.entries.items() if e.usable), None)

    def find(self, key) -> RunEntry | None:
        return self.entries.get(key) if isinstance(key, str) else None

    def get(self, key) -> RunEntry:
        entry = self.find(key)
        if entry is None:
            raise ClipInterpretError(f"unknown run {key!r}; choose one of {', '.join(self.entries)}")
        if not entry.usable:
            raise ClipInterpretError(f"run {entry.key} cannot be used: {entry.error}")
        return entry

    def spectra(self, entry: RunEntry, pool) -> tuple[dict, str]:
        """(a run's spectra for ``pool``, as ``Spectra.to_json``; where they come from): the run's own
        ``spectra-POOL.json`` when it holds one made with the run's weights, else computed from the run's
        model (every head, the pool's defaults) once per model and pool in this process."""
        files = entry.spectra_files()
        pool = str(pool or "")
        if pool not in files and pool not in SPECTRA_POOLS:
            raise ClipInterpretError(f"unknown pool {pool!r}; choose one of {', '.join(entry.spectra_pools())}")
        if pool in files:
            import json

            try:
                data = json.loads(files[pool].read_text())
            except (OSError, ValueError) as err:
                raise ClipInterpretError(f"cannot read {files[pool].name} of run {entry.key}: {err}; write it again "
                                         "with clip-interpret spectra --run RUN") from None
            if not isinstance(data, dict) or not isinstance(data.get("heads"), dict):
                raise ClipInterpretError(f"{files[pool].name} of run {entry.key} holds no heads; write it again "
                                         "with clip-interpret spectra --run RUN")
            fingerprint = data.get("fingerprint")
            if fingerprint == entry.run.fingerprint or (not fingerprint and data.get("model") == entry.run.model_spec):
                return data, f"the run's {files[pool].name}"
            if pool not in SPECTRA_POOLS:
                raise ClipInterpretError(f"{files[pool].name} of run {entry.key} was made with another model than "
                                         "the run's; write it again with clip-interpret spectra --run RUN")
        from ..spectra import head_spectra

        key = (entry.run.fingerprint, pool)
        with self._spectra_lock:  # one computation per model and pool, whoever asks first
            if key not in self._spectra:
                self._spectra[key] = head_spectra(entry.model, pool=pool).to_json()
                self.spectra_computed += 1
        return self._spectra[key], "the model's weights (computed once, kept for this app's other requests)"

    @property
    def query_side(self) -> int:
        """The shorter side an uploaded query is kept at: the largest input any served model takes."""
        sizes = [max(m.preprocess.image_size) for m in self._models.values() if not isinstance(m, Exception)]
        return max(sizes, default=224)

    def public(self, text: str) -> str:
        """A message for the browser: a run's folder becomes the run's name, any other server path its
        last part (an upload's file name, a checkpoint's file name)."""
        for entry in self.entries.values():
            forms = {str(entry.path.resolve()), str(entry.path.absolute()), str(entry.path)} - {entry.key}
            for form in sorted(forms, key=len, reverse=True):
                text = text.replace(form, entry.key)
        return _SERVER_PATH.sub(r"\1", text)


# ------------------------------------------------------------------ handlers
def display(image: Image.Image, least: int = 160, most: int = 640) -> Image.Image:
    """An image for the page: small ones (the toy model's 64x64) enlarged by a whole factor with
    sharp pixels, large ones shrunk to ``most`` pixels on their longer side."""
    if max(image.size) > most:  # (no full-size copy, unlike thumbnail())
        scale = most / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        return image.resize(size, Image.BICUBIC, reducing_gap=2.0)
    factor = -(-least // max(image.size))
    return image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST) if factor > 1 else image


def whole_number(value, what: str) -> int:
    """A whole number from the page (which sends numbers as given), or a clear error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise ClipInterpretError(f"{what} must be a whole number, not {value!r}")
    return int(number)


def _k(k, default: int) -> int:
    k = default if k in (None, "") else whole_number(k, "k")
    if not 1 <= k <= analyses.MAX_K:
        raise ClipInterpretError(f"k must be from 1 to {analyses.MAX_K}, not {k}")
    return k


def upload_problem(path) -> str | None:
    """Why an uploaded file is refused (not an image of an accepted format, or too many pixels),
    or None; reads only the file's header."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decompression-bomb warnings: the size is checked below
            with Image.open(path) as image:
                kind, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        return f"{name} has too many pixels; the app accepts up to {MAX_UPLOAD_PIXELS:,}"
    except Exception:  # noqa: BLE001 - whatever Pillow cannot identify is not an image
        return f"{name} is not an image file; upload one of {', '.join(UPLOAD_FORMATS)}"
    if kind not in UPLOAD_FORMATS:
        return f"{name} is a {kind} file; upload one of {', '.join(UPLOAD_FORMATS)}"
    if width * height > MAX_UPLOAD_PIXELS:
        return (f"{name} has {width}x{height} pixels, more than the app accepts ({MAX_UPLOAD_PIXELS:,}); "
                "upload a smaller image")
    return None


def remove_upload(path) -> None:
    """Delete an uploaded file and its folder (gradio keeps each upload in a folder of its own)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty (the same file uploaded twice at once), or gone
        pass


def query_image(path, side: int, preview: int = 220) -> tuple[Image.Image, Image.Image]:
    """An uploaded query, decoded once (two at a time at most): (the image shrunk so that its shorter
    side is ``side``, the models' input, as their preprocessing would; a preview for the page).
    The file stays for gradio (identical uploads of several sessions share it) until its cache is
    cleared: hourly, and at exit."""
    problem = upload_problem(path)
    if problem:
        raise ClipInterpretError(problem)
    with _DECODING:  # the full-size image exists only in here
        try:
            image = load_image(path, max_pixels=MAX_UPLOAD_PIXELS)
        except ImageLoadError as err:
            raise ImageLoadError(Path(path).name, err.reason) from None
        shown = display(image, preview)
        width, height = image.size
        if min(width, height) > side:  # the rounding of Preprocess.crop: the model's crop needs no resize
            shape = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
            image = image.resize(shape, Image.BICUBIC)
    return image, shown


def _image(query):
    """The query: a run image number, an uploaded image (decoded by ``query_image``), or nothing."""
    if query is None or (isinstance(query, str) and not query):
        raise ClipInterpretError("no query image: upload one, or pick an image of the run")
    return query


def neighbours_gallery(result: analyses.Neighbours) -> list[tuple[Image.Image, str]]:
    return [(display(im), f"#{r + 1}  image {i}  score {s}")
            for r, (im, i, s) in enumerate(zip(result.images, result.indices, analyses.format_scores(result.scores)))]


def neighbours_text(result: analyses.Neighbours, entry: RunEntry | None = None) -> str:
    what = {"property": f"property **{result.property}** (mean of heads {', '.join(result.heads)})",
            "image": f"heads {', '.join(result.heads)}" if len(result.heads) < 12 else f"{len(result.heads)} heads",
            "text": f"text *{result.query}*, heads "
                    + (", ".join(result.heads) if len(result.heads) < 12 else f"{len(result.heads)} heads")}
    names = [entry.shown_name(n) for n in result.names] if entry is not None else result.names
    rows = "\n".join(f"| {r + 1} | {i} | {n} | {s} |" for r, (i, n, s) in
                     enumerate(zip(result.indices, names, analyses.format_scores(result.scores))))
    score = "cosine" if result.metric == "cosine" else "dot product"
    return f"Top {len(result.indices)} by {what[result.analysis]} ({score}):\n\n| rank | image | name | score |\n|---|---|---|---|\n{rows}"


def segmentation_gallery(result: analyses.Segmentation) -> list[tuple[Image.Image, str]]:
    shown = [(display(result.image, 256), "image")]
    shown += [(analyses.overlay(result.image, m, result.vmax, colour_bar=True), t)
              for m, t in zip(result.maps, result.titles)]
    return shown


def segmentation_text(result: analyses.Segmentation) -> str:
    shares = ", ".join(f"*{t}* {s:+.4f}" for t, s in zip(result.texts, result.shares))
    return (f"Heads: {result.heads_label} (layers {result.layers}). Colour scale ±{result.vmax:.4g} for every map "
            f"(red raises the similarity, blue lowers it). The heads' share of the similarity: {shares}.")


def run_property_neighbours(registry: Registry, key, image, prop, k, metric="dot"):
    entry = registry.get(key)
    if not entry.labels:
        raise ClipInterpretError(entry.labels_note or f"run {entry.key} has no labelled heads")
    result = analyses.property_neighbours(entry.model, entry.run, _image(image), prop or "", k=_k(k, 4),
                                          labels=entry.labels, store=entry.store, metric=metric or "dot")
    return neighbours_gallery(result), registry.public(neighbours_text(result, entry))


def run_topic_segmentation(registry: Registry, key, image, text, heads):
    entry = registry.get(key)
    result = analyses.topic_segmentation(entry.model, _image(image), text or "", entry.heads(heads), run=entry.run)
    return segmentation_gallery(result), registry.public(segmentation_text(result))


def run_contrastive_segmentation(registry: Registry, key, image, text_a, text_b, heads):
    entry = registry.get(key)
    result = analyses.contrastive_segmentation(entry.model, _image(image), text_a or "", text_b or "",
                                               entry.heads(heads), run=entry.run)
    return segmentation_gallery(result), registry.public(segmentation_text(result))


def run_image_neighbours(registry: Registry, key, image, heads, k, metric="dot"):
    entry = registry.get(key)
    result = analyses.image_neighbours(entry.model, entry.run, _image(image), entry.heads(heads), k=_k(k, 8),
                                       store=entry.store, metric=metric or "dot")
    return neighbours_gallery(result), registry.public(neighbours_text(result, entry))


def run_text_neighbours(registry: Registry, key, text, heads, k):
    entry = registry.get(key)
    result = analyses.text_neighbours(entry.model, entry.run, text or "", entry.heads(heads), k=_k(k, 3),
                                      store=entry.store)
    return neighbours_gallery(result), registry.public(neighbours_text(result, entry))


def run_spectra(registry: Registry, key, head, pool=None):
    """A head's directions read from its weights: (rows of ``SPECTRA_COLUMNS``, a markdown summary)."""
    import html

    entry = registry.get(key)
    head = head[0] if isinstance(head, (list, tuple)) and len(head) == 1 else head
    if head in (None, "", [], ()) or not isinstance(head, str) or head == ALL_HEADS or head.startswith("layer:"):
        raise ClipInterpretError("choose one head (e.g. L4.H2): the Spectra tab lists one head's directions")
    data, origin = registry.spectra(entry, pool or entry.default_spectra_pool())
    found = data["heads"].get(head)
    if not isinstance(found, dict):
        raise ClipInterpretError(f"head {head} is not in these spectra; choose one of "
                                 f"{', '.join(list(data['heads'])[:3])}, ... (the model's heads)")
    rows = []
    for j, d in enumerate(found.get("directions") or []):
        texts = "; ".join(f"{t} ({w:.2f})" for t, w in zip(d.get("texts") or [], d.get("weights") or []))
        rows.append([j + 1, round(float(d["singular"]), 4), "+" if d.get("sign", 1) > 0 else "-",
                     f"{float(d['fit']):.1%}", texts or "-"])
    label, confidence = found.get("label"), found.get("confidence") or 0.0
    mine = f"**{html.escape(str(label))}** ({confidence:.0%})" if label else "none (the pool is untagged)"
    theirs = entry.labels.get(head)
    beside = (f"; the run's label: **{html.escape(theirs)}**"
              + (" (the same)" if label and normalise_property(label) == normalise_property(theirs) else "")
              if theirs else "")
    pool_info = data.get("pool") or {}
    text = (f"**{head}**: label from the weights {mine}{beside}. Its top {len(rows)} singular directions in the "
            f"joint space, each explained by at most {data.get('n_texts', '?')} texts of pool "
            f"{html.escape(Path(str(pool_info.get('name', pool))).name)} ({pool_info.get('size', '?')} texts); "
            f"fit: the share of the direction the texts capture. From {origin}.")
    return rows, registry.public(text)


def pick_run_image(registry: Registry, key, index) -> tuple[int, Image.Image]:
    """(the number, the image) of a run image chosen by its number."""
    entry = registry.get(key)
    if index in (None, ""):
        raise ClipInterpretError("type the number of a run image")
    index = whole_number(index, "a run image number")
    return index, analyses.run_image(entry.run, index)
