"""load_model: a spec string (or an in-memory model) -> ClipModel.

A ClipModel holds our HookedViT image tower, its preprocessing, and the native
text tower behind ``encode_text``. Weights that are not on disk need the
internet; when it cannot be reached the call fails in seconds with a message
naming the spec and how to point at a local file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ClipInterpretError, ModelLoadError, UnsupportedModelError
from ..images import OPENAI_MEAN, OPENAI_STD, RESIZE_MODES, Preprocess
from .convert import SUPPORTED, from_hf, from_hf_siglip, from_open_clip
from .hooked_vit import HookedViT
from .spec import ModelSpec, parse_spec

# Where a download would go; probed (with a short timeout) before any download so
# that an offline machine fails in seconds instead of retrying for minutes.
PROBE_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0
RANDOM_INIT_SEED = 0
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained (and maximal) logit scale, for a model that records none

PAPER_MODELS = (
    "open_clip:ViT-B-16/openai",
    "open_clip:ViT-B-32/openai",
    "open_clip:ViT-L-14/openai",
    "open_clip:ViT-B-16/laion2b_s34b_b88k",
    "open_clip:ViT-B-32/datacomp_m_s128m_b4k",
    "open_clip:ViT-L-14/laion2b_s32b_b82k",
)


def _offline_flag() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("CLIP_INTERPRET_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _internet_reachable() -> bool:
    try:
        with socket.create_connection(PROBE_HOST, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _require_internet(spec: str, local_hint: str, what: str = "its weights are") -> None:
    """Raise at once if a download cannot work, naming the spec, what is missing and the local alternative."""
    why = "offline mode is set (HF_HUB_OFFLINE / CLIP_INTERPRET_OFFLINE)" if _offline_flag() else \
        f"the internet is not reachable ({PROBE_HOST[0]} did not answer within {PROBE_TIMEOUT_S:g} s)"
    if _offline_flag() or not _internet_reachable():
        raise ModelLoadError(f"cannot load {spec!r}: {what} not on this machine and {why}. {local_hint}")


class TextEncoder:
    """Tokenise and encode texts with a native text tower; returns unit embeddings."""

    def __init__(self, tokenize: Callable[[list[str]], dict], n_tokens: Callable[[str], int],
                 encode: Callable[..., torch.Tensor], context_length: int):
        self._tokenize = tokenize
        self._n_tokens = n_tokens
        self._encode = encode
        self.context_length = context_length

    def __call__(self, texts: Sequence[str], batch_size: int = 256, device=None, precision: str = "fp32") -> torch.Tensor:
        """Unit embeddings [n, D], float32 on the CPU (computed on ``device`` in ``precision``)."""
        from ..device import compute

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ClipInterpretError("no texts given to encode")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ClipInterpretError(f"text #{i + 1} is empty; give a non-empty description")
        long = [t for t in texts if self._n_tokens(t) > self.context_length]
        if long:
            shown = "; ".join(repr(t[:60] + ("..." if len(t) > 60 else "")) for t in long[:3])
            warnings.warn(f"{len(long)} text(s) longer than the model's context of {self.context_length} tokens "
                          f"were truncated: {shown}", stacklevel=3)
        out = []
        where = torch.device(device or "cpu")
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = {k: v.to(where) for k, v in self._tokenize(texts[start:start + batch_size]).items()}
                with compute(where, precision):
                    emb = self._encode(**batch)
                emb = emb.float()
                out.append((emb / emb.norm(dim=-1, keepdim=True)).cpu())
        return torch.cat(out)


class ClipModel:
    """A CLIP-like model opened up: HookedViT image tower, preprocessing, text encoder.

    ``logit_scale`` and ``logit_bias`` are the native model's (exp of its learned log scale; the
    bias of SigLIP's sigmoid loss, None for CLIP): ``scores`` turns cosine similarities into the
    model's own zero-shot scores. Rankings and zero-shot accuracy (an argmax) do not depend on them.
    """

    def __init__(self, spec: str, vit: HookedViT, preprocess: Preprocess, text: TextEncoder,
                 native: nn.Module | None = None, random_weights: bool = False, note: str = "",
                 precision: str = "fp32", logit_scale: float = DEFAULT_LOGIT_SCALE, logit_bias: float | None = None):
        self.spec = spec
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.precision = precision  # compute precision of the matrix work (fp32, bf16, fp16)
        self.vit = vit.eval()
        self.preprocess = preprocess
        self.text = text
        self.native = native
        self.random_weights = random_weights
        self.note = note
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        c = self.vit.cfg
        kind = "RANDOM weights" if self.random_weights else "loaded weights"
        return (f"ClipModel({self.spec!r}, {c.layers} layers x {c.heads} heads, width {c.width}, "
                f"embedding {c.output_dim}, image {c.image_size[0]}x{c.image_size[1]}, {kind}, "
                f"{self.device}, {self.precision})")

    @property
    def device(self) -> torch.device:
        return self.vit.device

    def to(self, device=None, precision: str | None = None) -> "ClipModel":
        """Move the model to ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and/or set its compute
        precision. Weights stay float32; ``bf16``/``fp16`` run the matrix work under autocast."""
        from ..device import check_precision, resolve_device

        if precision is not None:
            self.precision = check_precision(precision)
        if device is not None:
            where = resolve_device(device)
            self.vit.to(where)
            if self.native is not None:
                self.native.to(where)
        return self

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit text embeddings [n, D] (float32, on the CPU). Long texts are truncated with a warning."""
        return self.text(texts, batch_size=batch_size, device=self.device, precision=self.precision)

    def scores(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Zero-shot scores [B, n] of unit image embeddings [B, D] against unit text embeddings [n, D]:
        with a logit bias (SigLIP), ``sigmoid(logit_scale * cos + logit_bias)``, each text on its own
        (the probability that it matches); without (CLIP), the softmax over the n texts of
        ``logit_scale * cos``."""
        logits = self.logit_scale * image_emb.float() @ text_emb.float().T
        if self.logit_bias is not None:
            return torch.sigmoid(logits + self.logit_bias)
        return torch.softmax(logits, dim=-1)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings [B, D] (float32, on the CPU) from preprocessed pixels [B, 3, H, W]."""
        from ..device import compute

        with compute(self.device, self.precision):
            emb = self.vit(pixels.to(self.device)).float()
        return (emb / emb.norm(dim=-1, keepdim=True)).cpu()

    def fingerprint(self) -> str:
        """A short hash of the image tower's weights (what a run directory is checked against)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.vit.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


# --------------------------------------------------------------------- open_clip
CONFIG_DIR = Path(__file__).parent / "configs"
CLIP_VOCAB = 49408  # the CLIP BPE tokenizer's vocabulary
_registered = False
_NATIVE_REFUSED = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                   "attentional_pool", "block_type")


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
    if isinstance(vision.get("layers"), (list, tuple)):
        return "a ResNet image tower (no attention heads to decompose)"
    if vision.get("timm_model_name"):
        return _timm_problem(vision["timm_model_name"], vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear"),
                             bool(vision.get("timm_proj_bias", False)))
    refused = [k for k in _NATIVE_REFUSED if vision.get(k)]
    if refused:
        return f"a VisionTransformer with {refused[0]} (attentional pooling, qk-norm or scaled attention)"
    if vision.get("pool_type", "tok") != "tok":
        return f"a VisionTransformer with pool_type={vision['pool_type']!r} (only CLS-token pooling)"
    return None


@functools.lru_cache(maxsize=None)
def _timm_problem(name: str, pool: str, proj, proj_bias: bool) -> str | None:
    import timm

    from .convert import check_timm_trunk

    if name not in timm.list_models(module="vision_transformer") + timm.list_models(module="tiny_towers"):
        kind = "an Eva trunk (EVA/EVA02, Perception Encoder: rotary position embeddings, SwiGLU MLPs)" \
            if name in timm.list_models(module="eva") else "a timm trunk that is not a VisionTransformer"
        return f"the timm tower {name!r}, {kind}"
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


def open_clip_architectures() -> list[str]:
    """open_clip architectures whose image tower we can decompose."""
    open_clip = registered_open_clip()
    return [name for name in open_clip.list_models() if not name.startswith("test-")  # tiny test towers
            and tower_problem(name) is None]


def _require_tokenizer(spec: str, name: str, load: Callable[..., Any]):
    """Load a Hugging Face tokenizer from the local cache, else (when it can be reached) the Hub; else one
    clear error naming it and how to pass it."""
    hint = (f"Download it once (`huggingface-cli download {name}`) into the Hugging Face cache, or pass a folder "
            "holding its files: load_model(spec, tokenizer='/path/to/folder') or --tokenizer /path/to/folder")
    try:
        return load(local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not readable): try the Hub below
        pass
    _require_internet(spec, hint, what=f"its text tower's tokenizer {name!r} is")
    try:
        return load()
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer {name!r} of {spec!r}: {err}. {hint}") from None


def open_clip_tokenizer(spec: str, arch: str, tokenizer=None):
    """The tokenizer of an open_clip architecture: ``tokenizer`` when given (a tokenizer, or a local folder
    of Hugging Face tokenizer files), else the architecture's own (open_clip's ``get_tokenizer``: the CLIP
    BPE, or the Hugging Face tokenizer its config names, from the cache or the Hub)."""
    open_clip = registered_open_clip()
    text = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    context = text.get("context_length", 77)
    kwargs = dict(text.get("tokenizer_kwargs", {}), context_length=context, tokenizer_mode=text.get("tokenizer_mode"))
    if tokenizer is not None:
        return _tokenizer_folder(spec, tokenizer, lambda folder, **kw: open_clip.tokenizer.HFTokenizer(
            folder, **kwargs, **kw))
    name = text.get("hf_tokenizer_name")
    if not name:
        return open_clip.get_tokenizer(arch)
    return _require_tokenizer(spec, name, lambda **kw: open_clip.tokenizer.HFTokenizer(name, **kwargs, **kw))


def _tokenizer_folder(spec: str, folder, load: Callable[..., Any]):
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer folder not found: {path} (for {spec!r}); pass a folder holding a Hugging "
                             "Face tokenizer's files (tokenizer.json or the vocabulary files it names)")
    try:
        return load(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path} does not hold a readable Hugging Face tokenizer (for {spec!r}): {err}") from None


def _in_memory_tokenizer(model: nn.Module, tokenizer=None):
    """An in-memory open_clip model's tokenizer: ``tokenizer`` (a tokenizer, or a folder of Hugging Face
    tokenizer files), else the CLIP BPE, only for a text tower with its vocabulary."""
    open_clip = registered_open_clip()
    context = int(getattr(model, "context_length", 77) or 77)
    if isinstance(tokenizer, (str, Path)):
        return _tokenizer_folder("<in-memory model>", tokenizer, lambda folder, **kw: open_clip.tokenizer.HFTokenizer(
            folder, context_length=context, **kw))
    if tokenizer is not None:
        return tokenizer
    text = getattr(model, "text", model)
    embedding = getattr(text, "token_embedding", None)
    vocab = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None
    if vocab != CLIP_VOCAB:
        what = f"a vocabulary of {vocab} tokens" if vocab else f"a {type(text).__name__} text tower"
        raise ModelLoadError(f"this open_clip model has {what}, not the CLIP tokenizer's {CLIP_VOCAB}: pass its "
                             "tokenizer, e.g. load_model(model, tokenizer=open_clip.get_tokenizer('ARCH')) or a "
                             "folder of Hugging Face tokenizer files")
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def _open_clip_text(model: nn.Module, tok) -> TextEncoder:
    context = int(getattr(model, "context_length", None) or getattr(tok, "context_length", None) or 77)
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

    return TextEncoder(tokenize, n_tokens, encode, context)


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


def _logits(native: nn.Module | None) -> tuple[float, float | None]:
    """(logit scale, logit bias or None) of a native model: exp of its learned log scale; the bias of
    SigLIP's sigmoid loss where there is one."""
    scale = getattr(native, "logit_scale", None)
    bias = getattr(native, "logit_bias", None)
    return (float(scale.detach().exp().reshape(-1)[0]) if isinstance(scale, torch.Tensor) else DEFAULT_LOGIT_SCALE,
            float(bias.detach().reshape(-1)[0]) if isinstance(bias, torch.Tensor) else None)


def _wrap_open_clip(spec: str, model: nn.Module, tokenizer, random_weights=False, note="",
                    keep_native_visual=True, preprocess_cfg: dict | None = None, in_memory: bool = False) -> ClipModel:
    """``tokenizer``: the architecture's (resolved before building, so that a missing one fails at once);
    ``in_memory``: a model object of unknown architecture, whose tokenizer is resolved once its image
    tower is known to be supported (``_in_memory_tokenizer``)."""
    model.eval()
    vit = from_open_clip(model.visual)
    if in_memory:
        tokenizer = _in_memory_tokenizer(model, tokenizer)
    preprocess = open_clip_preprocess(model, vit.cfg.image_size, preprocess_cfg)
    if not keep_native_visual:
        model.visual = nn.Identity()  # our HookedViT replaces it; the text tower stays
    scale, bias = _logits(model)
    return ClipModel(spec, vit, preprocess, _open_clip_text(model, tokenizer), native=model,
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


def read_state_dict(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (safetensors, torch or TorchScript), or a clear error naming it."""
    open_clip = registered_open_clip()
    try:
        state = open_clip.factory.load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - any reader failure means "not a checkpoint we can read"
        try:  # TorchScript archives (OpenAI's original .pt files)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
        except Exception:  # noqa: BLE001
            raise ModelLoadError(f"cannot read checkpoint {path} (spec {spec!r}): {err}") from None
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"checkpoint {path} (spec {spec!r}) holds no state dict")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint of another architecture, naming the first mismatched tensor and both shapes."""
    expected = model.state_dict()
    resized = ("positional_embedding",)  # open_clip interpolates these to the model's grid / context
    for name, tensor in expected.items():
        if name not in state:
            if name.endswith(("logit_bias", "position_ids")):
                continue
            raise ModelLoadError(f"checkpoint {source} does not fit this architecture: tensor {name!r} "
                                 f"(shape {list(tensor.shape)}) is missing from the checkpoint")
        theirs = state[name]
        scalar_like = name in ("logit_scale", "logit_bias") and theirs.numel() == tensor.numel()
        if tuple(theirs.shape) != tuple(tensor.shape) and not name.endswith(resized) and not scalar_like:
            raise ModelLoadError(f"checkpoint {source} is for another architecture: tensor {name!r} has shape "
                                 f"{list(theirs.shape)} in the checkpoint but {list(tensor.shape)} in the model")
    extra = [name for name in state if name not in expected and not name.endswith("position_ids")]
    if extra:
        raise ModelLoadError(f"checkpoint {source} is for another architecture: it has tensor {extra[0]!r} "
                             f"(shape {list(state[extra[0]].shape)}) that the model does not have")


def _load_open_clip(spec: str, parsed: ModelSpec, tokenizer=None) -> ClipModel:
    open_clip = registered_open_clip()
    arch = parsed.arch
    if arch not in open_clip.list_models():
        create_open_clip(spec, arch)  # raises the unknown-architecture error
    if parsed.tag:
        return _load_open_clip_tag(spec, parsed, tokenizer)
    tok = open_clip_tokenizer(spec, arch, tokenizer)  # before building: a missing tokenizer fails in seconds
    if parsed.random:
        model = create_open_clip(spec, arch)
        return _wrap_open_clip(spec, model, tok, random_weights=True, keep_native_visual=False,
                               preprocess_cfg=arch_preprocess_cfg(arch),
                               note=f"RANDOM WEIGHTS: randomly initialised (seed {RANDOM_INIT_SEED}), not a trained model")
    return _load_checkpoint(spec, arch, Path(parsed.path).expanduser(), tok, arch_preprocess_cfg(arch))


def _load_checkpoint(spec: str, arch: str, path: Path, tok, preprocess_cfg: dict) -> ClipModel:
    open_clip = registered_open_clip()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path} (spec {spec!r})")
    model = create_open_clip(spec, arch)
    state = read_state_dict(path, spec)
    state = open_clip.factory.convert_state_dict(model, state) if hasattr(open_clip.factory, "convert_state_dict") else state
    check_state_dict(model, state, f"{path} (spec {spec!r})")
    open_clip.factory.resize_pos_embed(state, model)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    return _wrap_open_clip(spec, model, tok, keep_native_visual=False, note=f"weights from {path}",
                           preprocess_cfg=preprocess_cfg)


def _load_open_clip_tag(spec: str, parsed: ModelSpec, tokenizer=None) -> ClipModel:
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
    tok = open_clip_tokenizer(spec, arch_q, tokenizer)
    local = _cached_open_clip_file(cfg)
    hint = (f"Download the checkpoint elsewhere and pass it as open_clip:{arch}"
            f"{'-quickgelu' if cfg.get('quick_gelu') and not arch.endswith('quickgelu') else ''}@/path/to/file.")
    if local is None:
        _require_internet(spec, hint)
        try:
            local = open_clip.pretrained.download_pretrained(cfg)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"cannot download the weights of {spec!r}: {err}. {hint}") from None
    model = _load_checkpoint(spec, arch_q, Path(local), tok, arch_preprocess_cfg(arch, parsed.tag))
    model.note = f"pretrained {arch}/{parsed.tag} from {local}"
    return model


def _cached_open_clip_file(cfg: dict) -> str | None:
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


# -------------------------------------------------------------------------- toy
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "toyworld" / "weights"


def _load_toy(spec: str) -> ClipModel:
    """The bundled toy CLIP, checked against its recorded checksum, loaded as a local open_clip checkpoint."""
    import json

    card = TOY_WEIGHTS / "toy.json"
    weights = TOY_WEIGHTS / "toy.safetensors"
    if not card.is_file() or not weights.is_file():
        raise ModelLoadError(f"the bundled toy model is missing ({weights}); reinstall clip-interpret, or train one "
                             "with `clip-interpret toyworld train` and load it as open_clip:toy@PATH")
    expected = json.loads(card.read_text())["sha256"]
    if sha256_file(weights) != expected:
        raise ModelLoadError(f"the bundled toy weights {weights} are corrupted (sha256 does not match {card.name}); "
                             "reinstall clip-interpret")
    model = _load_open_clip(spec, ModelSpec("open_clip", arch="toy", path=str(weights)))
    model.note = "the bundled toy CLIP trained on the known-answer world (docs/toy-model.md)"
    return model


# --------------------------------------------------------------------------- HF
HF_CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}


def _is_siglip(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "") in ("siglip", "siglip2")


def _hf_text(model: nn.Module, tokenizer) -> TextEncoder:
    """The text tower of a Hugging Face model: texts padded to its context, as it was trained (CLIP with
    the attention mask; SigLIP with input ids alone, as big_vision and open_clip feed it)."""
    context = int(model.config.text_config.max_position_embeddings)
    siglip = _is_siglip(model)
    if tokenizer is None:
        open_clip = registered_open_clip()
        simple = open_clip.tokenizer.SimpleTokenizer(context_length=context)
        warnings.warn("no Hugging Face tokenizer found with the model; using the CLIP BPE tokenizer "
                      "bundled with open_clip (the same vocabulary as OpenAI CLIP)")

        def tokenize(texts):
            ids = simple(texts, context_length=context)
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

        def n_tokens(text):
            return len(simple.encode(text)) + 2
    else:
        def tokenize(texts):
            out = tokenizer(texts, padding="max_length", truncation=True, max_length=context, return_tensors="pt")
            return {"input_ids": out["input_ids"]} if siglip else \
                {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

        def n_tokens(text):
            return len(tokenizer(text)["input_ids"])

    def encode(input_ids, attention_mask=None):
        out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return TextEncoder(tokenize, n_tokens, encode, context)


def _hf_preprocess(vit: HookedViT, folder: str | None, siglip: bool) -> Preprocess:
    """The image processor's settings (``preprocessor_config.json``), or the model family's defaults:
    CLIP's shortest-side resize and centre crop, SigLIP's squash to the input size with 0.5 mean/std."""
    mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (OPENAI_MEAN, OPENAI_STD)
    interpolation, resize_mode = "bicubic", "squash" if siglip else "shortest"
    if folder and (Path(folder) / "preprocessor_config.json").is_file():
        cfg = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
        interpolation = {2: "bilinear", 3: "bicubic", 0: "nearest", 1: "lanczos"}.get(cfg.get("resample", 3), "bicubic")
        size = cfg.get("size") or {}
        # SigLIP resizes to height x width; SigLIP 2 (NaFlex) to a patch budget, which our fixed grid squashes to
        squash = ("height" in size and not cfg.get("do_center_crop", False)) or "max_num_patches" in cfg
        resize_mode = "squash" if squash else "shortest"
    return Preprocess(image_size=vit.cfg.image_size, mean=mean, std=std, interpolation=interpolation,
                      resize_mode=resize_mode)


def _hf_tokenizer(spec: str, source: str | None, tokenizer, siglip: bool, online: bool = False):
    """A Hugging Face model's own tokenizer: ``tokenizer`` when given (a tokenizer, or a folder of its files),
    else the one saved with the model (the folder, the cache, or the Hub when the model came from there).
    A CLIP model without one falls back to the CLIP BPE (its vocabulary); a SigLIP model cannot."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is not None:
        return _tokenizer_folder(spec, tokenizer, AutoTokenizer.from_pretrained)
    if source is not None:
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=not online)
        except Exception:  # noqa: BLE001 - no tokenizer files with the model
            pass
    if siglip:
        where = f"with {source}" if source else "with this in-memory model"
        raise ModelLoadError(f"cannot load {spec!r}: no tokenizer {where} (SigLIP models need their own: "
                             "tokenizer.json or spiece.model and its config). Save it next to the model "
                             "(tokenizer.save_pretrained(folder)), or pass it: load_model(spec, "
                             "tokenizer=TOKENIZER_OR_FOLDER) or --tokenizer /path/to/folder")
    return None


def _wrap_hf(spec: str, model: nn.Module, tokenizer=None, folder: str | None = None, note="",
             source: str | None = None, online: bool = False) -> ClipModel:
    model.eval()
    siglip = _is_siglip(model)
    if siglip:
        vit = from_hf_siglip(model.vision_model)
    elif hasattr(model, "vision_model") and hasattr(model, "visual_projection"):
        vit = from_hf(model.vision_model, model.visual_projection)
    else:
        raise ModelLoadError(f"{spec!r} is not a Hugging Face CLIPModel, SiglipModel or Siglip2Model (it has no "
                             "vision_model with a projection or an attention-pooling head)")
    tok = _hf_tokenizer(spec, source or folder, tokenizer, siglip, online)
    scale, bias = _logits(model)
    return ClipModel(spec, vit, _hf_preprocess(vit, folder, siglip), _hf_text(model, tok), native=model, note=note,
                     logit_scale=scale, logit_bias=bias)


def _load_hf(spec: str, parsed: ModelSpec, tokenizer=None) -> ClipModel:
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    source = parsed.path or parsed.hf_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    online = False
    if parsed.path and not (Path(parsed.path) / "config.json").is_file():
        raise ModelLoadError(f"{parsed.path} (spec {spec!r}) is not a Hugging Face model folder: it needs config.json "
                             "and model weights (save_pretrained writes both)")
    try:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except OSError:
            if parsed.path:
                raise ModelLoadError(f"{parsed.path} (spec {spec!r}) is not a Hugging Face model folder: "
                                     "it needs config.json and model weights (save_pretrained writes both)") from None
            _require_internet(spec, "Download the model elsewhere (e.g. with `huggingface-cli download`) "
                                    "and pass its folder as hf:/path/to/folder.")
            online = True
            try:
                config = AutoConfig.from_pretrained(source)
            except OSError as err:
                raise ModelLoadError(f"cannot load Hugging Face model {source!r} (spec {spec!r}): {err}") from None
        except ValueError as err:
            raise ModelLoadError(f"cannot load {spec!r} as a Hugging Face model: {err}") from None
        kind = getattr(config, "model_type", "")
        if kind not in HF_CLASSES:
            raise UnsupportedModelError(f"{spec!r} is a Hugging Face {kind!r} model; supported: CLIPModel, "
                                        "SiglipModel, Siglip2Model (model types clip, siglip, siglip2)")
        try:
            model = getattr(transformers, HF_CLASSES[kind]).from_pretrained(source, local_files_only=not online)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load Hugging Face model {source!r} (spec {spec!r}): {err}") from None
        folder = parsed.path or None
        if folder is None:
            try:
                from huggingface_hub import snapshot_download

                folder = snapshot_download(source, local_files_only=True)
            except Exception:  # noqa: BLE001
                folder = None
        return _wrap_hf(spec, model, tokenizer, folder, note=f"Hugging Face {source}", source=source, online=online)
    finally:
        hf_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------ public API
def load_model(spec: Any, tokenizer=None, device: str | torch.device = "auto", precision: str = "fp32") -> ClipModel:
    """Load a CLIP-like model into a ClipModel.

    ``spec`` is a spec string (see ``clip_interpret.models.spec``) or an
    already-built open_clip ``CLIP`` / Hugging Face ``CLIPModel``, ``SiglipModel`` or
    ``Siglip2Model``. Every model gets its own tokenizer (open_clip's for the architecture,
    the Hugging Face model's); ``tokenizer`` replaces it: a tokenizer object (open_clip's or
    Hugging Face's), or a local folder of Hugging Face tokenizer files, which is how a
    tokenizer that is not on this machine is passed offline. An in-memory open_clip model
    whose text tower is not the CLIP BPE's needs it.
    ``device``: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``;
    ``precision``: compute precision ``fp32``, ``bf16`` or ``fp16`` (docs/decomposition.md).
    Whatever the device, every result handed back is on the CPU.
    """
    from ..device import check_precision, resolve_device

    device, precision = resolve_device(device), check_precision(precision)  # bad values fail before loading
    if isinstance(spec, ClipModel):
        return spec.to(device, precision)
    if isinstance(spec, nn.Module):
        kind = type(spec).__name__
        if hasattr(spec, "visual") and hasattr(spec, "encode_text"):
            model = _wrap_open_clip(f"<in-memory open_clip {kind}>", spec, tokenizer, note="in-memory open_clip model",
                                    in_memory=True)
        elif hasattr(spec, "vision_model") and hasattr(spec, "get_text_features"):
            model = _wrap_hf(f"<in-memory Hugging Face {kind}>", spec, tokenizer=tokenizer, note="in-memory HF model")
        else:
            raise ModelLoadError(f"cannot use a {kind} as a CLIP model; pass an open_clip CLIP, a Hugging Face "
                                 "CLIPModel / SiglipModel or a spec string")
        return model.to(device, precision)
    if not isinstance(spec, str):
        raise ModelLoadError(f"expected a model spec string or a model object, got {type(spec).__name__}")
    parsed = parse_spec(spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*QuickGELU.*")
        if parsed.source == "toy":
            model = _load_toy(spec)
        elif parsed.source == "open_clip":
            model = _load_open_clip(spec, parsed, tokenizer)
        else:
            model = _load_hf(spec, parsed, tokenizer)
    return model.to(device, precision)
