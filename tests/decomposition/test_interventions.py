"""One loop with hook points; interventions checked against hand-made forwards."""

import pytest
import torch

from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import ClipInterpretError
from clip_interpret.interventions import (Targets, activations, direct_effect, hooks, mean_activations,
                                          total_effect)

from tests.helpers import explicit_forward


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module", params=["tiny_ls_model", "avg_model"])
def vit(request):
    # 3 layers, no ln_pre, non-square images: LayerScale and CLS pooling, or CLIPA's average pooling
    return request.getfixturevalue(request.param).vit


@pytest.fixture(scope="module")
def pixels(vit):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, *vit.cfg.image_size, generator=g), torch.randn(4, 3, *vit.cfg.image_size, generator=g)


def test_cache_holds_every_named_activation_and_agrees_with_the_explicit_forward(vit, pixels):
    x, _ = pixels
    emb, cache = vit.run_with_cache(x)
    ref_emb, ref = explicit_forward(vit, x)
    assert set(vit.hook_names()) == set(cache)
    assert torch.allclose(emb, ref_emb, atol=1e-5) and torch.allclose(emb, vit(x), atol=1e-6)
    for name, value in ref.items():
        assert torch.allclose(cache[name], value, atol=1e-5), name
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["z", 2].shape == (4, vit.cfg.heads, vit.cfg.n_tokens, vit.cfg.head_dim)


def test_names_filter_keeps_only_what_is_asked_and_unknown_names_are_refused(vit, pixels):
    x, _ = pixels
    _, cache = vit.run_with_cache(x, names_filter=["blocks.0.attn.hook_z", "hook_image_embed"])
    assert set(cache) == {"blocks.0.attn.hook_z", "hook_image_embed"}
    _, cache = vit.run_with_cache(x, names_filter=lambda name: name.endswith("hook_mlp_out"))
    assert len(cache) == vit.cfg.layers
    with pytest.raises(KeyError, match="not in this cache"):
        cache["blocks.0.attn.hook_z"]
    with pytest.raises(ClipInterpretError, match="did you mean 'blocks.1.attn.hook_z'"):
        vit.run_with_hooks(x, [("blocks.1.attn.hook_zz", lambda z, name: z)])
    with pytest.raises(ClipInterpretError, match="returned shape"):
        vit.run_with_hooks(x, [("blocks.1.attn.hook_z", lambda z, name: z[:, :1])])


def test_a_pattern_hook_changes_the_forward_as_a_hand_made_one(vit, pixels):
    x, _ = pixels
    uniform = lambda p, name: torch.full_like(p, 1.0 / p.shape[-1])  # noqa: E731
    emb = vit.run_with_hooks(x, [("blocks.1.attn.hook_pattern", uniform)])

    def by_hand(name, value):
        if name == "blocks.1.attn.hook_z":  # uniform attention: every query averages the values
            _, cache = explicit_forward(vit, x)  # v of layer 1 is unchanged by the hook
            v = cache["blocks.1.attn.hook_v"]
            return v.mean(dim=2, keepdim=True).expand_as(value)
        return value

    assert torch.allclose(emb, explicit_forward(vit, x, by_hand)[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["zero", "mean", "patch"])
def test_total_effect_equals_a_forward_with_the_heads_replaced_by_hand(vit, pixels, mode):
    x, other = pixels
    targets = Targets.parse("L0.H1,L0.H2,L1.H0", vit.cfg)
    values = None
    if mode == "mean":
        values = mean_activations(vit, [other[:2], other[2:]], targets)
    elif mode == "patch":
        values = activations(vit, other, targets)
    _, ref_other = explicit_forward(vit, other)

    def by_hand(name, z):
        layer = int(name.split(".")[1])
        heads = [h for l, h in targets.heads if l == layer]
        if not name.endswith("hook_z") or not heads:
            return z
        z = z.clone()
        source = ref_other[name]
        z[:, heads] = 0 if mode == "zero" else (source.mean(0) if mode == "mean" else source)[..., heads, :, :]
        return z

    expected = unit(explicit_forward(vit, x, by_hand)[0])
    assert torch.allclose(total_effect(vit, x, targets, mode, values), expected, atol=1e-5)
    assert not torch.allclose(expected, unit(vit(x)), atol=1e-4)  # the intervention did something


def test_mlp_and_attention_layer_targets(vit, pixels):
    x, other = pixels
    targets = Targets.parse("MLP0,ATTN1", vit.cfg)
    values = mean_activations(vit, [other], targets)
    _, ref_other = explicit_forward(vit, other)
    means = {n: ref_other[n].mean(0) for n in ("blocks.0.hook_mlp_out", "blocks.1.hook_attn_out")}
    expected = unit(explicit_forward(vit, x, lambda n, v: means[n].expand_as(v) if n in means else v)[0])
    assert torch.allclose(total_effect(vit, x, targets, "mean", values), expected, atol=1e-5)


def test_direct_effect_is_the_total_effect_with_everything_after_the_target_frozen(vit, pixels):
    x, other = pixels
    last = vit.cfg.layers - 1
    # nothing follows the last MLP: its direct and total effects are the same
    targets = Targets.parse(f"MLP{last}", vit.cfg)
    values = mean_activations(vit, [other], targets)
    full, direct = direct_effect(vit, x, targets, "mean", values)
    assert torch.allclose(direct, total_effect(vit, x, targets, "mean", values), atol=1e-6)
    assert torch.allclose(full, unit(vit(x)), atol=1e-6)
    # the last layer's heads are followed by the last MLP only: frozen at its own value, the
    # total effect equals the direct one
    heads = Targets.parse(f"L{last}.H0,L{last}.H2", vit.cfg)
    values = mean_activations(vit, [other], heads)
    _, direct = direct_effect(vit, x, heads, "mean", values)
    _, cache = explicit_forward(vit, x)
    freeze = (f"blocks.{last}.hook_mlp_out", lambda value, name: cache[name])
    total_frozen = unit(vit.run_with_hooks(x, hooks(heads, "mean", values) + [freeze]))
    assert torch.allclose(direct, total_frozen, atol=1e-6)
    assert (direct - total_effect(vit, x, heads, "mean", values)).abs().max() > 1e-4  # the MLP does react
    # earlier heads act through every later layer: direct and total effects differ
    earlier = Targets.parse("L0.H0,L0.H1", vit.cfg)
    values = mean_activations(vit, [other], earlier)
    _, direct = direct_effect(vit, x, earlier, "mean", values)
    assert (direct - total_effect(vit, x, earlier, "mean", values)).abs().max() > 1e-3


def test_direct_effect_is_the_pooled_change_added_to_the_final_stream(vit, pixels):
    x, _ = pixels
    targets = Targets.parse("L1.H1", vit.cfg)
    _, direct = direct_effect(vit, x, targets, "zero")
    _, cache = explicit_forward(vit, x)
    block, d = vit.blocks[1], vit.cfg.head_dim
    z = cache["blocks.1.attn.hook_z"][:, 1]  # head 1, every row
    change = -(z @ block.out.weight[:, d:2 * d].T) * (block.ls1 if block.ls1 is not None else 1)
    final = cache[f"blocks.{vit.cfg.layers - 1}.hook_resid_post"] + change
    r = final[:, 0] if vit.cfg.pool == "cls" else final[:, 1:].sum(dim=1) / (final.shape[1] - 1)  # CLS, or patches
    expected = torch.nn.functional.layer_norm(r, (vit.cfg.width,), vit.ln_post.weight, vit.ln_post.bias,
                                              vit.cfg.ln_eps) @ vit.proj
    assert torch.allclose(direct, unit(expected), atol=1e-6)


def test_decomposition_of_an_intervened_forward_is_exact(vit, pixels):
    x, _ = pixels
    targets = Targets.parse("L0.H2", vit.cfg)
    d = decompose_pixels(vit, x, layers=[1, 2], fwd_hooks=hooks(targets, "zero"))
    assert torch.allclose(d.embedding, total_effect(vit, x, targets, "zero"), atol=1e-6)
    assert (d.total() - d.embedding).abs().max() < 1e-5
    with pytest.raises(ClipInterpretError, match="no longer split by token"):
        decompose_pixels(vit, x, layers=[0], spatial=True, fwd_hooks=hooks(targets, "zero"))


def test_bad_targets_and_modes_are_clear_errors(vit):
    with pytest.raises(ClipInterpretError, match="does not exist"):
        Targets.parse("L9.H0", vit.cfg)
    with pytest.raises(ClipInterpretError, match="heads 0-"):
        Targets.parse("L0.H99", vit.cfg)
    with pytest.raises(ClipInterpretError, match="no target"):
        Targets.parse("", vit.cfg)
    with pytest.raises(ClipInterpretError, match="unknown mode"):
        hooks(Targets.parse("MLP0", vit.cfg), "shuffle")
    with pytest.raises(ClipInterpretError, match="needs the targets' values"):
        total_effect(vit, torch.zeros(1, 3, *vit.cfg.image_size), Targets.parse("MLP0", vit.cfg), "mean")
