"""Shared fixtures. No test may download weights: offline mode is forced here."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CLIP_INTERPRET_OFFLINE"] = "1"
torch.set_num_threads(2)

from .helpers import make_open_clip  # noqa: E402 (after the offline switches)


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
def avg_model():
    """A ClipModel over a jittered random test-vit-tiny-avg: CLIPA's layout (no ln_pre, average pooling over
    the patch tokens, LN_post after the pooling), 3 layers x 4 heads, width 64, non-square 40x32 images."""
    from clip_interpret import load_model

    return load_model(make_open_clip("test-vit-tiny-avg", seed=2))


@pytest.fixture(scope="session")
def map_model():
    """A ClipModel over a jittered random test-vit-tiny-map: no CLS token, MAP attention pooling (SigLIP's
    layout), 3 layers x 4 heads, width 32, 32x32 images, a pooling head of 4 heads."""
    from clip_interpret import load_model

    return load_model(make_open_clip("test-vit-tiny-map"))


@pytest.fixture(scope="session")
def coca_model():
    """A ClipModel over a jittered random test-vit-tiny-coca: CoCa's layout (a CLS token, a multi-query attentional
    pooler of width 24 with 4 heads over LN_k of every token, LN_post on its first query's row), 3 layers x 4 heads,
    width 32, non-square 40x32 images."""
    from clip_interpret import load_model

    return load_model(make_open_clip("test-vit-tiny-coca", seed=3))


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
    from clip_interpret.runstore import index_images
    from clip_interpret.study import step_textspan

    model = toy_model
    out = tmp_path_factory.mktemp("toyrun") / "run"
    run = index_images(model, "toyworld:300:1", out, layers="all", progress=False)
    step_textspan(run, model, "toy", check=False, progress=False)
    return out, model
