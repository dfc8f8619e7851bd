"""The Hugging Face backend: CLIPModel, SiglipModel and Siglip2Model, from a hub id (the cache or the
internet), a local folder written by ``save_pretrained``, or a model in memory; their tokenizers and
image processor settings."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError
from ..images import OPENAI_MEAN, OPENAI_STD, Preprocess
from .clip_model import ClipModel, MissingTokenizer, TextEncoder, check_vocabulary, image_only, native_logits
from .convert import from_hf, from_hf_siglip
from .hooked_vit import HookedViT
from .hub import require_internet, tokenizer_folder
from .openclip import registered_open_clip
from .spec import ModelSpec


@contextlib.contextmanager
def quiet_loading():
    """Without transformers' "Loading weights" progress bar (ours say what loads), restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

HF_CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}


def _is_siglip(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "") in ("siglip", "siglip2")


def _hf_text(model: nn.Module, tokenizer, spec: str = "<in-memory model>") -> TextEncoder:
    """The text tower of a Hugging Face model: texts padded to its context, as it was trained (CLIP with
    the attention mask; SigLIP with input ids alone, as big_vision and open_clip feed it)."""
    context = int(model.config.text_config.max_position_embeddings)
    rows = getattr(model.config.text_config, "vocab_size", None)
    siglip = _is_siglip(model)
    if isinstance(tokenizer, MissingTokenizer):
        return image_only(spec, tokenizer.reason, context)
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

    return TextEncoder(tokenize, n_tokens, encode, context, vocab_rows=rows)


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
    A CLIP model without one falls back to the CLIP BPE (its vocabulary); a SigLIP model cannot: it is
    loaded image-only (a ``MissingTokenizer``)."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is not None:
        return tokenizer_folder(spec, tokenizer, AutoTokenizer.from_pretrained)
    if source is not None:
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=not online)
        except Exception:  # noqa: BLE001 - no tokenizer files with the model
            pass
    if siglip:
        where = "with the model" if source else "with this in-memory model"
        return MissingTokenizer(f"no tokenizer {where}; SigLIP models need their own, tokenizer.json or "
                                "spiece.model and its config")
    return None


def wrap_hf(spec: str, model: nn.Module, tokenizer=None, folder: str | None = None, note="",
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
    if tokenizer is not None:  # given: it must fit the text tower
        check_vocabulary(spec, tok, getattr(model.config.text_config, "vocab_size", None))
    scale, bias = native_logits(model)
    return ClipModel(spec, vit, _hf_preprocess(vit, folder, siglip), _hf_text(model, tok, spec), native=model, note=note,
                     logit_scale=scale, logit_bias=bias)


def load_hf(spec: str, parsed: ModelSpec, tokenizer=None) -> ClipModel:
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
            require_internet(spec, "Download the model elsewhere (e.g. with `huggingface-cli download`) "
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
            with quiet_loading():
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
        return wrap_hf(spec, model, tokenizer, folder, note=f"Hugging Face {source}", source=source, online=online)
    finally:
        hf_logging.set_verbosity(verbosity)
