"""Train the toy CLIP on the known-answer world (CPU, minutes).

The model is the open_clip config ``toy`` (models/configs/toy.json): a ViT image
tower (patch 8, 64 x 64 images, 6 layers x 8 heads) and a small text tower with
the CLIP BPE tokenizer, trained with the symmetric contrastive loss. Training
sample ``k`` is image ``k`` of the world with ``world_seed``, so a run is
reproducible and resumes exactly: a checkpoint holds the model, the optimiser
and the step, and is written atomically every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ClipInterpretError
from .world import PROPERTIES, generate

MODEL_NAME = "toy"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (a resumed run must match it)."""

    model: str = MODEL_NAME
    steps: int = 1800
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 2e-5
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    world_seed: int = 0
    group: int = 0  # hard-negative groups of images sharing properties (see batch_attributes)
    n_shared: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(cfg: TrainConfig):
    from ..models.loader import create_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return create_open_clip(f"open_clip:{cfg.model}", cfg.model, seed=cfg.seed)


def batch_attributes(start: int, size: int, world_seed: int, group: int, n_shared: int) -> list[dict]:
    """Hard negatives: the batch comes in groups of ``group`` images that share ``n_shared``
    randomly chosen properties, so the loss cannot be met by the easiest properties alone.
    Each image's own attributes stay uniformly distributed."""
    if group <= 1 or n_shared <= 0:
        return [{} for _ in range(size)]
    rng = np.random.default_rng([world_seed, 7919, start])
    names = list(PROPERTIES)
    out = []
    for first in range(0, size, group):
        shared = rng.choice(len(names), size=min(n_shared, len(names)), replace=False)
        fixed = {names[k]: PROPERTIES[names[k]][int(rng.integers(0, len(PROPERTIES[names[k]])))] for k in shared}
        out += [fixed] * min(group, size - first)
    return out


def batch_tensors(start: int, size: int, world_seed: int, preprocess, tokenizer, context: int,
                  group: int = 0, n_shared: int = 0):
    images, captions = [], []
    for offset, fixed in enumerate(batch_attributes(start, size, world_seed, group, n_shared)):
        item = generate(start + offset, world_seed, attributes=fixed)
        images.append(item.image)
        captions.append(item.caption)
    return preprocess.batch(images), tokenizer(captions, context_length=context)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), checkpoint_every: int = 100,
          log=print, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) in ``out_dir``; returns a summary. ``stop_after`` ends early (for tests)."""
    from tqdm import tqdm

    from ..models.loader import open_clip_preprocess, registered_open_clip

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipInterpretError(f"cannot create training folder {out}: {err.strerror or err}") from None
    ckpt_path = out / "checkpoint.pt"
    model = build_model(cfg)
    open_clip = registered_open_clip()
    context = model.context_length
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
    preprocess = open_clip_preprocess(model, model.visual.image_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    start, history, elapsed = 0, [], 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("config") != cfg.to_dict():
            theirs = state.get("config", {})
            diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs now {v!r}" for k, v in cfg.to_dict().items()
                     if theirs.get(k) != v]
            raise ClipInterpretError(f"{ckpt_path} was trained with a different config ({'; '.join(diffs)}); "
                                     "resume with the same options or choose another --out folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], state["history"], state.get("elapsed_s", 0.0)
        log(f"resuming from step {start} of {cfg.steps} ({ckpt_path})")
    log("config: " + json.dumps(cfg.to_dict()))
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc="training toy CLIP", unit="step", disable=not progress)
    t0 = time.perf_counter()
    step = start
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        pixels, tokens = batch_tensors(step * cfg.batch_size, cfg.batch_size, cfg.world_seed, preprocess,
                                       tokenizer, context, cfg.group, cfg.n_shared)
        image_features, text_features, logit_scale = model(pixels, tokens)[:3]
        loss = contrastive_loss(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == end:
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                          "config": cfg.to_dict(), "history": history,
                          "elapsed_s": elapsed + time.perf_counter() - t0}, ckpt_path)
    bar.close()
    elapsed += time.perf_counter() - t0
    model.eval()
    return {"model": model, "steps_done": end, "history": history, "elapsed_s": elapsed,
            "checkpoint": str(ckpt_path), "finished": end >= cfg.steps}


def export_weights(model, path: str | Path) -> str:
    """Write fp16 safetensors weights; returns their sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    from ..models.loader import sha256_file

    return sha256_file(path)


def config_from_dict(data: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})
