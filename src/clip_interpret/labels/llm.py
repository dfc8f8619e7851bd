"""The paper's labeller: in-context learning over an OpenAI-compatible chat API.

For each head the model is shown a few solved examples, then the head's TextSpan
descriptions, and must answer with one JSON object::

    {"property": "colors", "confidence": 0.9, "judgements": [true, true, false, true, true]}

Answers are parsed strictly (one JSON object, optionally inside one ```json fence;
the right number of boolean judgements; a confidence in [0, 1]; with a property
list, a property from it). A bad answer, a timeout or a server error is retried
with exponential backoff; when the retries are spent that head fails with the
reason and the other heads go on, until ``max_failures`` heads in a row have
failed (a hung or broken server): then the labelling stops with one message
saying what failed and how to resume. An endpoint that cannot be reached at all
stops the labelling at once. Every transport error (timeouts, refused or reset
connections, replies that are not HTTP or not JSON) becomes such a one-line
reason, never a traceback. Good answers are cached on disk, keyed by the full
request, so a second run asks nothing again.

Works with hosted APIs and local servers (llama.cpp, vLLM, Ollama): anything
that serves ``POST {base}/chat/completions``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import ClipInterpretError
from .store import normalise_property

SYSTEM = ("You label attention heads of a CLIP image encoder. Each head is described by a few short texts "
          "that span its output space (found with TextSpan). Name the one visual property the texts share "
          "(for example colors, locations, animals, patterns, shapes, counts), say how sure you are, and judge "
          "for each text whether it belongs to that property. Answer with one JSON object only: "
          '{"property": "<name>", "confidence": <number 0-1>, "judgements": [<true|false>, ...]} '
          "with one judgement per text, in order.")


class LLMUnreachable(ClipInterpretError):
    """The endpoint cannot be reached at all (refused connection, unknown host)."""


class LLMAnswerError(ClipInterpretError):
    """One head's answer could not be had (timeouts, server errors, malformed or invalid answers)."""


class LLMStopped(ClipInterpretError):
    """``max_failures`` heads in a row failed: the labelling stopped (the answers had are cached)."""


@dataclass
class LLMConfig:
    url: str | None = None  # base URL, e.g. http://127.0.0.1:8080/v1
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    retries: int = 3  # attempts after the first
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    properties: list[str] | None = None  # allowed properties (normalised); None: any
    examples: str | None = None  # a JSON file of few-shot examples; None: built from the published labels
    cache: bool = True
    max_failures: int | None = 3  # stop after this many heads in a row failed; None or 0: never stop

    @classmethod
    def from_env(cls, **overrides) -> "LLMConfig":
        """Options win over the environment: CLIP_INTERPRET_LLM_URL / OPENAI_BASE_URL,
        CLIP_INTERPRET_LLM_MODEL, CLIP_INTERPRET_LLM_KEY / OPENAI_API_KEY."""
        env = os.environ
        values = {"url": env.get("CLIP_INTERPRET_LLM_URL") or env.get("OPENAI_BASE_URL"),
                  "model": env.get("CLIP_INTERPRET_LLM_MODEL"),
                  "api_key": env.get("CLIP_INTERPRET_LLM_KEY") or env.get("OPENAI_API_KEY")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def check(self) -> None:
        if self.max_failures is not None and (isinstance(self.max_failures, bool) or
                                              not isinstance(self.max_failures, int) or self.max_failures < 0):
            raise ClipInterpretError(f"max_failures (--llm-max-failures) must be a whole number >= 0 "
                                     f"(0: never stop), got {self.max_failures!r}")
        if not self.url:
            raise ClipInterpretError("the llm labeller needs an OpenAI-compatible endpoint: pass --llm-url "
                                     "(e.g. http://127.0.0.1:8080/v1 for a local llama.cpp/vLLM/Ollama server) or "
                                     "set CLIP_INTERPRET_LLM_URL; the taxonomy and embedding labellers work offline")
        if not self.model:
            raise ClipInterpretError("the llm labeller needs a model name: pass --llm-model or set "
                                     "CLIP_INTERPRET_LLM_MODEL")


# ------------------------------------------------------------------ examples
def published_labels() -> dict:
    """The head labels published with CLIP-InterpreT for its six models (packaged data)."""
    return json.loads(resources.files("clip_interpret.labels").joinpath("published_head_labels.json").read_text())


def default_examples(n_texts: int = 5) -> list[dict]:
    """Few-shot examples: property names the paper's authors gave heads, each with descriptions of
    that property from the general pool, and one mixed head whose odd text is judged out."""
    from ..pools import load_pool

    pool = load_pool("general")
    by_category: dict[str, list[str]] = {}
    for category, text in zip(pool.categories, pool.texts):
        by_category.setdefault(normalise_property(category), []).append(text)
    published = {normalise_property(label) for model in published_labels()["models"].values()
                 for label in model["head_labels"].values()}
    examples = []
    for prop, shown in (("color", "Colors"), ("location", "Locations"), ("animal", "Animals")):
        if prop in published and prop in by_category:
            texts = by_category[prop][::max(1, len(by_category[prop]) // n_texts)][:n_texts]
            examples.append({"texts": texts, "property": shown, "confidence": 0.9,
                             "judgements": [True] * len(texts)})
    if "pattern" in by_category and "color" in by_category:
        texts = by_category["pattern"][:n_texts - 1] + [by_category["color"][0]]
        examples.append({"texts": texts, "property": "Patterns", "confidence": 0.7,
                         "judgements": [True] * (len(texts) - 1) + [False]})
    return examples


def load_examples(path: str | None) -> list[dict]:
    if path is None:
        return default_examples()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ClipInterpretError(f"cannot read few-shot examples {path}: {err}") from None
    if not isinstance(data, list) or not data:
        raise ClipInterpretError(f"{path}: expected a JSON list of {{\"texts\": [...], \"property\": ...}} examples")
    for i, ex in enumerate(data):
        if not isinstance(ex, dict) or not isinstance(ex.get("texts"), list) or not ex.get("property"):
            raise ClipInterpretError(f"{path}: example {i} needs 'texts' (a list) and 'property'")
        ex.setdefault("confidence", 0.9)
        ex.setdefault("judgements", [True] * len(ex["texts"]))
    return data


def _user_message(texts: list[str], properties: list[str] | None) -> str:
    lines = [f"{i + 1}. {t}" for i, t in enumerate(texts)]
    allowed = f"\nChoose the property from: {', '.join(properties)}." if properties else ""
    return "Texts of one head:\n" + "\n".join(lines) + allowed


def build_messages(texts: list[str], examples: list[dict], properties: list[str] | None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for ex in examples:
        messages.append({"role": "user", "content": _user_message(ex["texts"], properties)})
        messages.append({"role": "assistant", "content": json.dumps(
            {"property": ex["property"], "confidence": ex["confidence"], "judgements": ex["judgements"]})})
    messages.append({"role": "user", "content": _user_message(texts, properties)})
    return messages


# -------------------------------------------------------------------- parsing
def json_object(content: str) -> dict:
    """One JSON object (optionally in one ```json fence); LLMAnswerError otherwise."""
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fence:
        text = fence.group(1)
    try:
        data = json.loads(text)
    except ValueError:
        raise LLMAnswerError(f"malformed JSON answer: {content[:120]!r}") from None
    if not isinstance(data, dict):
        raise LLMAnswerError(f"the answer is not a JSON object: {content[:120]!r}")
    return data


def check_judgements(judgements, n_texts: int) -> list[bool]:
    if not isinstance(judgements, list) or len(judgements) != n_texts or \
            not all(isinstance(j, bool) for j in judgements):
        raise LLMAnswerError(f"'judgements' must be {n_texts} booleans, got {judgements!r}")
    return judgements


def parse_answer(content: str, n_texts: int, properties: list[str] | None) -> dict:
    """Strictly parse one answer; raise LLMAnswerError saying what is wrong."""
    data = json_object(content)
    prop, conf, judgements = data.get("property"), data.get("confidence"), data.get("judgements")
    if not isinstance(prop, str) or not prop.strip():
        raise LLMAnswerError("the answer has no 'property' string")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
        raise LLMAnswerError(f"'confidence' must be a number in [0, 1], got {conf!r}")
    check_judgements(judgements, n_texts)
    label = normalise_property(prop)
    if label in ("none", "unknown", "no property"):
        label = None
    elif properties is not None and label not in properties:
        raise LLMAnswerError(f"unknown property {prop!r}; allowed: {', '.join(properties)}")
    return {"label": label, "confidence": float(conf), "judgements": judgements}


# ------------------------------------------------------------------- transport
DROPPED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)  # a server that took the connection
def _one_line(what, limit: int = 160) -> str:
    """A reason on one line, cut to ``limit`` characters (servers may answer anything)."""
    text = " ".join(str(what).split()) or type(what).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class FailureStop:
    """Counts heads that failed in a row; ``max_failures`` of them stop the work with one message."""

    def __init__(self, config: LLMConfig, what: str = "labelling", unwritten: str = "no labels file"):
        self.config, self.what, self.unwritten = config, what, unwritten
        self.in_a_row, self.done = 0, 0

    def success(self) -> None:
        self.in_a_row = 0
        self.done += 1

    def failure(self, head: str, error: Exception) -> None:
        self.in_a_row += 1
        limit = self.config.max_failures
        if limit and self.in_a_row >= limit:
            raise LLMStopped(
                f"LLM {self.what} stopped: {self.in_a_row} heads in a row failed at {self.config.url} (last: {head}: "
                f"{_one_line(error, 300)}). Fix or restart the server (or raise --llm-timeout / --llm-max-failures, "
                f"0 never stops), then run the same command again: the answers already received ({self.done} in this "
                f"attempt) are cached and not asked again; {self.unwritten} was written by this attempt")

class ChatClient:
    """POST /chat/completions with retries, backoff, timeouts and an on-disk answer cache."""

    def __init__(self, config: LLMConfig, sleep=time.sleep):
        config.check()
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self.sleep = sleep
        from ..pools import cache_dir

        self.cache_root = cache_dir() / "llm"

    def _key(self, messages: list[dict]) -> str:
        payload = json.dumps({"url": self.endpoint, "model": self.config.model, "messages": messages}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _cached(self, key: str) -> str | None:
        path = self.cache_root / f"{key}.json"
        if self.config.cache and path.is_file():
            try:
                return json.loads(path.read_text())["content"]
            except (OSError, ValueError, KeyError):
                return None
        return None

    def _store(self, key: str, content: str) -> None:
        if not self.config.cache:
            return
        try:
            self.cache_root.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_root / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"content": content}))
            os.replace(tmp, self.cache_root / f"{key}.json")
        except OSError:
            pass  # the cache only saves requests

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.config.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
            data = json.loads(response.read().decode())  # ValueError (UnicodeDecodeError too) when not JSON
        try:
            return data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMAnswerError(f"the server's reply is not a chat completion: {str(data)[:120]!r}") from None

    def ask(self, messages: list[dict], validate) -> tuple[dict, bool]:
        """(validated answer, whether it came from the cache). Retries, then raises."""
        key = self._key(messages)
        cached = self._cached(key)
        if cached is not None:
            try:
                return validate(cached), True
            except LLMAnswerError:
                pass
        problems = []
        unreachable = 0
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.sleep(self.config.backoff * 2 ** (attempt - 1))
            try:
                content = self._post(messages)
                answer = validate(content)
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise ClipInterpretError(f"the LLM endpoint {self.endpoint} refused the request (HTTP {err.code}): "
                                             "check --llm-key / CLIP_INTERPRET_LLM_KEY") from None
                if err.code == 404:
                    raise ClipInterpretError(f"the LLM endpoint {self.endpoint} does not exist (HTTP 404): the base "
                                             "URL should end where /chat/completions is served, often in /v1") from None
                problems.append(f"HTTP {err.code}")
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    problems.append(f"no answer within {self.config.timeout:g} s")
                elif isinstance(reason, DROPPED):  # reached, then dropped while the request was sent
                    problems.append(f"the server's reply is not HTTP (the connection was dropped: {_one_line(reason)})")
                else:
                    unreachable += 1
                    problems.append(f"cannot connect ({_one_line(reason)})")
            except (TimeoutError, socket.timeout):
                problems.append(f"no answer within {self.config.timeout:g} s")
            except http.client.HTTPException as err:  # before OSError: RemoteDisconnected is both
                problems.append(f"the server's reply is not HTTP ({type(err).__name__}: {_one_line(err)})")
            except DROPPED as err:
                # the server took the connection and dropped it: reached, but no HTTP reply (as RemoteDisconnected)
                problems.append(f"the server's reply is not HTTP (the connection was dropped: {_one_line(err)})")
            except (ConnectionError, OSError) as err:
                unreachable += 1
                problems.append(f"connection failed ({_one_line(err)})")
            except ValueError:
                problems.append("the server's reply is not JSON")
            except LLMAnswerError as err:
                problems.append(_one_line(err, 300))
            else:
                self._store(key, content)
                return answer, False
        if unreachable == self.config.retries + 1:
            raise LLMUnreachable(f"cannot reach the LLM endpoint {self.endpoint}: {problems[-1]}. Is the server "
                                 "running? Set --llm-url / CLIP_INTERPRET_LLM_URL (answers already received are "
                                 "cached; running again continues)")
        raise LLMAnswerError(f"no valid answer after {len(problems)} attempts: " + "; ".join(problems))


def llm_labels(textspan: dict, config: LLMConfig, progress: bool = True, sleep=time.sleep) -> dict[str, dict]:
    """Label every head by asking the chat model; a failed head keeps its error and ``label: None``.
    ``config.max_failures`` heads failing in a row stop it with ``LLMStopped`` (answers had stay cached)."""
    from tqdm import tqdm

    client = ChatClient(config, sleep=sleep)
    examples = load_examples(config.examples)
    allowed = sorted({normalise_property(p) for p in config.properties}) if config.properties else None
    heads = {}
    stop = FailureStop(config)
    for name, head in tqdm(textspan["heads"].items(), desc="LLM labels", unit="head", disable=not progress):
        texts = head["texts"]
        messages = build_messages(texts, examples, allowed)
        try:
            answer, _ = client.ask(messages, lambda content: parse_answer(content, len(texts), allowed))
        except LLMUnreachable:
            raise
        except LLMAnswerError as err:
            heads[name] = {"label": None, "confidence": 0.0, "texts": texts, "judgements": None,
                           "source": "llm", "error": f"{name}: {err}"}
            stop.failure(name, err)  # raises LLMStopped after max_failures heads in a row
            continue
        stop.success()
        heads[name] = {"label": answer["label"], "confidence": answer["confidence"], "texts": texts,
                       "judgements": answer["judgements"] if answer["label"] else [False] * len(texts),
                       "source": "llm", "error": None}
    return heads
