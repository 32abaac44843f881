"""U-Net family: classic U-Net, the lumbar LeakyReLU variant, Attention U-Net and residual U-Net."""

from __future__ import annotations

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

from napari_spineseg.models.common import PaddedSegmenter


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> activation) x 2, optional Dropout2d at the end."""

    def __init__(self, in_ch: int, out_ch: int, act: str = "relu", negative_slope: float = 0.1, dropout: float = 0.0):
        def make_act() -> nn.Module:
            return nn.LeakyReLU(negative_slope, inplace=True) if act == "leaky" else nn.ReLU(inplace=True)

        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            make_act(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            make_act(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool then :class:`DoubleConv`."""

    def __init__(self, in_ch: int, out_ch: int, **kw: object):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, **kw))


class Up(nn.Module):
    """2x2 transposed conv, optional attention gate on the skip, concat, :class:`DoubleConv`."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, attention: bool = False, **kw: object):
        super().__init__()
        half = max(1, in_ch // 2)
        self.up = nn.ConvTranspose2d(in_ch, half, 2, stride=2)
        self.gate = AttentionBlock(2, f_int=max(1, skip_ch // 2), f_g=half, f_l=skip_ch) if attention else None
        self.conv = DoubleConv(half + skip_ch, out_ch, **kw)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.gate is not None:
            skip = self.gate(g=x, x=skip)
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to the class logits."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet(PaddedSegmenter):
    """U-Net (Ronneberger et al.) with ``depth`` downsamplings and filters doubling from ``base``.

    ``variant="leaky"`` gives the lumbar multi-class network: LeakyReLU in the upsampling blocks,
    Glorot-uniform initialisation, dropout; ``attention=True`` adds Oktay et al. attention gates.
    """

    output_layer_name = "head.conv"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        base: int = 16,
        depth: int = 4,
        dropout: float = 0.0,
        variant: str = "classic",
        negative_slope: float = 0.1,
        attention: bool = False,
    ):
        super().__init__()
        if not 1 <= depth <= 12 or base < 1:  # 2**12 downsampling is already beyond any image
            raise ValueError(f"need base >= 1 and depth in 1..12, got base={base}, depth={depth}")
        if variant not in ("classic", "leaky"):
            raise ValueError(f"variant must be 'classic' or 'leaky', got {variant!r}")
        self.num_classes = num_classes
        self.multiple = 2**depth
        chans = [base * 2**i for i in range(depth + 1)]
        # classic: dropout at the end of the contracting path (as in the paper); leaky: in every block.
        leaky = variant == "leaky"
        enc_kw = {"dropout": dropout if leaky else 0.0}
        dec_kw = {"act": "leaky" if leaky else "relu", "negative_slope": negative_slope, "dropout": enc_kw["dropout"]}
        self.inc = DoubleConv(in_channels, chans[0], **enc_kw)
        self.downs = nn.ModuleList(
            Down(chans[i], chans[i + 1], dropout=dropout if i == depth - 1 else enc_kw["dropout"]) for i in range(depth)
        )
        self.ups = nn.ModuleList(
            Up(chans[i + 1], chans[i], chans[i], attention=attention, **dec_kw) for i in reversed(range(depth))
        )
        self.head = OutConv(chans[0], num_classes)
        if variant == "leaky":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)


class ResUNet(PaddedSegmenter):
    """Residual U-Net: MONAI residual units (strided for downsampling) in encoder and decoder."""

    output_layer_name = "head.conv"

    def __init__(
        self, in_channels: int = 1, num_classes: int = 5, base: int = 16, depth: int = 4, dropout: float = 0.0
    ):
        super().__init__()
        if not 1 <= depth <= 12 or base < 1:  # 2**12 downsampling is already beyond any image
            raise ValueError(f"need base >= 1 and depth in 1..12, got base={base}, depth={depth}")
        self.num_classes = num_classes
        self.multiple = 2**depth
        chans = [base * 2**i for i in range(depth + 1)]

        def unit(i: int, o: int, stride: int = 1) -> ResidualUnit:
            return ResidualUnit(2, i, o, strides=stride, subunits=2, act="RELU", norm="BATCH", dropout=dropout or None)

        self.inc = unit(in_channels, chans[0])
        self.downs = nn.ModuleList(unit(chans[i], chans[i + 1], stride=2) for i in range(depth))
        self.upconvs = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decs = nn.ModuleList(unit(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = OutConv(chans[0], num_classes)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for upconv, dec in zip(self.upconvs, self.decs):
            y = dec(torch.cat([skips.pop(), upconv(y)], dim=1))
        return self.head(y)


def build_unet(
    in_channels: int = 1, num_classes: int = 5, base: int = 16, depth: int = 4, dropout: float = 0.0
) -> UNet:
    """Classic U-Net."""
    return UNet(in_channels, num_classes, base=base, depth=depth, dropout=dropout)


def build_unet_leaky(
    in_channels: int = 1,
    num_classes: int = 5,
    base: int = 16,
    depth: int = 4,
    dropout: float = 0.1,
    negative_slope: float = 0.1,
) -> UNet:
    """Lumbar multi-class U-Net: LeakyReLU decoder, Glorot init, BN + dropout."""
    return UNet(
        in_channels,
        num_classes,
        base=base,
        depth=depth,
        dropout=dropout,
        variant="leaky",
        negative_slope=negative_slope,
    )


def build_attention_unet(
    in_channels: int = 1, num_classes: int = 5, base: int = 16, depth: int = 4, dropout: float = 0.0
) -> UNet:
    """U-Net with attention gates on the skip connections (Oktay et al. 2018)."""
    return UNet(in_channels, num_classes, base=base, depth=depth, dropout=dropout, attention=True)


def build_resunet(
    in_channels: int = 1, num_classes: int = 5, base: int = 16, depth: int = 4, dropout: float = 0.0
) -> ResUNet:
    """Residual U-Net."""
    return ResUNet(in_channels, num_classes, base=base, depth=depth, dropout=dropout)
