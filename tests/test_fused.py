"""The inference rewrite (batch norm folded, activations fused) computes what the network computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.models import architecture_names, build_model
from napari_spineseg.models.fused import FusedConv2d, fuse_for_inference, fused_kernel_available
from napari_spineseg.phantom import sample_study
from napari_spineseg.volume import Volume
from test_architectures import SMALL  # the same tiny widths as the registry tests

torch.set_num_threads(2)


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Batch-norm statistics and affine parameters far from their initial values (folding must matter)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("name", architecture_names("segmentation"))
def test_fused_network_matches_the_original_in_fp32(name: str) -> None:
    model = _trained_statistics(build_model(name, in_channels=3, num_classes=4, **SMALL[name]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, 33, 47)
    with torch.inference_mode():
        want = model(x)
        torch.testing.assert_close(fused(x), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # the original (e.g. a network being trained) is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FusedConv2d) for m in model.modules())


def test_unet_double_convs_are_fused_with_their_activations() -> None:
    for name, activation in (("unet", "relu"), ("unet-leaky", "leaky_relu")):
        fused = fuse_for_inference(build_model(name, in_channels=1, num_classes=3, **SMALL[name]))
        convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
        assert convs, name
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert {m.activation for m in convs} >= {activation}
        if name == "unet-leaky":
            assert any(m.negative_slope == pytest.approx(0.1) for m in convs)


def test_the_fused_kernel_passes_its_self_check_here() -> None:
    # oneDNN ships with every x86 CPU build of PyTorch: a False here means the speed-up is lost
    assert fused_kernel_available()


def test_fused_bf16_weights_with_fallback_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _trained_statistics(build_model("unet", in_channels=1, num_classes=3, **SMALL["unet"]))
    kernel = fuse_for_inference(model, torch.bfloat16)
    fallback = fuse_for_inference(model, torch.bfloat16)
    for module in fallback.modules():
        if isinstance(module, FusedConv2d):
            module.use_kernel = False
    x = torch.randn(2, 1, 40, 24)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = kernel(x).float(), fallback(x).float()
        ref = model(x).float()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.99
    assert (a - ref).abs().mean() < 0.05 * ref.abs().mean() + 0.02


def test_predictor_labels_do_not_depend_on_layer_fusion_in_fp32() -> None:
    sample = sample_study().image
    geometry = sample.geometry
    crop = Volume.from_array(
        sample.array[:, 60:170, 60:170].copy(), spacing=geometry.spacing, direction=geometry.direction
    )
    labels = {}
    for fuse in (False, True):
        predictor = Predictor(SegmentationSettings(precision="fp32", fuse_layers=fuse, postprocess=False))
        predictor.load("spineseg-default")
        labels[fuse] = predictor.predict(crop).labels.array
    assert len(np.unique(labels[False])) >= 3
    assert (labels[False] == labels[True]).mean() > 0.9999
