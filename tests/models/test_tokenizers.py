"""Every listed architecture gets its own tokenizer, or one clear error naming it and how to pass it."""

import pytest
import torch

from clip_interpret import load_model
from clip_interpret.cli import main
from clip_interpret.errors import ModelLoadError
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.loader import arch_preprocess_cfg, open_clip_tokenizer, registered_open_clip

from tests.helpers import make_open_clip
from tests.helpers import tiny_tokenizer


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


@pytest.fixture
def tiny_hf_tokenized_arch(monkeypatch):
    """A tiny architecture whose config names a Hugging Face tokenizer that is not on this machine
    (as ViT-B-16-SigLIP's names timm/ViT-B-16-SigLIP), registered for the test only."""
    import copy

    open_clip = registered_open_clip()
    cfg = copy.deepcopy(open_clip.get_model_config("test-vit-tiny-map"))
    cfg["text_cfg"].update(vocab_size=100, hf_tokenizer_name="timm/ViT-B-16-SigLIP",
                           tokenizer_kwargs={"clean": "canonicalize"})
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-vit-tiny-map-hftok", cfg)
    return "test-vit-tiny-map-hftok"


def test_without_its_tokenizer_an_architecture_loads_image_only(tiny_hf_tokenized_arch, tmp_path, capsys):
    """Offline, the architecture's tokenizer cannot be had: the model loads image-only (one warning line
    naming the tokenizer), image work runs, and a text call is one error that suggests only what
    works offline (a folder: tokenizer="/path/to/folder" or --tokenizer)."""
    from PIL import Image

    from clip_interpret.errors import ClipInterpretError

    spec = f"open_clip:{tiny_hf_tokenized_arch}"
    with pytest.warns(UserWarning, match="image-only: its tokenizer 'timm/ViT-B-16-SigLIP' is not on this machine"):
        model = load_model(spec)
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    with pytest.raises(ClipInterpretError) as err:
        model.encode_text(["a red square"])
    message = str(err.value)
    assert 'tokenizer="/path/to/folder"' in message and "--tokenizer /path/to/folder" in message
    assert "get_tokenizer" not in message and "\n" not in message
    # the command line: image work runs with the warning
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["decompose", "--model", spec, str(tmp_path / "red.png"), "--out", str(tmp_path / "d")]) == 0
    assert "image-only" in capsys.readouterr().err
    assert main(["decompose", "--model", spec, str(tmp_path / "red.png"), "--text", "a red square"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--tokenizer /path/to/folder" in errors[0]
    # given a tokenizer folder, the text tower works
    tiny_tokenizer(tmp_path / "tok")
    assert load_model(spec, tokenizer=str(tmp_path / "tok")).encode_text(["a red square"]).shape == (1, 32)


@pytest.mark.parametrize("spec, problem", [("open_clip:xlm-roberta-base-ViT-B-32", "text tower is the Hugging Face"),
                                           ("open_clip:ViT-SO400M-14-SigLIP/webli", "weights are not on this machine")])
def test_what_else_is_missing_offline_still_fails_at_once_in_one_line(spec, problem, capsys):
    with pytest.raises(ModelLoadError, match=problem):
        load_model(spec)
    assert main(["decompose", "--model", spec, "nothing.png"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "image-only" not in line]
    assert "Traceback" not in "\n".join(err) and len([line for line in err if line.strip()]) == 1


def test_a_tokenizer_folder_serves_an_architecture_with_its_own_settings(tmp_path):
    """ViT-B-16-SigLIP (random weights) with a local tokenizer folder: open_clip's HFTokenizer over it,
    with the architecture's context (64) and cleaning (canonicalize: lower case, no punctuation)."""
    from open_clip.tokenizer import HFTokenizer

    folder = tmp_path / "tokenizer"
    tiny_tokenizer(folder)
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
    tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ModelLoadError, match="text tower is the Hugging Face model 'roberta-base'.*huggingface-cli"):
        load_model("open_clip:roberta-ViT-B-32", tokenizer=str(tmp_path / "tok"))


def test_in_memory_models_with_another_vocabulary_need_their_tokenizer(tmp_path):
    from clip_interpret.errors import ClipInterpretError

    native = make_open_clip("test-vit-tiny-map", text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2,
                                                               layers=1))
    with pytest.warns(UserWarning, match="image-only: its text tower has a vocabulary of 100 tokens"):
        image_only = load_model(native)
    with pytest.raises(ClipInterpretError, match="cannot encode texts.*tokenizer=") as err:
        image_only.encode_text(["a red square"])
    assert "get_tokenizer" not in str(err.value)  # open_clip.get_tokenizer may need the internet
    tiny_tokenizer(tmp_path / "tok")
    model = load_model(native, tokenizer=str(tmp_path / "tok"))
    assert model.encode_text(["a red square"]).shape == (1, 32)
    assert load_model(make_open_clip("test-vit-tiny-map")).text.context_length == 16  # the CLIP vocabulary: BPE


def test_architecture_preprocessing_comes_from_its_pretrained_tags():
    assert arch_preprocess_cfg("ViT-B-16-SigLIP") == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                                      "resize_mode": "squash"}
    assert arch_preprocess_cfg("ViT-H-14-quickgelu", "dfn5b")["resize_mode"] == "squash"
    assert arch_preprocess_cfg("ViT-H-14-quickgelu") == {}  # its tags disagree: open_clip's defaults
    assert arch_preprocess_cfg("test-vit-tiny") == {}
