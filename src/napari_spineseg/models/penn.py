"""PENN: patch-based network with a stacked sparse auto-encoder encoder and a per-patch classifier."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_spineseg.errors import InputError


class PennNet(nn.Module):
    """Overlapping ``patch_size``² patches (``F.unfold`` at ``stride``) -> encoder -> class scores -> ``F.fold``.

    Each flattened patch (``patch_size² * in_channels`` values) goes through ``len(hidden)`` sigmoid
    layers (the stacked sparse auto-encoder's encoder, pre-trainable layer by layer via
    :meth:`autoencoder_layers`) and a linear classifier.  Per-patch class probabilities (softmax, or
    sigmoid for one class) are spread over the patch's pixels, summed with ``F.fold`` and divided by
    the overlap count; the output is the log of these averaged probabilities (per-pixel logits; for
    one class the logit of the averaged probability).  With ``dense=True`` the classifier predicts a
    class distribution for every pixel of the patch instead of one per patch.
    """

    kind = "segmentation"
    output_layer_name = "classifier"
    new_class_bias = -30.0  # new classes added by extend_output_classes start with ~zero probability

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        patch_size: int = 32,
        stride: int = 8,
        hidden: tuple[int, ...] = (200, 200, 200),
        dense: bool = False,
    ):
        super().__init__()
        if patch_size < 1 or stride < 1 or stride > patch_size:
            raise ValueError(f"need 1 <= stride <= patch_size, got patch_size={patch_size}, stride={stride}")
        if not hidden or len(hidden) > 64:
            raise ValueError(f"hidden must list 1..64 encoder layer sizes, got {len(hidden)}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.stride = stride
        self.dense = dense
        sizes = [in_channels * patch_size * patch_size, *hidden]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        per_class = patch_size * patch_size if dense else 1
        self.classifier = nn.Linear(sizes[-1], num_classes * per_class)

    def autoencoder_layers(self) -> list[nn.Linear]:
        """The encoder's linear layers, in order (for greedy layer-wise auto-encoder pre-training)."""
        return list(self.encoder)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Hidden code [N, hidden[-1]] of flattened patches [N, in_channels * patch_size²]."""
        h = patches
        for layer in self.encoder:
            h = torch.sigmoid(layer(h))
        return h

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Pad so that patches at ``stride`` tile the image exactly and every pixel is covered."""
        h, w = x.shape[-2:]
        ps, st = self.patch_size, self.stride

        def target(n: int) -> int:
            return ps + st * math.ceil(max(n - ps, 0) / st)

        th, tw = target(h), target(w)
        if (th, tw) == (h, w):
            return x, (0, 0, h, w)
        ph, pw = th - h, tw - w
        top, left = ph // 2, pw // 2
        pads = (left, pw - left, top, ph - top)
        mode = "reflect" if max(pads[0], pads[1]) < w and max(pads[2], pads[3]) < h else "replicate"
        return F.pad(x, pads, mode=mode), (top, left, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits [B, num_classes, H, W] for input [B, in_channels, H, W]."""
        if x.ndim != 4:
            raise InputError(f"expected a 4-D batch [B, C, H, W], got shape {tuple(x.shape)}")
        xp, (top, left, h, w) = self._pad(x)
        b, hp, wp = xp.shape[0], xp.shape[-2], xp.shape[-1]
        ps, k = self.patch_size, self.num_classes
        cols = F.unfold(xp, ps, stride=self.stride)  # [B, C*ps*ps, L]
        n_patches = cols.shape[-1]
        code = self.encode(cols.transpose(1, 2).reshape(b * n_patches, -1))
        scores = self.classifier(code)  # [B*L, K] or [B*L, K*ps*ps]
        if self.dense:
            scores = scores.reshape(b, n_patches, k, ps * ps)
            prob = torch.sigmoid(scores) if k == 1 else torch.softmax(scores, dim=2)
            prob = prob.permute(0, 2, 3, 1).reshape(b, k * ps * ps, n_patches)
        else:
            prob = torch.sigmoid(scores) if k == 1 else torch.softmax(scores, dim=1)
            prob = prob.reshape(b, n_patches, k, 1).permute(0, 2, 3, 1).expand(b, k, ps * ps, n_patches)
            prob = prob.reshape(b, k * ps * ps, n_patches)
        summed = F.fold(prob, (hp, wp), ps, stride=self.stride)
        ones = torch.ones(1, ps * ps, n_patches, dtype=prob.dtype, device=prob.device)
        count = F.fold(ones, (hp, wp), ps, stride=self.stride)
        avg = (summed / count)[..., top : top + h, left : left + w]
        eps = 1e-7
        if k == 1:
            avg = avg.clamp(eps, 1 - eps)
            return torch.log(avg) - torch.log1p(-avg)
        return torch.log(avg.clamp_min(eps))


def build_penn(
    in_channels: int = 1,
    num_classes: int = 5,
    patch_size: int = 32,
    stride: int = 8,
    hidden: tuple[int, ...] = (200, 200, 200),
    dense: bool = False,
) -> PennNet:
    """PENN patch network (SSAE encoder 1024 -> 200 -> 200 -> 200 + classifier)."""
    return PennNet(in_channels, num_classes, patch_size=patch_size, stride=stride, hidden=tuple(hidden), dense=dense)
