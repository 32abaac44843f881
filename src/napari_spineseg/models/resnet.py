"""ResNet-50 family: FCN-ResNet50 segmentation and the slice-level lesion-presence classifier.

Module names mirror torchvision's ``resnet50`` (``conv1``, ``bn1``, ``layer1``..``layer4``,
bottleneck ``conv1..3``/``bn1..3``/``downsample``) so ImageNet weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_spineseg.errors import InputError
from napari_spineseg.models.common import PaddedSegmenter, scaled


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 -> 1x1, expansion 4), stride on the 3x3 conv."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(nn.Module):
    """ResNet-50 trunk (no pooling/fc), blocks [3, 4, 6, 3], channel widths scaled by ``width``.

    ``dilated=True`` replaces the strides of layer3/layer4 by dilation (output stride 8, as in
    torchvision's FCN); otherwise output stride 32.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0, dilated: bool = False, layers: tuple = (3, 4, 6, 3)):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.inplanes = scaled(64, width)
        self.dilation = 1
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(scaled(64, width), layers[0])
        self.layer2 = self._make_layer(scaled(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(scaled(256, width), layers[2], stride=2, dilate=dilated)
        self.layer4 = self._make_layer(scaled(512, width), layers[3], stride=2, dilate=dilated)
        self.out_channels = self.inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, previous_dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class FCNResNet50(PaddedSegmenter):
    """FCN with a ResNet-50 backbone: FCN head (3x3 conv, BN, ReLU, dropout, 1x1 conv), bilinear upsampling."""

    output_layer_name = "classifier.4"

    def __init__(
        self, in_channels: int = 1, num_classes: int = 5, width: float = 1.0, dilated: bool = True, dropout: float = 0.1
    ):
        super().__init__()
        self.num_classes = num_classes
        self.multiple = 8 if dilated else 32
        self.backbone = ResNet50Backbone(in_channels, width=width, dilated=dilated)
        c = self.backbone.out_channels
        inter = max(1, c // 4)
        self.classifier = nn.Sequential(
            nn.Conv2d(c, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(inter, num_classes, 1),
        )

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.backbone(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class LesionClassifier(nn.Module):
    """Slice-level lesion-presence classifier: ResNet-50 trunk, global pool, 1 logit per slice.

    ``pool="avg"`` (global average), ``"max"`` (global max: a small lesion is not diluted by the
    area of the slice, so crops in training and whole slices at inference give comparable logits)
    or ``"avgmax"`` (both, concatenated: the dense gradients of the average train faster).
    """

    kind = "classifier"

    def __init__(
        self, in_channels: int = 1, num_classes: int = 1, width: float = 1.0, dropout: float = 0.0, pool: str = "avg"
    ):
        super().__init__()
        if num_classes != 1:
            raise ValueError(
                f"the lesion classifier gives one presence logit; num_classes must be 1, got {num_classes}"
            )
        if pool not in ("avg", "max", "avgmax"):
            raise ValueError(f"pool must be 'avg', 'max' or 'avgmax', got {pool!r}")
        self.num_classes = 1
        self.pool = pool
        self.backbone = ResNet50Backbone(in_channels, width=width, dilated=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.out_channels * (2 if pool == "avgmax" else 1), 1)
        # Zero-initialised last BN of every residual branch (Goyal et al. 2017): each block starts as
        # the identity, which trains from scratch much faster on a few hundred small batches.
        for module in self.backbone.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Presence logits [B] for slices [B, C, H, W]."""
        if x.ndim != 4:
            raise InputError(f"expected a 4-D batch [B, C, H, W], got shape {tuple(x.shape)}")
        features = self.backbone(x)
        if self.pool == "avgmax":
            pooled = torch.cat([F.adaptive_avg_pool2d(features, 1), F.adaptive_max_pool2d(features, 1)], dim=1)
        elif self.pool == "max":
            pooled = F.adaptive_max_pool2d(features, 1)
        else:
            pooled = F.adaptive_avg_pool2d(features, 1)
        f = torch.flatten(pooled, 1)
        return self.fc(self.dropout(f)).squeeze(1)


def build_fcn_resnet50(
    in_channels: int = 1, num_classes: int = 5, width: float = 0.25, dilated: bool = True, dropout: float = 0.1
) -> FCNResNet50:
    """FCN-ResNet50 (output stride 8 when ``dilated``)."""
    return FCNResNet50(in_channels, num_classes, width=width, dilated=dilated, dropout=dropout)


def build_lesion_classifier(
    in_channels: int = 1, num_classes: int = 1, width: float = 0.25, dropout: float = 0.0, pool: str = "avg"
) -> LesionClassifier:
    """ResNet-50-style lesion-presence classifier."""
    return LesionClassifier(in_channels, num_classes, width=width, dropout=dropout, pool=pool)


@torch.no_grad()
def gate_slices(classifier: nn.Module, batch: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Bool tensor [B]: which slices of ``batch`` [B, C, H, W] need lesion segmentation (p >= threshold).

    The classifier is run in eval mode (its training flag is restored afterwards).
    """
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold}")
    was_training = classifier.training
    classifier.eval()
    try:
        prob = torch.sigmoid(classifier(batch).float())
    finally:
        classifier.train(was_training)
    return prob >= threshold
