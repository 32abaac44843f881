"""Segmentation report (issue #8): JSON + one-page HTML, levels superior → inferior, lesions, CLI."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from napari_spineseg.cli import main
from napari_spineseg.errors import GeometryMismatchError, InputError
from napari_spineseg.io import read_volume, write_labels, write_volume
from napari_spineseg.modelfile import read_metadata, resolve_model
from napari_spineseg.orientation import reorient
from napari_spineseg.phantom import Phantom, make_phantom
from napari_spineseg.report import DISCLAIMER, NO_LESION, build_report, mid_sagittal, report_to_json, write_report
from napari_spineseg.volume import Volume

SMALL = {"size": (96, 96, 24), "spacing": (2.5, 2.5, 5.0), "seed": 3}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def with_lesion() -> Phantom:
    return make_phantom(lesions=1, **SMALL)


@pytest.fixture(scope="module")
def without_lesion() -> Phantom:
    return make_phantom(lesions=0, **SMALL)


@pytest.fixture(scope="module")
def default_model():
    return read_metadata(resolve_model("spineseg-default"))


def test_levels_lesion_and_volumes_on_the_phantom(with_lesion: Phantom, default_model) -> None:
    report = build_report(with_lesion.image, with_lesion.labels, default_model, overlay=False)
    levels = report["levels"]
    superior = [level["superior_mm"] for level in levels]
    assert superior == sorted(superior, reverse=True)  # superior -> inferior
    bodies = [level["name"] for level in levels if level["value"] == 1]
    assert bodies == with_lesion.levels  # named anatomically (levels.py), one per phantom level
    assert report["level_identification"]["status"] == "named" and "anatomically" in report["level_naming"]
    assert [level["order"] for level in levels] == list(range(1, len(levels) + 1))
    assert all(levels[i]["value"] != levels[i + 1]["value"] for i in range(len(levels) - 1))  # body/disc alternate

    (lesion,) = report["lesions"]
    expected_level = with_lesion.lesion_levels[0]  # e.g. "in L3"
    assert lesion["level"] == expected_level
    assert report["lesion_summary"].startswith("1 lesion") and expected_level in report["lesion_summary"]

    voxel_ml = float(np.prod(SMALL["spacing"])) / 1000.0
    labels = with_lesion.labels.array
    for row in report["classes"]:
        assert row["voxels"] == int(np.count_nonzero(labels == row["value"]))
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=1e-4)
    assert lesion["volume_ml"] == pytest.approx(np.count_nonzero(labels == 4) * voxel_ml, abs=1e-4)
    assert {row["name"] for row in report["classes"]} >= {"vertebral body", "intervertebral disc", "lesion"}
    # The default model has no lesion class: the report says so.
    assert any(w["code"] == "classes" for w in report["warnings"])
    assert report["model"]["name"] == "spineseg-default"
    assert report["model"]["detects_lesions"] is False
    assert report["model"]["validation"]["val_mean_dice"] > 0.5


def test_no_lesion_detected(without_lesion: Phantom, default_model) -> None:
    report = build_report(without_lesion.image, without_lesion.labels, default_model, overlay=False)
    assert report["lesions"] == []
    assert report["lesion_summary"] == NO_LESION == "no lesion detected"
    assert "cannot detect lesions" in report["lesion_note"]
    assert sum(level["value"] == 1 for level in report["levels"]) == len(without_lesion.levels)
    assert next(row for row in report["classes"] if row["value"] == 4)["volume_ml"] == 0.0


def test_html_and_json_files(tmp_path: Path, with_lesion: Phantom, default_model) -> None:
    report = build_report(with_lesion.image, with_lesion.labels, default_model)
    html_path = write_report(report, tmp_path / "out" / "report.html")
    text = html_path.read_text(encoding="utf-8")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert match and base64.b64decode(match.group(1)).startswith(PNG_MAGIC)
    for level in report["levels"]:
        assert f"<td>{level['name']}</td>" in text
    assert DISCLAIMER in text and "Not a medical device" in text
    assert "spineseg-default" in text and "<script" not in text and "http" not in text  # self-contained
    assert not list((tmp_path / "out").glob(".*"))  # atomic write left no temporary file

    json_path = write_report(report, tmp_path / "report.json")
    loaded = json.loads(json_path.read_text(encoding="utf-8"))
    assert loaded == json.loads(report_to_json(report))
    assert "png_base64" not in loaded["overlay"] and loaded["overlay"]["plane"] == "sagittal"
    expected = {k: v for k, v in report.items() if k != "overlay"}
    assert {k: v for k, v in loaded.items() if k != "overlay"} == expected
    assert {
        "created",
        "software",
        "study",
        "classes",
        "levels",
        "lesions",
        "lesion_summary",
        "model",
        "warnings",
    } <= set(loaded)
    with pytest.raises(InputError):
        write_report(report, tmp_path / "report.pdf")


def test_no_patient_identifiers(tmp_path: Path, without_lesion: Phantom) -> None:
    secrets = {
        "patient_name": "DOE^JANE",
        "patient_id": "PID-123456",
        "patient_birth_date": "19510203",
        "study_instance_uid": "1.2.840.99999.1",
        "series_description": "T2 SAG",
        "modality": "MR",
    }
    study = Volume(
        without_lesion.image.array,
        without_lesion.image.geometry,
        name="T2 SAG (3)",
        path=tmp_path / "DOE_JANE" / "series",
        metadata={"dicom": secrets, "PatientName": "DOE^JANE", "dicom_files": [str(tmp_path / "DOE_JANE" / "1.dcm")]},
    )
    report = build_report(study, without_lesion.labels, overlay=False)
    text = report_to_json(report)
    for value in ("DOE", "JANE", "PID-123456", "19510203", "1.2.840.99999.1", str(tmp_path)):
        assert value not in text
    assert report["study"]["modality"] == "MR" and report["study"]["series_description"] == "T2 SAG"

    # A file header carrying a patient name does not leak through the CLI either.
    import SimpleITK as sitk

    image = without_lesion.image.to_sitk()
    image.SetMetaData("PatientName", "DOE^JANE")
    sitk.WriteImage(image, str(tmp_path / "study.mha"))
    write_labels(without_lesion.labels, tmp_path / "seg.nii.gz")
    out = tmp_path / "r.json"
    assert main(["report", str(tmp_path / "study.mha"), str(tmp_path / "seg.nii.gz"), "-o", str(out)]) == 0
    assert "DOE" not in out.read_text(encoding="utf-8") and "JANE" not in out.read_text(encoding="utf-8")


def test_mismatched_geometry(
    tmp_path: Path, without_lesion: Phantom, default_model, capsys: pytest.CaptureFixture
) -> None:
    moved = Volume.from_array(
        without_lesion.labels.array, spacing=(2.5, 2.5, 4.0), direction=without_lesion.labels.direction
    )
    with pytest.raises(GeometryMismatchError, match="do not share geometry"):
        build_report(without_lesion.image, moved, default_model)
    write_volume(without_lesion.image, tmp_path / "study.nii.gz")
    write_labels(moved, tmp_path / "seg.nii.gz")
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "study.nii.gz"), str(tmp_path / "seg.nii.gz"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "do not share geometry" in err and "spacing" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_end_to_end(tmp_path: Path, with_lesion: Phantom, capsys: pytest.CaptureFixture) -> None:
    study, seg = tmp_path / "study.nii.gz", tmp_path / "study_seg.nii.gz"
    write_volume(with_lesion.image, study)
    write_labels(with_lesion.labels, seg)
    html_path, json_path = tmp_path / "report.html", tmp_path / "sub" / "report.json"
    assert main(["report", str(study), str(seg), "-o", str(html_path), "--json", str(json_path)]) == 0
    assert "1 lesion" in capsys.readouterr().out
    assert "data:image/png;base64," in html_path.read_text(encoding="utf-8")
    record = json.loads(json_path.read_text(encoding="utf-8"))
    assert record["model"]["name"] == "spineseg-default" and "--model" in record["model"]["note"]
    assert sum(level["value"] == 1 for level in record["levels"]) == len(with_lesion.levels)
    assert record["lesions"][0]["level"] == with_lesion.lesion_levels[0]

    assert main(["report", str(study), str(seg), "-o", str(tmp_path / "b.json"), "--model", "none"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["model"]["name"] is None
    assert main(["report", str(study), str(seg), "-o", str(tmp_path / "r.txt")]) == 1
    assert main(["report", str(study), str(seg), "-o", str(tmp_path / "c.html"), "--model", "no-such-model"]) == 1
    assert "unknown model" in capsys.readouterr().err
    assert not (tmp_path / "c.html").exists()


def test_mid_sagittal_is_superior_up_anterior_left_in_any_storage_order(without_lesion: Phantom) -> None:
    # Phantom storage is PIR (array[z, y, x]: z -> right, y -> inferior, x -> posterior), so low y is
    # superior and low x anterior: a bright block there must show at the top left in every storage order.
    study = without_lesion.image
    geometry = study.geometry
    marker = np.zeros(study.shape, np.float32)
    marker[:, 2:6, 2:6] = 1000.0
    labels = np.zeros(study.shape, np.uint8)
    labels[:, 40:50, 40:50] = 1
    for code in ("PIR", "LPS", "RAS", "ILA"):
        stored_image, _ = reorient(Volume(marker, geometry, "marker"), code)
        stored_labels, _ = reorient(Volume(labels, geometry, "labels"), code)
        view = mid_sagittal(stored_image, stored_labels)
        rows, cols = view.image.shape
        bright = np.argwhere(view.image > 500)
        assert bright.size, code
        assert bright[:, 0].max() < rows // 4 and bright[:, 1].max() < cols // 4, code  # top-left
        assert (view.row_mm, view.col_mm) == (2.5, 2.5)
        assert view.slices == 24


def test_real_study_levels(data_dir: Path, tmp_path: Path) -> None:
    image = read_volume(data_dir / "lumbar-mri" / "VB3" / "01_img.nii.gz")
    seg = read_volume(data_dir / "lumbar-mri" / "VB3" / "01_seg.nii.gz")  # 1..5 = L1..L5, superior -> inferior
    bodies = seg.with_array((seg.array > 0).astype(np.uint8), name="VB3-01 bodies")
    report = build_report(image, bodies)
    levels = report["levels"]
    assert [level["name"] for level in levels] == [f"body {i}" for i in range(1, 6)]
    # body k is the level labelled k (L1..L5): compare centroids along S.
    for level_id, level in enumerate(levels, start=1):
        zyx = np.argwhere(seg.array == level_id).mean(axis=0)
        s_mm = seg.geometry.index_to_lps(zyx[::-1])[0, 2]
        assert level["superior_mm"] == pytest.approx(s_mm, abs=1.0)
    assert report["lesion_summary"] == NO_LESION
    png = base64.b64decode(report["overlay"]["png_base64"])
    assert png.startswith(PNG_MAGIC)
    (tmp_path / "vb3.png").write_bytes(png)


def test_report_imports_without_qt_or_napari() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari'):\n"
        "    sys.modules[name] = None\n"
        "import napari_spineseg.report\n"
        "assert 'matplotlib' not in sys.modules  # imported lazily, only to draw the overlay\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validation_figures_are_a_table_not_a_key_dump(without_lesion: Phantom, default_model) -> None:
    from napari_spineseg.report import report_to_html

    text = report_to_html(build_report(without_lesion.image, without_lesion.labels, default_model, overlay=False))
    section = text[text.index("<h3>Validation figures</h3>") : text.index("<h2>Warnings</h2>")]
    assert "<th>HD95 (mm)</th>" in section and "<td>VB1 vertebral body</td>" in section  # one row per entry
    assert "<td>mean Dice</td>" in section and "held_out_fused VB1" not in section and "dice 0." not in section
    assert section.count("<table>") >= 2


def test_report_warns_when_the_result_is_not_a_spine(without_lesion: Phantom) -> None:
    image = without_lesion.image
    brain = image.with_array(image.array, name="brain")
    brain.metadata["dicom"] = {"body_part": "BRAIN"}
    canal_only = np.where(without_lesion.labels.array == 3, 3, 0).astype(np.uint8)
    report = build_report(brain, without_lesion.labels.with_array(canal_only), overlay=False)
    messages = [w["message"] for w in report["warnings"] if w["code"] == "plausibility"]
    assert any("not the spine" in m for m in messages) and any("no vertebral body" in m for m in messages)
    fine = build_report(image, without_lesion.labels, overlay=False)
    assert not [w for w in fine["warnings"] if w["code"] == "plausibility"]
    assert all("note" in level for level in fine["levels"])
