"""The web app: its runs and handlers, then the real page driven by headless Chromium.

The browser test needs Debian's ``chromium`` (``make test`` installs it) and the ``playwright``
Python package (the ``test`` extra); it never downloads a browser.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clip_interpret import load_model
from clip_interpret.app import core
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images
from clip_interpret.toyworld import generate

CHROMIUM = Path(os.environ.get("CLIP_INTERPRET_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LABELS = {"labeller": "manual", "heads": {"L5.H3": {"label": "colours"}, "L4.H1": {"label": "color"},
                                          "L3.H0": {"label": "shape"}}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_model):
    """A labelled toy run, an unlabelled one (same model), one whose model cannot be loaded, and one
    whose manifest is cut short."""
    root = tmp_path_factory.mktemp("app-runs")
    model = toy_model
    index_images(model, "toyworld:200:1", root / "toy", progress=False)
    (root / "toy" / "labels.json").write_text(json.dumps(LABELS))
    index_images(model, "toyworld:40:2", root / "bare", progress=False)
    shutil.copytree(root / "bare", root / "broken")
    manifest = json.loads((root / "broken" / "manifest.json").read_text())
    manifest["model"]["spec"] = "open_clip:ViT-B-32/openai"  # not on this machine; tests run offline
    (root / "broken" / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(root / "bare", root / "damaged")
    (root / "damaged" / "manifest.json").write_text(json.dumps(manifest)[:100])
    return {name: root / name for name in ("toy", "bare", "broken", "damaged")}


@pytest.fixture(scope="module")
def registry(runs):
    loads = []

    def loader(spec):
        loads.append(spec)
        return load_model(spec)

    reg = core.Registry([runs["toy"], runs["bare"], runs["broken"], runs["damaged"], runs["toy"].parent / "missing"],
                        loader=loader)
    reg.loads = loads
    return reg


def test_models_load_once_and_a_broken_run_does_not_stop_the_others(registry, runs):
    assert registry.loads.count("toy") == 1 and registry.n_models == 1
    assert registry.entries["toy"].model is registry.entries["bare"].model
    assert registry.first_usable() == "toy"
    broken = registry.entries["broken"]
    assert not broken.usable and "open_clip:ViT-B-32/openai" in broken.error and "offline" in broken.error
    with pytest.raises(ClipInterpretError, match=r"run broken cannot be used: cannot load 'open_clip:ViT-B-32"):
        registry.get("broken")
    assert "not a run directory" in registry.entries["missing"].error
    damaged = registry.entries["damaged"]
    assert not damaged.usable and "manifest.json is not valid JSON" in damaged.error and "\n" not in damaged.error
    # the page says why without a server path: the run's folder is named by the run's name
    shown = registry.public(damaged.describe())
    assert "damaged/manifest.json is not valid JSON" in shown and str(runs["damaged"].parent) not in shown
    result = core.run_text_neighbours(registry, "toy", "a red circle", "L5.H3", 3)  # the others still serve
    assert len(result[0]) == 3


def test_messages_for_the_browser_carry_no_server_path(registry, runs, tmp_path):
    toy = runs["toy"]
    assert registry.public(f"run {toy} has images 0-199; there is no image 300") == \
        "run toy has images 0-199; there is no image 300"
    assert registry.public(f"run {toy.resolve()}/labels.json: bad") == "run toy/labels.json: bad"
    upload = tmp_path / "gradio" / "0123abcd" / "my photo.png"
    assert registry.public(f"cannot read image {upload.parent}/photo.png: truncated") == \
        "cannot read image photo.png: truncated"
    assert registry.public("model open_clip:ViT-B-32/openai, 2.5/3 done") == "model open_clip:ViT-B-32/openai, 2.5/3 done"


def test_results_name_a_folder_runs_images_without_server_paths(toy_model, tmp_path):
    """A run indexed from an image folder keeps each file's server path as its name; the page shows
    it relative to the run's folder (``red/0.png``), in every result table."""
    folder = tmp_path / "photos"
    for i in range(4):
        (folder / ("red" if i % 2 else "blue")).mkdir(parents=True, exist_ok=True)
        generate(1, seed=i).image.save(folder / ("red" if i % 2 else "blue") / f"{i}.png")
    index_images(toy_model, str(folder), tmp_path / "run", progress=False)
    reg = core.Registry([tmp_path / "run"])
    answers = [core.run_image_neighbours(reg, "run", 0, "L5.H3", 4)[1],
               core.run_text_neighbours(reg, "run", "a red circle", "L5.H3", 4)[1]]
    for text in answers:
        assert str(tmp_path) not in text and "/tmp" not in text, text
        assert "| red/1.png |" in text and "| blue/0.png |" in text, text


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels (Pillow identifies it from the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data, message", [
    ("page.html", b"<html><script>alert(1)</script></html>", "page.html is not an image file"),
    ("logo.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "logo.svg is not an image file"),
    ("notes.png", b"just text", "notes.png is not an image file"),
    ("huge.png", _png_header(9000, 9000), "huge.png has 9000x9000 pixels, more than the app accepts"),
    ("doc.pdf", b"%PDF-1.4 not really", "doc.pdf is not an image file"),
])
def test_uploads_are_checked_by_content(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    assert message in core.upload_problem(path)
    with pytest.raises(ClipInterpretError, match=message):
        core.query_image(path, 224)


def test_an_upload_is_decoded_once_and_kept_at_the_models_size(registry, toy_model, tmp_path):
    from PIL import Image

    from clip_interpret import decompose

    big = generate(3, seed=5).image.resize((1500, 1000), Image.NEAREST)
    big.save(tmp_path / "big.png")
    image, preview = core.query_image(tmp_path / "big.png", registry.query_side)
    assert registry.query_side == 64 and image.size == (96, 64) and max(preview.size) == 640
    exact = decompose(toy_model, [big]).embedding  # what the model sees of the full-size image
    assert (decompose(toy_model, [image]).embedding - exact).abs().max() < 1e-5
    gallery, text = core.run_image_neighbours(registry, "toy", image, "L4.H1", 4)
    assert len(gallery) == 4 and "Top 4" in text


def test_segmentation_maps_carry_their_colour_scale(registry):
    import numpy as np

    gallery, text = core.run_contrastive_segmentation(registry, "toy", 4, "a red circle", "stripes", "all heads")
    image, heat = gallery[0][0], gallery[1][0]
    assert heat.size[0] > heat.size[1] == image.size[1]  # the scale sits beside the map
    column = np.asarray(heat)[:, heat.size[1] + 12]  # inside the bar: red at the top, blue at the bottom
    assert column[2, 0] > column[2, 2] + 60 and column[-3, 2] > column[-3, 0] + 60 and "for every map" in text


def test_head_choosers_show_labels(registry):
    toy, bare = registry.entries["toy"], registry.entries["bare"]
    shown = dict(toy.head_choices())
    assert shown["L5.H3 (colours)"] == "L5.H3" and shown["L2.H0"] == "L2.H0" and shown["all heads"] == "all heads"
    assert [v for _, v in toy.head_choices(4)][:3] == ["layer:4", "L4.H0", "L4.H1"]
    assert toy.properties() == ["color", "shape"] and toy.default_head() == "L3.H0"
    assert toy.heads(["all heads"]) == "all" and toy.heads("layer:4") == [f"L4.H{h}" for h in range(8)]
    assert all("(" not in label for label, _ in bare.head_choices()) and "clip-interpret label" in bare.labels_note
    with pytest.raises(ClipInterpretError, match="clip-interpret label"):
        core.run_property_neighbours(registry, "bare", 0, "color", 4)


def test_page_images_are_enlarged_or_shrunk():
    from PIL import Image

    assert core.display(Image.new("RGB", (64, 64))).size == (192, 192)
    assert core.display(Image.new("RGB", (2000, 1000))).size == (640, 320)


def test_concurrent_requests_get_their_own_results(registry):
    jobs = [("text", "a red circle", "L5.H3"), ("text", "a blue star", "L2.H6"), ("text", "stripes", "L5.H3")] + \
        [("image", i, "L4.H1") for i in (3, 77, 199)]

    def call(job):
        kind, query, head = job
        if kind == "text":
            return core.run_text_neighbours(registry, "toy", query, head, 3)
        return core.run_image_neighbours(registry, "toy", query, head, 5)

    serial = [call(job) for job in jobs]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(call, jobs * 2))
    for job, alone, (gallery, text) in zip(jobs * 2, serial * 2, together):
        assert text == alone[1] and [c for _, c in gallery] == [c for _, c in alone[0]]


# ---------------------------------------------------------------- the real page
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """The app in a subprocess with a temporary directory of its own, where a folder left by a killed
    app process (pid 999999999: not running) waits to be swept."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    tmp = tmp_path_factory.mktemp("app-tmp")
    (tmp / "clip-interpret-app-999999999-old" / "abc").mkdir(parents=True)
    code = ("import sys; from clip_interpret.app import serve; "
            "serve(sys.argv[1:-1], port=int(sys.argv[-1]), max_upload_mb=1)")
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", code, str(runs["toy"]), str(runs["broken"]), str(runs["damaged"]),
                                 str(port)], stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=str(tmp)))
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    deadline = time.time() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited at start:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the app did not answer within 90 s:\n{log.read_text()}")
                time.sleep(0.3)
        yield {"url": url, "log": log, "runs": runs, "proc": proc, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _post_upload(url: str, name: str, data: bytes, content_type: str = "image/png"):
    """POST one file to gradio's upload route: (status, body)."""
    import urllib.error
    import urllib.request

    boundary = "xxBOUNDARYxx"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_app_binds_localhost_says_which_run_failed_and_limits_uploads(server):
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 20  # the server may answer a moment before its URL line is written
    while "http://127.0.0.1:" not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = server["log"].read_text()
    assert "run broken" in text and "unavailable" in text and "http://127.0.0.1:" in text
    status, _ = _post_upload(server["url"], "big.png", b"\0" * (2 << 20))
    assert status == 413
    for path in ("/etc/passwd", str(server["runs"]["toy"] / "manifest.json")):  # gradio serves no other files
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server["url"] + "gradio_api/file=" + path, timeout=10)
        assert err.value.code in (403, 404)


def test_the_upload_route_keeps_only_images(server):
    from PIL import Image

    for name, data, kind in (("page.html", b"<html><script>alert(1)</script></html>", "text/html"),
                             ("logo.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
                             ("notes.png", b"plain text", "image/png")):
        status, body = _post_upload(server["url"], name, data, kind)
        assert status == 415 and f"{name} is not an image file" in body and "/" not in body.split(";")[0]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "PNG")
    status, body = _post_upload(server["url"], "red.png", buffer.getvalue())
    assert status == 200 and body.endswith('red.png"]')
    stored = {p.name for p in server["tmp"].rglob("*") if p.is_file()}
    assert "red.png" in stored and not stored & {"page.html", "logo.svg", "notes.png"}
    assert not (server["tmp"] / "clip-interpret-app-999999999-old").exists()  # left by a dead process: swept


def _call(url: str, api_name: str, data: list) -> str:
    """One event through gradio's HTTP API (POST /call/NAME, then its event stream): the raw answer text."""
    import urllib.request

    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = response.read().decode()
    event = json.loads(answer)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event}", timeout=60) as response:
        return answer + response.read().decode()


def _server_paths(server) -> list[str]:
    """The absolute paths that must never reach a browser: the app's temporary folder and the runs'."""
    forms = set()
    for folder in (server["tmp"], *server["runs"].values()):
        forms |= {str(folder), str(Path(folder).resolve())}
    return sorted(forms)


def test_no_answer_of_the_app_names_a_server_path(server):
    """Issue 24 item 8: gradio's upload route answered the file's absolute path in the app's temporary
    folder, and results named their images by such paths. Every answer is read raw over HTTP."""
    import urllib.request

    from PIL import Image

    buffer = io.BytesIO()
    generate(1, seed=3).image.save(buffer, "PNG")
    answers = []
    status, body = _post_upload(server["url"], "my query.png", buffer.getvalue())
    answers.append(body)
    assert status == 200
    (path,) = json.loads(body)
    assert not os.path.isabs(path) and path.endswith("my query.png")
    uploaded = {"path": path, "orig_name": "my query.png", "meta": {"_type": "gradio.FileData"}}
    answer = _call(server["url"], "upload_query", [uploaded])  # the upload event, as the page sends it
    answers.append(answer)
    assert "the uploaded image my query.png" in answer, answer
    preview = json.loads(answer.split("data: ", 1)[1].splitlines()[0])[2]  # the preview, an image gradio holds
    fetch = preview["url"] if preview["url"].startswith("http") else server["url"] + preview["url"].lstrip("/")
    with urllib.request.urlopen(fetch, timeout=10) as got:
        assert Image.open(io.BytesIO(got.read())).size[0] > 0  # the page can still fetch it by the masked name
    for run, text in (("toy", "a red circle"), ("damaged", "a red circle"), ("toy", " ")):
        answers.append(_call(server["url"], "text_neighbours", [run, text, "L5.H3", 3]))
    assert '"url"' in answers[-3] and "score" in answers[-3]  # a gallery of images, and its table
    assert "damaged" in answers[-2] and "Error" in answers[-2]
    answers.append(_call(server["url"], "spectra", ["toy", "L4.H1", "toy"]))  # the Spectra tab's table
    assert "label from the weights" in answers[-1] and "singular value" in answers[-1], answers[-1][:500]
    for answer in answers:
        for form in _server_paths(server):
            assert form not in answer, (form, answer[:500])


def test_refused_requests_log_one_line_each(server):
    from gradio_client import Client

    before = server["log"].read_text()
    client = Client(server["url"], verbose=False)
    refused = [("toy", "a red circle", "L5.H3", 1000),  # k above the chooser's maximum
               ("toy", "a red circle", "L9.H9", 3),  # not a head of the run
               ("toy", "  ", "L5.H3", 3),  # an empty text: our own message
               ("damaged", "a red circle", "L5.H3", 3)]  # a run that cannot be used
    for args in refused:
        try:
            client.predict(*args, api_name="/text_neighbours")
        except Exception:  # noqa: BLE001 - gradio's own checks answer with an error
            pass
    deadline = time.time() + 10
    while time.time() < deadline and server["log"].read_text()[len(before):].count("refused a request") < 4:
        time.sleep(0.2)
    new = server["log"].read_text()[len(before):]
    assert new.count("refused a request") == 4 and "Traceback" not in new, new
    assert len([line for line in new.splitlines() if line.strip()]) == 4, new


def test_uploads_are_only_read_from_the_upload_folder(server):
    from clip_interpret.app import ui

    with pytest.raises(ClipInterpretError, match="must be uploaded through the page"):
        ui._uploaded("/etc/passwd")
    assert ui._query(("run", "7")) == 7


def test_layer_choice_narrows_the_head_chooser(registry, server):
    from clip_interpret.app import ui

    single = ui._heads_update(registry, "toy", "4", False)
    assert single.value == "L4.H1" and ("L4.H1 (color)", "L4.H1") in single.choices and len(single.choices) == 9
    assert ui._heads_update(registry, "toy", "3", True).value == ["layer:3"]
    assert ui._heads_update(registry, "toy", "all layers", False).value == "L3.H0"


def test_browser_runs_all_five_tabs(server, tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium "
                    "(apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright: pip install -e '.[test]'")
    shots = tmp_path_factory.mktemp("screenshots")
    files = tmp_path_factory.mktemp("uploads")
    good, bad, cut = files / "query.png", files / "broken.png", files / "truncated.png"
    generate(3, seed=5).image.resize((640, 480)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    cut.write_bytes(good.read_bytes()[:2000])  # a PNG header, then the data stops
    outside = []
    # every row of a gallery in view: nothing clipped inside a scrolling box
    unclipped = ("[...document.querySelectorAll('#{0} .grid-wrap')].every(e => e.scrollHeight <= e.clientHeight + 1)"
                 " && document.querySelectorAll('#{0} img').length >= {1}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(20_000)
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((server["url"], "data:", "blob:")) else None)
            page.goto(server["url"])
            page.wait_for_selector("#prop-run")
            assert "200 images" in page.inner_text("#run-info")

            def upload(path, expect):
                page.set_input_files("#query-upload input[type=file]", str(path))
                page.wait_for_function(f"document.querySelector('#query-msg').innerText.includes({expect!r})")

            page.click("#prop-run")  # no query yet
            page.wait_for_function("document.querySelector('#prop-msg').innerText.includes('no query image')")
            page.set_input_files("#query-upload input[type=file]", str(bad))  # refused by the upload route
            page.wait_for_function("[...document.querySelectorAll('.toast-body')].some("
                                   "t => t.innerText.includes('broken.png is not an image file'))")
            upload(cut, "cannot read image truncated.png")  # an image header, then nothing: a message
            assert "/" not in page.inner_text("#query-msg")  # the file's name, never the server's path
            upload(good, "uploaded image query.png")
            # the new query clears the message that said there was none
            page.wait_for_function("document.querySelector('#prop-msg').innerText.trim() == ''")

            def run_tab(tab, button, prefix, n_images, fill=None, expect="score"):
                page.get_by_role("tab", name=tab).click()
                for selector, value in (fill or {}).items():
                    page.fill(f"{selector} textarea", value)
                page.click(button)
                page.wait_for_function(
                    f"document.querySelectorAll('#{prefix}-gallery img').length >= {n_images} && "
                    f"document.querySelector('#{prefix}-msg').innerText.includes({expect!r})")
                page.wait_for_function(unclipped.format(f"{prefix}-gallery", n_images))
                page.screenshot(path=str(shots / f"{prefix}.png"), full_page=True)
                return page.inner_text(f"#{prefix}-msg")

            text = run_tab("Property neighbours", "#prop-run", "prop", 4)
            assert "color" in text and "L4.H1" in text and "L5.H3" in text
            text = run_tab("Topic segmentation", "#seg-run", "seg", 2, {"#seg-text": "a red circle"}, "all heads")
            text = run_tab("Contrastive segmentation", "#con-run", "con", 3,
                           {"#con-a": "a red circle", "#con-b": "a striped background"}, "for every map")
            assert "a striped background" in text
            page.fill("#run-index input", "17")
            page.click("#pick-run-image")
            page.wait_for_function("document.querySelector('#query-msg').innerText.includes('run image 17')")
            page.click("#browse-run")  # browse 16 run images from number 17, click the third
            page.wait_for_function(unclipped.format("run-browser", 16))
            page.locator("#run-browser img").nth(2).click()
            page.wait_for_function("document.querySelector('#query-msg').innerText.includes('run image 19')")
            page.screenshot(path=str(shots / "browse.png"), full_page=True)
            page.click("#pick-run-image")
            page.wait_for_function("document.querySelector('#query-msg').innerText.includes('run image 17')")
            text = run_tab("Image neighbours", "#img-run", "img", 8)
            assert "L3.H0" in text and text.count("toyworld:1:") == 8
            page.locator("#img-metric label", has_text="cosine").click()  # by cosine, the query itself comes first
            page.click("#img-run")
            page.wait_for_function("document.querySelector('#img-msg').innerText.includes('cosine')")
            assert page.inner_text("#img-gallery").index("image 17 ") < page.inner_text("#img-gallery").index("#2")
            page.get_by_role("tab", name="Text neighbours").click()
            shown = page.input_value("#txt-heads input")
            assert shown == "L3.H0 (shape)"  # head choosers show labels
            page.click("#txt-layer input")
            page.get_by_role("option", name="layer 4").click()
            page.wait_for_function("document.querySelector('#txt-heads input').value == 'L4.H1 (color)'")
            text = run_tab("Text neighbours", "#txt-run", "txt", 3, {"#txt-text": "a blue star"})
            assert "a blue star" in text and text.count("toyworld:1:") == 3

            page.fill("#txt-text textarea", "  ")
            page.click("#txt-run")
            page.wait_for_function("document.querySelector('#txt-msg').innerText.includes('text is empty')")

            # a second user at the same time sees only their own results
            other = browser.new_page()
            other.set_default_timeout(20_000)
            other.goto(server["url"])
            other.wait_for_selector("#prop-run")
            other.get_by_role("tab", name="Text neighbours").click()
            other.fill("#txt-text textarea", "a green square")
            page.fill("#txt-text textarea", "a yellow cross")
            other.click("#txt-run")
            page.click("#txt-run")
            for who, mine, theirs in ((page, "a yellow cross", "a green square"),
                                      (other, "a green square", "a yellow cross")):
                who.wait_for_function(f"document.querySelector('#txt-msg').innerText.includes({mine!r})")
                assert theirs not in who.inner_text("#txt-msg")

            page.get_by_role("tab", name="Spectra").click()  # a head's directions, read from its weights
            assert page.input_value("#spec-heads input") == "L3.H0 (shape)"
            page.click("#spec-run")
            page.wait_for_function("document.querySelector('#spec-msg').innerText.includes('label from the weights')")
            assert "L3.H0" in page.inner_text("#spec-msg") and "the run's label: shape" in page.inner_text("#spec-msg")
            table = page.inner_text("#spec-table")
            assert "singular value" in table and "texts (weight)" in table and table.count("%") >= 5, table
            page.screenshot(path=str(shots / "spectra.png"), full_page=True)

            page.click("#run-choice input")
            page.get_by_role("option", name="broken (unavailable)").click()
            page.wait_for_function("document.querySelector('#run-info').innerText.includes('cannot be used')")
            assert "open_clip:ViT-B-32/openai" in page.inner_text("#run-info")
            page.screenshot(path=str(shots / "broken-run.png"), full_page=True)
            page.click("#run-choice input")
            page.get_by_role("option", name="damaged (unavailable)").click()
            page.wait_for_function("document.querySelector('#run-info').innerText.includes('not valid JSON')")
            info = page.inner_text("#run-info")
            assert "damaged/manifest.json is not valid JSON" in info and str(server["runs"]["toy"].parent) not in info
        finally:
            browser.close()
    assert not outside, f"the page reached outside the app: {outside[:5]}"
    print(f"screenshots in {shots}")


def test_the_app_removes_its_temporary_folder_on_sigterm(server):
    """Last in this file: it stops the app the tests above used."""
    folders = list(server["tmp"].glob("clip-interpret-app-*"))
    assert len(folders) == 1 and any(p.is_file() for p in folders[0].rglob("*"))  # uploads and results
    server["proc"].terminate()  # SIGTERM
    assert server["proc"].wait(30) == 0
    assert not list(server["tmp"].iterdir())


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_the_app_command_says_only_our_lines_and_stops_quietly(stop, toy_model, tmp_path):
    """`clip-interpret app RUN` prints the runs, its URL and how to stop, nothing of gradio's (no "set
    `share=True`", no "Keyboard interruption"); SIGTERM and Ctrl-C stop it with status 0 and its temporary
    folder removed."""
    import signal
    import urllib.request

    index_images(toy_model, "toyworld:8:1", tmp_path / "run", progress=False, workers=0)
    (tmp_path / "tmp").mkdir()
    port = _free_port()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "clip_interpret", "app", str(tmp_path / "run"), "--port",
                                 str(port)], stdout=stdout, stderr=stderr, env=dict(env, TMPDIR=str(tmp_path / "tmp")))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while "serving on" not in out.read_text():  # our line, once the server is up
            assert proc.poll() is None and time.time() < deadline, (out.read_text(), err.read_text())
            time.sleep(0.3)
        urllib.request.urlopen(url, timeout=10).close()
        proc.send_signal(getattr(signal, stop))
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    printed, errors = out.read_text(), err.read_text()
    assert code == 0, (printed, errors)
    assert errors == ""
    assert printed.splitlines() == [printed.splitlines()[0], f"serving on {url} (stop with Ctrl-C)"]
    assert printed.startswith("run run: 8 images, model toy")
    assert not list((tmp_path / "tmp").iterdir())
