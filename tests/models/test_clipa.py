"""CLIPA towers (open_clip's native VisionTransformer with no_ln_pre, pool_type 'avg' and final_ln_after_pool):
loaded into the HookedViT and decomposed exactly, at their real width, heads, patch and image size."""

import functools
import warnings

import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import UnsupportedModelError
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.convert import from_open_clip
from clip_interpret.models.loader import registered_open_clip

from tests.helpers import explicit_forward, make_open_clip

CLIPA = ["ViT-L-14-CLIPA", "ViT-L-14-CLIPA-336", "ViT-H-14-CLIPA", "ViT-H-14-CLIPA-336", "ViT-bigG-14-CLIPA",
         "ViT-bigG-14-CLIPA-336"]
TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def reduced(arch: str, layers: int) -> dict:
    """The architecture's own vision config with fewer layers (the layers are all alike)."""
    return dict(registered_open_clip().get_model_config(arch)["vision_cfg"], layers=layers)


def pixels_for(vit, n=1, seed=1):
    return torch.randn(n, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def test_the_clipa_family_is_listed():
    archs = open_clip_architectures()
    assert all(arch in archs for arch in CLIPA)
    assert sorted(a for a in registered_open_clip().list_models() if "CLIPA" in a) == sorted(CLIPA)  # none left out


@pytest.mark.parametrize("arch", CLIPA)
def test_every_clipa_tower_matches_native_at_its_real_size(arch):
    """Each CLIPA tower at its real width, heads, head width, patch and image size, one block, jittered."""
    native = make_open_clip(arch, vision_cfg=reduced(arch, 1), text_cfg=TINY_TEXT)
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    width = {"L": 1024, "H": 1280, "b": 1664}[arch.split("-")[1][0]]
    assert (cfg.pool, cfg.ln_pre, cfg.class_token, cfg.width, cfg.patch_size) == ("avg", False, True, width, (14, 14))
    assert cfg.image_size == ((336, 336) if arch.endswith("336") else (224, 224))
    x = pixels_for(vit)
    with torch.no_grad():
        native_emb = native.encode_image(x)
        assert rel_err(vit(x), native_emb) < 1e-5
    d = decompose_pixels(vit, x, layers="all")
    unit = native_emb / native_emb.norm(dim=-1, keepdim=True)
    assert rel_err(d.total(), unit) < 1e-5 and rel_err(d.embedding, unit) < 1e-6


def test_vit_l_14_clipa_two_blocks_spatial_and_pieces_by_hand():
    """ViT-L-14-CLIPA with two blocks: spatial decomposition of every layer is exact, its tokens sum to the
    token-summed heads, and a head's share is the patch queries' mean attention row over the values, mapped by
    hand through LN_post (its scale frozen on the pooled vector) and the projection."""
    native = make_open_clip("ViT-L-14-CLIPA", vision_cfg=reduced("ViT-L-14-CLIPA", 2), text_cfg=TINY_TEXT)
    vit = from_open_clip(native.visual)
    x = pixels_for(vit, n=2)
    with torch.no_grad():
        native_emb = native.encode_image(x)
    d = decompose_pixels(vit, x, layers="all", spatial=True)
    assert d.head_tokens.shape == (2, 2, 257, 16, 768) and d.class_token
    assert rel_err(d.total(), native_emb / native_emb.norm(dim=-1, keepdim=True)) < 1e-5
    flat = decompose_pixels(vit, x, layers="all")
    assert torch.allclose(d.head_tokens.sum(2), flat.heads, atol=1e-6)
    # head 5 of layer 1 at source token 7, by hand from the explicit forward
    emb, cache = explicit_forward(vit, x)
    final = cache["blocks.1.hook_resid_post"]
    pooled = final[:, 1:].sum(dim=1) / 256
    sigma = torch.sqrt(pooled.var(dim=-1, unbiased=False) + vit.cfg.ln_eps)
    weight = cache["blocks.1.attn.hook_pattern"][:, 5, 1:, 7].sum(dim=1) / 256  # [B]: the patches' mean weight
    v = cache["blocks.1.attn.hook_v"][:, 5, 7]  # [B, d]
    piece = weight[:, None] * (v @ vit.blocks[1].out.weight[:, 5 * 64:6 * 64].T)
    piece = (piece - piece.mean(dim=-1, keepdim=True)) * vit.ln_post.weight @ vit.proj
    expected = piece / (sigma * emb.norm(dim=-1))[:, None]
    assert torch.allclose(d.head_tokens[:, 1, 7, 5], expected, atol=1e-6)
    assert d.head_tokens[:, :, 0].abs().max() > 0  # the CLS token is read by the patches' queries


@pytest.fixture
def small_clipa(monkeypatch):
    """open_clip builds ViT-L-14-CLIPA with 2 of its 24 blocks and a 1-layer text tower of its own vocabulary
    (for the specs that name the architecture: random weights, a checkpoint file)."""
    open_clip = registered_open_clip()
    text = dict(open_clip.get_model_config("ViT-L-14-CLIPA")["text_cfg"], layers=1, width=64, heads=2)
    monkeypatch.setattr(open_clip, "create_model", functools.partial(
        open_clip.create_model, vision_cfg=reduced("ViT-L-14-CLIPA", 2), text_cfg=text))
    return open_clip


def test_specs_random_weights_file_and_in_memory(small_clipa, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image-only: CLIPA's bert tokenizer is not on this machine
        random = load_model("open_clip:ViT-L-14-CLIPA")
    assert random.random_weights and random.vit.cfg.pool == "avg" and random.vit.cfg.layers == 2
    native = make_open_clip("ViT-L-14-CLIPA", seed=4)  # through the patched create_model: 2 blocks
    path = tmp_path / "clipa.pt"
    torch.save(native.state_dict(), path)
    x = pixels_for(random.vit, n=2)
    with torch.no_grad():
        expected = native.encode_image(x)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in (f"open_clip:ViT-L-14-CLIPA@{path}", native):
            model = load_model(spec)
            assert rel_err(model.encode_image(x), expected) < 1e-5
            assert rel_err(decompose(model, x, spatial=True).total(), expected) < 1e-5
    assert rel_err(random.encode_image(x), expected) > 1e-2  # the file's weights, not random ones


@pytest.mark.parametrize("vision, words", [
    (dict(pool_type="avg"), "pool_type='avg' and LN_post before the pooling"),
    (dict(pool_type="none"), "pool_type='none'"),
])
def test_other_native_poolings_are_refused_in_one_line(vision, words):
    from open_clip.model import CLIP

    model = CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16,
                                               **vision), text_cfg=TINY_TEXT)
    with pytest.raises(UnsupportedModelError, match=words) as err:
        load_model(model)
    assert "\n" not in str(err.value)
