"""Inference-only network rewrite: batch norm folded into convolutions, activations fused into them.

Small U-Nets are memory-bound on CPUs: after every 3×3 convolution a batch-norm pass and an
activation pass each read and write the whole feature map again.  :func:`fuse_for_inference`
returns a copy of a network in eval mode where, inside every ``nn.Sequential``,

* ``Conv2d → BatchNorm2d`` becomes one convolution (weights and bias folded, exact in fp32), and
* ``Conv2d → BatchNorm2d → ReLU/LeakyReLU`` becomes one oneDNN convolution with the activation
  as a post-op (the kernel PyTorch's own compiler emits on CPU), in the inference precision.

The original network is never modified (training keeps batch norm).  Anything that does not match
these patterns is left as it is, so every architecture of the registry stays valid.  When the
fused kernel is missing or fails its one-time self-check, plain ``conv2d`` + activation is used.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["FusedConv2d", "fuse_for_inference", "fused_kernel_available"]


class FusedConv2d(nn.Module):
    """A 2-D convolution (batch norm folded in) with an optional ReLU/LeakyReLU post-op.

    Weights are stored in the inference dtype; inputs are cast to it (as autocast would).
    """

    def __init__(self, conv: nn.Conv2d, activation: str | None, negative_slope: float, dtype: torch.dtype):
        super().__init__()
        if activation not in (None, "relu", "leaky_relu"):
            raise ValueError(f"unsupported fused activation {activation!r}")
        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.float())  # fp32 bias: added before the one rounding to dtype
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.use_kernel = activation is not None and self.weight.device.type == "cpu" and fused_kernel_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.use_kernel and x.device.type == "cpu":
            scalars = [self.negative_slope] if self.activation == "leaky_relu" else [None]
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.activation, scalars, "",
            )  # fmt: skip
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation == "relu":
            return F.relu(y)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, self.negative_slope)
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activation={self.activation}, kernel={self.use_kernel}"


@functools.cache
def fused_kernel_available() -> bool:
    """True when oneDNN's fused convolution + activation runs here and matches conv2d + ReLU."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 9, 7, generator=generator)
        w = torch.randn(4, 3, 3, 3, generator=generator)
        b = torch.randn(4, generator=generator)
        got = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [None], "")
        want = F.relu(F.conv2d(x, w, b, padding=1))
        return bool(got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4))
    except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover - builds without oneDNN
        return False


def fuse_for_inference(network: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An eval-mode copy of ``network`` with Conv→BN(→ReLU/LeakyReLU) runs fused; ``network`` is untouched.

    ``dtype``: precision of the fused convolutions (``torch.bfloat16`` under bf16 inference).
    """
    fused = copy.deepcopy(network).eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module, dtype)
    return fused


def _fuse_sequential(sequential: nn.Sequential, dtype: torch.dtype) -> None:
    names = list(sequential._modules)
    index = 0
    while index < len(names):
        conv = sequential._modules[names[index]]
        norm = sequential._modules[names[index + 1]] if index + 1 < len(names) else None
        if not (
            type(conv) is nn.Conv2d
            and type(norm) is nn.BatchNorm2d
            and conv.padding_mode == "zeros"
            and norm.track_running_stats
        ):
            index += 1
            continue
        folded = fuse_conv_bn_eval(conv.eval(), norm.eval())
        after = sequential._modules[names[index + 2]] if index + 2 < len(names) else None
        activation, slope, consumed = None, 0.0, 2
        if type(after) is nn.ReLU:
            activation, consumed = "relu", 3
        elif type(after) is nn.LeakyReLU:
            activation, slope, consumed = "leaky_relu", after.negative_slope, 3
        sequential._modules[names[index]] = FusedConv2d(folded, activation, slope, dtype)
        for name in names[index + 1 : index + consumed]:
            sequential._modules[name] = nn.Identity()
        index += consumed
