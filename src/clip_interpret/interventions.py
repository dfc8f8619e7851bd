"""Interventions on the forward: ablate or patch heads, MLPs and attention layers.

A **target** is a head (``L10.H3``: its result z, every token), an MLP (``MLP10``:
its output) or a whole attention layer (``ATTN10``: its output). A **mode** says
what replaces it: ``zero``; ``mean`` (its mean over reference images, per token
position); ``patch`` (its value on other images, image for image).

Two effects, always named as such:

* **total effect**: the forward re-run with hooks that replace the targets, so the
  change flows through every later layer (``HookedViT.run_with_hooks``);
* **direct effect**: the unmodified forward, with only the targets' change *at the
  CLS position* added to the final residual stream (the path that skips every later
  layer), then the final LayerNorm and projection. In an attention-pooled tower
  (SigLIP) the change at every token is added, then the final LayerNorm and the
  pooling head (in a CoCa tower its attentional pooler, the pooled row's LayerNorm
  and the projection). No re-run of the blocks: it comes from the decomposition's own pass.

The direct effect is the total effect with everything after the target frozen at
its unmodified value: for the last MLP (nothing follows it) the two are the same;
the last layer's heads are followed by the last MLP; elsewhere the difference is
how much of the target's effect goes through later layers.
(The mean-ablation study of ``ablation.py`` is another direct effect: it replaces
stored pieces in the joint space with the final LayerNorm scale frozen.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .decompose import parse_head
from .device import compute
from .errors import ClipInterpretError

MODES = ("zero", "mean", "patch")
EFFECTS = ("direct", "total")
_MLP = re.compile(r"^MLP(\d+)$", re.IGNORECASE)
_ATTN = re.compile(r"^ATTN(\d+)$", re.IGNORECASE)


@dataclass
class Targets:
    """What an intervention replaces: heads (layer, head), MLPs and attention layers (layer numbers)."""

    heads: list[tuple[int, int]] = field(default_factory=list)
    mlps: list[int] = field(default_factory=list)
    attns: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, spec, cfg) -> "Targets":
        """``"L10.H3,MLP9,ATTN8"`` (or a list of such names) -> Targets, checked against the model."""
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        out = cls()
        for item in [i for i in items if i != ""]:
            if isinstance(item, str) and (_MLP.match(item) or _ATTN.match(item)):
                layer = int((_MLP.match(item) or _ATTN.match(item)).group(1))
                (out.mlps if _MLP.match(item) else out.attns).append(layer)
            else:
                layer, head = parse_head(item)
                if not 0 <= head < cfg.heads:
                    raise ClipInterpretError(f"head L{layer}.H{head} does not exist: layers have heads "
                                             f"0-{cfg.heads - 1}")
                out.heads.append((layer, head))
        for layer in [h[0] for h in out.heads] + out.mlps + out.attns:
            if not 0 <= layer < cfg.layers:
                raise ClipInterpretError(f"layer {layer} does not exist: the model has layers 0-{cfg.layers - 1}")
        if not (out.heads or out.mlps or out.attns):
            raise ClipInterpretError("no target named: give heads (L10.H3), MLPs (MLP10) or attention layers "
                                     "(ATTN10)")
        return out

    def points(self) -> list[str]:
        """The hook points the targets live at."""
        names = [f"blocks.{layer}.attn.hook_z" for layer in sorted({h[0] for h in self.heads})]
        names += [f"blocks.{layer}.hook_mlp_out" for layer in sorted(set(self.mlps))]
        return names + [f"blocks.{layer}.hook_attn_out" for layer in sorted(set(self.attns))]

    def describe(self) -> str:
        return ", ".join([f"L{layer}.H{h}" for layer, h in self.heads] + [f"MLP{m}" for m in self.mlps]
                         + [f"ATTN{a}" for a in self.attns])


@torch.no_grad()
def activations(vit, pixels: torch.Tensor, targets: Targets, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The targets' activations on ``pixels`` (every token): what ``patch`` puts in."""
    with compute(pixels.device, precision):
        _, cache = vit.run_with_cache(pixels, names_filter=targets.points())
    return {name: cache[name].float() for name in targets.points()}


@torch.no_grad()
def mean_activations(vit, batches, targets: Targets, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The targets' activations averaged over the images of ``batches`` (pixel tensors), per token
    position: what ``mean`` puts in (float64 sums)."""
    sums, n = {}, 0
    for pixels in batches:
        for name, value in activations(vit, pixels, targets, precision).items():
            total = value.double().sum(dim=0)
            sums[name] = total if name not in sums else sums[name] + total
        n += pixels.shape[0]
    if n == 0:
        raise ClipInterpretError("no reference images to average over")
    return {name: (total / n).float() for name, total in sums.items()}


def _replacement(mode: str, values: dict | None, name: str, like: torch.Tensor) -> torch.Tensor:
    if mode == "zero":
        return torch.zeros_like(like)
    if values is None or name not in values:
        raise ClipInterpretError(f"mode {mode!r} needs the targets' values ({name} is missing)")
    value = values[name].to(like.device, like.dtype)
    if mode == "mean":
        value = value.expand_as(like)  # [T, ...] over the batch
    elif value.shape != like.shape:
        raise ClipInterpretError(f"patching {name}: the source activations have shape {list(value.shape)}, "
                                 f"the images' {list(like.shape)}; give as many source images as images")
    return value


def hooks(targets: Targets, mode: str = "mean", values: dict | None = None) -> list:
    """Forward hooks ``(name, fn)`` that replace the targets (for ``run_with_hooks`` / total effects)."""
    if mode not in MODES:
        raise ClipInterpretError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in targets.heads:
        by_layer.setdefault(layer, []).append(head)
    out = []
    for layer, heads in by_layer.items():
        def replace_heads(z, name, heads=heads):
            new = _replacement(mode, values, name, z)
            z = z.clone()
            z[:, heads] = new[:, heads, :z.shape[2]]  # [B, H, T, d]
            return z
        out.append((f"blocks.{layer}.attn.hook_z", replace_heads))
    for name in targets.points():
        if not name.endswith("hook_z"):
            out.append((name, lambda act, name: _replacement(mode, values, name, act)))
    return out


@torch.no_grad()
def total_effect(vit, pixels: torch.Tensor, targets: Targets, mode: str = "mean", values: dict | None = None,
                 precision: str = "fp32") -> torch.Tensor:
    """Unit embeddings [B, D] with the targets replaced in the forward (effects through later layers)."""
    with compute(pixels.device, precision):
        emb = vit.run_with_hooks(pixels, hooks(targets, mode, values)).float()
    return emb / emb.norm(dim=-1, keepdim=True)


@torch.no_grad()
def direct_effect(vit, pixels: torch.Tensor, targets: Targets, mode: str = "mean", values: dict | None = None,
                  precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(unmodified, direct-effect) unit embeddings [B, D]: the targets' change at the rows that reach
    the embedding (the CLS position, or every token of an attention-pooled tower) is added to the
    final residual stream only; the blocks are not re-run."""
    from .models.hooked_vit import HookPoints

    if mode not in MODES:
        raise ClipInterpretError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    points = HookPoints(vit, (), names_filter=targets.points(), cache={})
    stream = {}
    points.add(f"blocks.{vit.cfg.layers - 1}.hook_resid_post", lambda x, name: stream.update(final=x))
    with compute(pixels.device, precision):
        vit.run(pixels, points)
    cache = points.cache
    final = stream["final"].float()  # [B, R, width]: the CLS row alone, or every row the head reads
    rows = final.shape[1]
    delta = torch.zeros_like(final)
    with torch.autocast(device_type=pixels.device.type, enabled=False):
        for layer in sorted({h[0] for h in targets.heads}):
            name = f"blocks.{layer}.attn.hook_z"
            z = cache[name][:, :, :rows].float()  # [B, H, R, d]
            new = _replacement(mode, values, name, cache[name].float())[:, :, :rows]
            change = torch.zeros_like(z)
            heads = [h for l, h in targets.heads if l == layer]
            change[:, heads] = new[:, heads] - z[:, heads]
            block = vit.blocks[layer]
            if block.linear_output:  # the block's own output map, without its bias (which does not change)
                delta += block.attn_output(vit.merge_heads(change), bias=False)
            else:  # a norm inside the map (over the heads, or a post-norm): the difference of the two outputs
                delta += block.attn_output(vit.merge_heads(z + change)) - block.attn_output(vit.merge_heads(z))
        for name in targets.points():
            if not name.endswith("hook_z"):
                act = cache[name].float()
                delta += (_replacement(mode, values, name, act) - act)[:, :rows]
        full, direct = vit.head(final), vit.head(final + delta)
    return full / full.norm(dim=-1, keepdim=True), direct / direct.norm(dim=-1, keepdim=True)
