"""Benchmark: the web app's memory and disk under concurrent large uploads (CPU).

Starts `clip-interpret app` on a 200-image toy-world run in a subprocess (its own TMPDIR),
then S sessions at once (gradio clients, each its own browser session) each upload a large
PNG and run three analyses on it (property neighbours, image neighbours, topic segmentation).
Reports the app process's resident memory (VmRSS; the phase's peak from VmHWM, reset between
phases) at start, at each phase's peak and after an idle wait; then stops the app with SIGTERM
and lists what is left in its TMPDIR (expected: nothing). The clients do not fetch the result
images: gradio rewrites a cached image in place when two sessions produce the same one (here,
the same run images as neighbours), and a fetch at that instant is cut short.

Two images, each uploaded by every session:
  * 9000 x 9000 (81 MP): over the app's pixel limit, refused from the file's header;
  * 7000 x 7000 (49 MP): accepted, decoded once (two at a time), shrunk to the model's input,
    the file deleted; the analyses use the shrunk image.

    python bench/app_memory.py [--sessions 8] [--idle 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

LABELS = {"labeller": "manual", "heads": {"L5.H3": {"label": "color"}, "L4.H1": {"label": "color"}}}


def _mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def _png(path: Path, side: int, session: int) -> Path:
    """A large PNG that compresses well (stripes and a disc), like a big scan or render; each session's
    disc sits elsewhere (sessions of different users send different images)."""
    image = Image.new("RGB", (side, side), (220, 210, 170))
    draw = ImageDraw.Draw(image)
    for x in range(0, side, side // 20):
        draw.rectangle([x, 0, x + side // 40, side], fill=(180, 160, 110))
    offset = side // 16 * session
    draw.ellipse([offset, side // 4, offset + side // 4, side // 2], fill=(200, 30, 30))
    image.save(path, compress_level=1)
    return path


def _session(url: str, image: Path) -> str:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)  # see the module doc
    try:
        message = client.predict(handle_file(str(image)), api_name="/upload_query")[-1]
    except Exception as err:  # noqa: BLE001 - the refusal is the expected outcome for the 81 MP image
        return f"upload refused: {str(err).splitlines()[0][:120]}"
    client.predict("toy", "color", 4, "dot", api_name="/property_neighbours")
    client.predict("toy", "L4.H1", 8, "dot", api_name="/image_neighbours")
    client.predict("toy", "a red circle", ["all heads"], api_name="/topic_segmentation")
    return message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--idle", type=float, default=20, help="seconds to wait before the idle reading")
    args = parser.parse_args()

    from clip_interpret import load_model
    from clip_interpret.runstore import index_images

    work = Path(tempfile.mkdtemp(prefix="bench-app-memory-"))
    run = work / "toy"
    index_images(load_model("toy"), "toyworld:200:1", run, progress=False)
    (run / "labels.json").write_text(json.dumps(LABELS))
    images = {f"{mp} MP ({side}x{side})": [_png(work / f"{mp}mp-{i}.png", side, i) for i in range(args.sessions)]
              for mp, side in ((81, 9000), (49, 7000))}
    app_tmp = work / "tmp"
    app_tmp.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TMPDIR=str(app_tmp))
    log = open(work / "app.log", "w")
    app = subprocess.Popen([sys.executable, "-m", "clip_interpret", "app", str(run), "--port", str(port),
                            "--max-upload-mb", "100"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if app.poll() is not None or time.time() > deadline:
                sys.exit(f"the app did not start:\n{(work / 'app.log').read_text()}")
            time.sleep(0.5)
    time.sleep(2)
    start = _mb(app.pid, "VmRSS")
    print(f"app on a 200-image toy run, {args.sessions} sessions at once; RSS at start {start:,.0f} MB")
    print(f"{'upload (each session)':<22} {'peak RSS':>10} {'RSS after':>10}  outcome (first session)")
    for label, image in images.items():  # one image per session
        _reset_peak(app.pid)
        t0 = time.time()
        with ThreadPoolExecutor(args.sessions) as pool:
            outcomes = list(pool.map(lambda path: _session(url, path), image))
        elapsed = time.time() - t0
        print(f"{label:<22} {_mb(app.pid, 'VmHWM'):>7,.0f} MB {_mb(app.pid, 'VmRSS'):>7,.0f} MB  "
              f"{outcomes[0]} ({elapsed:.1f} s)")
    time.sleep(args.idle)
    print(f"RSS after {args.idle:.0f} s idle: {_mb(app.pid, 'VmRSS'):,.0f} MB (start {start:,.0f} MB)")
    app.send_signal(signal.SIGTERM)
    app.wait(60)
    left = sorted(str(p.relative_to(app_tmp)) for p in app_tmp.rglob("*"))
    print(f"after SIGTERM: exit status {app.returncode}; left in the app's TMPDIR: {left or 'nothing'}")
    log.close()


if __name__ == "__main__":
    main()
