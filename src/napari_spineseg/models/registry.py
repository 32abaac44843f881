"""Registry of the 2-D architectures: name -> builder, defaults, description."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from napari_spineseg.errors import InputError
from napari_spineseg.models.penn import build_penn
from napari_spineseg.models.resnet import build_fcn_resnet50, build_lesion_classifier
from napari_spineseg.models.unet import build_attention_unet, build_resunet, build_unet, build_unet_leaky
from napari_spineseg.models.vgg import build_vgg19_unet


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture: ``builder(in_channels=..., num_classes=..., **kwargs)`` plus its default kwargs."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    description: str = ""
    kind: str = "segmentation"  # or "classifier"


def _spec(
    name: str, builder: Callable[..., nn.Module], description: str, kind: str = "segmentation"
) -> ArchitectureSpec:
    params = inspect.signature(builder).parameters
    defaults = {
        k: p.default for k, p in params.items() if k not in ("in_channels", "num_classes") and p.default is not p.empty
    }
    return ArchitectureSpec(name, builder, defaults, description, kind)


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    s.name: s
    for s in (
        _spec("unet", build_unet, "Classic U-Net (DoubleConv/Down/Up/OutConv), filters doubling from `base`."),
        _spec(
            "unet-leaky",
            build_unet_leaky,
            "Lumbar multi-class U-Net: LeakyReLU(0.1) decoder, Glorot init, BN, dropout.",
        ),
        _spec(
            "attention-unet", build_attention_unet, "U-Net with attention gates on the skip connections (Oktay et al.)."
        ),
        _spec("resunet", build_resunet, "U-Net with residual blocks in encoder and decoder."),
        _spec("vgg19-unet", build_vgg19_unet, "VGG-19 encoder (16 convs, width-scalable) with a U-Net decoder."),
        _spec("fcn-resnet50", build_fcn_resnet50, "FCN head on a ResNet-50 backbone (output stride 8 when dilated)."),
        _spec(
            "penn", build_penn, "Patch network: 32x32 patches -> sparse auto-encoder 1024-200-200-200 -> classifier."
        ),
        _spec(
            "lesion-classifier",
            build_lesion_classifier,
            "Slice-level lesion-presence classifier (ResNet-50 style), logits [B].",
            kind="classifier",
        ),
    )
}


def architecture_names(kind: str | None = None) -> list[str]:
    """Registered architecture names, optionally only those of one ``kind`` ("segmentation"/"classifier")."""
    return [n for n, s in ARCHITECTURES.items() if kind is None or s.kind == kind]


def build_model(name: str, in_channels: int = 1, num_classes: int = 5, **kwargs: object) -> nn.Module:
    """Build architecture ``name``; the model gets ``arch_name`` and ``arch_kwargs`` (all kwargs used).

    Raises :class:`InputError` for an unknown name, unknown kwargs or invalid values.
    """
    spec = ARCHITECTURES.get(name)
    if spec is None:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise InputError(
            f"architecture {name!r} does not accept {', '.join(unknown)}; accepted: "
            f"in_channels, num_classes, {', '.join(spec.defaults)}"
        )
    if not isinstance(in_channels, int) or in_channels < 1:
        raise InputError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    if spec.kind == "classifier" and num_classes == 5:
        num_classes = 1  # the segmentation default means nothing for a one-logit presence classifier
    full = {**spec.defaults, **kwargs}
    try:
        model = spec.builder(in_channels=in_channels, num_classes=num_classes, **full)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot build {name!r} with {full}: {exc}") from exc
    model.arch_name = name
    model.arch_kwargs = {"in_channels": in_channels, "num_classes": num_classes, **full}
    model.kind = spec.kind
    return model
