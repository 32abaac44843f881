"""``spineseg info`` on every file in ../shared/data and CLI error behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest

from napari_spineseg.cli import main

INFO_KEYS = {"size", "spacing", "origin", "direction", "orientation", "planes"}


def test_info_json_on_every_shared_file(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    files = sorted(data_dir.rglob("*.nii.gz"))
    assert len(files) > 60
    for path in files:
        assert main(["info", "--json", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert set(info) >= INFO_KEYS
        assert "".join(nib.aff2axcodes(nib.load(str(path)).affine)) == info["orientation"]
        assert sorted(info["planes"].values()) == [0, 1, 2]
    assert main(["info", "--json", str(data_dir / "dicom-sagittal-series" / "series")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == [86, 86, 63] and info["orientation"] == "PIR"
    assert info["planes"] == {"axial": 1, "coronal": 0, "sagittal": 2}


def test_info_text_names_planes(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "orientation        PIR" in out and "sagittal = index axis 2 (z)" in out


def test_bad_file_is_one_line_and_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"garbage")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spineseg: error:") and str(bad) in err[-1]
    assert "Traceback" not in "".join(err)
