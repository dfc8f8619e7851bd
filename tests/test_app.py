"""The web app: its runs and handlers, then the real page driven by headless Chromium.

The browser test needs Debian's ``chromium`` (``make test`` installs it) and the ``playwright``
Python package (the ``test`` extra); it never downloads a browser.
"""

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
from clip_interpret.index import index_images
from clip_interpret.toyworld import generate

CHROMIUM = Path(os.environ.get("CLIP_INTERPRET_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LABELS = {"labeller": "manual", "heads": {"L5.H3": {"label": "colours"}, "L4.H1": {"label": "color"},
                                          "L3.H0": {"label": "shape"}}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_model):
    """A labelled toy run, an unlabelled one (same model), and one whose model cannot be loaded."""
    root = tmp_path_factory.mktemp("app-runs")
    model = toy_model
    index_images(model, "toyworld:200:1", root / "toy", progress=False)
    (root / "toy" / "labels.json").write_text(json.dumps(LABELS))
    index_images(model, "toyworld:40:2", root / "bare", progress=False)
    shutil.copytree(root / "bare", root / "broken")
    manifest = json.loads((root / "broken" / "manifest.json").read_text())
    manifest["model"]["spec"] = "open_clip:ViT-B-32/openai"  # not on this machine; tests run offline
    (root / "broken" / "manifest.json").write_text(json.dumps(manifest))
    return {name: root / name for name in ("toy", "bare", "broken")}


@pytest.fixture(scope="module")
def registry(runs):
    loads = []

    def loader(spec):
        loads.append(spec)
        return load_model(spec)

    reg = core.Registry([runs["toy"], runs["bare"], runs["broken"], runs["toy"].parent / "missing"], loader=loader)
    reg.loads = loads
    return reg


def test_models_load_once_and_a_broken_run_does_not_stop_the_others(registry):
    assert registry.loads.count("toy") == 1 and registry.n_models == 1
    assert registry.entries["toy"].model is registry.entries["bare"].model
    assert registry.first_usable() == "toy"
    broken = registry.entries["broken"]
    assert not broken.usable and "open_clip:ViT-B-32/openai" in broken.error and "offline" in broken.error
    with pytest.raises(ClipInterpretError, match=r"run broken .* cannot be used: cannot load 'open_clip:ViT-B-32"):
        registry.get("broken")
    assert "not a run directory" in registry.entries["missing"].error
    result = core.run_text_neighbours(registry, "toy", "a red circle", "L5.H3", 3)  # the others still serve
    assert len(result[0]) == 3


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
    port = _free_port()
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    code = ("import sys; from clip_interpret.app import serve; "
            "serve(sys.argv[1:-1], port=int(sys.argv[-1]), max_upload_mb=1)")
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", code, str(runs["toy"]), str(runs["broken"]), str(port)],
                                stdout=handle, stderr=subprocess.STDOUT)
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
        yield {"url": url, "log": log, "runs": runs}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_app_binds_localhost_says_which_run_failed_and_limits_uploads(server):
    import urllib.error
    import urllib.request

    text = server["log"].read_text()
    assert "run broken" in text and "unavailable" in text and "http://127.0.0.1:" in text
    boundary = "xxBOUNDARYxx"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * (2 << 20) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server["url"] + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413
    for path in ("/etc/passwd", str(server["runs"]["toy"] / "manifest.json")):  # gradio serves no other files
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server["url"] + "gradio_api/file=" + path, timeout=10)
        assert err.value.code in (403, 404)


def test_uploads_are_only_read_from_the_upload_folder(server):
    from clip_interpret.app import ui

    with pytest.raises(ClipInterpretError, match="must be uploaded through the page"):
        ui._query(("upload", "/etc/passwd"))
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
    good, bad = files / "query.png", files / "broken.png"
    generate(3, seed=5).image.save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    outside = []

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

            upload(bad, "cannot read image")  # a message, and the app keeps going
            upload(good, "uploaded image")

            def run_tab(tab, button, prefix, n_images, fill=None, expect="score"):
                page.get_by_role("tab", name=tab).click()
                for selector, value in (fill or {}).items():
                    page.fill(f"{selector} textarea", value)
                page.click(button)
                page.wait_for_function(
                    f"document.querySelectorAll('#{prefix}-gallery img').length >= {n_images} && "
                    f"document.querySelector('#{prefix}-msg').innerText.includes({expect!r})")
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
            page.wait_for_function("document.querySelectorAll('#run-browser img').length >= 16")
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

            page.click("#run-choice input")
            page.get_by_role("option", name="broken (unavailable)").click()
            page.wait_for_function("document.querySelector('#run-info').innerText.includes('cannot be used')")
            assert "open_clip:ViT-B-32/openai" in page.inner_text("#run-info")
            page.screenshot(path=str(shots / "broken-run.png"), full_page=True)
        finally:
            browser.close()
    assert not outside, f"the page reached outside the app: {outside[:5]}"
    print(f"screenshots in {shots}")
