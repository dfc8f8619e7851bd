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
    monkeypatch.setattr(loader, "TOY_WEIGHTS", copy)
    with pytest.raises(ModelLoadError, match="corrupted"):
        load_model("toy")
    (copy / "toy.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model("toy")


def test_toy_model_decomposes_exactly():
    model = load_model("toy")
    x = torch.randn(2, 3, 64, 64)
    d = decompose(model, x, layers="all", spatial=True)
    assert d.head_tokens.shape == (2, 6, 65, 8, 128) and d.heads.shape == (2, 6, 8, 128)
    assert (d.total() - d.embedding).abs().max() < 1e-5


def test_toyworld_eval_cli(tmp_path, capsys):
    assert main(["toyworld", "eval", "--n", "100", "--heads", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy on 100 held-out images" in out and "recall@1" in out
    data = json.loads((tmp_path / "e.json").read_text())
    assert len(data["head_effects"]["effects"]) == 6
