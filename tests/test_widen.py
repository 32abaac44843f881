"""Function-preserving widening of a trained U-Net (models/widen.py, scripts/widen_model.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_spineseg.errors import InputError
from napari_spineseg.modelfile import load_model
from napari_spineseg.models import build_model
from napari_spineseg.models.widen import widen_unet

ROOT = Path(__file__).resolve().parents[1]


def _trained_like(seed: int = 0):
    """A small U-Net with non-trivial weights and batch-norm statistics."""
    torch.manual_seed(seed)
    network = build_model("unet", in_channels=3, num_classes=4, base=4, depth=3)
    network.train()
    for _ in range(3):  # move the running statistics away from their initial values
        network(torch.randn(4, 3, 40, 40) * 2 + 1)
    return network.eval()


def test_the_widened_network_computes_the_same_logits_with_more_context_slices():
    narrow = _trained_like()
    wide = widen_unet(narrow, factor=2, in_channels=5).eval()
    x = torch.randn(2, 5, 48, 40)
    with torch.no_grad():
        expected, got = narrow(x[:, 1:4]), wide(x)
    assert wide.inc[0].out_channels == 8 and wide.inc[0].in_channels == 5
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())
    assert sum(p.numel() for p in wide.parameters()) > 3.5 * sum(p.numel() for p in narrow.parameters())


def test_noise_breaks_the_symmetry_of_the_copies_but_keeps_the_prediction():
    narrow = _trained_like(1)
    wide = widen_unet(narrow, factor=3, noise=0.01, seed=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        agreement = (wide(x).argmax(1) == narrow(x).argmax(1)).float().mean().item()
    first = wide.inc[0].weight
    assert not torch.equal(first[:4], first[4:8])  # copies differ, so training can pull them apart
    assert agreement > 0.98


def test_only_a_classic_unet_grows_and_the_context_grows_symmetrically():
    with pytest.raises(InputError, match="classic U-Net"):
        widen_unet(build_model("attention-unet", in_channels=1, num_classes=3, base=4, depth=2))
    with pytest.raises(InputError, match="classic U-Net"):
        widen_unet(build_model("unet-leaky", in_channels=1, num_classes=3, base=4, depth=2))
    with pytest.raises(InputError, match="symmetrically"):
        widen_unet(_trained_like(), in_channels=4)


def test_the_widen_script_writes_a_model_that_segments_as_the_bundled_one(tmp_path):
    out = tmp_path / "wide.safetensors"
    command = [sys.executable, str(ROOT / "scripts" / "widen_model.py"), "spineseg-default", str(out), "--noise", "0"]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    bundled, wide = load_model("spineseg-default"), load_model(out)
    assert wide.metadata.context_slices == bundled.metadata.context_slices
    assert wide.metadata.architecture_kwargs["base"] == 2 * bundled.metadata.architecture_kwargs["base"]
    assert wide.metadata.training["widened_from"]["model"] == "spineseg-default"
    x = torch.randn(1, bundled.metadata.in_channels, 64, 64)
    with torch.no_grad():
        assert torch.allclose(wide.network.eval()(x), bundled.network.eval()(x), atol=1e-3)
