"""``spineseg segment`` / ``models`` on real studies: exact geometry, errors, no partial output."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_spineseg.cli import main
from napari_spineseg.io import read_volume
from napari_spineseg.modelfile import ModelMetadata, save_model
from napari_spineseg.models import build_model


@pytest.fixture()
def tiny_model_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    metadata = ModelMetadata("tiny", "unet", network.arch_kwargs, preprocess={"pixel_spacing_mm": 2.0})
    return save_model(network, metadata, tmp_path / "tiny.safetensors")


def test_segment_real_study_keeps_geometry_exactly(data_dir: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    source = data_dir / "spinal-cord-t2" / "t2.nii.gz"  # PSR: a non-canonical orientation
    out = tmp_path / "out" / "t2_seg.mha"
    uncertainty = tmp_path / "out" / "t2_unc.nii.gz"
    args = ["segment", str(source), "-o", str(out), "--model", str(tiny_model_path), "-q"]
    assert main([*args, "--uncertainty", str(uncertainty)]) == 0
    study, labels = read_volume(source), read_volume(out)
    assert labels.geometry == study.geometry
    assert labels.array.dtype == np.uint8
    assert read_volume(uncertainty).geometry == study.geometry


def test_segment_dicom_series_writes_nifti(
    data_dir: Path, tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture
) -> None:
    series = data_dir / "dicom-sagittal-series" / "series"
    assert main(["segment", str(series), "-o", str(tmp_path), "--model", str(tiny_model_path), "-q"]) == 0
    (written,) = list(tmp_path.glob("*_seg.nii.gz"))
    assert read_volume(written).geometry.is_close(read_volume(series).geometry)
    # A brain EPI is not a spine study: said on stderr (the labels are still written).
    err = capsys.readouterr().err
    assert "spineseg: warning:" in err and "'BRAIN', not the spine" in err, err


def test_segment_default_output_name_and_planes(data_dir: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    source = tmp_path / "case_img.nii.gz"
    shutil.copy(data_dir / "spinal-cord-t2" / "t2.nii.gz", source)
    cmd = ["segment", str(source), "--model", str(tiny_model_path), "--planes", "sagittal", "--fusion", "vote", "-q"]
    assert main(cmd) == 0
    assert (tmp_path / "case_img_seg.nii.gz").is_file()


def test_segment_failures_exit_nonzero_and_leave_nothing(
    tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    assert main(["segment", str(bad), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model_path)]) == 1
    assert "bad.nii.gz" in capsys.readouterr().err
    assert main(["segment", str(bad), "--model", str(tmp_path / "nomodel.safetensors")]) == 1
    assert "model file not found" in capsys.readouterr().err
    assert main(["segment", str(bad), "--model", "x", "--planes", "transverse"]) == 1
    assert not list(tmp_path.glob("o.nii.gz*")) and not list(tmp_path.glob(".*part*"))


def test_models_lists_user_models(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path))
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    save_model(network, ModelMetadata("mine", "unet", network.arch_kwargs), tmp_path / "mine.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"xx")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "user" in out and "UNUSABLE" in out
