"""Device-resident three-plane inference: the study goes to the device once, only labels come back.

The host path of :class:`~napari_spineseg.inference.Predictor` slices every batch in numpy,
resamples it on the CPU, sends it to the device and brings the probabilities back into a host
accumulator: on a GPU the accelerator waits for the CPU most of the time.  Here the prepared
canonical study is one device tensor; the context slices of a batch are gathered by index on
the device, in-plane resampling to the model's pixel spacing (and back) is ``F.interpolate`` on
the device, and the fused accumulator, the per-plane argmax and the final argmax stay there; the
fused class index (uint8) and the uncertainty map are the only copies back.

The operations are the host path's, in the same order and precision: on ``device="cpu"`` the
labels are bit-identical to the host path (the tests' reference); on CUDA they differ only as
CUDA and CPU kernels round differently.  Batches are bounded by :data:`BATCH_PIXEL_BUDGET`-style
pixel budgets: the free device memory on CUDA (``torch.cuda.mem_get_info``), the host budget on
the CPU.  Per-slice filters (CLAHE, denoising) are numpy/scipy code and keep the host path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import Cancelled
from .orientation import Plane
from .preprocess import PreprocessConfig
from .slicing import PreparedStudy, model_slice_shape, plane_pixel_spacing

__all__ = ["FusionPlan", "accumulate", "device_batch_size", "fuse_on_device", "segment_resident"]

# CUDA: the share of the free device memory a batch may use, and the bytes one network pixel
# costs at inference (activations of the default U-Net in fp16 with room to spare); batches are
# capped at MAX_DEVICE_BATCH slices, beyond which the GPU is saturated anyway.
DEVICE_MEMORY_FRACTION = 0.5
DEVICE_BYTES_PER_PIXEL = 4096
MAX_DEVICE_BATCH = 256
# Values per chunk of the final argmax on CUDA (the host path uses ~4 M to bound host temporaries).
DEVICE_FUSE_CHUNK = 1 << 26


@dataclass(frozen=True)
class FusionPlan:
    """How batches are accumulated and fused (shared by the host and the resident paths)."""

    n_classes: int
    weights: dict[Plane, float]
    total_weight: float
    vote: bool  # accumulator counts per-plane winners (uint8, one channel per class)
    quantised_total: float | None  # 8-bit accumulator of probabilities scaled to this total; None: float16
    entropy: bool
    disagreement: bool

    @property
    def fuse_total(self) -> float:
        return self.quantised_total if self.quantised_total is not None else self.total_weight


def accumulate(target: Any, rows: slice, probabilities: Any, plan: FusionPlan, plane: Plane) -> None:
    """Add a batch's probabilities ``[B, C, H, W]`` into ``target[rows]`` (a plane view ``[k, H, W, C']``)."""
    import torch

    if plan.vote:
        winners = probabilities.argmax(dim=1)
        for c in range(plan.n_classes):
            target[rows, ..., c] += (winners == c).to(torch.uint8)
    elif plan.quantised_total is not None:
        scaled = probabilities[:, 1:] * (plan.quantised_total * plan.weights[plane] / plan.total_weight)
        target[rows] += torch.round(scaled).permute(0, 2, 3, 1).to(torch.uint8)
    else:
        foreground = probabilities[:, 1:]
        if plan.weights[plane] != 1.0:
            foreground = foreground * plan.weights[plane]
        target[rows] += foreground.permute(0, 2, 3, 1).to(torch.float16)


def device_batch_size(device: str, host_batch: int, network_slice_pixels: int) -> int:
    """Slices per batch: sized by the free device memory on CUDA, ``host_batch`` elsewhere."""
    if not device.startswith("cuda"):
        return host_batch
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    budget = int(free * DEVICE_MEMORY_FRACTION) // DEVICE_BYTES_PER_PIXEL
    return max(1, min(MAX_DEVICE_BATCH, budget // max(1, network_slice_pixels)))


def segment_resident(
    study: PreparedStudy,
    planes: Sequence[Plane],
    plan: FusionPlan,
    preprocess: PreprocessConfig,
    context_slices: int,
    *,
    device: str,
    channels_last: bool,
    probabilities: Callable[[Any, Plane], Any],
    batch_size: Callable[[Plane, int, int], int],
    event: Callable[..., Any],
    cancel: threading.Event | None = None,
) -> Generator[Any, None, tuple[np.ndarray, np.ndarray | None]]:
    """Segment a prepared study on ``device``; yields ``event("plane", ...)`` after every batch.

    ``probabilities(tensor, plane)``: the network's class probabilities ``[B, C, h, w]`` (float32,
    on the device) for a network input; ``batch_size(plane, slice_pixels, network_pixels)``: slices
    per batch for slices of that many pixels (on the study's grid, at the model's spacing).
    Returns the fused class index (uint8) and the uncertainty map (float32 or None) on the
    canonical grid, as numpy arrays.
    """
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(study.image).to(device)  # the one host-to-device copy of the study
    study.image = np.empty((0, 0, 0), study.image.dtype)  # the host copy is no longer needed
    shape = tuple(image.shape)
    channels = plan.n_classes if plan.vote else plan.n_classes - 1
    dtype = torch.uint8 if plan.vote or plan.quantised_total is not None else torch.float16
    accumulator = torch.zeros((*shape, channels), dtype=dtype, device=device)
    plane_argmax = torch.zeros((len(planes), *shape), dtype=torch.uint8, device=device) if plan.disagreement else None
    offsets = torch.arange(-context_slices, context_slices + 1, device=device)
    total = sum(shape[p.canonical_array_axis] for p in planes)
    done_overall = 0
    for plane_index, plane in enumerate(planes):
        axis = plane.canonical_array_axis
        stack, target = image.movedim(axis, 0), accumulator.movedim(axis, 0)  # views
        count, height, width = stack.shape
        out_hw = model_slice_shape(
            (height, width), plane_pixel_spacing(study.spacing_zyx, plane), preprocess.pixel_spacing_mm
        )
        size = batch_size(plane, height * width, int(out_hw[0] * out_hw[1]))
        for start in range(0, count, size):
            if cancel is not None and cancel.is_set():
                raise Cancelled("segmentation cancelled")
            stop = min(start + size, count)
            rows = slice(start, stop)
            indices = (torch.arange(start, stop, device=device)[:, None] + offsets).clamp_(0, count - 1)
            batch = stack[indices.reshape(-1)].reshape(stop - start, len(offsets), height, width).float()
            if out_hw != (height, width):
                batch = F.interpolate(batch, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            result = probabilities(batch, plane)
            if tuple(result.shape[-2:]) != (height, width):
                result = F.interpolate(
                    result.contiguous(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
                )
            accumulate(target, rows, result, plan, plane)
            if plane_argmax is not None:
                plane_argmax[plane_index].movedim(axis, 0)[rows] = result.argmax(dim=1).to(torch.uint8)
            done_overall += stop - start
            yield event("plane", plane.value, stop, count, done_overall / max(total, 1))
    yield event("fuse", fraction=1.0)
    del image, stack, target
    fused, uncertainty = fuse_on_device(accumulator, plan, plane_argmax, len(planes))
    return fused.cpu().numpy(), (uncertainty.cpu().numpy() if uncertainty is not None else None)


def fuse_on_device(accumulator: Any, plan: FusionPlan, plane_argmax: Any, n_planes: int) -> tuple[Any, Any]:
    """The host path's fusion (``Predictor._fuse``) in torch, on the accumulator's device."""
    import torch

    device = accumulator.device
    shape = tuple(accumulator.shape[:3])
    fused = torch.zeros(shape, dtype=torch.uint8, device=device)
    wanted = plan.entropy or plane_argmax is not None
    uncertainty = torch.zeros(shape, dtype=torch.float32, device=device) if wanted else None
    values = (DEVICE_FUSE_CHUNK if device.type == "cuda" else 1 << 22) // max(1, int(np.prod(accumulator.shape[1:])))
    chunk, total = max(1, values), float(plan.fuse_total)
    for start in range(0, shape[0], chunk):
        rows = slice(start, start + chunk)
        part = accumulator[rows].float()
        if not plan.vote and not plan.entropy:
            background = total - part.sum(dim=-1)
            winner, best = part.max(dim=-1)
            fused[rows] = torch.where(winner > background, best + 1, 0).to(torch.uint8)
        elif plan.vote:
            fused[rows] = part.argmax(dim=-1).to(torch.uint8)
            probabilities = part / float(n_planes)
        else:
            background = total - part.sum(dim=-1, keepdim=True)
            probabilities = torch.cat([background, part], dim=-1) / total
            fused[rows] = probabilities.argmax(dim=-1).to(torch.uint8)
        if plan.entropy and uncertainty is not None:
            p = probabilities.clamp(1e-6, 1.0)
            uncertainty[rows] = -(p * p.log()).sum(dim=-1) / float(np.log(p.shape[-1]))
        if plane_argmax is not None and uncertainty is not None:
            agree = (plane_argmax[:, rows] == fused[rows][None]).sum(dim=0)
            uncertainty[rows] = 1.0 - agree.float() / float(n_planes)
    return fused, uncertainty
