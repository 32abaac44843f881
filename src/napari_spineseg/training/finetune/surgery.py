"""Network surgery for new classes: grown output rows, their probe, their speed-up, batch norm."""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...modelfile import ModelMetadata
from ...orientation import Plane
from ...preprocess import PreprocessConfig
from ...schema import IGNORE

logger = logging.getLogger(__name__)


def _stay_in_eval(self, mode: bool = True):
    return self


def freeze_batchnorm(network) -> int:
    """Keep batch-norm layers in eval mode (running statistics of the base model) while training."""
    from torch import nn

    count = 0
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = types.MethodType(_stay_in_eval, module)
            count += 1
    return count


def unfreeze_batchnorm(network) -> None:
    for module in network.modules():
        module.__dict__.pop("train", None)


def _output_layer(network):
    name = getattr(network, "output_layer_name", None)
    return network.get_submodule(name) if name else None


def grow_head(network, new_k: int, parents: Mapping[int, int], margin: float) -> None:
    """Grow the output to ``new_k`` classes; new rows copy their parent's row, bias − margin."""
    import torch
    from torch import nn

    from ...models import extend_output_classes

    extend_output_classes(network, new_k)
    layer = _output_layer(network)
    if isinstance(layer, nn.Conv2d):
        with torch.no_grad():
            for new_index, parent in parents.items():
                layer.weight[new_index].copy_(layer.weight[parent])
                if layer.bias is not None:
                    layer.bias[new_index] = layer.bias[parent] - float(margin)


def probe_new_rows(
    network, base_meta: ModelMetadata, pairs, targets, lut: np.ndarray, parents: Mapping[int, int], config
) -> dict[int, float]:
    """Fit each new class's output row to the painted voxels: a class-balanced logistic regression
    on the base network's last features (new class vs everything else trusted on the same slices).

    A copy of the parent row cannot tell a lesion from the body around it, and a few hundred
    painted voxels among tens of thousands pull a fresh row down faster than they teach it (the
    painted hemangioma of the sample study stayed at Dice 0 after 200 steps).  The probe finds
    the direction in feature space that separates what was painted, so fine-tuning starts from a
    row that already predicts it.  Returns ``{new index: balanced training accuracy}``.
    """
    import torch
    from torch import nn

    from ...preprocess import resample_back, resample_slices
    from ...slicing import plane_pixel_spacing, plane_view, prepare_study, slice_batch

    layer = _output_layer(network)
    if not isinstance(layer, nn.Conv2d) or not parents:
        return {}
    preprocess = PreprocessConfig.from_dict(base_meta.preprocess) if base_meta.preprocess else PreprocessConfig()
    captured: list = []
    hook = layer.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach().float()))
    features_by_class: dict[int, list] = {}
    negatives: list = []
    try:
        # Every plane the model runs in: the planes' predictions are averaged at inference, so a
        # row fitted to one plane's features alone is outvoted by the other two.
        for pair, target in zip(pairs, targets):
            study = prepare_study(pair.image, preprocess)
            canonical = study.reorientation.forward(target.labels)
            for plane in [Plane(p) for p in config.planes]:
                labels = plane_view(canonical, plane)
                stack = plane_view(study.image, plane)
                index = lut[labels]  # class index per voxel (IGNORE: not trusted)
                wanted = [i for i in parents if (index == i).any()]
                if not wanted:
                    continue
                slices = np.flatnonzero(np.isin(index, wanted).any(axis=(1, 2)))[:16]
                batch = slice_batch(stack, slices, base_meta.context_slices)
                spacing = plane_pixel_spacing(study.spacing_zyx, plane)
                height, width = batch.shape[-2:]
                if preprocess.pixel_spacing_mm is not None:
                    model_spacing = (preprocess.pixel_spacing_mm, preprocess.pixel_spacing_mm)
                    batch = resample_slices(batch, spacing, model_spacing, order=1)
                captured.clear()
                with torch.inference_mode():
                    network.eval()(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
                features = captured[0].numpy()
                if features.shape[-2:] != (height, width):
                    features = resample_back(features, (height, width), order=1)
                features = np.moveaxis(features, 1, -1)  # [B, H, W, F]
                sliced = index[slices]
                for i in wanted:
                    features_by_class.setdefault(i, []).append(features[sliced == i])
                others = (sliced != IGNORE) & ~np.isin(sliced, wanted)
                rows = np.flatnonzero(others.ravel())
                rng = np.random.default_rng(0)
                take = rng.choice(rows, size=min(len(rows), 20_000), replace=False) if len(rows) else rows
                negatives.append(features.reshape(-1, features.shape[-1])[take])
    finally:
        hook.remove()
    if not features_by_class or not sum(len(n) for n in negatives):
        return {}  # nothing trusted beside the new classes on their slices: keep the parent-copy rows
    rest = torch.from_numpy(np.concatenate(negatives)).float()
    fitted: dict[int, float] = {}
    weight, bias = layer.weight.data, layer.bias.data if layer.bias is not None else None
    for new_index, parent in parents.items():
        chunks = features_by_class.get(new_index)
        if not chunks:
            continue
        positive = torch.from_numpy(np.concatenate(chunks)).float()
        direction, offset, accuracy = _balanced_logistic(positive, rest)
        with torch.no_grad():  # new logit = parent logit + probe: wins over the parent where the probe says so
            weight[new_index] = weight[parent] + direction.to(weight.dtype).view(-1, *([1] * (weight.ndim - 2)))
            if bias is not None:
                bias[new_index] = bias[parent] + float(offset)
        fitted[int(new_index)] = round(accuracy, 4)
    return fitted


def _balanced_logistic(positive, negative, max_false_positive: float = 0.005) -> tuple[Any, float, float]:
    """Class-balanced, lightly L2-regularised logistic regression (L-BFGS) of ``positive`` vs
    ``negative`` feature rows: ``(weights, bias, balanced accuracy)`` on the raw features."""
    import torch
    from torch.nn import functional as F

    x = torch.cat([positive, negative])
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    sample_weight = torch.where(y > 0, 0.5 / len(positive), 0.5 / len(negative))
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * sample_weight).sum()
        loss = loss + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        # Balanced weights put the threshold where both classes are equally likely; a direction
        # that does not separate them would then claim half the parent.  Shift it so that at
        # most ``max_false_positive`` of the negatives score above zero.
        scores = z @ w + b
        shift = max(0.0, float(torch.quantile(scores[y == 0], 1.0 - max_false_positive)))
        scores = scores - shift
        accuracy = 0.5 * float((scores[y > 0] > 0).float().mean() + (scores[y == 0] <= 0).float().mean())
        return (w / std).detach(), float(b - shift - (w * mean / std).sum()), accuracy


class _FastNewRows:
    """Marker base; see :func:`speed_up_new_rows`."""


def speed_up_new_rows(network, old_k: int, scale: float) -> bool:
    """Train the new classes' output rows ``scale`` times faster.

    Adam moves every weight by about ``lr`` per step whatever its gradient's size, so a new row
    cannot travel far at fine-tuning learning rates.  The rows are reparametrised as
    ``scale * u`` (``u`` is what Adam updates) until :func:`fuse_new_rows` folds them back into a
    plain convolution with the architecture's own parameter names.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    name = getattr(network, "output_layer_name", None)
    layer = _output_layer(network)
    if not isinstance(layer, nn.Conv2d) or scale == 1.0 or layer.out_channels <= old_k:
        return False

    class FastNewRows(nn.Module, _FastNewRows):
        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            self.conv = conv
            self.scale = float(scale)
            with torch.no_grad():
                self.new_weight = nn.Parameter(conv.weight[old_k:].clone() / self.scale)
                self.new_bias = None if conv.bias is None else nn.Parameter(conv.bias[old_k:].clone() / self.scale)
            self.old_weight = nn.Parameter(conv.weight[:old_k].detach().clone())
            self.old_bias = None if conv.bias is None else nn.Parameter(conv.bias[:old_k].detach().clone())

        def weights(self):
            weight = torch.cat([self.old_weight, self.scale * self.new_weight])
            bias = None if self.old_bias is None else torch.cat([self.old_bias, self.scale * self.new_bias])
            return weight, bias

        def forward(self, x):
            weight, bias = self.weights()
            c = self.conv
            return F.conv2d(
                x,
                weight.to(x.dtype),
                None if bias is None else bias.to(x.dtype),
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
            )

    wrapper = FastNewRows(layer)
    del wrapper._modules["conv"]  # keep the settings, not a second copy of the parameters
    wrapper.__dict__["conv"] = layer
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    setattr(parent, child, wrapper)
    return True


def fuse_new_rows(network) -> None:
    """Undo :func:`speed_up_new_rows`: a plain convolution with the trained weights."""
    import torch

    name = getattr(network, "output_layer_name", None)
    if not name:
        return
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    wrapper = getattr(parent, child)
    if not isinstance(wrapper, _FastNewRows):
        return
    conv = wrapper.__dict__["conv"]
    with torch.no_grad():
        weight, bias = wrapper.weights()
        conv.weight.data = weight.detach().clone().to(conv.weight.dtype)
        if bias is not None:
            conv.bias.data = bias.detach().clone().to(conv.bias.dtype)
    setattr(parent, child, conv)
