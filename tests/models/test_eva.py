"""EVA01-CLIP: open_clip towers on a timm Eva trunk with plain pre-norm blocks, converted and decomposed
exactly; the Eva variants with pieces the decomposition does not express (EVA02, Perception Encoder)
refused in one line that names them."""

import functools
import json

import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.cli import main
from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import UnsupportedModelError
from clip_interpret.interventions import Targets, direct_effect, mean_activations, total_effect
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.convert import from_open_clip
from clip_interpret.models.loader import registered_open_clip
from clip_interpret.models.openclip import timm_problem, tower_problem

from tests.helpers import explicit_forward, jitter, make_open_clip

TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def pixels_for(vit, n=2, seed=0):
    return torch.randn(n, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def build(arch: str, monkeypatch, seed: int = 0, **trunk_kwargs):
    """A jittered random open_clip model of ``arch`` with a tiny text tower, its timm trunk built with
    ``trunk_kwargs`` (depth=1: one block of the real width)."""
    import timm

    open_clip = registered_open_clip()
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", functools.partial(timm.create_model, **trunk_kwargs))
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, text_cfg=TINY_TEXT)
    return jitter(model.eval(), seed=seed)


def test_eva01_eva02_and_pe_core_are_listed():
    archs = open_clip_architectures()
    assert "EVA01-g-14" in archs and "EVA01-g-14-plus" in archs
    for arch in ("EVA02-B-16", "EVA02-E-14", "PE-Core-B-16", "PE-Core-bigG-14-448"):  # test_eva02.py, test_pe.py
        assert arch in archs and tower_problem(arch) is None


@pytest.mark.parametrize("name, pool, named", [
    ("vit_base_patch16_rope_mixed_224", "token", "rotary position embeddings of kind RotaryEmbeddingMixed"),
    ("vit_base_patch16_rope_reg1_gap_256", "avg", "register tokens"),
])
def test_a_refused_eva_trunk_is_judged_in_one_line_before_building(name, pool, named):
    message = timm_problem(name, pool, None, False)
    assert "\n" not in message and name in message and "Eva trunk with" in message and named in message


@pytest.mark.parametrize("arch", ["EVA01-g-14", "EVA01-g-14-plus"])
def test_eva01_matches_native_at_its_real_width_and_decomposes_exactly(arch, monkeypatch):
    """EVA01-g-14's tower at its real width (1408), heads (16), MLP (6144), patch (14) and image size
    (224) with two blocks, every parameter jittered: the forward and total() within 1e-5 of encode_image."""
    native = build(arch, monkeypatch, depth=2)
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    assert (cfg.width, cfg.heads, cfg.mlp_width, cfg.patch_size, cfg.image_size, cfg.layers) == \
        (1408, 16, 6144, (14, 14), (224, 224), 2)
    assert cfg.pool == "cls" and cfg.class_token and cfg.proj_bias and cfg.output_dim == 1024 and not cfg.ln_pre
    x = pixels_for(vit, n=2)
    with torch.no_grad():
        theirs = native.encode_image(x)
    assert rel_err(vit(x), theirs) < 1e-5
    unit = theirs / theirs.norm(dim=-1, keepdim=True)
    d = decompose_pixels(vit, x, layers="all")
    assert d.heads.shape == (2, 2, 16, 1024)
    assert rel_err(d.total(), unit) < 1e-5 and rel_err(d.embedding, unit) < 1e-5
    spatial = decompose_pixels(vit, x[:1], layers=[1], spatial=True)
    assert spatial.head_tokens.shape == (1, 1, 257, 16, 1024)
    assert rel_err(spatial.total(), unit[:1]) < 1e-5
    assert torch.allclose(spatial.head_tokens.sum(2), d.heads[:1, 1:], atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(qkv_fused=False), dict(init_values=0.1), dict(use_pre_transformer_norm=True)],
                         ids=["separate-qkv", "layer-scale", "norm-pre"])
def test_eva_layout_options_convert_exactly(kwargs, monkeypatch):
    """Separate q/k/v projections (the key without a bias), LayerScale (gamma_1, gamma_2) and a LayerNorm
    before the blocks (no patch bias then) are expressed too."""
    native = build("test-vit-tiny-eva", monkeypatch, seed=3, **kwargs)
    vit = from_open_clip(native.visual)
    assert vit.cfg.layer_scale == ("init_values" in kwargs) and vit.cfg.ln_pre == ("use_pre_transformer_norm" in kwargs)
    x = pixels_for(vit, n=3, seed=1)
    with torch.no_grad():
        theirs = native.encode_image(x)
    assert rel_err(vit(x), theirs) < 1e-5
    d = decompose_pixels(vit, x, layers="all", spatial=True)
    assert rel_err(d.total(), theirs / theirs.norm(dim=-1, keepdim=True)) < 1e-5


@pytest.mark.parametrize("kwargs, named", [
    (dict(qk_norm=True), "qk-norm"),
    (dict(init_values=0.1, attn_only_layer_scale=True), "LayerScale on the attention branch only"),
])
def test_an_eva_trunk_with_a_piece_not_expressed_is_refused_naming_it(kwargs, named, monkeypatch):
    native = build("test-vit-tiny-eva", monkeypatch, **kwargs)
    with pytest.raises(UnsupportedModelError, match="timm Eva trunk with") as err:
        from_open_clip(native.visual)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_average_pooling_of_an_eva_trunk_is_refused(monkeypatch):
    import copy

    open_clip = registered_open_clip()
    cfg = copy.deepcopy(open_clip.get_model_config("test-vit-tiny-eva"))
    cfg["vision_cfg"]["timm_pool"] = "avg"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-vit-tiny-eva-avg", cfg)
    assert "global_pool='avg'" in tower_problem("test-vit-tiny-eva-avg")
    native = open_clip.create_model("test-vit-tiny-eva-avg", pretrained=None, text_cfg=TINY_TEXT)
    with pytest.raises(UnsupportedModelError, match="global_pool='avg'"):
        from_open_clip(native.visual)


def test_the_real_spec_loads_with_random_weights(monkeypatch):
    """``open_clip:EVA01-g-14`` (random weights, seed 0) as the loader builds it, with two blocks and a
    tiny text tower: the same tower as open_clip's own build from that seed."""
    import open_clip as oc
    import timm

    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=2))
    monkeypatch.setattr(oc, "create_model", functools.partial(oc.create_model, text_cfg=TINY_TEXT))
    model = load_model("open_clip:EVA01-g-14")
    assert model.random_weights and model.vit.cfg.layers == 2 and model.vit.cfg.width == 1408
    torch.manual_seed(0)
    native = oc.create_model("EVA01-g-14", pretrained=None).eval()
    x = pixels_for(model.vit, n=1)
    with torch.no_grad():
        assert rel_err(model.vit(x), native.encode_image(x)) < 1e-5


def test_an_eva_checkpoint_and_an_in_memory_model_load(tmp_path):
    from safetensors.torch import save_file

    native = make_open_clip("test-vit-tiny-eva", seed=5)
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    x = pixels_for(from_open_clip(native.visual), n=2)
    with torch.no_grad():
        theirs = native.encode_image(x)
    for model in (load_model(f"open_clip:test-vit-tiny-eva@{path}"), load_model(native)):
        assert not model.random_weights
        with torch.no_grad():
            assert rel_err(model.vit(x), theirs) < 1e-5
        d = decompose(model, x, layers="all")
        assert rel_err(d.total(), theirs / theirs.norm(dim=-1, keepdim=True)) < 1e-5
        assert model.encode_text(["a red circle"]).shape == (1, 24)


@pytest.fixture(scope="module")
def eva_model():
    return load_model(make_open_clip("test-vit-tiny-eva", seed=2))


def test_hook_points_agree_with_the_explicit_forward(eva_model):
    vit = eva_model.vit
    x = pixels_for(vit, n=2)
    emb, cache = vit.run_with_cache(x)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(emb, ref_emb, atol=1e-5) and torch.allclose(cache["hook_image_embed"], ref_emb, atol=1e-5)
    for name, value in ref.items():
        assert torch.allclose(cache[name], value, atol=1e-5), name


def test_interventions_on_an_eva_tower_match_a_hand_made_forward(eva_model):
    vit = eva_model.vit
    x, other = pixels_for(vit, n=3, seed=1), pixels_for(vit, n=3, seed=2)
    targets = Targets.parse("L0.H1,L1.H3", vit.cfg)
    values = mean_activations(vit, [other], targets)
    _, ref_other = explicit_forward(vit, other)

    def by_hand(name, z):
        heads = [h for l, h in targets.heads if name == f"blocks.{l}.attn.hook_z"]
        if not heads:
            return z
        z = z.clone()
        z[:, heads] = ref_other[name].mean(0)[heads]
        return z

    expected = explicit_forward(vit, x, by_hand)[0]
    assert torch.allclose(total_effect(vit, x, targets, "mean", values), expected / expected.norm(dim=-1, keepdim=True),
                          atol=1e-5)
    # direct effect of an early MLP: its mean replaces it at the embedding only, later blocks see it unchanged
    mlp0 = Targets.parse("MLP0", vit.cfg)
    means = mean_activations(vit, [other], mlp0)
    full, direct = direct_effect(vit, x, mlp0, "mean", means)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(full, ref_emb / ref_emb.norm(dim=-1, keepdim=True), atol=1e-5)
    mean_mlp0 = explicit_forward(vit, other)[1]["blocks.0.hook_mlp_out"].mean(0)
    r = ref["blocks.2.hook_resid_post"][:, 0] - ref["blocks.0.hook_mlp_out"][:, 0] + mean_mlp0[0]
    by_hand_direct = torch.nn.functional.layer_norm(r, (vit.cfg.width,), vit.ln_post.weight, vit.ln_post.bias,
                                                    vit.cfg.ln_eps) @ vit.proj + vit.proj_bias
    assert torch.allclose(direct, by_hand_direct / by_hand_direct.norm(dim=-1, keepdim=True), atol=1e-5)


def test_index_ablate_and_textspan_on_a_tiny_eva_tower(tmp_path, capsys, monkeypatch):
    """The study's first steps on an EVA01-layout tower (random weights) over toy-world images."""
    import numpy as np

    from clip_interpret.runstore import open_run

    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["index", "--model", "open_clip:test-vit-tiny-eva", "--images", "toyworld:40:1", "--out", str(run),
                 "--layers", "all", "--storage", "fp32", "--workers", "0"]) == 0
    opened = open_run(run)
    assert opened.manifest["model"]["vit"]["proj_bias"] is True and len(opened.head_names()) == 12
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 1e-5
    assert main(["ablate", str(run)]) == 0
    assert main(["ablate", str(run), "--heads", "L2.H1", "--workers", "0"]) == 0
    saved = json.loads((run / "ablation.json").read_text())
    assert saved["n_images"] == 40
    assert main(["textspan", str(run), "--pool", "toy", "--m", "2", "--rank", "8"]) == 0
    assert (run / "textspan-toy.json").is_file()


def test_the_projection_bias_joins_the_constant_in_both_conventions(eva_model):
    """EVA01's head is a Linear with a bias b_P: the constant is (P^T beta + b_P) / ||emb|| (centred), shared
    out with the rest in the published convention; both sum exactly to the unit embedding."""
    vit = eva_model.vit
    x = pixels_for(vit, n=2, seed=4)
    emb, _ = explicit_forward(vit, x)
    norm = emb.norm(dim=-1, keepdim=True)
    centred = decompose_pixels(vit, x, layers="all")
    assert torch.allclose(centred.constant, (vit.ln_post.bias @ vit.proj + vit.proj_bias) / norm, atol=1e-6)
    assert vit.proj_bias.abs().max() > 1e-3  # jittered: a dropped bias would show
    published = decompose_pixels(vit, x, layers="all", convention="published")
    for d in (centred, published):
        assert rel_err(d.total(), emb / norm) < 1e-5
