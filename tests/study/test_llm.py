"""The LLM labeller against a local HTTP server that speaks the OpenAI chat-completions protocol."""

import json
import socket
import struct
import threading
import time

import pytest

from clip_interpret.errors import ClipInterpretError
from clip_interpret.labels.llm import (LLMConfig, LLMUnreachable, build_messages, default_examples, llm_labels,
                                       parse_answer, published_labels)

from tests.helpers import ChatServer


@pytest.fixture
def serve(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    servers = []

    def start(script):
        servers.append(ChatServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _texts(body):
    """The texts of the head being asked about (the last user message)."""
    last = body["messages"][-1]["content"]
    return [line.split(". ", 1)[1] for line in last.splitlines() if line[:1].isdigit()]


def answer_by_keyword(body, n):
    texts = _texts(body)
    prop = "colors" if any("red" in t or "blue" in t for t in texts) else "Shapes"
    key = "red" if prop == "colors" else "circle"
    return {"property": prop, "confidence": 0.8, "judgements": [key in t or "blue" in t for t in texts]}


TEXTSPAN = {"pool": {"name": "t", "hash": "h", "size": 6}, "run": {"fingerprint": "f"}, "heads": {
    "L0.H0": {"texts": ["a red car", "a blue sky", "a circle"], "explained": [0.3, 0.2, 0.1]},
    "L0.H1": {"texts": ["a circle", "a big circle", "a square"], "explained": [0.3, 0.2, 0.1]},
}}


def config(url, **kw):
    return LLMConfig(url=url, model="test-model", api_key=kw.pop("api_key", "sekrit"), timeout=kw.pop("timeout", 5),
                     retries=kw.pop("retries", 2), backoff=0.01, **kw)


def test_labels_every_head_and_sends_the_protocol(serve):
    server = serve(answer_by_keyword)
    heads = llm_labels(TEXTSPAN, config(server.url), progress=False)
    assert heads["L0.H0"]["label"] == "color" and heads["L0.H0"]["judgements"] == [True, True, False]
    assert heads["L0.H1"]["label"] == "shape" and heads["L0.H1"]["judgements"] == [True, True, False]
    request = server.requests[0]
    assert request["body"]["model"] == "test-model" and request["auth"] == "Bearer sekrit"
    roles = [m["role"] for m in request["body"]["messages"]]
    assert roles[0] == "system" and roles[-1] == "user" and "assistant" in roles  # few-shot examples


def test_answers_are_cached_on_disk(serve):
    server = serve(answer_by_keyword)
    llm_labels(TEXTSPAN, config(server.url), progress=False)
    asked = len(server.requests)
    again = llm_labels(TEXTSPAN, config(server.url), progress=False)
    assert len(server.requests) == asked == 2
    assert again["L0.H0"]["label"] == "color"
    llm_labels(TEXTSPAN, config(server.url, cache=False), progress=False)
    assert len(server.requests) == 4


def test_malformed_json_is_retried(serve):
    server = serve(lambda body, n: "Sure! The property is colors." if n == 1 else answer_by_keyword(body, n))
    heads = llm_labels({**TEXTSPAN, "heads": {"L0.H0": TEXTSPAN["heads"]["L0.H0"]}}, config(server.url),
                       progress=False)
    assert heads["L0.H0"]["label"] == "color" and len(server.requests) == 2


def test_a_head_that_keeps_failing_fails_alone(serve):
    def script(body, n):
        if "a red car" in _texts(body):
            return {"property": "vehicles", "confidence": 0.9, "judgements": [True, True, True]}
        return answer_by_keyword(body, n)

    server = serve(script)
    heads = llm_labels(TEXTSPAN, config(server.url, properties=["colors", "shape"], retries=2), progress=False)
    assert heads["L0.H0"]["label"] is None
    assert "L0.H0" in heads["L0.H0"]["error"] and "unknown property 'vehicles'" in heads["L0.H0"]["error"]
    assert heads["L0.H1"]["label"] == "shape" and heads["L0.H1"]["error"] is None
    assert sum("a red car" in _texts(r["body"]) for r in server.requests) == 3  # first try + 2 retries
    # the allowed list is in the prompt
    assert "color, shape" in server.requests[0]["body"]["messages"][-1]["content"]


def test_timeouts_and_server_errors_are_retried_then_reported(serve):
    server = serve(lambda body, n: ("sleep", 1.0, answer_by_keyword(body, n)) if n == 1 else ("status", 503))
    heads = llm_labels({**TEXTSPAN, "heads": {"L0.H0": TEXTSPAN["heads"]["L0.H0"]}},
                       config(server.url, timeout=0.3, retries=1), progress=False)
    error = heads["L0.H0"]["error"]
    assert "no answer within 0.3 s" in error and "HTTP 503" in error


def test_slow_answer_within_timeout_is_taken(serve):
    server = serve(lambda body, n: ("sleep", 0.2, answer_by_keyword(body, n)))
    heads = llm_labels({**TEXTSPAN, "heads": {"L0.H1": TEXTSPAN["heads"]["L0.H1"]}}, config(server.url, timeout=5),
                       progress=False)
    assert heads["L0.H1"]["label"] == "shape"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path))
    url = f"http://127.0.0.1:{_free_port()}/v1"
    started = time.time()
    with pytest.raises(LLMUnreachable, match="cannot reach the LLM endpoint .*Is the server running"):
        llm_labels(TEXTSPAN, config(url, retries=1), progress=False)
    assert time.time() - started < 5


def test_wrong_key_and_wrong_path_fail_at_once(serve):
    server = serve(lambda body, n: ("status", 401))
    with pytest.raises(ClipInterpretError, match="HTTP 401.*key"):
        llm_labels(TEXTSPAN, config(server.url), progress=False)
    assert len(server.requests) == 1
    server = serve(answer_by_keyword)
    with pytest.raises(ClipInterpretError, match="HTTP 404"):
        llm_labels(TEXTSPAN, config(server.url.replace("/v1", "/nope")), progress=False)


def test_configuration_comes_from_options_or_environment(monkeypatch):
    monkeypatch.setenv("CLIP_INTERPRET_LLM_URL", "http://env:1/v1")
    monkeypatch.setenv("CLIP_INTERPRET_LLM_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    cfg = LLMConfig.from_env(model="opt-model")
    assert (cfg.url, cfg.model, cfg.api_key) == ("http://env:1/v1", "opt-model", "env-key")
    monkeypatch.delenv("CLIP_INTERPRET_LLM_URL")
    with pytest.raises(ClipInterpretError, match="--llm-url"):
        LLMConfig.from_env(model="m").check()


@pytest.mark.parametrize("content,problem", [
    ('{"property": "colors", "confidence": 0.5, "judgements": [true, false]}', "3 booleans"),
    ('{"property": "colors", "confidence": 1.5, "judgements": [true, true, true]}', "confidence"),
    ('{"property": "", "confidence": 0.5, "judgements": [true, true, true]}', "property"),
    ('{"property": "colors", "confidence": 0.5, "judgements": [1, 0, 1]}', "booleans"),
    ('[1, 2, 3]', "not a JSON object"),
    ('{"property": "colors", "confidence": 0.5, "judgements": [true, true, true]} and more', "malformed"),
])
def test_answers_are_parsed_strictly(content, problem):
    with pytest.raises(ClipInterpretError, match=problem):
        parse_answer(content, 3, None)


def test_fenced_answer_and_none_property():
    ok = parse_answer('```json\n{"property": "Colours", "confidence": 0.7, "judgements": [true]}\n```', 1, None)
    assert ok == {"label": "color", "confidence": 0.7, "judgements": [True]}
    assert parse_answer('{"property": "none", "confidence": 0.2, "judgements": [false]}', 1, None)["label"] is None


def test_few_shot_examples_use_the_published_property_names():
    published = {label for m in published_labels()["models"].values() for label in m["head_labels"].values()}
    examples = default_examples()
    assert examples and all(ex["property"] in published for ex in examples)
    assert all(len(ex["judgements"]) == len(ex["texts"]) for ex in examples)
    messages = build_messages(["a", "b"], examples, None)
    assert len(messages) == 2 + 2 * len(examples)


def test_label_command_with_a_local_llm_server(serve, toy_textspan_run, tmp_path, capsys):
    """The whole path: `clip-interpret label --labeller llm` against the local server; one head's answers
    are always invalid, so it fails alone and the command still writes the others."""
    import shutil

    from clip_interpret.cli import main

    src, _ = toy_textspan_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ts = json.loads((run / "textspan-toy.json").read_text())
    doomed = ts["heads"]["L5.H4"]["texts"]

    def script(body, n):
        texts = _texts(body)
        if texts == doomed:
            return "I think these are backgrounds."
        return {"property": "colors", "confidence": 0.6, "judgements": [True] * len(texts)}

    server = serve(script)
    code = main(["label", str(run), "--labeller", "llm", "--llm-url", server.url, "--llm-model", "m",
                 "--llm-retries", "1", "--properties", "colors,background,pattern"])
    captured = capsys.readouterr()
    assert code == 0
    assert "L5.H4" in captured.err and "malformed JSON" in captured.err
    labels = json.loads((run / "labels-llm.json").read_text())
    assert labels["heads"]["L5.H4"]["label"] is None and labels["failed"] == {"L5.H4": labels["heads"]["L5.H4"]["error"]}
    assert sum(1 for e in labels["heads"].values() if e["label"] == "color") == 47
    assert labels["options"]["properties"] == ["colors", "background", "pattern"]


# ------------------------------------------------------------ broken servers (issue 24, item 5)
class RawServer:
    """A TCP server below HTTP: ``mode`` "hang" reads each request and never answers; "garbage"
    answers raw bytes that are not HTTP; "reset" closes the connection without a word; "rst" closes it
    with a TCP reset."""

    def __init__(self, mode):
        self.mode, self.stop, self.requests = mode, threading.Event(), 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        held = []
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                conn.recv(65536)  # the request (headers and, here, the small body)
            except OSError:
                pass
            self.requests += 1
            if self.mode == "hang":
                held.append(conn)
                continue
            if self.mode == "garbage":
                conn.sendall(b"\x00\x01\x02 not http at all\r\n\r\n")
            if self.mode == "rst":  # close with a TCP reset: the client meets ECONNRESET, not an empty reply
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        for conn in held:
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def raw_server(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    servers = []

    def start(mode):
        servers.append(RawServer(mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


FIVE_HEADS = {**TEXTSPAN, "heads": {f"L0.H{i}": {"texts": [f"a red car {i}", f"a circle {i}"],
                                               "explained": [0.2, 0.1]} for i in range(5)}}


def test_a_hung_server_stops_after_max_failures_heads(raw_server):
    server = raw_server("hang")
    started = time.time()
    with pytest.raises(ClipInterpretError) as caught:
        llm_labels(FIVE_HEADS, config(server.url, timeout=0.2, retries=0, max_failures=2), progress=False)
    message = str(caught.value)
    assert time.time() - started < 3  # 2 heads x 0.2 s, not 5 heads
    assert server.requests == 2
    assert "\n" not in message and "2 heads in a row failed" in message and "L0.H1" in message
    assert "no answer within 0.2 s" in message and "run the same command again" in message and "cached" in message


def test_max_failures_counts_heads_in_a_row_and_zero_never_stops(serve):
    # every other head fails: never 2 in a row, so all 5 are labelled or failed without a stop
    def script(body, n):
        return ("status", 500) if n % 2 else {"property": "colors", "confidence": 0.5, "judgements": [True, True]}

    server = serve(script)
    heads = llm_labels(FIVE_HEADS, config(server.url, retries=0, max_failures=2), progress=False)
    assert [h["label"] for h in heads.values()] == [None, "color", None, "color", None]
    server = serve(lambda body, n: ("status", 500))
    heads = llm_labels(FIVE_HEADS, config(server.url, retries=0, max_failures=0, cache=False), progress=False)
    assert all("HTTP 500" in h["error"] for h in heads.values()) and len(server.requests) == 5
    with pytest.raises(ClipInterpretError, match="max_failures"):
        llm_labels(FIVE_HEADS, config(server.url, max_failures=-1), progress=False)


@pytest.mark.parametrize("mode,reason", [("garbage", "not HTTP"), ("reset", "not HTTP"), ("rst", "not HTTP")])
def test_a_server_that_does_not_speak_http_is_a_one_line_reason(raw_server, mode, reason):
    server = raw_server(mode)
    started = time.time()
    heads = llm_labels({**TEXTSPAN, "heads": {"L0.H0": TEXTSPAN["heads"]["L0.H0"]}},
                       config(server.url, timeout=1, retries=1), progress=False)
    error = heads["L0.H0"]["error"]
    assert heads["L0.H0"]["label"] is None and reason in error and "\n" not in error
    assert server.requests == 2 and time.time() - started < 3
    with pytest.raises(ClipInterpretError, match="3 heads in a row failed.*not HTTP"):
        llm_labels(FIVE_HEADS, config(server.url, timeout=1, retries=0), progress=False)


def test_a_reply_that_is_not_json_is_a_reason(serve):
    server = serve(lambda body, n: {"x": 1})
    handler = server.server.RequestHandlerClass  # answer 200 with bytes that are neither UTF-8 nor JSON

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        payload = b"<html>\xff\xfe not json</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    handler.do_POST = do_POST
    heads = llm_labels({**TEXTSPAN, "heads": {"L0.H0": TEXTSPAN["heads"]["L0.H0"]}}, config(server.url, retries=0),
                       progress=False)
    assert "not JSON" in heads["L0.H0"]["error"]


def _label(run, url, *extra):
    from clip_interpret.cli import main

    return main(["label", str(run), "--labeller", "llm", "--llm-url", url, "--llm-model", "m", "--llm-retries", "0",
                 *extra])


def test_a_failed_rerun_never_replaces_labels_that_were_had(serve, toy_textspan_run, tmp_path, capsys):
    """32 heads labelled, then a run where every request fails: labels.json and labels-llm.json keep
    every earlier label (merged per head), whether the run stops early or goes through every head."""
    import shutil

    src, _ = toy_textspan_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    good = serve(lambda body, n: {"property": "colors", "confidence": 0.6, "judgements": [True] * len(_texts(body))})
    assert _label(run, good.url) == 0
    before = json.loads((run / "labels.json").read_text())
    n_heads = len(before["heads"])
    assert sum(1 for e in before["heads"].values() if e["label"] == "color") == n_heads

    broken = serve(lambda body, n: ("status", 500))
    # the default stop: 3 heads in a row fail, the command ends with one line and writes nothing
    capsys.readouterr()
    assert _label(run, broken.url, "--llm-max-failures", "3") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "LLM labels:" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and "3 heads in a row failed" in err[0]
    assert "HTTP 500" in err[0] and "run the same command again" in err[0]
    assert json.loads((run / "labels.json").read_text()) == before
    # no stop: every head fails; each keeps its earlier label, labels.json keeps its labels
    assert _label(run, broken.url, "--llm-max-failures", "0", "--llm-timeout", "1") == 0
    for name in ("labels.json", "labels-llm.json"):
        after = json.loads((run / name).read_text())
        assert {h: e["label"] for h, e in after["heads"].items()} == {h: "color" for h in before["heads"]}, name
        assert not after["failed"]
    assert len(json.loads((run / "labels-llm.json").read_text())["kept"]) == n_heads


def test_merge_keeps_only_same_texts_and_new_successes_win(serve, toy_textspan_run, tmp_path):
    import shutil

    from clip_interpret.labels import label_run

    src, _ = toy_textspan_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ts = json.loads((run / "textspan-toy.json").read_text())
    first, second = list(ts["heads"])[:2]
    colors = serve(lambda body, n: {"property": "colors", "confidence": 0.6, "judgements": [True] * len(_texts(body))})
    label_run(run, "llm", llm=config(colors.url, retries=0), progress=False)
    previous = json.loads((run / "labels-llm.json").read_text())
    previous["heads"][second]["texts"] = ["other texts"]  # as if from another TextSpan result
    (run / "labels-llm.json").write_text(json.dumps(previous))
    first_texts = ts["heads"][first]["texts"]

    def script(body, n):  # the first head gets a new label; every other head fails
        if _texts(body) == first_texts:
            return {"property": "shapes", "confidence": 0.6, "judgements": [True] * len(first_texts)}
        return ("status", 500)

    mixed = serve(script)
    out = label_run(run, "llm", llm=config(mixed.url, retries=0, max_failures=0, cache=False), progress=False)
    assert out["heads"][first]["label"] == "shape" and not out["heads"][first].get("kept")
    assert out["heads"][second]["label"] is None and "HTTP 500" in out["heads"][second]["error"]
    third = list(ts["heads"])[2]
    assert out["heads"][third]["label"] == "color" and "HTTP 500" in out["heads"][third]["kept"]


def test_the_llm_judge_stops_after_max_failures_heads_too(serve):
    from clip_interpret.labels.judges import judge_labels

    server = serve(lambda body, n: ("status", 500))
    labels = {"labeller": "embedding", "heads": {h: {"label": "color"} for h in FIVE_HEADS["heads"]}}
    with pytest.raises(ClipInterpretError, match="LLM judging stopped: 2 heads in a row failed.*HTTP 500"):
        judge_labels(labels, FIVE_HEADS, llm=config(server.url, retries=0, max_failures=2))
    assert len(server.requests) == 2
