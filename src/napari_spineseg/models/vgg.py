"""VGG-19 encoder (16 conv layers, 5 stages) with a U-Net decoder."""

from __future__ import annotations

import torch
from torch import nn

from napari_spineseg.models.common import PaddedSegmenter, scaled
from napari_spineseg.models.unet import OutConv, Up

VGG19_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


class VGG19UNet(PaddedSegmenter):
    """U-Net whose encoder is VGG-19's convolutional part (widths scaled by ``width``).

    ``self.convs`` holds the 16 encoder convolutions in torchvision order (and ``self.bns`` their
    batch norms when ``batch_norm``); the stages are separated by 2x2 max-pooling, the fifth stage
    (1/16 resolution) is the bottleneck.
    """

    output_layer_name = "head.conv"

    def __init__(self, in_channels: int = 1, num_classes: int = 5, width: float = 1.0, batch_norm: bool = True):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.num_classes = num_classes
        self.multiple = 16
        self.batch_norm = batch_norm
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.stage_sizes = [n for _, n in VGG19_STAGES]
        stage_ch = [scaled(c, width) for c, _ in VGG19_STAGES]
        prev = in_channels
        for ch, n in zip(stage_ch, self.stage_sizes):
            for _ in range(n):
                self.convs.append(nn.Conv2d(prev, ch, 3, padding=1))
                self.bns.append(nn.BatchNorm2d(ch) if batch_norm else nn.Identity())
                prev = ch
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        # decoder: up from stage k+1 to stage k, 4 times
        self.ups = nn.ModuleList(Up(stage_ch[i + 1], stage_ch[i], stage_ch[i]) for i in reversed(range(4)))
        self.head = OutConv(stage_ch[0], num_classes)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        k = 0
        for s, n in enumerate(self.stage_sizes):
            if s > 0:
                x = self.pool(x)
            for _ in range(n):
                x = self.relu(self.bns[k](self.convs[k](x)))
                k += 1
            skips.append(x)
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)


def build_vgg19_unet(
    in_channels: int = 1, num_classes: int = 5, width: float = 0.25, batch_norm: bool = True
) -> VGG19UNet:
    """VGG-19-encoder U-Net."""
    return VGG19UNet(in_channels, num_classes, width=width, batch_norm=batch_norm)
