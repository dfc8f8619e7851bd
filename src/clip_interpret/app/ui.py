"""The gradio page: a run chooser, a query image (uploaded, or picked from the run by number),
and the five analyses as tabs.

Each browser session keeps its query in a server-side ``gr.State``; results go back as
in-memory images, so no two users share an output file. The only files read are the
run's own images (by position) and uploads that gradio received into its upload folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402

from ..errors import ClipInterpretError  # noqa: E402
from ..images import load_image  # noqa: E402
from . import core  # noqa: E402

log = logging.getLogger(__name__)
CSS = ".ci-msg p { margin: 0.2em 0; }"
BROWSE = 16  # run images shown at once when browsing


def _uploaded(path) -> str:
    """An uploaded file's path, refused unless it lies in gradio's upload folder."""
    from gradio.utils import get_upload_folder

    real = Path(path).resolve()
    root = Path(get_upload_folder()).resolve()
    if root not in real.parents:
        raise ClipInterpretError("the query image must be uploaded through the page")
    return str(real)


def _query(query):
    """The session's query -> what the analyses take: a run image index or an uploaded file."""
    if not query:
        raise ClipInterpretError("no query image: upload one, or pick an image of the run by its number")
    kind, value = query
    return int(value) if kind == "run" else _uploaded(value)


def _guard(fn, n_out: int):
    """Run a handler; a user error becomes a message (the last output), the other outputs cleared."""
    def wrapped(*args):
        try:
            return fn(*args)
        except ClipInterpretError as err:
            message = f"**Error:** {err}"
        except Exception as err:  # noqa: BLE001 - a bug must not take the app down; say what happened
            log.exception("analysis failed")
            message = f"**Internal error** ({type(err).__name__}): {err}"
        return (*([None] * (n_out - 1)), message)
    return wrapped


def build(registry: core.Registry) -> gr.Blocks:
    keys = registry.keys()
    first = registry.first_usable() or (keys[0] if keys else None)
    entry = registry.entries.get(first)
    usable = entry is not None and entry.usable
    run_choices = [(k if e.usable else f"{k} (unavailable)", k) for k, e in registry.entries.items()]

    with gr.Blocks(title="clip-interpret", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        query = gr.State(None)  # per session: ("upload", path) or ("run", index)
        gr.Markdown("## clip-interpret: the five CLIP-InterpreT analyses")
        with gr.Row():
            run_box = gr.Dropdown(run_choices, value=first, label="Run", elem_id="run-choice", scale=1)
            run_info = gr.Markdown(entry.describe() if entry else "No runs given.", elem_id="run-info")
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
                             height=270, allow_preview=False, format="png", visible=False, elem_id="run-browser")

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
                         [run_box, layer], heads)
            return heads

        def outputs(prefix: str, columns: int):
            gallery = gr.Gallery(label="Result", columns=columns, height="auto", format="png", elem_id=f"{prefix}-gallery",
                                 object_fit="contain")
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
                seg_out = outputs("seg", 2)
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

        # --------------------------------------------------------------- events
        def on_upload(path):
            if not path:
                return gr.skip(), None, None, ""
            try:
                image = load_image(_uploaded(path))
            except ClipInterpretError as err:  # refused: the box is emptied for the next try
                return None, None, None, f"**Error:** {err}"
            return gr.skip(), ("upload", path), core.display(image, 220), "Query: the uploaded image."

        def on_pick(key, index):
            try:
                image = core.pick_run_image(registry, key, index)
            except ClipInterpretError as err:
                return gr.skip(), gr.skip(), gr.skip(), f"**Error:** {err}"
            return None, ("run", int(index)), core.display(image, 220), f"Query: run image {int(index)}."

        def on_browse(key, start):
            try:
                entry_ = registry.get(key)
                start = max(0, min(int(start or 0), len(entry_.run) - 1))
                stop = min(len(entry_.run), start + BROWSE)
                shown = [(core.display(core.analyses.run_image(entry_.run, i), 96), f"#{i}") for i in range(start, stop)]
            except ClipInterpretError as err:
                return gr.skip(), gr.skip(), f"**Error:** {err}"
            return gr.Gallery(value=shown, visible=True), start, f"Run images {start}-{stop - 1}: click one to use it."

        def on_select(key, start, evt: gr.SelectData):
            return on_pick(key, int(start) + int(evt.index))

        upload.upload(on_upload, upload, [upload, query, preview, query_msg])
        pick.click(on_pick, [run_box, index_box], [upload, query, preview, query_msg])
        browse.click(on_browse, [run_box, index_box], [browser, browse_start, query_msg])
        browser.select(on_select, [run_box, browse_start], [upload, query, preview, query_msg])

        def on_run(key, current):
            picked = registry.entries.get(key)
            ok = picked is not None and picked.usable
            props_now = picked.properties() if ok else []
            updates = [picked.describe() if picked else "",
                       gr.Dropdown(choices=props_now, value=props_now[0] if props_now else None)]
            updates += [gr.Dropdown(choices=picked.layer_choices() if ok else [], value=core.ALL_LAYERS)
                        for _ in layer_boxes]
            for _, multi in head_boxes:
                default = [core.ALL_HEADS] if multi else (picked.default_head() if ok else None)
                updates.append(gr.Dropdown(choices=picked.head_choices() if ok else [], value=default, multiselect=multi))
            updates.append(gr.Gallery(value=None, visible=False))
            if current and current[0] == "run":  # a number of the other run's images: forget it
                return updates + [None, None, "Pick a query image of this run, or upload one."]
            return updates + [gr.skip()] * 3

        run_box.change(on_run, [run_box, query], [run_info, prop, *layer_boxes, *[h for h, _ in head_boxes],
                                                  browser, query, preview, query_msg])

        def analysis(fn):
            return _guard(lambda *a: fn(registry, *a), 2)

        prop_go.click(analysis(lambda r, key, q, p, k, m: core.run_property_neighbours(r, key, _query(q), p, k, m)),
                      [run_box, query, prop, prop_k, prop_metric], list(prop_out))
        seg_go.click(analysis(lambda r, key, q, t, h: core.run_topic_segmentation(r, key, _query(q), t, h)),
                     [run_box, query, seg_text, seg_heads], list(seg_out))
        con_go.click(analysis(lambda r, key, q, a, b, h: core.run_contrastive_segmentation(r, key, _query(q), a, b, h)),
                     [run_box, query, con_a, con_b, con_heads], list(con_out))
        img_go.click(analysis(lambda r, key, q, h, k, m: core.run_image_neighbours(r, key, _query(q), h, k, m)),
                     [run_box, query, img_heads, img_k, img_metric], list(img_out))
        txt_go.click(analysis(core.run_text_neighbours), [run_box, txt_text, txt_heads, txt_k], list(txt_out))
    return demo


def _heads_update(registry: core.Registry, key, layer, multiselect: bool):
    entry = registry.entries.get(key)
    if entry is None or not entry.usable:
        return gr.Dropdown(choices=[], value=None)
    layer = core.ALL_LAYERS if layer in (None, core.ALL_LAYERS) else int(layer)
    choices = entry.head_choices(layer)
    if multiselect:  # the whole layer (or every head)
        return gr.Dropdown(choices=choices, value=[choices[0][1]], multiselect=True)
    names = [value for _, value in choices[1:]]
    return gr.Dropdown(choices=choices, value=([n for n in names if n in entry.labels] + names)[0])
