"""Where and in what precision the model computes.

``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")``: ``auto`` is the first GPU
when there is one, else the CPU; a GPU that is not there is one clear error naming
the devices that are.

``Precision`` is the *compute* precision (``fp32``, ``bf16``, ``fp16``): matrix
work runs in the lower precision under autocast, while LayerNorm statistics, the
residual stream and the final map into the joint space stay in float32 (see
docs/decomposition.md). It is distinct from the *storage* dtype of a run's shards.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ClipInterpretError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"


def available_devices() -> list[str]:
    """The devices torch can use here, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(gpus)]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A device name -> ``torch.device``, checked against what this machine has."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            index = int(name.split(":", 1)[1]) if ":" in name else 0
        except ValueError:
            raise ClipInterpretError(f"bad device {device!r}; expected {DEVICE_HELP}") from None
        there = available_devices()
        if f"cuda:{index}" not in there:
            why = "this machine has no usable GPU (torch.cuda.is_available() is False)" if len(there) == 1 \
                else f"it has {len(there) - 1} GPU(s)"
            raise ClipInterpretError(f"device {device!r} is not available: {why}; devices here: "
                                     f"{', '.join(there)}. Use --device auto or cpu")
        return torch.device(f"cuda:{index}")
    raise ClipInterpretError(f"unknown device {device!r}; expected {DEVICE_HELP}")


def compute_device(model, device=None) -> torch.device:
    """``device`` when given, else the model's own device (the CPU for a model without one)."""
    return torch.device(device) if device is not None else getattr(model, "device", torch.device("cpu"))


def check_precision(precision: str | None) -> str:
    """A valid precision name (None -> fp32), or a clear error. Called once, where a precision
    enters: ``load_model`` / ``ClipModel.to`` (the model's), a call given one explicitly
    (``resolve_precision``), the CLI's choices."""
    name = (precision or "fp32").strip().lower()
    if name not in PRECISIONS:
        raise ClipInterpretError(f"unknown compute precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return name


def resolve_precision(model, precision: str | None = None) -> str:
    """The compute precision of a call: ``precision`` when given (checked here: it enters here), else
    the model's own (checked when it was set), else fp32 (a bare HookedViT)."""
    if precision is not None:
        return check_precision(precision)
    return getattr(model, "precision", "fp32")


def compute(device: torch.device, precision: str):
    """The context for the matrix work: autocast to ``precision`` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def full_precision(device: torch.device):
    """A context where autocast is off: LayerNorm statistics and the map to the joint space."""
    return torch.autocast(device_type=device.type, enabled=False)


def cores() -> int:
    """CPU cores available to this process (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def out_of_memory_error(device: torch.device, batch_size: int, what: str = "", per_image_bytes: int | None = None,
                        option: str = "--batch-size") -> ClipInterpretError:
    """A clear error for a batch that did not fit on the GPU: what to try instead."""
    free = total = None
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(device)
    memory = f" ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)" if free is not None else ""
    fit = ""
    if per_image_bytes and free:
        n = max(0, int(free * 0.8 // per_image_bytes))
        fit = f"; about {n} image(s) fit at once ({per_image_bytes / 2**20:.0f} MiB each)"
    smaller = max(1, batch_size // 2)
    return ClipInterpretError(f"out of memory on {device}{memory} {what}at batch size {batch_size}{fit}. "
                              f"Try {option} {smaller}" + (" or fewer images per call" if per_image_bytes else ""))
