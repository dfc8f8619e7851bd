"""SigLIP and SigLIP 2: attention-pooled towers converted exactly, decomposed exactly through the pooling head."""

import functools

import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import ClipInterpretError, UnsupportedModelError
from clip_interpret.interventions import Targets, direct_effect, hooks, mean_activations, total_effect
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.convert import from_hf_siglip, from_open_clip
from clip_interpret.models.loader import registered_open_clip

from tests.helpers import explicit_forward, jitter, make_hf_siglip, tiny_tokenizer

TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def pixels_for(vit, n=2, seed=0):
    return torch.randn(n, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def hf_features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def siglip_archs() -> list[str]:
    """One listed open_clip architecture per family of timm trunks (the same width, heads and patch; the
    image sizes differ only in the length of the position embedding), at its largest image size."""
    open_clip = registered_open_clip()
    chosen = {}
    for arch in open_clip_architectures():
        vision = open_clip.get_model_config(arch)["vision_cfg"]
        name = vision.get("timm_model_name")
        # not the Eva trunks (PE-Core's: tests/models/test_pe.py)
        if name and vision.get("timm_pool") == "map" and not name.startswith("vit_pe_"):
            family = name.rsplit("_", 1)[0]  # vit_so400m_patch14_siglip_378 -> vit_so400m_patch14_siglip
            size = vision["image_size"] if isinstance(vision["image_size"], int) else max(vision["image_size"])
            if size >= chosen.get(family, ("", 0))[1]:
                chosen[family] = (arch, size)
    return sorted(arch for arch, _ in chosen.values())


def test_the_siglip_family_is_listed():
    archs = open_clip_architectures()
    for arch in ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "ViT-SO400M-14-SigLIP", "ViT-B-16-SigLIP2",
                 "ViT-SO400M-16-SigLIP2-512", "ViT-gopt-16-SigLIP2-384", "nllb-clip-base-siglip"):
        assert arch in archs
    assert len(siglip_archs()) >= 6  # the families: B/16, B/32, L/16, SO400M/14 and /16, gopt/16


@pytest.mark.parametrize("arch", siglip_archs())
def test_every_siglip_trunk_matches_native_at_its_real_width(arch, monkeypatch):
    """Each distinct timm trunk at its real width, heads, patch and image size and pooling head, with
    one block (the blocks are all alike; ViT-B-16-SigLIP is checked at full depth below)."""
    import timm

    open_clip = registered_open_clip()
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=1))
    torch.manual_seed(0)
    native = jitter(open_clip.create_model(arch, pretrained=None, text_cfg=TINY_TEXT).eval())
    vit = from_open_clip(native.visual)
    assert vit.cfg.pool == "map" and not vit.cfg.class_token and vit.cfg.layers == 1
    assert vit.cfg.image_size == tuple(native.visual.trunk.patch_embed.img_size)
    x = pixels_for(vit, n=1)
    with torch.no_grad():
        assert rel_err(vit(x), native.encode_image(x)) < 1e-5


@pytest.fixture(scope="module")
def b16_siglip():
    """open_clip ViT-B-16-SigLIP's image tower at full size (12 layers, 224x224), a tiny text tower."""
    open_clip = registered_open_clip()
    torch.manual_seed(0)
    return jitter(open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, text_cfg=TINY_TEXT).eval())


def test_vit_b16_siglip_matches_native_and_decomposes_exactly(b16_siglip):
    vit = from_open_clip(b16_siglip.visual)
    assert (vit.cfg.layers, vit.cfg.heads, vit.cfg.pool_heads, vit.cfg.n_tokens) == (12, 12, 12, 196)
    x = pixels_for(vit, n=2)
    with torch.no_grad():
        native = b16_siglip.encode_image(x)
    assert rel_err(vit(x), native) < 1e-5
    d = decompose_pixels(vit, x, layers="all")  # the heads of every layer
    assert d.heads.shape == (2, 12, 12, 768) and d.pool_heads.shape == (2, 12, 768)
    assert (d.total() - d.embedding).abs().max() < 1e-5
    assert torch.allclose(d.embedding, native / native.norm(dim=-1, keepdim=True), atol=1e-6)
    assert (sum(p.sum(dim=1) for p in d.pool_view().values()) - d.embedding).abs().max() < 1e-5
    last = decompose_pixels(vit, x[:1], layers=[11], spatial=True)
    assert last.head_tokens.shape == (1, 1, 196, 12, 768) and (last.total() - last.embedding).abs().max() < 1e-5
    assert torch.allclose(last.head_tokens.sum(2), d.heads[:1, 11:], atol=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_hf_siglip_matches_native(version):
    native = make_hf_siglip(version=version)
    vit = from_hf_siglip(native.vision_model)
    assert vit.cfg.image_size == (32, 32) and vit.cfg.pool_heads == 3 and not vit.cfg.proj
    x = pixels_for(vit, n=3)
    with torch.no_grad():
        if version == 1:
            theirs = hf_features(native.get_image_features(pixel_values=x))
        else:  # NaFlex inputs at the fixed native grid: patches flattened (row, column, channel), no padding
            patches = x.reshape(3, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, 192)
            theirs = hf_features(native.get_image_features(
                pixel_values=patches, pixel_attention_mask=torch.ones(3, 16, dtype=torch.long),
                spatial_shapes=torch.tensor([[4, 4]] * 3)))
        assert rel_err(vit(x), theirs) < 1e-5


def test_siglip2_without_a_square_grid_is_refused():
    import transformers

    cfg = transformers.Siglip2Config(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, vocab_size=100),
                                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                                        num_attention_heads=3, num_patches=12, patch_size=8))
    with pytest.raises(UnsupportedModelError, match="square grid"):
        from_hf_siglip(transformers.Siglip2Model(cfg).vision_model)


def naive_pieces(vit, pixels):
    """Every piece of an attention-pooled tower from its definition, via the explicit forward: each
    head's output at every token, written out head by head and token by token, through the frozen
    LN_post scale and pooling pattern of that token, the pooling values and outputs, per pooling head."""
    emb, cache = explicit_forward(vit, pixels)
    cfg, pool = vit.cfg, vit.pool
    w, n_pool = cfg.width, cfg.pool_heads
    d_pool = w // n_pool
    sigma = cache["ln_post.hook_scale"]  # [B, T]
    pattern = cache["pool.hook_pattern"][:, :, 0]  # [B, Hp, T]
    norm = emb.norm(dim=-1)

    def to_joint(c):  # c [B, T, width] at every token -> [B, D]
        centred = (c - c.mean(dim=-1, keepdim=True)) * vit.ln_post.weight / sigma[..., None]
        total = 0
        for p in range(n_pool):
            part = slice(p * d_pool, (p + 1) * d_pool)
            value = centred @ pool.kv.weight[w:][part].T  # [B, T, d]
            total = total + (pattern[:, p, :, None] * value).sum(dim=1) @ pool.out.weight[:, part].T
        return total / norm[:, None]

    block = vit.blocks[2]
    only = torch.zeros_like(cache["hook_embed"])
    only[:, 5] = cache["blocks.2.attn.hook_z"][:, 1, 5] @ block.out.weight[:, cfg.head_dim:2 * cfg.head_dim].T
    token_5 = to_joint(only * (block.ls1 if block.ls1 is not None else 1))
    heads = []
    for layer, block in enumerate(vit.blocks):
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [B, H, T, d]
        ls = block.ls1 if block.ls1 is not None else 1
        heads.append(torch.stack([to_joint(z[:, h] @ block.out.weight[:, h * cfg.head_dim:(h + 1) * cfg.head_dim].T
                                           * ls) for h in range(cfg.heads)], dim=1))
    tokens = pixels.new_zeros(pixels.shape[0], cfg.n_tokens, w)
    values = cache["pool.hook_v"]  # [B, Hp, T, d] (LN_post, W_V and b_V of each token)
    pool_heads = torch.stack([(pattern[:, p, :, None] * values[:, p]).sum(dim=1)
                              @ pool.out.weight[:, p * d_pool:(p + 1) * d_pool].T for p in range(n_pool)], dim=1)
    return dict(
        heads=torch.stack(heads, dim=1),
        bias=[to_joint(tokens + (block.out.bias * (block.ls1 if block.ls1 is not None else 1))) for block in vit.blocks],
        attn=[to_joint(cache[f"blocks.{l}.hook_attn_out"]) for l in range(cfg.layers)],
        mlps=torch.stack([to_joint(cache[f"blocks.{l}.hook_mlp_out"]) for l in range(cfg.layers)], dim=1),
        embed=to_joint(cache["hook_embed"]),
        pool_mlp=cache["pool.hook_mlp_out"] / norm[:, None],
        constant=((vit.ln_post.bias @ pool.kv.weight[w:].T + pool.kv.bias[w:]) @ pool.out.weight.T
                  + pool.out.bias) / norm[:, None],
        pool_heads=pool_heads / norm[:, None, None],
        pool_bias=pool.out.bias / norm[:, None],
        token_5=token_5,
    )


@pytest.fixture(scope="module")
def hf_siglip_model():
    return load_model(make_hf_siglip(seed=4), tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("which", ["map_model", "hf_siglip_model"])
def test_each_piece_equals_its_definition(which, request):
    model = request.getfixturevalue(which)
    vit = model.vit
    x = pixels_for(vit, n=2, seed=3)
    ref = naive_pieces(vit, x)
    d = decompose(model, x, layers=[0, 2], spatial=True)
    atol = 1e-6
    assert torch.allclose(d.heads, ref["heads"][:, [0, 2]], atol=atol)
    assert torch.allclose(d.head_tokens.sum(2), d.heads, atol=atol)
    assert torch.allclose(d.attn_bias, torch.stack([ref["bias"][0], ref["bias"][2]], 1), atol=atol)
    assert d.other_layers == [1] and torch.allclose(d.other_attn[:, 0], ref["attn"][1], atol=atol)
    assert torch.allclose(d.mlps, ref["mlps"], atol=atol)
    assert torch.allclose(d.cls_embed, ref["embed"], atol=atol)
    assert torch.allclose(d.pool_mlp[:, 0], ref["pool_mlp"], atol=atol)
    assert torch.allclose(d.constant, ref["constant"], atol=atol)
    assert torch.allclose(d.pool_heads, ref["pool_heads"], atol=atol)
    assert torch.allclose(d.pool_head_tokens.sum(2), d.pool_heads, atol=atol)
    assert torch.allclose(d.pool_bias, ref["pool_bias"], atol=atol)
    # per stream position: head 1 of layer 2 at token 5 is its output there alone, through the pool
    assert torch.allclose(d.head_tokens[:, 1, 5, 1], ref["token_5"], atol=atol)


LAYER_CHOICES = [None, "all", [0], [-1], [0, 2]]


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("layers", LAYER_CHOICES)
def test_pieces_sum_to_the_unit_embedding(map_model, hf_siglip_model, layers, spatial):
    for model in (map_model, hf_siglip_model):
        x = pixels_for(model.vit, n=3)
        d = decompose(model, x, layers=layers, spatial=spatial)
        assert torch.allclose(d.embedding, model.encode_image(x), atol=1e-6)
        assert (d.total() - d.embedding).abs().max() < 1e-5
        assert (sum(p.sum(dim=1) for p in d.pool_view().values()) - d.embedding).abs().max() < 1e-5
        assert sorted(d.layers + d.other_layers) == list(range(model.vit.cfg.layers))
        assert set(d.pieces()) == {"heads", "attn_bias", "other_attn", "mlps", "cls_embed", "pool_mlp", "constant"}
        assert not d.class_token and d.pool_mlp.shape[1] == 1


def test_token_summed_and_spatial_heads_agree_and_maps_cover_the_patches(map_model):
    x = pixels_for(map_model.vit, n=2)
    flat = decompose(map_model, x, layers="all", batch_size=1)
    spatial = decompose(map_model, x, layers="all", spatial=True)
    assert torch.allclose(flat.heads, spatial.heads, atol=1e-6)
    assert flat.pool_head_tokens is None and spatial.pool_head_tokens.shape == (2, 4, 16, 32)
    text = map_model.encode_text(["a red square"])
    tokens = spatial.token_similarity(text)  # [B, T, 1]: T = the 16 patches, no CLS
    grid = spatial.similarity_maps(text, upsample=False)
    assert tokens.shape == (2, 16, 1) and grid.shape == (2, 1, 4, 4)
    assert torch.allclose(grid.flatten(2).transpose(1, 2), tokens, atol=1e-7)
    assert spatial.similarity_maps(text).shape == (2, 1, 32, 32)


def test_a_clip_tower_has_no_pool_view(tiny_model):
    d = decompose(tiny_model, pixels_for(tiny_model.vit, n=1))
    assert d.pool_mlp.shape == (1, 0, tiny_model.vit.cfg.output_dim) and d.pool_heads is None
    with pytest.raises(ClipInterpretError, match="no attention-pooling head"):
        d.pool_view()


def test_the_published_convention_is_refused_for_attention_pooling(map_model):
    """The original code's shares are defined for CLS pooling only: an attention-pooled tower is refused."""
    with pytest.raises(ClipInterpretError, match="pool by their CLS token"):
        decompose(map_model, pixels_for(map_model.vit, n=1), convention="published")


def test_low_precision_pieces_sum_to_that_forwards_embedding(map_model):
    x = pixels_for(map_model.vit, n=2)
    full = decompose(map_model, x)
    for precision in ("bf16", "fp16"):
        d = decompose(map_model, x, precision=precision)
        assert (d.total() - d.embedding).abs().max() < 1e-5
        assert rel_err(d.embedding, full.embedding) < 2e-2


# ------------------------------------------------------------- hooks and interventions
def test_hook_points_of_the_pooling_head_agree_with_the_explicit_forward(map_model):
    vit = map_model.vit
    x = pixels_for(vit, n=2)
    names = vit.hook_names()
    assert names[-11:] == ["ln_post.hook_scale", "ln_post.hook_normalized", "pool.hook_k", "pool.hook_v",
                           "pool.hook_pattern", "pool.hook_z", "pool.hook_attn_out", "pool.ln.hook_normalized",
                           "pool.mlp.hook_post", "pool.hook_mlp_out", "hook_image_embed"]
    emb, cache = vit.run_with_cache(x)
    ref_emb, ref = explicit_forward(vit, x)
    assert set(cache) == set(names)
    assert torch.allclose(emb, ref_emb, atol=1e-5)
    for name, value in ref.items():
        assert torch.allclose(cache[name], value, atol=1e-5), name
    assert cache["blocks.2.hook_resid_post"].shape == (2, 16, 32)  # the last block computes every row


def test_a_pooling_hook_changes_the_forward_as_a_hand_made_one_and_stops_the_decomposition(map_model):
    vit = map_model.vit
    x = pixels_for(vit, n=2)
    zero_head = (lambda z, name: torch.cat([z[:, :1] * 0, z[:, 1:]], dim=1))  # noqa: E731
    emb = vit.run_with_hooks(x, [("pool.hook_z", zero_head)])
    expected, _ = explicit_forward(vit, x, lambda name, v: zero_head(v, name) if name == "pool.hook_z" else v)
    assert torch.allclose(emb, expected, atol=1e-5) and not torch.allclose(emb, vit(x), atol=1e-4)
    with pytest.raises(ClipInterpretError, match="pooling head"):
        decompose_pixels(vit, x, fwd_hooks=[("pool.hook_z", zero_head)])


def test_interventions_on_an_attention_pooled_tower(map_model):
    vit = map_model.vit
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
    # nothing but the pooling head follows the last MLP: its direct and total effects are the same
    last = Targets.parse(f"MLP{vit.cfg.layers - 1}", vit.cfg)
    means = mean_activations(vit, [other], last)
    full, direct = direct_effect(vit, x, last, "mean", means)
    assert torch.allclose(direct, total_effect(vit, x, last, "mean", means), atol=1e-6)
    assert torch.allclose(full, map_model.encode_image(x), atol=1e-6)
    # the decomposition of the intervened forward is exact too
    d = decompose_pixels(vit, x, layers=[1, 2], fwd_hooks=hooks(targets, "zero"))
    assert torch.allclose(d.embedding, total_effect(vit, x, targets, "zero"), atol=1e-6)
    assert (d.total() - d.embedding).abs().max() < 1e-5


# ------------------------------------------------------------------ text and scores
def test_hf_siglip_folder_text_and_sigmoid_scores_match_native(tmp_path):
    native = make_hf_siglip(seed=5)
    native.save_pretrained(tmp_path / "siglip")
    with pytest.warns(UserWarning, match="loaded image-only: no tokenizer with the model.*--tokenizer"):
        image_only = load_model(f"hf:{tmp_path / 'siglip'}")  # image work needs no tokenizer
    with pytest.raises(ClipInterpretError, match="image-only.*cannot encode texts.*--tokenizer /path/to/folder"):
        image_only.encode_text(["a red square"])
    tiny_tokenizer(tmp_path / "siglip")  # its own tokenizer, saved with it
    model = load_model(f"hf:{tmp_path / 'siglip'}")
    texts = ["a photo of a dog", "a red square"]
    ids = tiny_tokenizer()(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    x = pixels_for(model.vit, n=2)
    with torch.no_grad():
        out = native(input_ids=ids, pixel_values=x)  # SigLIP's text tower reads the ids alone, as trained
    assert torch.allclose(model.encode_text(texts), out.text_embeds, atol=1e-5)
    assert torch.allclose(model.scores(model.encode_image(x), model.encode_text(texts)),
                          torch.sigmoid(out.logits_per_image), atol=1e-5)
    assert model.logit_bias == pytest.approx(float(native.logit_bias.detach()))
    assert model.preprocess.resize_mode == "squash" and model.preprocess.mean == (0.5, 0.5, 0.5)


def test_in_memory_siglip_needs_a_tokenizer(tmp_path):
    native = make_hf_siglip(seed=6)
    with pytest.warns(UserWarning, match="image-only"):
        image_only = load_model(native)
    with pytest.raises(ClipInterpretError, match='tokenizer="/path/to/folder"'):
        image_only.encode_text(["a cat"])
    tiny_tokenizer(tmp_path / "tok")
    by_folder = load_model(native, tokenizer=str(tmp_path / "tok"))
    by_object = load_model(native, tokenizer=tiny_tokenizer())
    assert torch.allclose(by_folder.encode_text(["a cat"]), by_object.encode_text(["a cat"]))


def test_open_clip_siglip_keeps_its_logit_bias_and_scores_like_native(b16_siglip):
    tokens = [[1, 5, 7, 2, 0, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0]]  # ids of its 100-token tiny text tower
    model = load_model(b16_siglip, tokenizer=lambda texts: torch.tensor(tokens[:len(texts)]))
    assert model.logit_bias == pytest.approx(float(b16_siglip.logit_bias))
    x = pixels_for(model.vit, n=1)
    with torch.no_grad():
        image, text, scale, bias = b16_siglip(x, torch.tensor(tokens))
    assert model.logit_scale == pytest.approx(float(scale))
    ours = model.scores(model.encode_image(x), model.encode_text(["one", "two"]))
    assert torch.allclose(ours, torch.sigmoid(scale * image @ text.T + bias), atol=1e-5)


def test_an_open_clip_siglip_checkpoint_loads_from_a_local_file(tmp_path):
    """open_clip:ARCH@FILE for a MAP-pooled tower: the image tower, the sigmoid logit bias and the
    architecture's preprocessing come with it."""
    from safetensors.torch import save_file

    native = jitter(registered_open_clip().create_model("test-vit-tiny-map", pretrained=None).eval(), seed=8)
    with torch.no_grad():
        native.logit_bias.fill_(-3.5)
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    model = load_model(f"open_clip:test-vit-tiny-map@{path}")
    assert not model.random_weights and model.logit_bias == pytest.approx(-3.5)
    x = pixels_for(model.vit, n=2)
    with torch.no_grad():
        assert rel_err(model.vit(x), native.encode_image(x)) < 1e-5
    d = decompose(model, x, layers="all")
    assert (d.total() - d.embedding).abs().max() < 1e-5


# ------------------------------------------------ offline: image-only, and a tokenizer that fits (issue 24 item 7)
def test_a_siglip_without_its_tokenizer_does_image_work_and_says_how_to_give_one(tmp_path):
    """Offline, with no tokenizer files: the model loads image-only with one warning line; images
    encode and decompose exactly; every text call is one line that suggests only what works offline."""
    import warnings

    native = make_hf_siglip(seed=7)
    native.save_pretrained(tmp_path / "siglip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(f"hf:{tmp_path / 'siglip'}")
    ours = [str(w.message) for w in caught if "image-only" in str(w.message)]
    assert len(ours) == 1 and "\n" not in ours[0]
    assert not model.text.available
    x = pixels_for(model.vit, n=2)
    with torch.no_grad():
        expected = hf_features(native.get_image_features(pixel_values=x))
    assert torch.allclose(model.encode_image(x), expected / expected.norm(dim=-1, keepdim=True), atol=1e-5)
    d = decompose(model, x, layers="all")
    assert (d.total() - d.embedding).abs().max() < 1e-5
    with pytest.raises(ClipInterpretError) as err:
        model.encode_text(["a photo of a dog"])
    message = str(err.value)
    assert "\n" not in message and "--tokenizer /path/to/folder" in message and 'tokenizer="/path/to/folder"' in message
    assert "get_tokenizer" not in message and "huggingface-cli" not in message


def test_a_given_tokenizer_must_fit_the_text_towers_vocabulary(tmp_path):
    """A tokenizer whose ids go past the text tower's token embeddings is refused, naming both sizes:
    at load when it says its vocabulary, else at the first text that gives such an id."""
    import open_clip

    from clip_interpret.errors import ModelLoadError

    clip_bpe = open_clip.tokenizer.SimpleTokenizer(context_length=16)  # 49,408 tokens
    with pytest.raises(ModelLoadError, match="vocabulary of 49,408 tokens.*100 token embeddings"):
        load_model(make_hf_siglip(seed=8), tokenizer=clip_bpe)
    with pytest.raises(ModelLoadError, match="vocabulary of 49,408 tokens.*100 token embeddings"):
        load_model(make_open_clip_tiny_text(), tokenizer=clip_bpe)
    big = tmp_path / "big"
    tiny_tokenizer(big, extra=50_000)
    with pytest.raises(ModelLoadError, match="vocabulary of 50,069 tokens.*49,408 token embeddings"):
        load_model("open_clip:test-vit-tiny-map", tokenizer=str(big))
    # a tokenizer that does not say its size: its ids are checked as they come
    model = load_model(make_open_clip_tiny_text(), tokenizer=lambda texts: torch.tensor([[1, 150, 2, 0, 0, 0, 0, 0]]))
    with pytest.raises(ClipInterpretError, match="token id 150.*100 token embeddings"):
        model.encode_text(["one"])
    fits = load_model(make_hf_siglip(seed=8), tokenizer=tiny_tokenizer())  # 69 tokens of 100: taken
    assert fits.encode_text(["a red square"]).shape == (1, 48)


def make_open_clip_tiny_text():
    from tests.helpers import make_open_clip

    return make_open_clip("test-vit-tiny-map", text_cfg=dict(TINY_TEXT))
