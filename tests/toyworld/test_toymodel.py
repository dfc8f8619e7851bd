"""Training the toy CLIP (a few steps), resuming, and the bundled toy model."""

import json
import shutil

import numpy as np
import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.cli import main
from clip_interpret.errors import ClipInterpretError, ModelLoadError
from clip_interpret.models import loader
from clip_interpret.models import toy as toy_backend
from clip_interpret.toyworld.evaluate import evaluate
from clip_interpret.toyworld.train import TrainConfig, batch_tensors, build_model, contrastive_loss, train

SMALL = TrainConfig(steps=12, batch_size=24, lr=2e-3, warmup=2)


def _loss_on(model, cfg, start=0):
    from clip_interpret.models.loader import open_clip_preprocess, registered_open_clip

    tok = registered_open_clip().tokenizer.SimpleTokenizer(context_length=model.context_length)
    pixels, tokens = batch_tensors(start, cfg.batch_size, cfg.world_seed,
                                   open_clip_preprocess(model, model.visual.image_size), tok, model.context_length)
    model.eval()
    with torch.no_grad():
        return float(contrastive_loss(*model(pixels, tokens)[:3]))


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    before = _loss_on(build_model(SMALL), SMALL, start=10_000)  # a batch the run never sees
    result = train(tmp_path / "run", SMALL, checkpoint_every=100, progress=False, log=lambda *_: None)
    after = _loss_on(result["model"], SMALL, start=10_000)
    assert result["finished"] and len(result["history"]) == 12
    assert after < before - 0.05, (before, after)


def test_resume_continues_exactly_and_refuses_another_config(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1)
    straight = train(tmp_path / "a", cfg, progress=False, log=lambda *_: None)
    first = train(tmp_path / "b", cfg, progress=False, log=lambda *_: None, stop_after=2)
    assert not first["finished"] and first["steps_done"] == 2
    messages = []
    resumed = train(tmp_path / "b", cfg, progress=False, log=messages.append)
    assert any("resuming from step 2" in m for m in messages)
    assert resumed["history"][:2] == first["history"]
    for (name, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(ClipInterpretError, match="different config.*lr"):
        train(tmp_path / "b", TrainConfig(steps=4, batch_size=8, warmup=1, lr=1e-4), progress=False,
              log=lambda *_: None)


def test_bundled_toy_model_matches_its_card_by_an_independent_count(toy_model):
    """evaluate()'s figures and the card's claims against a count written here: generated held-out
    images, their true attributes and each value's prompts (the task's definition), one image at a time."""
    from clip_interpret.toyworld import PROPERTIES, generate
    from clip_interpret.toyworld.evaluate import class_prompts

    model, n = toy_model, 300
    assert not model.random_weights and model.vit.cfg.layers == 6 and model.vit.cfg.heads == 8
    card = json.loads((loader.TOY_WEIGHTS / "toy.json").read_text())["eval"]
    items = [generate(i, seed=1) for i in range(n)]
    images = model.encode_image(torch.stack([model.preprocess(item.image) for item in items])).numpy()
    result = evaluate(model, n=n)
    for prop, values in PROPERTIES.items():
        wordings = class_prompts(prop)  # for each value, its prompts (one call to the text encoder)
        flat = model.encode_text([w for value in wordings for w in value]).numpy()
        ends = np.cumsum([len(value) for value in wordings])
        prompts = [flat[end - len(value):end].mean(axis=0) for value, end in zip(wordings, ends)]
        right = 0
        for image, item in zip(images, items):
            scores = [float(image @ (p / (p @ p) ** 0.5)) for p in prompts]
            right += values[scores.index(max(scores))] == item.attributes[prop]
        assert abs(result["zero_shot"][prop]["accuracy"] - right / n) <= 1 / n, prop  # a near-tie may flip
        claimed, chance = card["zero_shot"][prop]["accuracy"], 1 / len(values)
        assert abs(right / n - claimed) < 0.08, (prop, right / n, claimed)  # the card measured 1000 images
        if claimed > chance + 0.3:  # what the card says the model learned, it shows here
            assert right / n > chance + 0.2, prop
    captions = model.encode_text([item.caption for item in items]).numpy()
    first = 0  # images whose own caption scores highest
    for i, image in enumerate(images):
        scores = captions @ image
        first += int((scores > scores[i]).sum() == 0)
    assert abs(result["retrieval"]["recall@1"] - first / n) <= 1 / n


def test_bundled_weights_are_checked(tmp_path, monkeypatch):
    copy = tmp_path / "weights"
    shutil.copytree(loader.TOY_WEIGHTS, copy)
    data = bytearray((copy / "toy.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (copy / "toy.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(toy_backend, "TOY_WEIGHTS", copy)
    with pytest.raises(ModelLoadError, match="corrupted"):
        load_model("toy")
    (copy / "toy.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model("toy")


def test_toy_model_decomposes_exactly():
    model = load_model("toy")
    x = torch.randn(2, 3, 64, 64)
    d = decompose(model, x, layers="all", spatial=True)
    assert d.head_tokens.shape == (2, 6, 17, 8, 128) and d.heads.shape == (2, 6, 8, 128)  # v2: 4x4 patches + CLS
    assert (d.total() - d.embedding).abs().max() < 1e-5


def test_toyworld_eval_cli(tmp_path, capsys):
    assert main(["toyworld", "eval", "--n", "100", "--heads", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy on 100 held-out images" in out and "recall@1" in out
    data = json.loads((tmp_path / "e.json").read_text())
    assert len(data["head_effects"]["effects"]) == 6


def test_contrast_groups_share_all_but_the_free_property_and_name_it():
    from clip_interpret.toyworld import PROPERTIES, generate
    from clip_interpret.toyworld.train import batch_items
    from clip_interpret.toyworld.world import POSITION_WORDS, SIZE_WORDS

    cfg = TrainConfig(batch_size=24, contrast_group=4, contrast_share=0.5, contrast_free="size,position")
    items = batch_items(3, cfg)
    assert [index for index, _, _ in items] == list(range(72, 96))  # the world's images of step 3
    assert all(not fixed and not named for _, fixed, named in items[12:])  # the rest drawn freely
    for first in range(0, 12, 4):
        group = [generate(index, 0, attributes=fixed, mention=named) for index, fixed, named in items[first:first + 4]]
        (free,) = items[first][2]
        assert free in ("size", "position")
        for prop in PROPERTIES:
            if prop != free:
                assert len({item.attributes[prop] for item in group}) == 1, (prop, free)
        words = SIZE_WORDS if free == "size" else POSITION_WORDS
        for item in group:  # every caption names the free property's value
            assert any(w in item.caption for w in words[item.attributes[free]]), item.caption


def test_naming_a_property_changes_only_the_caption():
    from clip_interpret.toyworld import generate

    named = 0
    for i in range(40):
        plain, forced = generate(i, 5), generate(i, 5, mention=("count",))
        assert plain.attributes == forced.attributes
        assert np.array_equal(np.asarray(plain.image), np.asarray(forced.image))
        named += plain.caption != forced.caption
    assert 0 < named < 40  # some captions named the count already


def test_training_is_the_same_with_image_workers_and_checks_its_options(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=8, warmup=1, contrast_group=4)
    quiet = {"progress": False, "log": lambda *_: None}
    here = train(tmp_path / "a", cfg, workers=0, **quiet)
    there = train(tmp_path / "b", cfg, workers=2, **quiet)
    assert here["history"] == there["history"]
    for (name, a), (_, b) in zip(here["model"].state_dict().items(), there["model"].state_dict().items()):
        assert torch.equal(a, b), name
    for bad, what in ((dict(contrast_group=1), "--contrast-group"), (dict(contrast_share=1.5), "--contrast-share"),
                      (dict(contrast_free="shape,height"), "--contrast-free.*height"),
                      (dict(contrast_group=4, contrast_n_free=3, contrast_free="shape,size"), "--contrast-n-free"),
                      (dict(precision="fp8"), "--precision")):
        with pytest.raises(ClipInterpretError, match=what):
            train(tmp_path / "c", TrainConfig(steps=2, batch_size=8, **bad), **quiet)


def test_training_starts_from_given_weights_and_resumes_old_checkpoints(tmp_path):
    from clip_interpret.toyworld.train import export_weights

    source = build_model(TrainConfig(seed=3))
    export_weights(source, tmp_path / "w.safetensors")
    started = build_model(TrainConfig(init=str(tmp_path / "w.safetensors")))
    for (name, a), (_, b) in zip(source.state_dict().items(), started.state_dict().items()):
        assert torch.equal(a.half().float(), b), name  # the fp16 weights, exactly
    assert not torch.equal(build_model(TrainConfig()).visual.conv1.weight, started.visual.conv1.weight)
    with pytest.raises(ClipInterpretError, match="--init .*nope.*no such file"):
        build_model(TrainConfig(init=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ModelLoadError, match="another architecture"):
        build_model(TrainConfig(model="toy-v2", init=str(tmp_path / "w.safetensors")))
    # a checkpoint written before the contrast options existed resumes under the defaults
    cfg = TrainConfig(steps=3, batch_size=8, warmup=1)
    train(tmp_path / "old", cfg, stop_after=1, progress=False, log=lambda *_: None)
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    for key in ("contrast_group", "contrast_share", "contrast_free", "contrast_n_free", "init", "precision"):
        del state["config"][key]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    messages = []
    assert train(tmp_path / "old", cfg, progress=False, log=messages.append)["finished"]
    assert any("resuming from step 1" in m for m in messages)


def test_best_threshold_matches_a_brute_force_count():
    from clip_interpret.toyworld.evaluate import _best_threshold_accuracy

    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.integers(0, 12, 50).astype(float)  # ties on purpose
        labels = rng.random(50) < 0.4
        best = 0.0
        for t in np.concatenate([[-1.0], np.unique(values)]):
            above = values > t
            best = max(best, (above == labels).mean(), (above != labels).mean())
        assert _best_threshold_accuracy(values, labels) == pytest.approx(best)


def test_toyworld_eval_diagnose_cli(tmp_path, capsys):
    assert main(["toyworld", "eval", "--n", "200", "--diagnose", "400", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "why each property is learned or not" in out and "size from pixel counts alone" in out
    found = json.loads((tmp_path / "d.json").read_text())["diagnosis"]
    props = found["properties"]
    # the card says v2 learned every property: the diagnosis finds each in the image embedding and the text
    # tower telling its values apart
    for prop, found_prop in props.items():
        assert found_prop["verdict"] == "learned" and found_prop["probe"] > 0.9 and found_prop["text_max_cos"] < 0.95, prop
    assert found["size_baselines"]["pixels_per_object"] > found["size_baselines"]["object_pixels_of_image"]


def test_images_without_masks_are_the_same_images():
    from clip_interpret.toyworld import generate

    for i in range(30):
        full, bare = generate(i, 2), generate(i, 2, masks=False)
        assert bare.masks is None and full.masks.shape[0] == int(full.attributes["count"])
        assert np.array_equal(np.asarray(full.image), np.asarray(bare.image))
        assert (full.caption, full.attributes, full.objects) == (bare.caption, bare.attributes, bare.objects)


def test_value_phrases_name_their_own_value_and_no_other():
    from clip_interpret.toyworld import world as W

    vocab = {"shape": W.SHAPE_WORDS, "color": W.COLOR_WORDS, "size": W.SIZE_WORDS, "position": W.POSITION_WORDS,
             "background": W.BACKGROUND_WORDS, "pattern": W.PATTERN_WORDS,
             "count": {str(c): words for c, words in W.COUNT_WORDS.items()}}
    rng = np.random.default_rng(5)
    for _ in range(30):
        for prop, values in W.PROPERTIES.items():
            phrases = W.value_phrases(prop, rng)
            assert len(phrases) == len(values)
            for value, phrase in zip(values, phrases):
                words = f" {phrase} ".replace(",", " ")
                own = [w for w in vocab[prop][value] if f" {w} " in words]
                assert own, (prop, value, phrase)
                if prop != "count":  # "a" (one) is inside every phrase; counts are checked by their own word
                    others = [w for v in values if v != value for w in vocab[prop][v] if f" {w} " in words]
                    assert not others, (prop, value, phrase, others)


def test_training_helps_resume_exactly_and_are_not_exported(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, probe_weight=1.0, prompt_weight=0.5)
    quiet = {"progress": False, "log": lambda *_: None}
    straight = train(tmp_path / "a", cfg, **quiet)
    train(tmp_path / "b", cfg, stop_after=2, **quiet)
    resumed = train(tmp_path / "b", cfg, **quiet)
    assert resumed["history"] == straight["history"]  # the probes' weights and moments come back too
    plain = train(tmp_path / "c", TrainConfig(steps=4, batch_size=8, warmup=1), **quiet)
    assert plain["history"][0] < straight["history"][0]  # the helps add their losses from the first step
    assert set(straight["model"].state_dict()) == set(plain["model"].state_dict())  # no probe in the model
    with pytest.raises(ClipInterpretError, match="--probe-weight"):
        train(tmp_path / "d", TrainConfig(steps=2, batch_size=8, probe_weight=-1), **quiet)
