"""Optional ImageNet initialisation from torchvision weights (only if torchvision is importable).

The key mapping is pure (state dict in, state dict out) so it is testable without torchvision.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from napari_spineseg.models.resnet import FCNResNet50, LesionClassifier
from napari_spineseg.models.vgg import VGG19UNet

# torchvision ``features`` indices of VGG-19's 16 convolutions, without and with batch norm.
VGG19_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
VGG19_BN_CONV_INDICES: tuple[int, ...] = (0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49)
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB first-conv weight [O, 3, kh, kw] -> [O, in_channels, kh, kw].

    One channel: the mean over RGB.  More channels: the mean tiled and scaled by 3/in_channels so
    the response to a constant image keeps its magnitude.
    """
    if weight.shape[1] == in_channels:
        return weight.clone()
    mean = weight.mean(dim=1, keepdim=True)
    if in_channels == 1:
        return mean
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def map_vgg19_state_dict(tv_state: Mapping[str, torch.Tensor], batch_norm: bool) -> dict[str, torch.Tensor]:
    """torchvision ``vgg19``/``vgg19_bn`` state dict -> :class:`VGG19UNet` encoder keys (``convs.i``, ``bns.i``)."""
    out: dict[str, torch.Tensor] = {}
    indices = VGG19_BN_CONV_INDICES if batch_norm else VGG19_CONV_INDICES
    for i, idx in enumerate(indices):
        for p in ("weight", "bias"):
            key = f"features.{idx}.{p}"
            if key in tv_state:
                out[f"convs.{i}.{p}"] = tv_state[key]
        if batch_norm:
            for p in _BN_KEYS:
                key = f"features.{idx + 1}.{p}"
                if key in tv_state:
                    out[f"bns.{i}.{p}"] = tv_state[key]
    return out


def map_resnet50_state_dict(tv_state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """torchvision ``resnet50`` state dict -> our backbone keys (``prefix`` + same names; ``fc`` dropped).

    Also accepts torchvision ``fcn_resnet50`` backbone keys (``backbone.*``).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tv_state.items():
        if key.startswith("backbone."):
            key = key[len("backbone.") :]
        if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")):
            out[prefix + key] = value
    return out


def load_mapped_weights(
    model: nn.Module, mapped: Mapping[str, torch.Tensor], first_conv_key: str
) -> tuple[list[str], list[str]]:
    """Copy ``mapped`` tensors into ``model`` where shapes agree (first conv adapted to the input channels).

    Returns ``(loaded_keys, skipped_keys)``.
    """
    own = model.state_dict()
    loaded, skipped = [], []
    with torch.no_grad():
        for key, value in mapped.items():
            if key not in own:
                skipped.append(key)
                continue
            target = own[key]
            if key == first_conv_key:
                value = adapt_first_conv(value, target.shape[1])
            if tuple(value.shape) != tuple(target.shape):
                skipped.append(key)
                continue
            target.copy_(value.to(dtype=target.dtype))
            loaded.append(key)
    return loaded, skipped


def init_from_torchvision(model: nn.Module) -> bool:
    """Initialise a ``vgg19-unet``, ``fcn-resnet50`` or ``lesion-classifier`` from ImageNet weights.

    Returns False (without error) if torchvision is not installed, the width factor is not 1, the
    architecture has no pretrained counterpart or the weights cannot be fetched; True on success.
    """
    try:
        import torchvision  # noqa: F401
        from torchvision import models as tvm
    except Exception:  # torchvision missing or broken next to this torch build
        return False
    width = getattr(model, "arch_kwargs", {}).get("width", 1.0)
    if width != 1.0:
        warnings.warn(f"ImageNet weights need width factor 1, model has {width}; not initialised", stacklevel=2)
        return False
    try:
        if isinstance(model, VGG19UNet):
            if model.batch_norm:
                tv_state = tvm.vgg19_bn(weights="IMAGENET1K_V1").state_dict()
            else:
                tv_state = tvm.vgg19(weights="IMAGENET1K_V1").state_dict()
            mapped = map_vgg19_state_dict(tv_state, model.batch_norm)
            first = "convs.0.weight"
        elif isinstance(model, (FCNResNet50, LesionClassifier)):
            tv_state = tvm.resnet50(weights="IMAGENET1K_V2").state_dict()
            mapped = map_resnet50_state_dict(tv_state)
            first = "backbone.conv1.weight"
        else:
            return False
    except Exception as exc:  # offline, cache unwritable, ...
        warnings.warn(f"could not fetch torchvision ImageNet weights: {exc}", stacklevel=2)
        return False
    loaded, _ = load_mapped_weights(model, mapped, first)
    return bool(loaded)
