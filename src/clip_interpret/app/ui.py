"""The gradio page: a run chooser, a query image (uploaded, or picked from the run by number),
the five analyses as tabs, and a Spectra tab that lists a head's directions read from its weights.

Each browser session keeps its query in a server-side ``gr.State`` (a run image number, or the
uploaded image itself, decoded once and shrunk); results go back as in-memory images, so no two
users share an output file. The only files read are the run's own images (by position) and
uploads, which the upload route checks by content (only images are kept) and which are decoded once.
Every event takes its values as sent and the handlers check them: a refused value is a message
in the page and one line in the server log.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402

from ..errors import ClipInterpretError  # noqa: E402
from . import core  # noqa: E402

log = logging.getLogger(__name__)
CSS = ".ci-msg p { margin: 0.2em 0; }"
BROWSE = 16  # run images shown at once when browsing


class UploadFilter:
    """ASGI middleware on gradio's upload route: every file received must be an image of an accepted
    format and size (by its content); otherwise the files are deleted and the request refused (415)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/upload"):
            return await self.app(scope, receive, send)
        held = []

        async def hold(message):
            held.append(message)

        await self.app(scope, receive, hold)  # the files are in place once the route (and its tasks) returned
        if held and held[0].get("status") == 200:
            paths = json.loads(b"".join(m.get("body", b"") for m in held[1:]) or b"[]")
            problems = [p for p in map(core.upload_problem, paths) if p]
            if problems:
                for path in paths:
                    core.remove_upload(path)
                log.warning("refused an upload: %s", problems[0])
                return await PlainTextResponse(problems[0], status_code=415)(scope, receive, send)
        for message in held:
            await send(message)


class PathMask:
    """ASGI middleware: no answer of the app names a server path. Gradio names every file it holds
    (an upload, a result image) by its absolute path in its folder; in every textual answer (JSON,
    event streams, text) that folder becomes ``TOKEN`` (a relative name: ``ci-app-temp/3f2a/photo.png``)
    and each run's folder its name. Requests that name ``TOKEN`` (the page sends an upload's path
    back, and fetches result images by it) get the folder back before gradio reads them, so gradio
    sees its own paths and checks them as it always does."""

    TOKEN = "ci-app-temp"
    TEXTUAL = (b"application/json", b"text/")

    def __init__(self, app, root: str | None = None, runs: dict[str, str] | None = None):
        from urllib.parse import quote

        from gradio.utils import get_upload_folder

        self.app = app
        root = root or get_upload_folder()
        forms = {root, os.path.abspath(root), str(Path(root).resolve())} - {"/", ""}  # (never the whole disk)
        self.roots = sorted(forms, key=len, reverse=True)  # the longest first: no form eats part of another
        self.masks = [(f.encode(), self.TOKEN.encode()) for f in self.roots]
        self.masks += [(quote(f, safe="/").encode(), self.TOKEN.encode()) for f in self.roots if quote(f, safe="/") != f]
        for key, folder in (runs or {}).items():  # one way: no request names a run's folder
            for form in sorted({folder, os.path.abspath(folder), str(Path(folder).resolve())}, key=len, reverse=True):
                if form not in (key, "/"):
                    self.masks.append((form.encode(), key.encode()))

    def mask(self, data: bytes) -> bytes:
        for form, token in self.masks:
            data = data.replace(form, token)
        return data

    def unmask(self, data: bytes) -> bytes:
        return data.replace(self.TOKEN.encode(), self.roots[-1].encode()) if self.roots else data

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = self.TOKEN.encode()
        headers = dict(scope.get("headers") or [])
        if self.roots and (token in (scope.get("raw_path") or b"") or self.TOKEN in scope["path"]):  # e.g. GET /gradio_api/file=TOKEN/...
            scope = dict(scope, path=scope["path"].replace(self.TOKEN, self.roots[-1]),
                         raw_path=self.unmask(scope.get("raw_path") or scope["path"].encode()))
        if headers.get(b"content-type", b"").startswith(b"application/json"):  # an event's values
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                more = message.get("more_body", False)
            body = self.unmask(body)
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())])
            sent = False

            async def receive_once():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            inner_receive = receive_once
        else:
            inner_receive = receive
        start = None

        async def masked_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers") or []).get(b"content-type", b"")
                if not kind.startswith(self.TEXTUAL):
                    start = False  # images and other files pass untouched
                    return await send(message)
                start = message  # sent with the first part of the body, whose length may change
                return None
            if message["type"] == "http.response.body" and start is not False:
                body = self.mask(message.get("body", b""))
                if start is not None:
                    headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
                    if not message.get("more_body", False):  # the whole body: its length is known
                        headers.append((b"content-length", str(len(body)).encode()))
                    await send(dict(start, headers=headers))
                    start = None
                return await send(dict(message, body=body))
            return await send(message)

        return await self.app(scope, inner_receive, masked_send)


def _uploaded(path) -> str:
    """An uploaded file's path, refused unless it lies in gradio's upload folder."""
    from gradio.utils import get_upload_folder

    real = Path(path).resolve()
    root = Path(get_upload_folder()).resolve()
    if root not in real.parents:
        raise ClipInterpretError("the query image must be uploaded through the page")
    return str(real)


def _query(query):
    """The session's query -> what the analyses take: a run image number or the uploaded image."""
    if not query:
        raise ClipInterpretError("no query image: upload one, or pick an image of the run by its number")
    kind, value = query
    return int(value) if kind == "run" else value


def _guard(registry: core.Registry, fn, n_out: int):
    """Run a handler; a user error becomes a message (the last output, one line in the server log),
    the other outputs cleared."""
    def wrapped(*args):
        try:
            return fn(*args)
        except ClipInterpretError as err:
            log.warning("refused a request: %s", err)
            message = f"**Error:** {registry.public(str(err))}"
        except Exception as err:  # noqa: BLE001 - a bug must not take the app down; say what happened
            log.exception("analysis failed")
            message = f"**Internal error** ({type(err).__name__}): {registry.public(str(err))}"
        return (*([None] * (n_out - 1)), message)
    return wrapped


def build(registry: core.Registry) -> gr.Blocks:
    keys = registry.keys()
    first = registry.first_usable() or (keys[0] if keys else None)
    entry = registry.entries.get(first)
    usable = entry is not None and entry.usable
    run_choices = [(k if e.usable else f"{k} (unavailable)", k) for k, e in registry.entries.items()]

    def describe(picked) -> str:
        return registry.public(picked.describe()) if picked else ""

    with gr.Blocks(title="clip-interpret", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        query = gr.State(None)  # per session: ("upload", image) or ("run", index)
        gr.Markdown("## clip-interpret: the five CLIP-InterpreT analyses")
        with gr.Row():
            run_box = gr.Dropdown(run_choices, value=first, label="Run", elem_id="run-choice", scale=1)
            run_info = gr.Markdown(describe(entry) or "No runs given.", elem_id="run-info")
        with gr.Row():
            upload = gr.File(label="Upload a query image", file_types=["image"], type="filepath",
                          elem_id="query-upload")
            with gr.Column():
                index_box = gr.Number(value=0, precision=0, minimum=0, label="...or a run image, by number",
                                   elem_id="run-index")
                with gr.Row():
                    pick = gr.Button("Use this run image", elem_id="pick-run-image")
                    browse = gr.Button(f"Browse {BROWSE} from this number", elem_id="browse-run")
                query_msg = gr.Markdown(elem_id="query-msg", elem_classes="ci-msg")
            preview = gr.Image(label="Query image", interactive=False, format="png", height=220, buttons=["fullscreen"],
                               elem_id="query-preview")
        browse_start = gr.State(0)  # per session: the run image number of the first thumbnail
        browser = gr.Gallery(label="The run's images: click one to use it as the query", columns=BROWSE // 2,
                             height="max-content", allow_preview=False, format="png", visible=False,
                             elem_id="run-browser")

        layer_boxes, head_boxes = [], []

        def head_picker(prefix: str, multiselect: bool):
            with gr.Row():
                layer = gr.Dropdown(entry.layer_choices() if usable else [], value=core.ALL_LAYERS, label="Layer",
                                    elem_id=f"{prefix}-layer", scale=1)
                default = [core.ALL_HEADS] if multiselect else (entry.default_head() if usable else None)
                heads = gr.Dropdown(entry.head_choices() if usable else [], value=default, multiselect=multiselect,
                                    label="Heads (a set is summed)" if multiselect else "Head",
                                    elem_id=f"{prefix}-heads", scale=2)
            layer_boxes.append(layer)
            head_boxes.append((heads, multiselect))
            layer.change(lambda key, chosen, multi=multiselect: _heads_update(registry, key, chosen, multi),
                         [run_box, layer], heads, preprocess=False)
            return heads

        def outputs(prefix: str, columns: int):
            gallery = gr.Gallery(label="Result", columns=columns, height="max-content", format="png",
                                 elem_id=f"{prefix}-gallery", object_fit="contain")  # every row shown, none cut
            message = gr.Markdown(elem_id=f"{prefix}-msg", elem_classes="ci-msg")
            return gallery, message

        def metric_choice(prefix: str):
            return gr.Radio([("dot product (the paper's)", "dot"), ("cosine", "cosine")], value="dot",
                         label="Score", elem_id=f"{prefix}-metric")

        props = entry.properties() if usable else []
        with gr.Tabs():
            with gr.Tab("Property neighbours", elem_id="tab-property"):
                gr.Markdown("The run's images closest to the query in the heads labelled with a property "
                            "(score: mean contribution of those heads, dot product).")
                with gr.Row():
                    prop = gr.Dropdown(props, value=props[0] if props else None, allow_custom_value=True,
                                       label="Property", elem_id="prop-property")
                    prop_k = gr.Number(value=4, precision=0, minimum=1, maximum=core.analyses.MAX_K, label="k")
                    prop_metric = metric_choice("prop")
                prop_go = gr.Button("Find neighbours", variant="primary", elem_id="prop-run")
                prop_out = outputs("prop", 4)
            with gr.Tab("Topic segmentation", elem_id="tab-segment"):
                gr.Markdown("Where in the image the chosen heads carry a text: each patch's share of the similarity.")
                seg_text = gr.Textbox(label="Text", placeholder="e.g. a red circle", elem_id="seg-text")
                seg_heads = head_picker("seg", multiselect=True)
                seg_go = gr.Button("Segment", variant="primary", elem_id="seg-run")
                seg_out = outputs("seg", 3)
            with gr.Tab("Contrastive segmentation", elem_id="tab-contrast"):
                gr.Markdown("The maps of text A minus text B and of B minus A, on one colour scale.")
                with gr.Row():
                    con_a = gr.Textbox(label="Text A", elem_id="con-a")
                    con_b = gr.Textbox(label="Text B", elem_id="con-b")
                con_heads = head_picker("con", multiselect=True)
                con_go = gr.Button("Contrast", variant="primary", elem_id="con-run")
                con_out = outputs("con", 3)
            with gr.Tab("Image neighbours", elem_id="tab-image"):
                gr.Markdown("The run's images closest to the query in one head (the score compares the two images' contributions).")
                img_heads = head_picker("img", multiselect=False)
                with gr.Row():
                    img_k = gr.Number(value=8, precision=0, minimum=1, maximum=core.analyses.MAX_K, label="k")
                    img_metric = metric_choice("img")
                img_go = gr.Button("Find neighbours", variant="primary", elem_id="img-run")
                img_out = outputs("img", 4)
            with gr.Tab("Text neighbours", elem_id="tab-text"):
                gr.Markdown("The run's images whose contribution in one head best matches a text.")
                txt_text = gr.Textbox(label="Text", placeholder="e.g. a striped background", elem_id="txt-text")
                txt_heads = head_picker("txt", multiselect=False)
                txt_k = gr.Number(value=3, precision=0, minimum=1, maximum=core.analyses.MAX_K, label="k")
                txt_go = gr.Button("Find neighbours", variant="primary", elem_id="txt-run")
                txt_out = outputs("txt", 3)
            with gr.Tab("Spectra", elem_id="tab-spectra"):
                gr.Markdown("One head read from its weights alone, no image: its top singular directions in the joint "
                            "space, each explained by a few texts of a pool (docs/spectra.md). From the run's "
                            "spectra file when it has one (`clip-interpret spectra --run RUN`), else computed from "
                            "the model once (seconds).")
                spec_heads = head_picker("spec", multiselect=False)
                spec_pool = gr.Dropdown(entry.spectra_pools() if usable else [],
                                        value=entry.default_spectra_pool() if usable else None, label="Pool",
                                        elem_id="spec-pool")
                spec_go = gr.Button("List the directions", variant="primary", elem_id="spec-run")
                spec_out = (gr.Dataframe(headers=core.SPECTRA_COLUMNS, datatype=["number", "number", "str", "str", "str"],
                                         interactive=False, wrap=True, elem_id="spec-table",
                                         column_widths=["8%", "12%", "6%", "8%", "66%"]),
                            gr.Markdown(elem_id="spec-msg", elem_classes="ci-msg"))

        # --------------------------------------------------------------- events
        def on_upload(payload):
            path = payload.get("path") if isinstance(payload, dict) else None  # gradio's file data, as sent
            if not path:
                return gr.skip(), None, None, ""
            try:
                image, shown = core.query_image(_uploaded(path), registry.query_side)
            except ClipInterpretError as err:  # refused: the box is emptied for the next try
                log.warning("refused an upload: %s", err)
                return None, None, None, f"**Error:** {registry.public(str(err))}"
            # the box is emptied too: the image is kept (shrunk) in the session
            return None, ("upload", image), shown, f"Query: the uploaded image {Path(path).name}."

        def on_pick(key, index):
            try:
                index, image = core.pick_run_image(registry, key, index)
            except ClipInterpretError as err:
                log.warning("refused a request: %s", err)
                return gr.skip(), gr.skip(), gr.skip(), f"**Error:** {registry.public(str(err))}"
            return None, ("run", index), core.display(image, 220), f"Query: run image {index}."

        def on_browse(key, start):
            try:
                entry_ = registry.get(key)
                start = max(0, min(core.whole_number(start or 0, "the first run image"), len(entry_.run) - 1))
                stop = min(len(entry_.run), start + BROWSE)
                shown = [(core.display(core.analyses.run_image(entry_.run, i), 96), f"#{i}") for i in range(start, stop)]
            except ClipInterpretError as err:
                log.warning("refused a request: %s", err)
                return gr.skip(), gr.skip(), f"**Error:** {registry.public(str(err))}"
            return gr.Gallery(value=shown, visible=True), start, f"Run images {start}-{stop - 1}: click one to use it."

        def on_select(key, start, evt: gr.SelectData):
            return on_pick(key, int(start) + int(evt.index))

        # every event takes the values as sent (preprocess=False): the handlers check them, and a refused
        # value is one line in the server log, not gradio's traceback
        upload.upload(on_upload, upload, [upload, query, preview, query_msg], api_name="upload_query",
                      preprocess=False)
        pick.click(on_pick, [run_box, index_box], [upload, query, preview, query_msg], preprocess=False)
        browse.click(on_browse, [run_box, index_box], [browser, browse_start, query_msg], preprocess=False)
        browser.select(on_select, [run_box, browse_start], [upload, query, preview, query_msg], preprocess=False)

        def on_run(key, current):
            picked = registry.find(key)
            ok = picked is not None and picked.usable
            props_now = picked.properties() if ok else []
            updates = [describe(picked),
                       gr.Dropdown(choices=props_now, value=props_now[0] if props_now else None),
                       gr.Dropdown(choices=picked.spectra_pools() if ok else [],
                                   value=picked.default_spectra_pool() if ok else None)]
            updates += [gr.Dropdown(choices=picked.layer_choices() if ok else [], value=core.ALL_LAYERS)
                        for _ in layer_boxes]
            for _, multi in head_boxes:
                default = [core.ALL_HEADS] if multi else (picked.default_head() if ok else None)
                updates.append(gr.Dropdown(choices=picked.head_choices() if ok else [], value=default, multiselect=multi))
            updates.append(gr.Gallery(value=None, visible=False))
            if current and current[0] == "run":  # a number of the other run's images: forget it
                return updates + [None, None, "Pick a query image of this run, or upload one."]
            return updates + [gr.skip()] * 3

        run_box.change(on_run, [run_box, query], [run_info, prop, spec_pool, *layer_boxes, *[h for h, _ in head_boxes],
                                                  browser, query, preview, query_msg], preprocess=False)

        def analysis(fn):
            return _guard(registry, lambda *a: fn(registry, *a), 2)

        for button, fn, inputs, out, name in (
                (prop_go, lambda r, key, q, p, k, m: core.run_property_neighbours(r, key, _query(q), p, k, m),
                 [run_box, query, prop, prop_k, prop_metric], prop_out, "property_neighbours"),
                (seg_go, lambda r, key, q, t, h: core.run_topic_segmentation(r, key, _query(q), t, h),
                 [run_box, query, seg_text, seg_heads], seg_out, "topic_segmentation"),
                (con_go, lambda r, key, q, a, b, h: core.run_contrastive_segmentation(r, key, _query(q), a, b, h),
                 [run_box, query, con_a, con_b, con_heads], con_out, "contrastive_segmentation"),
                (img_go, lambda r, key, q, h, k, m: core.run_image_neighbours(r, key, _query(q), h, k, m),
                 [run_box, query, img_heads, img_k, img_metric], img_out, "image_neighbours"),
                (txt_go, core.run_text_neighbours, [run_box, txt_text, txt_heads, txt_k], txt_out, "text_neighbours"),
                (spec_go, core.run_spectra, [run_box, spec_heads, spec_pool], spec_out, "spectra")):
            button.click(analysis(fn), inputs, list(out), api_name=name, preprocess=False)
        # a new query (or none): the results and messages of the tabs that use it no longer apply
        about_query = [*prop_out, *seg_out, *con_out, *img_out]
        query.change(lambda: [None] * len(about_query), None, about_query, show_progress="hidden")
    return demo


def _heads_update(registry: core.Registry, key, layer, multiselect: bool):
    entry = registry.find(key)
    if entry is None or not entry.usable:
        return gr.Dropdown(choices=[], value=None)
    layer = int(layer) if str(layer) in map(str, entry.run.layers) else core.ALL_LAYERS
    choices = entry.head_choices(layer)
    if multiselect:  # the whole layer (or every head)
        return gr.Dropdown(choices=choices, value=[choices[0][1]], multiselect=True)
    names = [value for _, value in choices[1:]]
    return gr.Dropdown(choices=choices, value=([n for n in names if n in entry.labels] + names)[0])
