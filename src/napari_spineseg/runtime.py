"""Where and how computation runs: devices, mixed precision, autocast, seeds (Qt-free, torch imported lazily).

One public place for what inference, training, fine-tuning and the lesion gate share:
:func:`available_devices`, :func:`resolve_device`, :func:`resolve_precision` (``auto`` → bf16 on
CPUs with native bf16, fp16 on CUDA, else fp32), :func:`training_precision` (the training form,
where ``off`` means fp32 and fp16 needs CUDA), :func:`autocast` (the mixed-precision context) and
:func:`seed_everything`; :func:`resolve_workers` sizes the training data loader to the machine.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "auto_workers",
    "autocast",
    "available_devices",
    "cpu_supports_bf16",
    "resolve_device",
    "resolve_precision",
    "resolve_workers",
    "seed_everything",
    "training_precision",
]


def available_devices() -> list[str]:
    """Devices this machine can run on, best first (``cpu`` always last)."""
    import torch

    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit device is an InputError."""
    device = (device or "auto").lower()
    available = available_devices()
    if device == "auto":
        return available[0]
    base = device.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}: choose auto, cpu, cuda or mps")
    if base not in available:
        raise InputError(f"device {device!r} is not available here (available: {', '.join(available)})")
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX)."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # pragma: no cover - platform probes
            continue
    return False


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` → ``bf16`` on CPUs with native bf16, ``fp16`` on CUDA, else ``fp32``."""
    precision = (precision or "auto").lower()
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"unknown precision {precision!r}: choose auto, fp32, bf16 or fp16")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    if device == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def training_precision(mixed_precision: str, device: str, fp16_needs_cuda: bool = True) -> str:
    """The precision a training run uses: ``off``/``fp32`` → fp32, else :func:`resolve_precision`;
    fp16 off CUDA is an InputError when ``fp16_needs_cuda``."""
    precision = "fp32" if mixed_precision in ("off", "fp32") else resolve_precision(mixed_precision, device)
    if fp16_needs_cuda and precision == "fp16" and not device.startswith("cuda"):
        raise InputError("fp16 mixed precision needs CUDA; use bf16 on CPU")
    return precision


def autocast(device: str, precision: str) -> Any:
    """The mixed-precision context: bf16/fp16 autocast on ``device``'s type, nothing for fp32."""
    if precision in ("bf16", "fp16"):
        import torch

        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_workers(cores: int | None = None, processes: int | None = None) -> int:
    """Data loader workers for a machine: 0 on ≤ 4 cores (workers cost more than they give:
    measured on 2 cores, docs/performance.md), else ``min(12, cores - 2)``, shared among the
    ``processes`` training processes of one machine (``LOCAL_WORLD_SIZE`` under torchrun)."""
    cores = usable_cores() if cores is None else int(cores)
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_process = cores // max(1, processes)
    return 0 if per_process <= 4 else min(12, per_process - 2)


def resolve_workers(workers: int | str | None) -> int:
    """``auto`` (or None) → :func:`auto_workers`; a count ≥ 0 as given; anything else an InputError."""
    if workers is None or (isinstance(workers, str) and workers.strip().lower() == "auto"):
        return auto_workers()
    try:
        count = int(workers)
    except (TypeError, ValueError):
        raise InputError(f"data loader workers: expected a number or auto, got {workers!r}") from None
    if count < 0 or isinstance(workers, bool) or (isinstance(workers, float) and workers != count):
        raise InputError(f"data loader workers: expected a number >= 0 or auto, got {workers!r}")
    return count
