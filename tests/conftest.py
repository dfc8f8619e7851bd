"""Shared fixtures. No test may download weights: offline mode is forced here."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CLIP_INTERPRET_OFFLINE"] = "1"
torch.set_num_threads(2)


def jitter(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: fresh inits have unit LayerNorm gains, zero biases and
    constant LayerScale, which would hide a dropped bias or gain."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def make_open_clip(arch: str, seed: int = 0, **kwargs):
    import open_clip

    from clip_interpret.models.loader import _open_clip

    _open_clip()  # registers the package's test-* configs
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, pretrained_image=False, **kwargs)
    return jitter(model.eval(), seed=seed)


def make_hf_clip(seed: int = 0, act: str = "quick_gelu", image_size: int = 64, patch: int = 16):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act=act),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                           image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    return jitter(CLIPModel(cfg).eval(), seed=seed)


@pytest.fixture(scope="session")
def tiny_model():
    """A ClipModel over a jittered random test-vit-tiny (3 layers x 4 heads, 32x32 images)."""
    from clip_interpret import load_model

    return load_model(make_open_clip("test-vit-tiny"))


@pytest.fixture(scope="session")
def tiny_ls_model():
    """LayerScale, no ln_pre, non-square 48x32 images, gelu."""
    from clip_interpret import load_model

    return load_model(make_open_clip("test-vit-tiny-ls", seed=1))


@pytest.fixture(scope="session")
def toy_model():
    """The bundled toy CLIP, loaded once for the session."""
    from clip_interpret import load_model

    return load_model("toy")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Single-image work: one torch thread is as fast, and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_textspan_run(tmp_path_factory, toy_model):
    """A 300-image held-out toy-world run of the bundled toy model (all layers) with TextSpan on the toy pool."""
    from clip_interpret.index import index_images
    from clip_interpret.study import step_textspan

    model = toy_model
    out = tmp_path_factory.mktemp("toyrun") / "run"
    run = index_images(model, "toyworld:300:1", out, layers="all", progress=False)
    step_textspan(run, model, "toy", check=False, progress=False)
    return out, model
