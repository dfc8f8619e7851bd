"""The open_clip backend: open_clip architectures (native VisionTransformer towers and timm trunks),
by tag (pretrained weights from the cache or the internet), from a checkpoint file, with random
weights, or an open_clip model already in memory; their tokenizers and preprocessing."""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError
from ..images import OPENAI_MEAN, OPENAI_STD, RESIZE_MODES, Preprocess
from ..tower_pools import NATIVE_REFUSED as _NATIVE_REFUSED  # noqa: F401 (the name tests compare with)
from ..tower_pools import OTHER_TIMM, TIMM_FAMILIES, native_tower_problem
from .clip_model import ClipModel, MissingTokenizer, TextEncoder, check_vocabulary, image_only, native_logits
from .convert import SUPPORTED, from_open_clip
from .files import check_state_dict, read_state_dict
from .hub import require_internet, require_tokenizer, tokenizer_folder
from .spec import ModelSpec

RANDOM_INIT_SEED = 0
CONFIG_DIR = Path(__file__).parent / "configs"
CLIP_VOCAB = 49408  # the CLIP BPE tokenizer's vocabulary
_registered = False


def registered_open_clip():
    """open_clip, with our model configs (tiny ``test-*`` towers, ``toy``) and the tiny timm trunk of
    ``test-vit-tiny-map`` registered once."""
    global _registered
    import open_clip

    if not _registered:
        from . import tiny_towers  # noqa: F401 - registers the tiny timm trunk with timm

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def tower_problem(arch: str) -> str | None:
    """Why an open_clip architecture's image tower cannot be opened up here, or None when it can.
    Native towers are judged by their config; timm trunks are built on the meta device (no memory,
    no weights) and checked as the converter would."""
    open_clip = registered_open_clip()
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return timm_problem(vision["timm_model_name"], vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear"),
                             bool(vision.get("timm_proj_bias", False)))
    return native_tower_problem(vision)


@functools.lru_cache(maxsize=None)
def timm_problem(name: str, pool: str, proj, proj_bias: bool) -> str | None:
    import timm

    from .convert import check_timm_trunk

    from .tiny_towers import EVA_TRUNKS

    if name in timm.list_models(module="eva") or name in EVA_TRUNKS:
        return eva_problem(name, pool, proj, proj_bias)
    if name not in timm.list_models(module="vision_transformer") + timm.list_models(module="tiny_towers"):
        return f"the timm tower {name!r}, {timm_family(name)}"
    if pool != "map":
        return f"the timm tower {name!r} pooled by {pool or 'its default'!r} (only 'map', SigLIP's attention pooling)"
    if proj not in ("none", "linear") or (proj == "linear" and proj_bias):
        return f"the timm tower {name!r} with projection {proj!r} (only 'none', or 'linear' without bias)"
    try:
        with torch.device("meta"):  # its structure only: one block, no weights, no initialisation
            trunk = timm.create_model(name, num_classes=0, global_pool=pool, depth=1, weight_init="skip")
        check_timm_trunk(trunk)
    except UnsupportedModelError as err:
        return str(err).split(". Supported:")[0].removeprefix("unsupported image tower: ")
    return None


# why a timm trunk of these timm modules is not opened up here (its module: timm/models/MODULE.py)
def timm_family(name: str) -> str:
    """Why the timm model ``name``, not a VisionTransformer or Eva trunk, is not opened up: its family's reason."""
    import timm

    for module, reason in TIMM_FAMILIES.items():
        if name in timm.list_models(module=module):
            return reason
    return OTHER_TIMM


def eva_problem(name: str, pool: str, proj, proj_bias: bool) -> str | None:
    """An open_clip tower on a timm Eva trunk (EVA01, EVA02, Perception Encoder): built on the meta device
    with one block, as open_clip builds it (``proj`` null: the trunk's classifier head is the projection)."""
    import timm

    from .convert import eva_missing

    if proj not in (None, "linear"):
        return (f"the timm tower {name!r} with projection {proj!r} (Eva trunks: only null, the trunk's head, "
                "or 'linear')")
    kwargs = dict(num_classes=1) if proj is None else dict(num_classes=0)
    try:
        with torch.device("meta"):
            trunk = timm.create_model(name, global_pool=pool, depth=1, **kwargs)
        if type(trunk).__name__ != "Eva":  # TIMM_USE_NAFLEX=1 builds Eva names as NaFlexVit
            return f"the timm tower {name!r}, built by timm as a {type(trunk).__name__} (not an Eva trunk)"
        missing = eva_missing(trunk)
    except UnsupportedModelError as err:
        return str(err).split(". Supported:")[0].removeprefix("unsupported image tower: ")
    except (AssertionError, ValueError, TypeError, RuntimeError) as err:  # timm refuses the arguments itself
        return f"the timm tower {name!r} with global_pool={pool!r}, which timm cannot build ({err})"
    if missing:
        return f"the timm tower {name!r}, an Eva trunk with {', '.join(missing)} (pieces not decomposed)"
    return None


def open_clip_architectures() -> list[str]:
    """open_clip architectures whose image tower we can decompose."""
    open_clip = registered_open_clip()
    return [name for name in open_clip.list_models() if not name.startswith("test-")  # tiny test towers
            and tower_problem(name) is None]


def open_clip_tokenizer(spec: str, arch: str, tokenizer=None, missing_ok: bool = False):
    """The tokenizer of an open_clip architecture: ``tokenizer`` when given (a tokenizer, or a local folder
    of Hugging Face tokenizer files; checked against the text tower's vocabulary), else the architecture's
    own (open_clip's ``get_tokenizer``: the CLIP BPE, or the Hugging Face tokenizer its config names, from
    the cache or the Hub). ``missing_ok``: a Hugging Face tokenizer that cannot be had is a
    ``MissingTokenizer`` (the model is then loaded image-only) rather than an error."""
    open_clip = registered_open_clip()
    text = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    rows = None if text.get("hf_model_name") else int(text.get("vocab_size", CLIP_VOCAB))
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        check_vocabulary(spec, tokenizer, rows)
        return tokenizer
    context = text.get("context_length", 77)
    kwargs = dict(text.get("tokenizer_kwargs", {}), context_length=context, tokenizer_mode=text.get("tokenizer_mode"))
    if tokenizer is not None:
        tok = tokenizer_folder(spec, tokenizer, lambda folder, **kw: open_clip.tokenizer.HFTokenizer(
            folder, **kwargs, **kw))
        check_vocabulary(spec, tok, rows)
        return tok
    name = text.get("hf_tokenizer_name")
    if not name:
        return open_clip.get_tokenizer(arch)
    try:
        return require_tokenizer(spec, name, lambda **kw: open_clip.tokenizer.HFTokenizer(name, **kwargs, **kw))
    except ModelLoadError:
        if not missing_ok:
            raise
        return MissingTokenizer(f"its tokenizer {name!r} is not on this machine")


def text_rows(model: nn.Module) -> int | None:
    """The token embeddings of an open_clip model's text tower (its vocabulary), when it has one of its own."""
    text = getattr(model, "text", model)
    embedding = getattr(text, "token_embedding", None)
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def in_memory_tokenizer(model: nn.Module, tokenizer=None):
    """An in-memory open_clip model's tokenizer: ``tokenizer`` (a tokenizer, or a folder of Hugging Face
    tokenizer files), else the CLIP BPE, only for a text tower with its vocabulary."""
    open_clip = registered_open_clip()
    context = int(getattr(model, "context_length", 77) or 77)
    vocab = text_rows(model)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = tokenizer_folder("<in-memory model>", tokenizer, lambda folder, **kw: open_clip.tokenizer.HFTokenizer(
            folder, context_length=context, **kw))
    if tokenizer is not None:
        check_vocabulary("<in-memory model>", tokenizer, vocab)
        return tokenizer
    if vocab != CLIP_VOCAB:
        what = f"a vocabulary of {vocab} tokens" if vocab else f"a {type(getattr(model, 'text', model)).__name__} text tower"
        return MissingTokenizer(f"its text tower has {what}, not the CLIP tokenizer's {CLIP_VOCAB}, and no tokenizer "
                                "was given")
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def open_clip_text(model: nn.Module, tok, spec: str = "<in-memory model>") -> TextEncoder:
    context = int(getattr(model, "context_length", None) or getattr(tok, "context_length", None) or 77)
    if isinstance(tok, MissingTokenizer):
        return image_only(spec, tok.reason, context)
    if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):
        def n_tokens(text: str) -> int:
            return len(tok.encode(text)) + 2
    else:
        def n_tokens(text: str) -> int:  # HF-backed tokenizers: ask the wrapped tokenizer
            inner = getattr(tok, "tokenizer", None)
            return len(inner(text)["input_ids"]) if inner is not None else 0

    takes_context = "context_length" in _params(tok)

    def tokenize(texts):
        return {"text": tok(texts, context_length=context) if takes_context else tok(texts)}

    def encode(text):
        return model.encode_text(text)

    return TextEncoder(tokenize, n_tokens, encode, context, vocab_rows=text_rows(model))


def _params(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def arch_preprocess_cfg(arch: str, tag: str | None = None) -> dict:
    """The preprocessing of a pretrained tag of an architecture; without a tag (random weights, a
    local checkpoint), the one all its tags share, if they agree (e.g. SigLIP's squash resize and
    0.5 mean/std), else nothing (open_clip's defaults)."""
    open_clip = registered_open_clip()
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(arch)
    found = {json.dumps({k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}, sort_keys=True)
             for cfg in (open_clip.get_pretrained_cfg(arch, t) for t in tags)}
    return json.loads(found.pop()) if len(found) == 1 else {}


def open_clip_preprocess(model: nn.Module, image_size, overrides: dict | None = None) -> Preprocess:
    """The model's preprocessing (``model.visual.preprocess_cfg``, updated by ``overrides``)."""
    cfg = {**(getattr(model.visual, "preprocess_cfg", None) or {}), **(overrides or {})}
    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in RESIZE_MODES:
        warnings.warn(f"open_clip resize_mode {resize_mode!r} replaced by 'shortest' (resize + centre crop)")
        resize_mode = "shortest"
    return Preprocess(
        image_size=(int(size[0]), int(size[1])),
        mean=tuple(float(m) for m in cfg.get("mean", OPENAI_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", OPENAI_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=resize_mode,
    )




def wrap_open_clip(spec: str, model: nn.Module, tokenizer, random_weights=False, note="",
                    keep_native_visual=True, preprocess_cfg: dict | None = None, in_memory: bool = False) -> ClipModel:
    """``tokenizer``: the architecture's (resolved before building, so that a missing one fails at once);
    ``in_memory``: a model object of unknown architecture, whose tokenizer is resolved once its image
    tower is known to be supported (``in_memory_tokenizer``)."""
    model.eval()
    vit = from_open_clip(model.visual)
    if in_memory:
        tokenizer = in_memory_tokenizer(model, tokenizer)
    preprocess = open_clip_preprocess(model, vit.cfg.image_size, preprocess_cfg)
    if not keep_native_visual:
        model.visual = nn.Identity()  # our HookedViT replaces it; the text tower stays
    scale, bias = native_logits(model)
    return ClipModel(spec, vit, preprocess, open_clip_text(model, tokenizer, spec), native=model,
                     random_weights=random_weights, note=note, logit_scale=scale, logit_bias=bias)


def create_open_clip(spec: str, arch: str, quick_gelu: bool = False, seed: int = RANDOM_INIT_SEED) -> nn.Module:
    open_clip = registered_open_clip()
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().replace("_", "-") == arch.lower().replace("_", "-")]
        hint = f" Did you mean {close[0]!r}?" if close else " `clip-interpret models` lists them."
        raise ModelLoadError(f"unknown open_clip architecture {arch!r} in spec {spec!r}.{hint}")
    problem = tower_problem(arch)
    if problem:
        raise UnsupportedModelError(f"{arch!r} (spec {spec!r}) has {problem}; it is not supported. Supported: "
                                    f"{SUPPORTED}. `clip-interpret models` lists the architectures.")
    text = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" for every random init
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random-weight models are reproducible
            return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu,
                                          pretrained_text=False, pretrained_image=False)
    except OSError as err:  # a Hugging Face text tower whose configuration is not on this machine
        name = text.get("hf_model_name", "?")
        raise ModelLoadError(f"cannot build {arch!r} (spec {spec!r}): its text tower is the Hugging Face model "
                             f"{name!r}, whose configuration is not on this machine ({str(err).splitlines()[0]}). "
                             f"Download it once (`huggingface-cli download {name}`) into the Hugging Face cache") \
            from None
    finally:
        root.setLevel(level)


def load_open_clip(spec: str, parsed: ModelSpec, tokenizer=None) -> ClipModel:
    open_clip = registered_open_clip()
    arch = parsed.arch
    if arch not in open_clip.list_models():
        create_open_clip(spec, arch)  # raises the unknown-architecture error
    if parsed.tag:
        return load_open_clip_tag(spec, parsed, tokenizer)
    tok = open_clip_tokenizer(spec, arch, tokenizer, missing_ok=True)  # a bad given one fails before building
    if parsed.random:
        model = create_open_clip(spec, arch)
        return wrap_open_clip(spec, model, tok, random_weights=True, keep_native_visual=False,
                               preprocess_cfg=arch_preprocess_cfg(arch),
                               note=f"RANDOM WEIGHTS: randomly initialised (seed {RANDOM_INIT_SEED}), not a trained model")
    return load_checkpoint(spec, arch, Path(parsed.path).expanduser(), tok, arch_preprocess_cfg(arch))


def load_checkpoint(spec: str, arch: str, path: Path, tok, preprocess_cfg: dict) -> ClipModel:
    open_clip = registered_open_clip()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path} (spec {spec!r})")
    model = create_open_clip(spec, arch)
    state = read_state_dict(path, spec)
    state = open_clip.factory.convert_state_dict(model, state) if hasattr(open_clip.factory, "convert_state_dict") else state
    check_state_dict(model, state, f"{path} (spec {spec!r})")
    open_clip.factory.resize_pos_embed(state, model)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    return wrap_open_clip(spec, model, tok, keep_native_visual=False, note=f"weights from {path}",
                           preprocess_cfg=preprocess_cfg)


def load_open_clip_tag(spec: str, parsed: ModelSpec, tokenizer=None) -> ClipModel:
    """Pretrained weights by tag, from the local cache or (when it can be reached) downloaded."""
    open_clip = registered_open_clip()
    arch = parsed.arch
    cfg = open_clip.get_pretrained_cfg(arch, parsed.tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelLoadError(f"unknown pretrained tag {parsed.tag!r} for {arch} (spec {spec!r}); known tags: "
                             f"{', '.join(tags) if tags else 'none'}")
    problem = tower_problem(arch)
    if problem:  # before any download
        create_open_clip(spec, arch)
    arch_q = arch
    if cfg.get("quick_gelu") and not arch.endswith("quickgelu") and f"{arch}-quickgelu" in open_clip.list_models():
        arch_q = f"{arch}-quickgelu"
    tok = open_clip_tokenizer(spec, arch_q, tokenizer, missing_ok=True)
    local = cached_open_clip_file(cfg)
    hint = (f"Download the checkpoint elsewhere and pass it as open_clip:{arch}"
            f"{'-quickgelu' if cfg.get('quick_gelu') and not arch.endswith('quickgelu') else ''}@/path/to/file.")
    if local is None:
        require_internet(spec, hint)
        try:
            local = open_clip.pretrained.download_pretrained(cfg)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"cannot download the weights of {spec!r}: {err}. {hint}") from None
    model = load_checkpoint(spec, arch_q, Path(local), tok, arch_preprocess_cfg(arch, parsed.tag))
    model.note = f"pretrained {arch}/{parsed.tag} from {local}"
    return model


def cached_open_clip_file(cfg: dict) -> str | None:
    """The pretrained file if it is already on disk (HF cache or open_clip's URL cache)."""
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        if try_to_load_from_cache is not None:
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for name in names:
                found = try_to_load_from_cache(repo, name)
                if isinstance(found, str) and Path(found).is_file():
                    return found
    url = cfg.get("url", "")
    if url:
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None
