"""CoCa towers (open_clip's native VisionTransformer with ``attentional_pool``: a multi-query attentional pooler
over LN_k of every token, LN_post on the pooled rows, the contrastive embedding its first query's row):
loaded into the HookedViT and decomposed exactly, at their real width, heads, patch and image size."""

import functools
import warnings

import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import ClipInterpretError, UnsupportedModelError
from clip_interpret.interventions import Targets, direct_effect, hooks, mean_activations, total_effect
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.convert import from_open_clip
from clip_interpret.models.loader import registered_open_clip

from tests.helpers import explicit_forward, explicit_multi_query_pool, make_open_clip

COCA = ["coca_ViT-B-32", "coca_ViT-L-14"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def small(arch: str, layers: int) -> dict:
    """The architecture's own vision config with fewer layers, and its text tower and caption decoder in small."""
    cfg = registered_open_clip().get_model_config(arch)
    return dict(vision_cfg=dict(cfg["vision_cfg"], layers=layers),
                text_cfg=dict(cfg["text_cfg"], layers=1, width=64, heads=2),
                multimodal_cfg=dict(cfg["multimodal_cfg"], layers=1, width=64, heads=2))


def pixels_for(vit, n=1, seed=1):
    return torch.randn(n, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def test_coca_is_listed_with_attention_pooling():
    from clip_interpret.model_catalog import compute_model_table

    archs = open_clip_architectures()
    assert all(arch in archs for arch in COCA)
    pools = {row[0]: row[1] for row in compute_model_table()["open_clip"]}
    assert [pools[arch] for arch in COCA] == ["attn-pool", "attn-pool"]
    # coca_base and coca_roberta-ViT-B-32 have no attentional pooler: their embedding is LN_post of the CLS row
    assert pools["coca_base"] == pools["coca_roberta-ViT-B-32"] == "cls"


@pytest.mark.parametrize("arch", COCA)
def test_every_coca_tower_matches_native_at_its_real_size(arch):
    """Each CoCa tower at its real width, heads, patch, image size and pooler (8 heads of the embedding's width),
    one block, jittered: the forward and the decomposition's total against native encode_image."""
    native = make_open_clip(arch, **small(arch, 1))
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    width, dim, patch = {"coca_ViT-B-32": (768, 512, 32), "coca_ViT-L-14": (1024, 768, 14)}[arch]
    assert (cfg.pool, cfg.class_token, cfg.width, cfg.patch_size, cfg.image_size) == (
        "attn-pool", True, width, (patch, patch), (224, 224))
    assert (cfg.pool_heads, cfg.pool_width, cfg.output_dim) == (8, dim, dim)
    x = pixels_for(vit)
    with torch.no_grad():
        native_emb, ours = native.encode_image(x, normalize=False), vit(x)
    assert rel_err(ours, native_emb) < 1e-5
    d = decompose_pixels(vit, x, layers="all")
    assert rel_err(d.total(), unit(native_emb)) < 1e-5 and rel_err(d.embedding, unit(ours)) < 1e-6


def test_coca_vit_b_32_two_blocks_spatial_and_a_share_by_hand():
    """coca_ViT-B-32 with two blocks: the spatial decomposition of every layer and the pooler's own partition are
    exact; a head's share at one source token is its value, weighted by the pooler's attention to that token,
    carried by hand through LN_k (its scale frozen per token), the pooler's values and output and the pooled row's
    LayerNorm (its scale frozen per image) to the projection."""
    native = make_open_clip("coca_ViT-B-32", seed=2, **small("coca_ViT-B-32", 2))
    vit = from_open_clip(native.visual)
    x = pixels_for(vit, n=2)
    with torch.no_grad():
        expected = unit(native.encode_image(x, normalize=False))
    d = decompose_pixels(vit, x, layers="all", spatial=True)
    assert d.head_tokens.shape == (2, 2, 50, 12, 512) and d.class_token and d.pool_mlp.shape == (2, 0, 512)
    assert rel_err(d.total(), expected) < 1e-5
    assert rel_err(sum(piece.sum(dim=1) for piece in d.pool_view().values()), expected) < 1e-5
    flat = decompose_pixels(vit, x, layers="all")
    assert torch.allclose(d.head_tokens.sum(2), flat.heads, atol=1e-6)
    assert d.similarity_maps(expected[:1], heads="L1.H3", upsample=False).shape == (2, 1, 7, 7)

    emb, cache = explicit_forward(vit, x)
    final = cache["blocks.1.hook_resid_post"]  # [B, T, width]
    sigma_k = torch.sqrt(final.var(dim=-1, unbiased=False) + 1e-5)  # [B, T]
    y = cache["pool.hook_attn_out"]
    sigma_y = torch.sqrt(y.var(dim=-1, unbiased=False) + 1e-5)
    head, token = 3, 9
    written = cache["blocks.1.attn.hook_z"][:, head, token] @ vit.blocks[1].out.weight[:, head * 64:(head + 1) * 64].T
    normed = (written - written.mean(dim=-1, keepdim=True)) * vit.ln_post.weight / sigma_k[:, token, None]
    pool = vit.pool
    values = (normed @ pool.kv.weight[512:].T).view(2, 8, 64)  # [B, Hp, d] (no bias: a share of a sum)
    weight = cache["pool.hook_pattern"][:, :, 0, token]  # [B, Hp]
    pooled = (weight[..., None] * values).reshape(2, 512) @ pool.out.weight.T
    by_hand = ((pooled - pooled.mean(dim=-1, keepdim=True)) * pool.ln.weight / sigma_y[:, None]) @ vit.proj
    assert torch.allclose(d.head_tokens[:, 1, token, head], by_hand / emb.norm(dim=-1, keepdim=True), atol=1e-6)


def test_hook_points_of_the_pooler_agree_with_the_explicit_forward(coca_model):
    vit = coca_model.vit
    x = pixels_for(vit, n=2)
    names = ["pool.hook_pattern", "pool.hook_v", "pool.hook_z", "pool.hook_attn_out", "pool.ln.hook_scale",
             "blocks.2.hook_resid_post", "hook_image_embed"]
    emb, cache = vit.run_with_cache(x, names_filter=names)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(emb, ref_emb, atol=1e-5)
    for name in names:
        assert torch.allclose(cache[name], ref[name], atol=1e-5), name
    assert cache["pool.hook_pattern"].shape == (2, 4, 1, 21)  # the first query's pattern over CLS + 20 patches
    assert torch.allclose(cache["pool.hook_pattern"].sum(-1), torch.ones(2, 4, 1))


def test_a_pooler_hook_changes_the_forward_as_a_hand_made_one_and_stops_the_decomposition(coca_model):
    vit = coca_model.vit
    x = pixels_for(vit, n=2)

    def zero_head(z, name):
        z = z.clone()
        z[:, 1] = 0
        return z

    for name in ("pool.hook_z", "pool.hook_attn_out"):
        expected, _ = explicit_forward(vit, x, lambda n, v: zero_head(v, n) if n == name == "pool.hook_z" else
                                       v * 0.5 if n == name else v)
        fn = zero_head if name == "pool.hook_z" else (lambda y, n: y * 0.5)
        assert torch.allclose(vit.run_with_hooks(x, [(name, fn)]), expected, atol=1e-5)
        with pytest.raises(ClipInterpretError, match="no longer reach the embedding through the pooler"):
            decompose_pixels(vit, x, fwd_hooks=[(name, fn)])

    def uniform(pattern, name):  # the first query's attention spread evenly over the tokens
        return torch.full_like(pattern, 1 / pattern.shape[-1])

    hooked = vit.run_with_hooks(x, [("pool.hook_pattern", uniform)])
    d = decompose_pixels(vit, x, layers="all", fwd_hooks=[("pool.hook_pattern", uniform)])
    assert rel_err(d.embedding, unit(hooked)) < 1e-6 and rel_err(d.total(), unit(hooked)) < 1e-5
    assert rel_err(hooked, vit(x)) > 1e-3


def test_interventions_on_a_coca_tower_match_a_hand_made_forward(coca_model):
    vit = coca_model.vit
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

    assert torch.allclose(total_effect(vit, x, targets, "mean", values), unit(explicit_forward(vit, x, by_hand)[0]),
                          atol=1e-5)
    # the decomposition of the intervened forward is exact
    d = decompose_pixels(vit, x, layers=[1, 2], fwd_hooks=hooks(targets, "mean", values))
    assert torch.allclose(d.embedding, total_effect(vit, x, targets, "mean", values), atol=1e-6)
    assert (d.total() - d.embedding).abs().max() < 1e-5
    # direct effect of an early MLP: its mean replaces it at every token the pooler reads, the later blocks see
    # it unchanged (the pooler and its LayerNorms are re-run on the changed final stream)
    mlp0 = Targets.parse("MLP0", vit.cfg)
    means = mean_activations(vit, [other], mlp0)
    full, direct = direct_effect(vit, x, mlp0, "mean", means)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(full, unit(ref_emb), atol=1e-5)
    mean_mlp0 = ref_other["blocks.0.hook_mlp_out"].mean(0)
    changed = ref["blocks.2.hook_resid_post"] - ref["blocks.0.hook_mlp_out"] + mean_mlp0
    by_hand_direct, _ = explicit_multi_query_pool(vit, changed, lambda name, value: value, {})
    assert torch.allclose(direct, unit(by_hand_direct), atol=1e-5)
    assert (direct - total_effect(vit, x, mlp0, "mean", means)).abs().max() > 1e-4  # later blocks do react


def test_the_joint_map_of_spectra_is_the_pooler_with_its_scales_frozen(coca_model):
    """spectra.joint_map carries a residual vector through LN_k's centring and gain, the pooler's values and
    output, the pooled row's centring and gain and the projection: the Jacobian of those layers, run as modules."""
    from clip_interpret.spectra import joint_map

    vit = coca_model.vit
    pool, e = vit.pool, vit.cfg.pool_width

    def carried(c):  # a residual vector -> the joint space, every LayerNorm's scale set to one, biases removed
        n = (c - c.mean()) * vit.ln_post.weight
        v = torch.nn.functional.linear(n, pool.kv.weight[e:])
        y = torch.nn.functional.linear(v, pool.out.weight)
        return ((y - y.mean()) * pool.ln.weight) @ vit.proj

    jacobian = torch.autograd.functional.jacobian(carried, torch.zeros(vit.cfg.width))  # [D, width]
    assert torch.allclose(joint_map(vit), jacobian.T, atol=1e-5)


@pytest.fixture
def small_coca(monkeypatch):
    """open_clip builds coca_ViT-B-32 with 2 of its 12 blocks, a 1-layer text tower and caption decoder."""
    open_clip = registered_open_clip()
    monkeypatch.setattr(open_clip, "create_model", functools.partial(open_clip.create_model,
                                                                     **small("coca_ViT-B-32", 2)))
    return open_clip


def test_specs_random_weights_file_and_in_memory(small_coca, tmp_path):
    random = load_model("open_clip:coca_ViT-B-32")
    assert random.random_weights and random.vit.cfg.pool == "attn-pool" and random.vit.cfg.layers == 2
    native = make_open_clip("coca_ViT-B-32", seed=4)  # through the patched create_model: 2 blocks
    path = tmp_path / "coca.pt"
    torch.save(native.state_dict(), path)
    x = pixels_for(random.vit, n=2)
    with torch.no_grad():
        expected = native.encode_image(x)  # CoCa's encode_image normalises
        texts = native.encode_text(registered_open_clip().get_tokenizer("coca_ViT-B-32")(["a photo of a dog",
                                                                                         "a diagram"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in (f"open_clip:coca_ViT-B-32@{path}", native):
            model = load_model(spec)
            assert rel_err(model.encode_image(x), expected) < 1e-5
            assert rel_err(decompose(model, x, spatial=True).total(), expected) < 1e-5
            assert rel_err(model.encode_text(["a photo of a dog", "a diagram"]), unit(texts)) < 1e-5
    assert rel_err(random.encode_image(x), expected) > 1e-2  # the file's weights, not random ones


@pytest.mark.parametrize("vision, words", [
    (dict(attentional_pool="parallel"), "attentional_pool='parallel'"),
    (dict(attentional_pool="cascade"), "attentional_pool='cascade'"),
    (dict(attentional_pool=True, pool_type="avg"), "pool_type='avg'"),
])
def test_other_attentional_poolers_are_refused_in_one_line(vision, words):
    from open_clip.model import CLIP

    from clip_interpret.tower_pools import native_tower_problem

    model = CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16,
                                               attn_pooler_queries=2, attn_pooler_heads=2, **vision),
                 text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1))
    with pytest.raises(UnsupportedModelError, match=words) as err:
        load_model(model)
    assert "\n" not in str(err.value)
    assert words in native_tower_problem(vision)  # the catalog's judgement from the config alone agrees


def test_low_precision_pieces_sum_to_that_forwards_embedding(coca_model):
    x = pixels_for(coca_model.vit, n=2)
    full = decompose(coca_model, x)
    for precision in ("bf16", "fp16"):
        d = decompose(coca_model, x, precision=precision, spatial=True)
        assert (d.total() - d.embedding).abs().max() < 1e-5
        assert rel_err(d.embedding, full.embedding) < 2e-2


def test_the_published_convention_is_refused_for_the_attentional_pooler(coca_model):
    x = pixels_for(coca_model.vit)
    with pytest.raises(ClipInterpretError, match="pools by attention") as err:
        decompose(coca_model, x, convention="published")
    assert "\n" not in str(err.value)
