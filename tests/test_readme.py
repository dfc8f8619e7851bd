"""The README runs as written: every shell and Python block, in order, in a scratch folder.

Each bash block runs in a fresh shell whose PATH does not hold the virtual
environment: the quick start must activate it itself, and every later block gets
the one line the README tells a new shell to run first (`source .venv/bin/activate`).
Each Python block runs in a fresh interpreter of that environment. The scratch
folder links the clone's Makefile, pyproject.toml and .venv, so `make demo` runs
as a newcomer types it (its install step is already done by `make test`).

What cannot run here is replaced, each replacement with its reason, and each must
still match the README (so the list cannot drift from it): see REPLACE and SKIP.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ChatServer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)

# block text -> why it is not run
SKIP = {
    "make test": "it is the command that runs this test",
}
# README text -> (what runs instead, why)
REPLACE = {
    "http://127.0.0.1:8080/v1": ("{llm_url}", "an LLM server of the user's own; a stub answers the same protocol"),
    "--steps 10000 --warmup 200": ("--steps 3 --warmup 1", "the real run takes 80-100 minutes on 2 cores"),
    "--checkpoint-every 250": ("--checkpoint-every 2", "with 3 steps, a checkpoint is still written and read"),
}
APP_PREFIX = "clip-interpret app "


def blocks(text: str) -> list[tuple[str, str]]:
    return [(lang.strip(), body) for lang, body in FENCE.findall(text)]


def test_every_block_says_what_it_is():
    """A block is bash (run), python (run) or text (shown only): an unlabelled fence would be skipped silently."""
    kinds = [lang for lang, _ in blocks(README.read_text())]
    assert kinds and all(k in ("bash", "python", "text") for k in kinds), kinds
    assert kinds.count("bash") >= 5 and kinds.count("python") >= 2


def _label_with_the_first_allowed_property(body: dict, n: int) -> dict:
    """The LLM stub's answer: every head gets the first allowed property, every text judged to fit."""
    ask = body["messages"][-1]["content"]
    allowed = re.search(r"Choose the property from: ([^.\n]+)", ask)
    return {"property": allowed.group(1).split(", ")[0] if allowed else "colour", "confidence": 0.9,
            "judgements": [True] * len(re.findall(r"^\d+\. ", ask, re.M))}


def _serve_briefly(line: str) -> str:
    """A line that starts the app (it serves until stopped): start it, wait until it answers, stop it."""
    port = re.search(r"--port[ =](\d+)", line)
    url = f"http://127.0.0.1:{port.group(1) if port else 7860}/"
    command = line.split("#", 1)[0].strip()
    return f"""{command} &
app=$!
python - <<'PY'
import time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen("{url}", timeout=2); break
    except Exception:
        time.sleep(0.5)
else:
    raise SystemExit("the app never answered at {url}")
PY
kill -TERM $app
wait $app || [ $? -eq 143 ]
"""


def _shell_script(body: str) -> str:
    lines = []
    for line in body.splitlines():
        lines.append(_serve_briefly(line) if line.startswith(APP_PREFIX) else line)
    return "\n".join(lines)


def _fresh_env(scratch: Path) -> dict:
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["CLIP_INTERPRET_CACHE"] = str(scratch / ".cache")  # a newcomer's empty cache
    env["CLIP_INTERPRET_OFFLINE"] = "1"  # never try to download weights
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("MAKEFLAGS", None)
    env.pop("MFLAGS", None)
    env.pop("MAKELEVEL", None)
    return env


def test_the_readme_runs_as_written(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file() or not (venv / ".installed").is_file():
        pytest.skip("run under the environment `make test` makes (.venv with its .installed mark)")
    scratch = tmp_path / "clone"
    scratch.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        (scratch / name).symlink_to(ROOT / name)
    (scratch / ".venv").symlink_to(venv)
    text = README.read_text()
    stub = ChatServer(_label_with_the_first_allowed_property)
    try:
        used = set()
        for old, (new, _) in REPLACE.items():
            if old in text:
                used.add(old)
                text = text.replace(old, new.format(llm_url=stub.url))
        assert used == set(REPLACE), f"replacements that no longer match the README: {set(REPLACE) - used}"
        skipped, ran = set(), 0
        for k, (lang, body) in enumerate(blocks(text)):
            if lang == "text":
                continue
            command = re.sub(r"[ \t]*#.*", "", body).strip()  # the block without its comments
            if command in SKIP:
                skipped.add(command)
                continue
            if lang == "bash":
                first = ran == 0
                script = ("" if first else "source .venv/bin/activate\n") + _shell_script(body)
                argv = ["bash", "-euo", "pipefail", "-c", script]
            else:
                argv = [str(venv / "bin" / "python"), "-c", body]
            began = time.monotonic()
            done = subprocess.run(argv, cwd=scratch, env=_fresh_env(scratch), capture_output=True, text=True,
                                  timeout=1200)
            print(f"README block {k + 1} ({lang}): {time.monotonic() - began:.1f} s")  # shown with pytest -s
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"README block {k + 1} ({lang}) failed:\n{body}\n---\n{output[-4000:]}"
            assert "Traceback" not in output, f"README block {k + 1} printed a traceback:\n{output[-4000:]}"
            ran += 1
        assert skipped == set(SKIP), f"skips that no longer match a README block: {set(SKIP) - skipped}"
    finally:
        stub.close()
    # what the blocks promise to leave behind
    assert (scratch / "out" / "demo" / "report.html").is_file()
    assert (scratch / "runs" / "study" / "report.html").is_file()
    assert (scratch / "query.png").is_file()
