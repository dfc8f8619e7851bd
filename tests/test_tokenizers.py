"""Every listed architecture gets its own tokenizer, or one clear error naming it and how to pass it."""

import pytest
import torch

from clip_interpret import load_model
from clip_interpret.cli import main
from clip_interpret.errors import ModelLoadError
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.loader import arch_preprocess_cfg, open_clip_tokenizer, registered_open_clip

from .conftest import make_open_clip
from .test_siglip import _tiny_tokenizer


def test_every_listed_architecture_gets_its_own_tokenizer():
    """What open_clip's get_tokenizer gives the architecture (the CLIP BPE where its config names no
    other); a Hugging Face tokenizer that is not on this machine (tests run offline) is one error
    naming it and how to pass a folder."""
    open_clip = registered_open_clip()
    listed = open_clip_architectures()
    sample = ["a photo of a dog, in the grass!"]
    for arch in listed:
        text = open_clip.get_model_config(arch).get("text_cfg", {})
        name = text.get("hf_tokenizer_name")
        if name:
            with pytest.raises(ModelLoadError) as err:
                open_clip_tokenizer(f"open_clip:{arch}", arch)
            message = str(err.value)
            assert repr(name) in message and "--tokenizer" in message and f"huggingface-cli download {name}" in message
        else:
            ours, theirs = open_clip_tokenizer(f"open_clip:{arch}", arch), open_clip.get_tokenizer(arch)
            assert type(ours) is type(theirs) and ours.context_length == theirs.context_length
            assert torch.equal(ours(sample), theirs(sample))
    # the architectures of the defect: another vocabulary, never the CLIP BPE
    for arch in ("xlm-roberta-base-ViT-B-32", "roberta-ViT-B-32", "mt5-base-ViT-B-32", "nllb-clip-base",
                 "ViT-H-14-worldwide", "ViT-L-14-worldwide", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"):
        assert arch in listed and open_clip.get_model_config(arch)["text_cfg"].get("hf_tokenizer_name")


@pytest.mark.parametrize("spec, name", [("open_clip:xlm-roberta-base-ViT-B-32", "xlm-roberta-base"),
                                        ("open_clip:ViT-H-14-worldwide", "facebook/xlm-v-base"),
                                        ("open_clip:ViT-SO400M-14-SigLIP/webli", "timm/ViT-B-16-SigLIP")])
def test_loading_without_the_tokenizer_fails_at_once_naming_it(spec, name, capsys):
    with pytest.raises(ModelLoadError, match=f"tokenizer '{name}' is not on this machine.*--tokenizer"):
        load_model(spec)
    assert main(["decompose", "--model", spec, "nothing.png"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_tokenizer_folder_serves_an_architecture_with_its_own_settings(tmp_path):
    """ViT-B-16-SigLIP (random weights) with a local tokenizer folder: open_clip's HFTokenizer over it,
    with the architecture's context (64) and cleaning (canonicalize: lower case, no punctuation)."""
    from open_clip.tokenizer import HFTokenizer

    folder = tmp_path / "tokenizer"
    _tiny_tokenizer(folder)
    model = load_model("open_clip:ViT-B-16-SigLIP", tokenizer=str(folder))
    assert model.random_weights and model.vit.cfg.pool == "map"
    assert model.preprocess.resize_mode == "squash" and model.preprocess.mean == (0.5, 0.5, 0.5)
    assert model.logit_bias == pytest.approx(-10.0)
    reference = HFTokenizer(str(folder), context_length=64, clean="canonicalize")
    with torch.no_grad():
        expected = model.native.encode_text(reference(["a photo of a dog"]), normalize=True)
    assert torch.allclose(model.encode_text(["A Photo of a DOG!"]), expected, atol=1e-5)
    with pytest.raises(ModelLoadError, match="tokenizer folder not found"):
        load_model("open_clip:test-vit-tiny-map", tokenizer=str(tmp_path / "missing"))


def test_an_architecture_whose_text_tower_is_not_here_says_so(tmp_path):
    _tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ModelLoadError, match="text tower is the Hugging Face model 'roberta-base'.*huggingface-cli"):
        load_model("open_clip:roberta-ViT-B-32", tokenizer=str(tmp_path / "tok"))


def test_in_memory_models_with_another_vocabulary_need_their_tokenizer(tmp_path):
    native = make_open_clip("test-vit-tiny-map", text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2,
                                                               layers=1))
    with pytest.raises(ModelLoadError, match="vocabulary of 100 tokens.*tokenizer="):
        load_model(native)
    _tiny_tokenizer(tmp_path / "tok")
    model = load_model(native, tokenizer=str(tmp_path / "tok"))
    assert model.encode_text(["a red square"]).shape == (1, 32)
    assert load_model(make_open_clip("test-vit-tiny-map")).text.context_length == 16  # the CLIP vocabulary: BPE


def test_architecture_preprocessing_comes_from_its_pretrained_tags():
    assert arch_preprocess_cfg("ViT-B-16-SigLIP") == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                                      "resize_mode": "squash"}
    assert arch_preprocess_cfg("ViT-H-14-quickgelu", "dfn5b")["resize_mode"] == "squash"
    assert arch_preprocess_cfg("ViT-H-14-quickgelu") == {}  # its tags disagree: open_clip's defaults
    assert arch_preprocess_cfg("test-vit-tiny") == {}
