"""load_model: a spec string (or an in-memory model) -> ClipModel.

A ClipModel holds our HookedViT image tower, its preprocessing, and the native
text tower behind ``encode_text``. Weights that are not on disk need the
internet; when it cannot be reached the call fails in seconds with a message
naming the spec and how to point at a local file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ClipInterpretError, ModelLoadError
from ..images import OPENAI_MEAN, OPENAI_STD, Preprocess
from .convert import from_hf, from_open_clip
from .hooked_vit import HookedViT
from .spec import ModelSpec, parse_spec

# Where a download would go; probed (with a short timeout) before any download so
# that an offline machine fails in seconds instead of retrying for minutes.
PROBE_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0
RANDOM_INIT_SEED = 0

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


def _require_internet(spec: str, local_hint: str) -> None:
    """Raise at once if a download cannot work, naming the spec and the local alternative."""
    why = "offline mode is set (HF_HUB_OFFLINE / CLIP_INTERPRET_OFFLINE)" if _offline_flag() else \
        f"the internet is not reachable ({PROBE_HOST[0]} did not answer within {PROBE_TIMEOUT_S:g} s)"
    if _offline_flag() or not _internet_reachable():
        raise ModelLoadError(f"cannot load {spec!r}: its weights are not on this machine and {why}. {local_hint}")


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
    """A CLIP-like model opened up: HookedViT image tower, preprocessing, text encoder."""

    def __init__(self, spec: str, vit: HookedViT, preprocess: Preprocess, text: TextEncoder,
                 native: nn.Module | None = None, random_weights: bool = False, note: str = "",
                 precision: str = "fp32"):
        self.spec = spec
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
        return self.vit.proj.device

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
_registered = False


def registered_open_clip():
    """open_clip, with our model configs (tiny ``test-*`` towers, ``toy``) registered once."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def open_clip_architectures() -> list[str]:
    """open_clip architectures whose image tower is a ViT we can decompose."""
    open_clip = registered_open_clip()
    names = []
    for name in open_clip.list_models():
        if name.startswith("test-"):
            continue  # tiny towers for the test suite; loadable, not advertised
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        if isinstance(vision.get("layers"), int) and not vision.get("timm_model_name") \
                and not vision.get("attentional_pool") and vision.get("pool_type", "tok") == "tok" \
                and not any(vision.get(k) for k in ("qk_norm", "scaled_cosine_attn", "scale_heads",
                                                    "scale_attn_inner", "scale_attn", "scale_fc")) \
                and not vision.get("block_type"):
            names.append(name)
    return names


def _open_clip_text(model: nn.Module, tokenizer=None) -> TextEncoder:
    open_clip = registered_open_clip()
    context = int(getattr(model, "context_length", 77) or 77)
    tok = tokenizer if tokenizer is not None else open_clip.tokenizer.SimpleTokenizer(context_length=context)
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


def open_clip_preprocess(model: nn.Module, image_size) -> Preprocess:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if cfg.get("resize_mode", "shortest") != "shortest":
        warnings.warn(f"open_clip resize_mode {cfg['resize_mode']!r} replaced by 'shortest' (resize + centre crop)")
    return Preprocess(
        image_size=(int(size[0]), int(size[1])),
        mean=tuple(float(m) for m in cfg.get("mean", OPENAI_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", OPENAI_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def _wrap_open_clip(spec: str, model: nn.Module, tokenizer=None, random_weights=False, note="",
                    keep_native_visual=True) -> ClipModel:
    model.eval()
    vit = from_open_clip(model.visual)
    preprocess = open_clip_preprocess(model, vit.cfg.image_size)
    if not keep_native_visual:
        model.visual = nn.Identity()  # our HookedViT replaces it; the text tower stays
    return ClipModel(spec, vit, preprocess, _open_clip_text(model, tokenizer), native=model,
                     random_weights=random_weights, note=note)


def create_open_clip(spec: str, arch: str, quick_gelu: bool = False, seed: int = RANDOM_INIT_SEED) -> nn.Module:
    open_clip = registered_open_clip()
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().replace("_", "-") == arch.lower().replace("_", "-")]
        hint = f" Did you mean {close[0]!r}?" if close else " `clip-interpret models` lists them."
        raise ModelLoadError(f"unknown open_clip architecture {arch!r} in spec {spec!r}.{hint}")
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if not isinstance(vision.get("layers"), int) or vision.get("timm_model_name"):
        raise ModelLoadError(
            f"{arch!r} (spec {spec!r}) has a {'ResNet' if isinstance(vision.get('layers'), (list, tuple)) else 'timm'} "
            "image tower; only ViT towers with CLS pooling are supported. `clip-interpret models` lists them.")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" for every random init
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random-weight models are reproducible
            return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu,
                                          pretrained_text=False, pretrained_image=False)
    finally:
        root.setLevel(level)


def _read_state_dict(path: Path, spec: str) -> dict[str, torch.Tensor]:
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


def _load_open_clip(spec: str, parsed: ModelSpec) -> ClipModel:
    open_clip = registered_open_clip()
    arch = parsed.arch
    if parsed.random:
        model = create_open_clip(spec, arch)
        return _wrap_open_clip(spec, model, random_weights=True, keep_native_visual=False,
                               note=f"RANDOM WEIGHTS: randomly initialised (seed {RANDOM_INIT_SEED}), not a trained model")
    if parsed.path:
        path = Path(parsed.path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file not found: {path} (spec {spec!r})")
        model = create_open_clip(spec, arch)
        state = _read_state_dict(path, spec)
        state = open_clip.factory.convert_state_dict(model, state) if hasattr(open_clip.factory, "convert_state_dict") else state
        check_state_dict(model, state, f"{path} (spec {spec!r})")
        open_clip.factory.resize_pos_embed(state, model)
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
        return _wrap_open_clip(spec, model, keep_native_visual=False, note=f"weights from {path}")
    # a pretrained tag
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if arch not in open_clip.list_models():
        create_open_clip(spec, arch)  # raises the unknown-architecture error
    cfg = open_clip.get_pretrained_cfg(arch, parsed.tag)
    if not cfg:
        known = ", ".join(tags) if tags else "none"
        raise ModelLoadError(f"unknown pretrained tag {parsed.tag!r} for {arch} (spec {spec!r}); known tags: {known}")
    local = _cached_open_clip_file(cfg)
    hint = (f"Download the checkpoint elsewhere and pass it as open_clip:{arch}"
            f"{'-quickgelu' if cfg.get('quick_gelu') and not arch.endswith('quickgelu') else ''}@/path/to/file.")
    if local is None:
        _require_internet(spec, hint)
        try:
            local = open_clip.pretrained.download_pretrained(cfg)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"cannot download the weights of {spec!r}: {err}. {hint}") from None
    arch_q = arch
    if cfg.get("quick_gelu") and not arch.endswith("quickgelu") and f"{arch}-quickgelu" in open_clip.list_models():
        arch_q = f"{arch}-quickgelu"
    model = _load_open_clip(spec, ModelSpec("open_clip", arch=arch_q, path=str(local)))
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
def _hf_text(model: nn.Module, tokenizer) -> TextEncoder:
    context = int(model.config.text_config.max_position_embeddings)
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
            return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

        def n_tokens(text):
            return len(tokenizer(text)["input_ids"])

    def encode(input_ids, attention_mask):
        out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return TextEncoder(tokenize, n_tokens, encode, context)


def _hf_preprocess(vit: HookedViT, folder: str | None) -> Preprocess:
    mean, std, interpolation = OPENAI_MEAN, OPENAI_STD, "bicubic"
    if folder and (Path(folder) / "preprocessor_config.json").is_file():
        import json

        cfg = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
        interpolation = {2: "bilinear", 3: "bicubic", 0: "nearest", 1: "lanczos"}.get(cfg.get("resample", 3), "bicubic")
    return Preprocess(image_size=vit.cfg.image_size, mean=mean, std=std, interpolation=interpolation)


def _wrap_hf(spec: str, model: nn.Module, tokenizer=None, folder: str | None = None, note="") -> ClipModel:
    model.eval()
    if not hasattr(model, "vision_model") or not hasattr(model, "visual_projection"):
        raise ModelLoadError(f"{spec!r} is not a Hugging Face CLIPModel (it has no vision_model and visual_projection)")
    vit = from_hf(model.vision_model, model.visual_projection)
    return ClipModel(spec, vit, _hf_preprocess(vit, folder), _hf_text(model, tokenizer), native=model, note=note)


def _load_hf(spec: str, parsed: ModelSpec) -> ClipModel:
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    source = parsed.path or parsed.hf_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=True)
        except OSError:
            if parsed.path:
                raise ModelLoadError(f"{parsed.path} (spec {spec!r}) is not a Hugging Face CLIP folder: "
                                     "it needs config.json and model weights (save_pretrained writes both)") from None
            _require_internet(spec, "Download the model elsewhere (e.g. with `huggingface-cli download`) "
                                    "and pass its folder as hf:/path/to/folder.")
            try:
                model = CLIPModel.from_pretrained(source)
            except OSError as err:
                raise ModelLoadError(f"cannot load Hugging Face model {source!r} (spec {spec!r}): {err}") from None
        except ValueError as err:
            raise ModelLoadError(f"cannot load {spec!r} as a Hugging Face CLIPModel: {err}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception:  # noqa: BLE001 - a folder without tokenizer files falls back to CLIP BPE
            tokenizer = None
    finally:
        hf_logging.set_verbosity(verbosity)
    folder = parsed.path or None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(source, local_files_only=True)
        except Exception:  # noqa: BLE001
            folder = None
    return _wrap_hf(spec, model, tokenizer, folder, note=f"Hugging Face {source}")


# ------------------------------------------------------------------ public API
def load_model(spec: Any, tokenizer=None, device: str | torch.device = "auto", precision: str = "fp32") -> ClipModel:
    """Load a CLIP-like model into a ClipModel.

    ``spec`` is a spec string (see ``clip_interpret.models.spec``) or an
    already-built open_clip ``CLIP`` / Hugging Face ``CLIPModel``. For in-memory
    models whose tokenizer is not the standard CLIP BPE, pass ``tokenizer``.
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
            model = _wrap_open_clip(f"<in-memory open_clip {kind}>", spec, tokenizer=tokenizer,
                                    note="in-memory open_clip model")
        elif hasattr(spec, "vision_model") and hasattr(spec, "get_text_features"):
            model = _wrap_hf(f"<in-memory Hugging Face {kind}>", spec, tokenizer=tokenizer, note="in-memory HF model")
        else:
            raise ModelLoadError(f"cannot use a {kind} as a CLIP model; pass an open_clip CLIP, a Hugging Face "
                                 "CLIPModel or a spec string")
        return model.to(device, precision)
    if not isinstance(spec, str):
        raise ModelLoadError(f"expected a model spec string or a model object, got {type(spec).__name__}")
    parsed = parse_spec(spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*QuickGELU.*")
        if parsed.source == "toy":
            model = _load_toy(spec)
        elif parsed.source == "open_clip":
            model = _load_open_clip(spec, parsed)
        else:
            model = _load_hf(spec, parsed)
    return model.to(device, precision)
