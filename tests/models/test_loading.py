"""Model specs, checkpoints, offline failure, text encoding."""

import socket
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

from clip_interpret import load_model
from clip_interpret.errors import ClipInterpretError, ModelLoadError
from clip_interpret.models import hub, loader, parse_spec

from tests.helpers import make_hf_clip, make_open_clip


@pytest.mark.parametrize("spec, fields", [
    ("open_clip:ViT-B-32/openai", dict(source="open_clip", arch="ViT-B-32", tag="openai")),
    ("open_clip:ViT-B-16@/tmp/x.pt", dict(source="open_clip", arch="ViT-B-16", path="/tmp/x.pt")),
    ("open_clip:ViT-L-14", dict(source="open_clip", arch="ViT-L-14", tag="", path="")),
    ("hf:openai/clip-vit-base-patch32", dict(source="hf", hf_id="openai/clip-vit-base-patch32")),
])
def test_parse_spec(spec, fields):
    parsed = parse_spec(spec)
    for key, value in fields.items():
        assert getattr(parsed, key) == value
    assert parsed.random == (spec == "open_clip:ViT-L-14")


@pytest.mark.parametrize("spec", ["", "clip:ViT-B-32", "open_clip:", "open_clip:ViT-B-32@", "hf:", "hf:./nowhere"])
def test_bad_specs_name_the_spec_forms(spec):
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    assert "spec" in str(err.value) or "not found" in str(err.value)


def test_random_init_is_marked_and_reproducible():
    a = load_model("open_clip:test-vit-tiny")
    b = load_model("open_clip:test-vit-tiny")
    assert a.random_weights and "RANDOM" in repr(a) and "RANDOM" in a.note
    assert a.fingerprint() == b.fingerprint()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.encode_image(x), b.encode_image(x))


def test_unknown_architecture_and_tag():
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture 'ViT-B-33'"):
        load_model("open_clip:ViT-B-33")
    with pytest.raises(ModelLoadError, match="Did you mean 'ViT-B-32'"):
        load_model("open_clip:vit_b_32")
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'nope'.*openai"):
        load_model("open_clip:ViT-B-32/nope")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    native = make_open_clip("test-vit-tiny", seed=5)
    path = tmp_path / f"ckpt{suffix}"
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style wrapper
    else:
        save_file(state, str(path))
    model = load_model(f"open_clip:test-vit-tiny@{path}")
    assert not model.random_weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = native.encode_image(x)
        text_expected = native.encode_text(loader.registered_open_clip().tokenizer.SimpleTokenizer(context_length=16)(["a dog"]))
    assert torch.allclose(model.vit(x), expected, atol=1e-5)
    assert torch.allclose(model.encode_text(["a dog"]), text_expected / text_expected.norm(dim=-1, keepdim=True),
                          atol=1e-5)
    assert model.fingerprint() != load_model("open_clip:test-vit-tiny").fingerprint()


def test_checkpoint_of_another_architecture_names_the_tensor(tmp_path):
    other = make_open_clip("test-vit-tiny-ls")
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ModelLoadError) as err:
        load_model(f"open_clip:test-vit-tiny@{path}")
    message = str(err.value)
    assert "another architecture" in message
    ours = make_open_clip("test-vit-tiny").state_dict()
    theirs = other.state_dict()
    mismatched = [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape
                  and not k.endswith("positional_embedding")]
    first = mismatched[0]
    assert f"tensor {first!r}" in message
    assert f"{list(theirs[first].shape)} in the checkpoint but {list(ours[first].shape)} in the model" in message


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_model(f"open_clip:test-vit-tiny@{tmp_path / 'missing.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model(f"open_clip:test-vit-tiny@{junk}")


def test_offline_pretrained_fails_fast_with_a_local_hint():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model("open_clip:ViT-B-32/openai")
    message = str(err.value)
    assert "'open_clip:ViT-B-32/openai'" in message and "open_clip:ViT-B-32-quickgelu@/path/to/file" in message
    with pytest.raises(ModelLoadError, match=r"hf:/path/to/folder"):
        load_model("hf:openai/clip-vit-base-patch32")
    assert time.monotonic() - start < 60  # generous: the point is no minutes of retries


def test_unreachable_internet_is_detected_without_offline_flags(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CLIP_INTERPRET_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a local port with nobody listening: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hub, "PROBE_HOST", ("127.0.0.1", port))
    with pytest.raises(ModelLoadError, match="internet is not reachable"):
        load_model("open_clip:ViT-B-16/laion2b_s34b_b88k")


def test_hf_folder_and_in_memory_objects(tmp_path):
    native = make_hf_clip(seed=3)
    native.save_pretrained(tmp_path / "clip")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = native.get_image_features(pixel_values=x)
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in (f"hf:{tmp_path / 'clip'}", str(tmp_path / "clip"), native):
            model = load_model(spec)
            assert torch.allclose(model.vit(x), expected, atol=1e-5)
            assert model.preprocess.image_size == (64, 64)
            text = model.encode_text(["a photo of a dog", "a cat"])
            assert text.shape == (2, 24)
            assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_hf_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_model(f"hf:{tmp_path / 'empty'}")


def test_in_memory_open_clip_text_matches_native():
    native = make_open_clip("test-vit-tiny", seed=2)
    model = load_model(native)
    tokens = loader.registered_open_clip().tokenizer.SimpleTokenizer(context_length=16)(["red", "a blue square"])
    with torch.no_grad():
        expected = native.encode_text(tokens, normalize=True)
    assert torch.allclose(model.encode_text(["red", "a blue square"]), expected, atol=1e-5)
    assert model.native is native and native.visual is not None  # the user's model is left intact


def test_wrong_objects_are_refused():
    with pytest.raises(ModelLoadError, match="cannot use a Linear"):
        load_model(torch.nn.Linear(2, 2))
    with pytest.raises(ModelLoadError, match="spec string"):
        load_model(42)


def test_text_errors_and_truncation(tiny_model):
    with pytest.raises(ClipInterpretError, match="text #2 is empty"):
        tiny_model.encode_text(["a dog", "  "])
    with pytest.raises(ClipInterpretError, match="no texts"):
        tiny_model.encode_text([])
    long = "a very long description of a red square " * 10
    with pytest.warns(UserWarning, match="longer than the model's context of 16 tokens"):
        emb = tiny_model.encode_text([long, "short"])
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
