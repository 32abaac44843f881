"""Shared pieces of the 2-D architectures: padding to a size multiple, cropping back, head growing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_spineseg.errors import InputError


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (width-scalable backbones)."""
    return max(1, round(channels * width))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad ``x`` [B, C, H, W] symmetrically so H and W are multiples of ``multiple``.

    Reflect padding is used where the image is large enough, replicate padding otherwise.
    Returns the padded tensor and ``(top, left, H, W)`` for :func:`crop_back`.
    """
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    top, left = ph // 2, pw // 2
    if ph == 0 and pw == 0:
        return x, (0, 0, h, w)
    pads = (left, pw - left, top, ph - top)
    mode = "reflect" if (ph - top) < h and (pw - left) < w and top < h and left < w else "replicate"
    return F.pad(x, pads, mode=mode), (top, left, h, w)


def crop_back(y: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on a network output."""
    top, left, h, w = box
    return y[..., top : top + h, left : left + w]


class PaddedSegmenter(nn.Module):
    """Base class: pads the input to ``self.multiple``, runs :meth:`forward_padded`, crops back.

    Subclasses set ``multiple`` and ``output_layer_name`` (dotted path of the final 1x1 conv or
    linear classifier, used by :func:`extend_output_classes`).
    """

    multiple: int = 1
    output_layer_name: str = "head"

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] for input [B, in_channels, H, W]."""
        if x.ndim != 4:
            raise InputError(f"expected a 4-D batch [B, C, H, W], got shape {tuple(x.shape)}")
        xp, box = pad_to_multiple(x, self.multiple)
        return crop_back(self.forward_padded(xp), box)


def _grow_conv(old: nn.Conv2d, k: int) -> nn.Conv2d:
    new = nn.Conv2d(
        old.in_channels,
        k,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.out_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias[: old.out_channels].copy_(old.bias)
    return new


def _grow_linear(old: nn.Linear, rows: int, new_bias: float | None) -> nn.Linear:
    new = nn.Linear(old.in_features, rows, bias=old.bias is not None).to(
        device=old.weight.device, dtype=old.weight.dtype
    )
    with torch.no_grad():
        n = old.out_features
        new.weight[:n].copy_(old.weight)
        if new_bias is not None:
            new.weight[n:].zero_()
        if old.bias is not None:
            new.bias[:n].copy_(old.bias)
            if new_bias is not None:
                new.bias[n:].fill_(new_bias)
    return new


def extend_output_classes(model: nn.Module, new_num_classes: int) -> None:
    """Grow the output layer of a segmentation model to ``new_num_classes`` in place.

    The old classes' weights are copied exactly; the new classes get a fresh initialisation (for
    the probability-averaging ``penn`` network the new rows start at zero weight and a very
    negative bias, so the old classes' log-probabilities are unchanged to float precision).
    ``model.arch_kwargs["num_classes"]`` is updated.
    """
    name = getattr(model, "output_layer_name", None)
    kwargs = getattr(model, "arch_kwargs", None)
    if name is None or getattr(model, "kind", "segmentation") != "segmentation":
        raise InputError(f"{type(model).__name__} has no growable segmentation output layer")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    old_k = model.num_classes
    if new_num_classes < old_k:
        raise InputError(f"cannot shrink the output from {old_k} to {new_num_classes} classes")
    if new_num_classes == old_k:
        return
    if isinstance(old, nn.Conv2d):
        new: nn.Module = _grow_conv(old, new_num_classes)
    elif isinstance(old, nn.Linear):
        per_class = old.out_features // old_k
        new = _grow_linear(old, new_num_classes * per_class, new_bias=getattr(model, "new_class_bias", None))
    else:  # pragma: no cover - programming error
        raise TypeError(f"unsupported output layer {type(old).__name__}")
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    model.num_classes = new_num_classes
    if isinstance(kwargs, dict):
        kwargs["num_classes"] = new_num_classes
