"""Train the toy CLIP on the known-answer world (a CPU in minutes to hours, or a GPU).

The model is an open_clip config (``toy``: models/configs/toy.json, a ViT image
tower with patch 8, 64 x 64 images, 6 layers x 8 heads; ``toy-v2``: patch 4,
width 192) and a small text tower with the CLIP BPE tokenizer, trained with the
symmetric contrastive loss. Training sample ``k`` is image ``k`` of the world
with ``world_seed`` (its attributes fixed in part for hard-negative groups), so
the batch of a step depends only on the config and the step: a run is
reproducible, the same with any number of image workers, and resumes exactly
(a checkpoint holds the model, the optimiser and the step, written atomically
every ``checkpoint_every`` steps) on any device.

Contrast groups (``contrast_group``): part of each batch comes in groups of
images that share every property but ``contrast_n_free`` of ``contrast_free``,
and whose captions name the free ones; within such a group only the free
property tells the captions apart, so the loss cannot be met by the properties
that are easy to see (colour, background, pattern).

Two helps beside the contrastive loss (v2, docs/toy-model.md), both off by default:

* ``probe_weight``: a linear classifier per property on the (unnormalised) image
  embedding, trained with the model (cross-entropy summed over the seven
  properties) and thrown away at export: a direct signal for the properties the
  contrastive loss alone never starts on (shape, position). The exported model
  has no trace of it but what it taught the image tower.
* ``prompt_weight``: each image against one phrase per value of every property,
  worded afresh each step from the world's caption vocabulary
  (``world.value_phrases``, not the evaluation prompts), through the text tower:
  the text tower learns to tell every value apart.
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

from ..device import PRECISIONS, compute
from ..errors import ClipInterpretError
from .world import PROPERTIES, generate, property_name, value_phrases

MODEL_NAME = "toy"
MODELS = ("toy", "toy-v2")  # open_clip configs in models/configs


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
    contrast_group: int = 0  # contrast groups (module doc): size, 0 = none
    contrast_share: float = 0.5  # the share of each batch in contrast groups
    contrast_free: str = "shape,size,count,position"  # the properties a group may leave free
    contrast_n_free: int = 1
    init: str = ""  # weights to start from (safetensors or a checkpoint.pt), "" = random initialisation
    precision: str = "fp32"  # compute precision: fp32, or bf16 / fp16 autocast (the weights stay fp32)
    probe_weight: float = 0.0  # weight of the per-property linear-probe loss on the image embedding (module doc)
    prompt_weight: float = 0.0  # weight of the per-property value-phrase loss through the text tower (module doc)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Refuse settings that cannot train, naming the option."""
        problems = []
        if self.steps <= 0 or self.batch_size <= 1:
            problems.append("--steps must be > 0 and --batch-size > 1")
        if self.contrast_group == 1 or self.contrast_group < 0:
            problems.append("--contrast-group must be 0 (none) or at least 2")
        if not 0 <= self.contrast_share <= 1:
            problems.append("--contrast-share must be in [0, 1]")
        free = [p for p in self.contrast_free.split(",") if p.strip()]
        try:
            free = [property_name(p) for p in free]
        except ClipInterpretError as err:
            problems.append(f"--contrast-free: {err}")
        if self.contrast_group and not 1 <= self.contrast_n_free <= len(free):
            problems.append(f"--contrast-n-free must be between 1 and the {len(free)} properties of --contrast-free")
        if self.probe_weight < 0 or self.prompt_weight < 0:
            problems.append("--probe-weight and --prompt-weight must be >= 0")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if problems:
            raise ClipInterpretError("; ".join(problems))


def build_model(cfg: TrainConfig):
    """The open_clip model of ``cfg.model``, initialised with ``cfg.seed`` or loaded from ``cfg.init``."""
    from ..models.files import check_state_dict, read_state_dict
    from ..models.openclip import create_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_open_clip(f"open_clip:{cfg.model}", cfg.model, seed=cfg.seed)
    if cfg.init:
        path = Path(cfg.init)
        if not path.is_file():
            raise ClipInterpretError(f"--init {cfg.init}: no such file; give a .safetensors file or a checkpoint.pt "
                                     "written by `toyworld train`")
        if path.suffix == ".safetensors":
            state = read_state_dict(path, f"--init {cfg.init}")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)["model"]
            except Exception as err:  # a file that is not a training checkpoint
                raise ClipInterpretError(f"--init {cfg.init} is not a training checkpoint ({err})") from None
        state = {k: v.float() for k, v in state.items()}
        check_state_dict(model, state, f"--init {cfg.init}")
        model.load_state_dict(state)
    return model


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


def contrast_groups(step: int, cfg: TrainConfig) -> list[tuple[dict, tuple[str, ...]]]:
    """The first samples of step ``step``'s batch: (fixed attributes, properties the caption names)
    for each, in contrast groups (module doc); the rest of the batch is drawn freely."""
    if cfg.contrast_group < 2 or cfg.contrast_share <= 0:
        return []
    free_from = [property_name(p) for p in cfg.contrast_free.split(",") if p.strip()]
    rng = np.random.default_rng([cfg.world_seed, 104729, step])
    n_groups = int(round(cfg.batch_size * cfg.contrast_share / cfg.contrast_group))
    out = []
    for _ in range(n_groups):
        free = tuple(free_from[k] for k in sorted(rng.choice(len(free_from), cfg.contrast_n_free, replace=False)))
        fixed = {p: values[int(rng.integers(len(values)))] for p, values in PROPERTIES.items() if p not in free}
        out += [(fixed, free)] * cfg.contrast_group
    return out[:cfg.batch_size]


def batch_items(step: int, cfg: TrainConfig) -> list[tuple[int, dict, tuple[str, ...]]]:
    """(world image index, fixed attributes, always-named properties) of each sample of a step."""
    start = step * cfg.batch_size
    grouped = contrast_groups(step, cfg)
    free = batch_attributes(start, cfg.batch_size, cfg.world_seed, cfg.group, cfg.n_shared)
    return [(start + k, *(grouped[k] if k < len(grouped) else (free[k], ()))) for k in range(cfg.batch_size)]


def batch_tensors(start: int, size: int, world_seed: int, preprocess, tokenizer, context: int,
                  group: int = 0, n_shared: int = 0):
    images, captions = [], []
    for offset, fixed in enumerate(batch_attributes(start, size, world_seed, group, n_shared)):
        item = generate(start + offset, world_seed, attributes=fixed)
        images.append(item.image)
        captions.append(item.caption)
    return preprocess.batch(images), tokenizer(captions, context_length=context)


@dataclass
class _StepBatch:
    """Step -> (uint8 crops [B, 3, H, W], token ids [B, context], property labels [B, 7]); picklable,
    run by the image workers."""

    cfg: TrainConfig
    preprocess: object
    tokenizer: object
    context: int

    def __call__(self, step: int):
        crops, captions, labels = [], [], []
        for index, fixed, mention in batch_items(step, self.cfg):
            item = generate(index, self.cfg.world_seed, attributes=fixed, mention=mention, masks=False)
            crops.append(self.preprocess.crop_uint8(item.image))
            captions.append(item.caption)
            labels.append([values.index(item.attributes[p]) for p, values in PROPERTIES.items()])
        return (torch.stack(crops), self.tokenizer(captions, context_length=self.context),
                torch.tensor(labels, dtype=torch.long))


_MAKE: _StepBatch | None = None  # the batch maker of an image worker (set once, by _worker_init)


def _worker_init(make: _StepBatch) -> None:
    global _MAKE
    torch.set_num_threads(1)
    _MAKE = make


def _worker_batch(step: int):
    return _MAKE(step)


def step_batches(make: _StepBatch, steps: range, workers: int):
    """The batches of ``steps`` in order, made by ``workers`` processes (0: here), a few steps ahead.
    The maker (with its tokenizer, 2 MB pickled) reaches each worker once, not with every step."""
    if workers <= 0:
        for step in steps:
            yield make(step)
        return
    import collections
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_worker_init, initargs=(make,)) as pool:
        pending = collections.deque()
        todo = iter(steps)
        for step in todo:
            pending.append(pool.apply_async(_worker_batch, (step,)))
            if len(pending) >= 2 * workers:
                break
        first = steps.start
        while pending:
            try:
                batch = pending.popleft().get(timeout=600)
            except mp.TimeoutError:
                raise ClipInterpretError(f"an image worker did not deliver a batch within 600 s (killed or stuck) "
                                         f"after step {first}; rerun the same command to resume from the last "
                                         "checkpoint") from None
            first += 1
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(_worker_batch, (nxt,)))
            yield batch


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    logits = (logit_scale * image_features @ text_features.T).float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class PropertyProbes(torch.nn.Module):
    """One linear classifier per property on the image embedding (the ``probe_weight`` help)."""

    def __init__(self, dim: int):
        super().__init__()
        self.sizes = [len(v) for v in PROPERTIES.values()]
        self.linear = torch.nn.Linear(dim, sum(self.sizes))

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor):
        """-> (cross-entropy summed over the properties, correct predictions [7])"""
        logits = self.linear(embedding.float()).split(self.sizes, dim=1)
        loss = sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits))
        correct = torch.stack([(lg.argmax(1) == labels[:, k]).sum() for k, lg in enumerate(logits)])
        return loss, correct


def prompt_loss(image_unit, labels, model, tokenizer, context: int, step: int, cfg: "TrainConfig",
                device) -> torch.Tensor:
    """Each image against one phrase per value of every property (the ``prompt_weight`` help),
    phrases drawn for this step from the caption vocabulary; mean over the properties."""
    rng = np.random.default_rng([cfg.world_seed, 15485863, step])
    phrases, sizes = [], []
    for prop in PROPERTIES:
        values = value_phrases(prop, rng)
        phrases += values
        sizes.append(len(values))
    text = model.encode_text(tokenizer(phrases, context_length=context).to(device), normalize=True)
    logits = model.logit_scale.exp() * image_unit @ text.T
    losses = [F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits.float().split(sizes, dim=1))]
    return sum(losses) / len(losses)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _config_diffs(saved: dict, cfg: TrainConfig) -> list[str]:
    """Differences between a checkpoint's config and ``cfg`` (keys added since count as their defaults)."""
    defaults = TrainConfig().to_dict()
    return [f"{k}: checkpoint {saved.get(k, defaults[k])!r} vs now {v!r}" for k, v in cfg.to_dict().items()
            if saved.get(k, defaults[k]) != v]


def _say(message: str) -> None:
    print(message, flush=True)  # a log redirected to a file shows each checkpoint as it is written


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), checkpoint_every: int = 100,
          log=_say, progress: bool = True, stop_after: int | None = None, device="cpu",
          workers: int = 0) -> dict:
    """Train (or resume) in ``out_dir``; returns a summary. ``stop_after`` ends early (for tests).

    ``device``: where the model trains; ``workers``: processes making the images (0: this one);
    neither changes the batches, so a run may resume on another device or with other workers."""
    from tqdm import tqdm

    from ..models.openclip import open_clip_preprocess, registered_open_clip

    cfg.check()
    device = torch.device(device)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipInterpretError(f"cannot create training folder {out}: {err.strerror or err}") from None
    ckpt_path = out / "checkpoint.pt"
    state = None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diffs = _config_diffs(state.get("config", {}), cfg)
        if diffs:
            raise ClipInterpretError(f"{ckpt_path} was trained with a different config ({'; '.join(diffs)}); "
                                     "resume with the same options or choose another --out folder")
    model = build_model(cfg if state is None else TrainConfig(**{**cfg.to_dict(), "init": ""}))
    open_clip = registered_open_clip()
    context = model.context_length
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
    preprocess = open_clip_preprocess(model, model.visual.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        probes = PropertyProbes(model.visual.output_dim) if cfg.probe_weight > 0 else None
    model.to(device)
    named = list(model.named_parameters()) + ([] if probes is None else list(probes.to(device).named_parameters()))
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start, history, elapsed = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        if probes is not None:
            probes.load_state_dict(state["probes"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], state["history"], state.get("elapsed_s", 0.0)
        log(f"resuming from step {start} of {cfg.steps} ({ckpt_path})")
    log("config: " + json.dumps(cfg.to_dict()))
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc="training toy CLIP", unit="step", disable=not progress)
    make = _StepBatch(cfg, preprocess, tokenizer, context)
    t0 = time.perf_counter()

    def save(step_done: int) -> None:
        _atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "probes": None if probes is None else {k: v.detach().cpu() for k, v in probes.state_dict().items()},
                      "optimizer": optimizer.state_dict(), "step": step_done, "config": cfg.to_dict(),
                      "history": history, "elapsed_s": elapsed + time.perf_counter() - t0,
                      "device": str(device)}, ckpt_path)

    batches = step_batches(make, range(start, end), workers)
    correct, seen = torch.zeros(len(PROPERTIES), device=device), 0  # summed on the device: no sync a step
    for step, (crops, tokens, labels) in zip(range(start, end), batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        pixels = preprocess.normalise(crops.to(device, non_blocking=True))
        labels = labels.to(device)
        with compute(device, cfg.precision):
            image_raw = model.encode_image(pixels)
            image_features = F.normalize(image_raw, dim=-1)
            text_features = model.encode_text(tokens.to(device, non_blocking=True), normalize=True)
            loss = contrastive_loss(image_features, text_features, model.logit_scale.exp())
            if probes is not None:
                probe_loss, right = probes(image_raw, labels)
                loss = loss + cfg.probe_weight * probe_loss
                correct += right
                seen += len(labels)
            if cfg.prompt_weight > 0:
                loss = loss + cfg.prompt_weight * prompt_loss(image_features, labels, model, tokenizer, context,
                                                              step, cfg, device)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == end:
            save(step + 1)
            if seen:
                accuracy = ", ".join(f"{p} {c / seen:.0%}" for p, c in zip(PROPERTIES, correct.tolist()))
                log(f"step {step + 1}: loss {np.mean(history[-checkpoint_every:]):.3f}; "
                    f"training-batch probe accuracy since the last checkpoint: {accuracy}")
                correct, seen = torch.zeros(len(PROPERTIES), device=device), 0
    bar.close()
    elapsed += time.perf_counter() - t0
    model.eval()
    return {"model": model.cpu(), "steps_done": end, "history": history, "elapsed_s": elapsed,
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
    from ..models.files import sha256_file

    return sha256_file(path)


def config_from_dict(data: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})
