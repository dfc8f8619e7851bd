"""ClipModel: a CLIP-like model opened up (our HookedViT image tower, its preprocessing, the native
text tower behind ``encode_text``), whatever backend loaded it."""

from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ClipInterpretError
from ..images import Preprocess
from .hooked_vit import HookedViT

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained (and maximal) logit scale, for a model that records none


TOKENIZER_HINT = ("pass a folder of its Hugging Face tokenizer files (tokenizer.json, or spiece.model and its "
                  "config): load_model(spec, tokenizer=\"/path/to/folder\") or --tokenizer /path/to/folder")


class MissingTokenizer:
    """Stands for a tokenizer that could not be had (``reason`` says why): the model is loaded image-only."""

    def __init__(self, reason: str):
        self.reason = reason


def tokenizer_size(tok) -> int | None:
    """How many token ids a tokenizer can give (its vocabulary with added tokens), when it says:
    Hugging Face tokenizers, open_clip's HFTokenizer over one, and the CLIP BPE; None otherwise."""
    for candidate in (tok, getattr(tok, "tokenizer", None)):
        if candidate is None:
            continue
        size = getattr(candidate, "vocab_size", None)
        if hasattr(candidate, "get_vocab") and hasattr(candidate, "__len__"):  # Hugging Face: with added tokens
            return int(len(candidate))
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        encoder = getattr(candidate, "encoder", None)
        if isinstance(encoder, dict):  # open_clip's SimpleTokenizer
            return len(encoder)
    return None


def check_vocabulary(spec: str, tok, rows: int | None) -> None:
    """A given tokenizer must give only ids the text tower has embeddings for; one clear error otherwise."""
    from ..errors import ModelLoadError

    size = tokenizer_size(tok)
    if rows and size and size > rows:
        raise ModelLoadError(f"the tokenizer given for {spec!r} has a vocabulary of {size:,} tokens, but the model's "
                             f"text tower has {rows:,} token embeddings (ids must be below {rows:,}): it is not this "
                             "model's tokenizer; pass the model's own (a folder of its tokenizer files)")


class TextEncoder:
    """Tokenise and encode texts with a native text tower; returns unit embeddings. ``vocab_rows``: the
    text tower's token embeddings; a tokenizer id at or above it is one clear error."""

    available = True

    def __init__(self, tokenize: Callable[[list[str]], dict], n_tokens: Callable[[str], int],
                 encode: Callable[..., torch.Tensor], context_length: int, vocab_rows: int | None = None):
        self._tokenize = tokenize
        self._n_tokens = n_tokens
        self._encode = encode
        self.context_length = context_length
        self.vocab_rows = vocab_rows

    def _check_ids(self, batch: dict) -> None:
        ids = batch.get("input_ids", batch.get("text"))
        if self.vocab_rows and isinstance(ids, torch.Tensor) and ids.numel() and int(ids.max()) >= self.vocab_rows:
            raise ClipInterpretError(f"the tokenizer gave token id {int(ids.max()):,}, but the text tower has "
                                     f"{self.vocab_rows:,} token embeddings (ids must be below {self.vocab_rows:,}): "
                                     "it is not this model's tokenizer; " + TOKENIZER_HINT)

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
                batch = self._tokenize(texts[start:start + batch_size])
                self._check_ids(batch)
                batch = {k: v.to(where) for k, v in batch.items()}
                with compute(where, precision):
                    emb = self._encode(**batch)
                emb = emb.float()
                out.append((emb / emb.norm(dim=-1, keepdim=True)).cpu())
        return torch.cat(out)


class NoTextEncoder(TextEncoder):
    """The text side of a model loaded image-only (no tokenizer could be had): every text call is one
    clear error saying how to give the tokenizer."""

    available = False

    def __init__(self, spec: str, reason: str, context_length: int = 0):
        self.spec, self.reason = spec, reason
        super().__init__(self._refuse, self._refuse, self._refuse, context_length)

    def message(self) -> str:
        return f"{self.spec!r} was loaded image-only ({self.reason}), so it cannot encode texts; {TOKENIZER_HINT}"

    def _refuse(self, *args, **kwargs):
        raise ClipInterpretError(self.message())

    def __call__(self, texts, *args, **kwargs) -> torch.Tensor:
        self._refuse()


def image_only(spec: str, reason: str, context_length: int = 0) -> NoTextEncoder:
    """A NoTextEncoder, with the one-line warning that the model is loaded image-only."""
    warnings.warn(f"{spec}: loaded image-only: {reason}; text calls need its tokenizer "
                  "(tokenizer=\"/path/to/folder\" or --tokenizer /path/to/folder)", stacklevel=4)
    return NoTextEncoder(spec, reason, context_length)


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
        kind = ("RANDOM weights" if self.random_weights  # in memory: the caller's weights, random or trained
                else "in-memory weights" if self.spec.startswith("<in-memory") else "loaded weights")
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


def native_logits(native: nn.Module | None) -> tuple[float, float | None]:
    """(logit scale, logit bias or None) of a native model: exp of its learned log scale; the bias of
    SigLIP's sigmoid loss where there is one."""
    scale = getattr(native, "logit_scale", None)
    bias = getattr(native, "logit_bias", None)
    return (float(scale.detach().exp().reshape(-1)[0]) if isinstance(scale, torch.Tensor) else DEFAULT_LOGIT_SCALE,
            float(bias.detach().reshape(-1)[0]) if isinstance(bias, torch.Tensor) else None)
