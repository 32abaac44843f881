"""Function-preserving widening of a trained U-Net (Net2WiderNet, Chen et al. 2016).

A wider network (``factor`` times the filters) and more context slices start where a trained
narrower one stands instead of from scratch: every filter is replicated ``factor`` times, the
weights that read replicated channels are divided by ``factor``, and the added outer context
slices start with zero weight.  In evaluation mode the widened network computes the same logits
(to float precision); small noise on the copies (``noise``) lets them diverge in training.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_spineseg.errors import InputError
from napari_spineseg.models.registry import build_model
from napari_spineseg.models.unet import DoubleConv, UNet

__all__ = ["widen_unet"]

# A channel map: for every channel of the wide layer, the narrow layer's channel it copies (-1: none).
ChannelMap = torch.Tensor


def _replicated(channels: int, factor: int) -> ChannelMap:
    return torch.arange(channels * factor) % channels


def _concatenated(skip: int, upsampled: int, factor: int) -> ChannelMap:
    """Map of ``cat([skip, upsampled])`` when both parts are replicated separately."""
    return torch.cat([_replicated(skip, factor), skip + _replicated(upsampled, factor)])


def _centred(old_channels: int, new_channels: int) -> ChannelMap:
    """Input context slices: the old ones in the middle, the added outer slices unmapped."""
    offset = (new_channels - old_channels) // 2
    mapping = torch.full((new_channels,), -1, dtype=torch.long)
    mapping[offset : offset + old_channels] = torch.arange(old_channels)
    return mapping


def _copy_weight(old: torch.Tensor, out_map: ChannelMap, in_map: ChannelMap) -> torch.Tensor:
    """Gather a weight ``[out, in, k, k]`` by the two maps; inputs read from a replicated channel are
    divided by its number of copies, unmapped inputs get zero weight."""
    copies = torch.bincount(in_map[in_map >= 0], minlength=old.shape[1]).clamp(min=1).to(old.dtype)
    weight = old.index_select(0, out_map) / copies.view(1, -1, 1, 1)
    picked = weight.index_select(1, in_map.clamp(min=0))
    return torch.where((in_map < 0).view(1, -1, 1, 1), torch.zeros((), dtype=old.dtype), picked)


def _widen_conv(old: nn.Module, new: nn.Module, out_map: ChannelMap, in_map: ChannelMap) -> None:
    if isinstance(old, nn.ConvTranspose2d):  # transposed weights are [in, out, k, k]
        new.weight.copy_(_copy_weight(old.weight.transpose(0, 1), out_map, in_map).transpose(0, 1))
    else:
        new.weight.copy_(_copy_weight(old.weight, out_map, in_map))
    if old.bias is not None:
        new.bias.copy_(old.bias[out_map])


def _widen_norm(old: nn.BatchNorm2d, new: nn.BatchNorm2d, out_map: ChannelMap) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).copy_(getattr(old, name)[out_map])
    new.num_batches_tracked.copy_(old.num_batches_tracked)


def _widen_block(old: DoubleConv, new: DoubleConv, out_map: ChannelMap, in_map: ChannelMap) -> None:
    """conv, BN, act, conv, BN, act: the first conv reads ``in_map``, everything writes ``out_map``."""
    _widen_conv(old[0], new[0], out_map, in_map)
    _widen_norm(old[1], new[1], out_map)
    _widen_conv(old[3], new[3], out_map, out_map)
    _widen_norm(old[4], new[4], out_map)


def _check_widenable(network: nn.Module, factor: int, in_channels: int) -> None:
    name = getattr(network, "arch_name", "unet")
    if not isinstance(network, UNet) or name != "unet" or any(up.gate is not None for up in network.ups):
        raise InputError(f"only the classic U-Net can be widened, not {name!r}")
    if factor < 1:
        raise InputError(f"the widening factor must be at least 1, got {factor}")
    old_in = network.inc[0].in_channels
    if in_channels < old_in or (in_channels - old_in) % 2:
        raise InputError(f"input channels can grow symmetrically only ({old_in} -> {in_channels})")


@torch.no_grad()
def widen_unet(
    network: UNet, factor: int = 2, in_channels: int | None = None, noise: float = 0.0, seed: int = 0
) -> UNet:
    """A U-Net ``factor`` times as wide (and with ``in_channels`` context slices) computing what ``network`` does.

    ``noise`` adds Gaussian noise of that fraction of each wide weight tensor's standard deviation,
    so that replicated filters can diverge when training continues.
    """
    in_channels = in_channels or network.inc[0].in_channels
    _check_widenable(network, factor, in_channels)
    base, depth = network.inc[0].out_channels, len(network.downs)
    wide = build_model("unet", in_channels, network.num_classes, base=base * factor, depth=depth, dropout=0.0)
    chans = [base * 2**i for i in range(depth + 1)]
    input_map = _centred(network.inc[0].in_channels, in_channels)
    _widen_block(network.inc, wide.inc, _replicated(chans[0], factor), input_map)
    for i, (old, new) in enumerate(zip(network.downs, wide.downs)):
        _widen_block(old[1], new[1], _replicated(chans[i + 1], factor), _replicated(chans[i], factor))
    for level, old, new in zip(reversed(range(depth)), network.ups, wide.ups):
        half = chans[level + 1] // 2
        _widen_conv(old.up, new.up, _replicated(half, factor), _replicated(chans[level + 1], factor))
        skip_and_up = _concatenated(chans[level], half, factor)
        _widen_block(old.conv, new.conv, _replicated(chans[level], factor), skip_and_up)
    _widen_conv(network.head.conv, wide.head.conv, torch.arange(network.num_classes), _replicated(chans[0], factor))
    if noise > 0:
        generator = torch.Generator().manual_seed(seed)
        for module in wide.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                scale = noise * float(module.weight.std())
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * scale)
    return wide
