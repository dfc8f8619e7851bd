"""Every architecture open_clip lists, walked: what `clip-interpret models` lists as supported loads into the
HookedViT (a small random version: its real image tower cut to one block, its text tower in small), pools as the
table says and decomposes exactly; everything else is refused by the loader in one line naming the architecture
and why. The walk is driven by the table's own judgement (model_catalog), so a family made supported there is
checked here without a change. The whole walk (98 supported architectures: 71 towers built; 48 refusals) took 37 s
on 2 quiet cores (121 tests), 2026-12-06; 76 s with 88 supported when the cores were shared (load average 3.4)."""

import functools
import json
import warnings

import pytest
import torch

from clip_interpret import load_model
from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import UnsupportedModelError
from clip_interpret.model_catalog import compute_model_table
from clip_interpret.models.loader import registered_open_clip


TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)
ARCHS = [arch for arch in registered_open_clip().list_models() if not arch.startswith("test-")]
CATALOG = compute_model_table()
TABLE = {row[0]: row[1] for row in CATALOG["open_clip"]}  # the supported ones: {arch: pool}
REFUSED = dict(CATALOG["refused"])  # the others: {arch: reason}


def tower_key(arch: str) -> str:
    """What fixes an architecture's image tower: its embedding width, vision config and quick_gelu."""
    cfg = registered_open_clip().get_model_config(arch)
    return json.dumps([cfg["embed_dim"], cfg["vision_cfg"], bool(cfg.get("quick_gelu", False))], sort_keys=True)


def supported_towers() -> list[list[str]]:
    """The supported architectures grouped by image tower (ViT-H-14 and ViT-H-14-worldwide have one): each tower
    is built and checked once, for every architecture of its group."""
    groups = {}
    for arch in ARCHS:
        if arch in TABLE:
            groups.setdefault(tower_key(arch), []).append(arch)
    return list(groups.values())


def jitter_constants(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter a fresh init leaves constant (LayerNorm gains, biases, LayerScale, class tokens, ...),
    so that no zero bias or unit gain hides a bug; the random matrices are left as they are (helpers.jitter
    perturbs those too, which costs as much again as building the big towers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1 or bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def small_random(arch: str, monkeypatch) -> torch.nn.Module:
    """open_clip's model of ``arch`` with random weights (its constants jittered): its image tower at its real width, heads,
    patch and image size with one block (a native tower's ``layers``, a timm trunk's ``depth``), a one-layer text
    tower of its own (a Hugging Face text tower would need files from the Hub) and a one-layer caption decoder."""
    import timm

    open_clip = registered_open_clip()
    cfg = open_clip.get_model_config(arch)
    vision = dict(cfg["vision_cfg"])
    if not vision.get("timm_model_name"):
        vision["layers"] = 1
    text = dict(TINY_TEXT, **{k: v for k, v in cfg["text_cfg"].items() if k in ("embed_cls", "output_tokens")})
    kwargs = dict(vision_cfg=vision, text_cfg=text)
    if "multimodal_cfg" in cfg:
        kwargs["multimodal_cfg"] = dict(cfg["multimodal_cfg"], layers=1, width=16, heads=2)
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=1))
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None, pretrained_image=False, pretrained_text=False, **kwargs)
    return jitter_constants(model.eval())


@pytest.mark.parametrize("archs", supported_towers(), ids=lambda archs: "+".join(archs))
def test_each_supported_tower_loads_pools_as_listed_and_decomposes_exactly(archs, monkeypatch):
    assert len({TABLE[arch] for arch in archs}) == 1
    native = small_random(archs[0], monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image-only: the tiny text tower has no tokenizer
        model = load_model(native)
    vit = model.vit
    assert vit.cfg.pool == TABLE[archs[0]]  # pools as the table says
    x = torch.randn(1, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = native.encode_image(x)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    d = decompose_pixels(vit, x, layers="all")
    assert float((d.embedding - expected).norm()) < 1e-5, "forward"
    assert float((d.total() - expected).norm()) < 1e-5, "decomposition"


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch not in TABLE])
def test_each_other_architecture_is_refused_in_one_line_naming_it_and_why(arch):
    with pytest.raises(UnsupportedModelError) as err:
        load_model(f"open_clip:{arch}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{arch!r} (spec 'open_clip:{arch}') has ")
    assert "; it is not supported" in message


def test_the_walk_covers_both_outcomes_and_the_refusals_name_their_family():
    from clip_interpret.models.openclip import tower_problem

    refused = [arch for arch in ARCHS if arch not in TABLE]
    assert set(TABLE) <= set(ARCHS) and len(TABLE) > 50 and len(refused) > 20
    assert {"coca_ViT-B-32", "ViT-L-14-CLIPA", "EVA01-g-14", "ViT-B-16-SigLIP"} <= set(TABLE)
    reasons = {"RN50": "ResNet", "convnext_base": "ConvNeXt", "MobileCLIP2-S0": "FastViT",
               "MobileCLIP-B": "convolutional stem", "ViTamin-B": "ViTamin", "swin_base_patch4_window7_224": "Swin",
               "vit_relpos_medium_patch16_cls_224": "relative position"}
    for arch, words in reasons.items():
        assert arch in refused and words in tower_problem(arch), arch


def test_the_table_lists_every_other_architecture_with_the_loaders_reason():
    """`models` lists each refused architecture with its reason: every architecture is in exactly one of the two
    lists, and the reason read from the files is, word for word, the one the loader gives."""
    from clip_interpret.models.openclip import tower_problem

    assert set(REFUSED) == set(ARCHS) - set(TABLE) and not set(REFUSED) & set(TABLE)
    for arch, reason in REFUSED.items():
        assert reason and "\n" not in reason and reason == tower_problem(arch), arch
    assert "ResNet" in REFUSED["RN50"] and "pooled by 'token'" in REFUSED["MobileCLIP2-L-14"]
