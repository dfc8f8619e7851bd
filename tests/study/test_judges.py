"""Association is judged by a method independent of the labeller, never by the labeller's own tags."""

import pytest

from clip_interpret.labels.judges import choose_judge, judge_labels
from clip_interpret.labels.labellers import taxonomy_labels
from clip_interpret.labels.llm import LLMConfig
from clip_interpret.metrics import scores

from tests.helpers import ChatServer


def _textspan(heads: dict[str, list[tuple[str, str]]]) -> dict:
    return {"pool": {"name": "toy"}, "heads": {
        h: {"texts": [t for t, _ in pairs], "categories": [c for _, c in pairs], "explained": [0.3] * len(pairs)}
        for h, pairs in heads.items()}}


def test_each_labeller_gets_another_judge():
    assert choose_judge("taxonomy", tagged=True)[0] == "embedding"
    assert choose_judge("embedding", tagged=True)[0] == "taxonomy"
    judge, why = choose_judge("embedding", tagged=False)
    assert judge is None and "--llm-url" in why
    assert choose_judge("llm", tagged=True)[0] == "taxonomy" and choose_judge("llm", tagged=False)[0] == "embedding"
    llm = LLMConfig(url="http://x/v1", model="m")
    assert choose_judge("taxonomy", True, llm)[0] == "llm" and choose_judge("llm", True, llm)[0] == "taxonomy"


def test_taxonomy_labels_are_judged_by_the_embedding_not_by_their_tags():
    """A pool whose tags are wrong: the taxonomy labeller trusts them (its own judgements all say
    yes), the embedding judge reads the texts and says no."""
    textspan = _textspan({
        "L0.H0": [("a crimson thing", "shape"), ("a blue object", "shape"), ("something green", "shape")],  # mis-tagged
        "L0.H1": [("a crimson thing", "color"), ("a blue object", "color"), ("something green", "color")],
    })
    labels = {"labeller": "taxonomy", "heads": taxonomy_labels(textspan)}
    assert all(all(e["judgements"]) for e in labels["heads"].values())  # the labeller's own view
    verdict = judge_labels(labels, textspan, toy=True)  # MiniLM (installed with the test extra)
    assert verdict["judge"] == "embedding" and "MiniLM" in verdict["detail"]
    assert verdict["judgements"]["L0.H0"] == [False, False, False]
    assert verdict["judgements"]["L0.H1"] == [True, True, True]
    s = scores(labels["heads"], judgements=verdict["judgements"], judge=verdict["detail"])
    assert s["association"] == pytest.approx(0.5)


def test_embedding_labels_are_judged_by_the_pool_tags():
    textspan = _textspan({"L0.H0": [("a red shape", "color"), ("a stripy pattern", "pattern")]})
    labels = {"labeller": "embedding", "heads": {"L0.H0": {"label": "color", "judgements": [True, True]}}}
    verdict = judge_labels(labels, textspan)
    assert verdict["judge"] == "taxonomy" and verdict["judgements"] == {"L0.H0": [True, False]}
    untagged = _textspan({"L0.H0": [("a red shape", None), ("a stripy pattern", None)]})
    none = judge_labels(labels, untagged)
    assert none["judge"] is None and none["judgements"] == {}
    assert scores(labels["heads"], judgements=none["judgements"])["association"] is None


def test_the_llm_judge_asks_about_the_label(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    asked = []

    def script(body, n):
        question = body["messages"][-1]["content"]
        asked.append(question)
        texts = [line.split(". ", 1)[1] for line in question.splitlines() if line[:1].isdigit()]
        return {"judgements": ["red" in t or "blue" in t for t in texts]}

    server = ChatServer(script)
    try:
        textspan = _textspan({"L0.H0": [("a red shape", "shape"), ("a star", "shape"), ("a blue object", "shape")],
                              "L0.H1": [("a star", "shape")]})
        labels = {"labeller": "taxonomy", "heads": {"L0.H0": {"label": "color"}, "L0.H1": {"label": None}}}
        verdict = judge_labels(labels, textspan, llm=LLMConfig(url=server.url, model="judge-model", retries=0))
    finally:
        server.close()
    assert verdict["judge"] == "llm" and "judge-model" in verdict["detail"]
    assert verdict["judgements"] == {"L0.H0": [True, False, True]}  # only labelled heads are asked
    assert len(asked) == 1 and asked[0].startswith("Property: color")
