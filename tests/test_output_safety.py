"""Red-team findings (issue #18) on the command line and cohort runs: no user file is ever replaced.

Each test builds its inputs (tiny synthetic studies, a small pydicom series, an untrained tiny
model) and failed before the fix: output collisions, the study or a source DICOM slice
overwritten, a manual label file overwritten or reported as a result, a cohort study paired with
another study's output, a user model hiding the bundled one, names too long for the file system,
``-o x.png`` making a directory, an interrupt leaving new labels beside an old uncertainty map,
``--uncertainty`` ignored with several studies, constant studies segmented, a broken pipe error.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fuzz_targets as ft
import napari_spineseg
from napari_spineseg import io as sio
from napari_spineseg.cli import main
from napari_spineseg.cohort import REPORT_NAME, segment_cohort
from napari_spineseg.errors import InputError
from napari_spineseg.io import read_volume, write_volume
from napari_spineseg.modelfile import ModelMetadata, save_model, user_model_path
from napari_spineseg.models import build_model
from napari_spineseg.outputs import owned_record, read_record, record_path
from napari_spineseg.phantom import make_phantom

SRC = Path(napari_spineseg.__file__).resolve().parents[1]  # the code under test, for subprocesses


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    with torch.no_grad():
        network.head.conv.weight.mul_(30.0)  # labels that vary, so two studies give two label maps
        network.head.conv.bias.zero_()
    metadata = ModelMetadata("tiny", "unet", network.arch_kwargs, preprocess={"pixel_spacing_mm": 2.0})
    return save_model(network, metadata, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def study(path: Path, seed: int = 0, value: float | None = None) -> Path:
    """A small phantom study (x 32, y 32, z 12), or a constant one of ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = make_phantom(size=(32, 32, 12), seed=seed).image
    if value is not None:
        image = image.with_array(np.full(image.shape, value, np.float32))
    write_volume(image, path)
    return path


def dicom_series(directory: Path, description: str | None = None) -> list[Path]:
    """An 8-slice 32 x 24 MR series (pydicom), optionally with another SeriesDescription."""
    import pydicom

    files = ft.write_dicom_series(directory, slices=8, rows=32, columns=24)
    for path in files:  # what a DICOM Segmentation of the series needs
        ds = pydicom.dcmread(path)
        ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.StudyID = "O", "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.Manufacturer = "1", "", "test"
        if description is not None:
            ds.SeriesDescription = description
        ds.save_as(path, enforce_file_format=True)
    return files


def segment(*args: str | Path, model: Path) -> int:
    return main(["segment", *map(str, args), "--model", str(model), "--device", "cpu", "-q"])


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("spineseg: error:")]
    assert len(lines) == 1 and len(lines[0]) < 400, err
    return lines[0]


# 1 -------------------------------------------------------------------------------------------
def test_same_named_studies_get_distinct_outputs(tmp_path: Path, model: Path) -> None:
    a, b = study(tmp_path / "a" / "scan.nii.gz", 1), study(tmp_path / "b" / "scan.nii.gz", 2)
    assert segment(a, b, "-o", tmp_path / "out", model=model) == 0
    written = sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz"))
    assert written == ["scan-2_seg.nii.gz", "scan_seg.nii.gz"]
    sources = {Path(read_record(tmp_path / "out" / name)["source"]) for name in written}
    assert sources == {a.resolve(), b.resolve()}
    arrays = [read_volume(tmp_path / "out" / name).array for name in written]
    assert not np.array_equal(*arrays) and len(np.unique(arrays[0])) > 1  # each study's own labels

    for folder in ("p1", "p2"):  # same series description and number
        dicom_series(tmp_path / folder / "series")
    assert segment(tmp_path / "p1" / "series", tmp_path / "p2" / "series", "-o", tmp_path / "dcm", model=model) == 0
    assert len(list((tmp_path / "dcm").glob("*_seg.nii.gz"))) == 2


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_the_study_is_never_an_output(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture, suffix) -> None:
    source = study(tmp_path / f"scan{suffix}")
    link = tmp_path / f"link{suffix}"
    os.link(source, link)
    before = snapshot(source)
    other = tmp_path / "labels.nii.gz"
    for extra in (
        ["-o", source],
        ["-o", link],  # the same file under another name
        ["-o", other, "--uncertainty", source],
        ["-o", other, "--uncertainty", other],  # the uncertainty map over the labels
    ):
        assert segment(source, *extra, model=model) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "input study" in line or "named for both" in line
    assert snapshot(source) == before and not other.exists()


# 3 -------------------------------------------------------------------------------------------
def test_a_source_dicom_slice_is_never_written(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    series = tmp_path / "series"
    files = dicom_series(series)
    before = snapshot(*files)
    for extra in (
        ["--dicom-seg", files[0], "-o", tmp_path / "l.nii.gz"],
        ["-o", files[3]],
        ["-o", series / "new.dcm"],  # a new .dcm in the series folder would join the series
        ["--dicom-seg", series],
    ):
        assert segment(files[0], *extra, model=model) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "input study" in line or "source series folder" in line
    assert snapshot(*files) == before
    assert sorted(p.name for p in series.iterdir()) == sorted(f.name for f in files)


# 4 -------------------------------------------------------------------------------------------
def test_a_user_label_file_is_never_replaced(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    source = study(tmp_path / "case.nii.gz")
    manual = tmp_path / "case_seg.nii.gz"
    write_volume(read_volume(source).with_array(np.ones((12, 32, 32), np.uint8)), manual)
    before = manual.read_bytes()
    assert segment(source, model=model) == 1
    assert "not written by spineseg" in one_error_line(capsys.readouterr().err)
    assert manual.read_bytes() == before
    assert segment(source, "--overwrite", model=model) == 0  # the user insists
    assert manual.read_bytes() != before and owned_record(manual)
    assert segment(source, model=model) == 0  # spineseg's own output is replaced freely
    corrected = read_volume(manual)  # the user corrects the labels and saves them over the file
    write_volume(corrected.with_array(np.full(corrected.shape, 2, np.uint8)), manual)
    corrected_bytes = manual.read_bytes()
    assert segment(source, model=model) == 1 and manual.read_bytes() == corrected_bytes


def test_cohort_never_reports_or_replaces_a_manual_label_file(tmp_path: Path, model: Path) -> None:
    study(tmp_path / "case.nii.gz", 1)
    study(tmp_path / "other.nii.gz", 2)
    manual = tmp_path / "case_seg.nii.gz"
    write_volume(read_volume(tmp_path / "case.nii.gz").with_array(np.ones((12, 32, 32), np.uint8)), manual)
    before = manual.read_bytes()
    results = {p.result.study: p.result for p in segment_cohort(tmp_path, model=model)}
    assert results["case"].status == "error" and "not written by spineseg" in results["case"].error
    assert results["other"].status == "done" and manual.read_bytes() == before
    with open(tmp_path / REPORT_NAME, newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["study"] == "case")
    assert row["status"] == "error" and row["volume_ml_vertebral_body"] == ""


# 5 -------------------------------------------------------------------------------------------
def test_cohort_resume_binds_each_result_to_its_study(tmp_path: Path, model: Path) -> None:
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    study(cohort / "sub" / "a.nii.gz", 1)
    assert [(p.result.study, p.result.status) for p in segment_cohort(cohort, out, model=model)] == [("sub_a", "done")]
    first = (out / "sub_a_seg.nii.gz").read_bytes()
    study(cohort / "sub_a.nii.gz", 2)  # another study whose derived name is the same
    statuses = {p.result.study: p.result.status for p in segment_cohort(cohort, out, model=model)}
    assert statuses == {"sub_a": "skipped", "sub_a-2": "done"}
    assert (out / "sub_a_seg.nii.gz").read_bytes() == first
    assert read_record(out / "sub_a_seg.nii.gz")["study_key"] == "sub/a.nii.gz"
    assert read_record(out / "sub_a-2_seg.nii.gz")["study_key"] == "sub_a.nii.gz"

    study(cohort / "sub" / "a.nii.gz", 3)  # the study changed: its old labels are not its result
    statuses = {p.result.study: p.result.status for p in segment_cohort(cohort, out, model=model)}
    assert statuses == {"sub_a": "done", "sub_a-2": "skipped"}
    other_model = tmp_path / "other.safetensors"
    other_model.write_bytes(model.read_bytes())
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    save_model(network, ModelMetadata("tiny2", "unet", network.arch_kwargs), other_model)
    statuses = {p.result.study: p.result.status for p in segment_cohort(cohort, out, model=other_model)}
    assert statuses == {"sub_a": "done", "sub_a-2": "done"}  # another model: segmented again


# 17 ------------------------------------------------------------------------------------------
def test_a_user_model_may_not_hide_a_bundled_one(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path / "models"))
    argv = ["finetune", "--model", str(model), "--image", "i.nii.gz", "--labels", "l.nii.gz", "-o"]
    assert main([*argv, "spineseg-default"]) == 1
    assert "bundled model" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--phantoms", "1", "-o", str(user_model_path("spineseg-default"))]) == 1
    assert "bundled model" in one_error_line(capsys.readouterr().err)
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    with pytest.raises(InputError, match="bundled model"):
        save_model(network, ModelMetadata("x", "unet", network.arch_kwargs), user_model_path("Spineseg-Default"))
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


# 19 ------------------------------------------------------------------------------------------
def test_long_names_fit_or_are_refused_before_segmenting(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = tmp_path / "series"
    dicom_series(series, description="D" * 300)
    assert segment(series, "-o", tmp_path / "out", model=model) == 0
    (written,) = (tmp_path / "out").glob("*_seg.nii.gz")
    assert len(written.name) < 130 and written.name.startswith("DDDD")

    ran = []
    monkeypatch.setattr("napari_spineseg.segment_command.run_with_progress", lambda *a: ran.append(a))
    assert segment(series, "-o", tmp_path / ("x" * 240 + ".nii.gz"), model=model) == 1
    assert "too long" in one_error_line(capsys.readouterr().err) and not ran


# 20 ------------------------------------------------------------------------------------------
def test_unknown_extension_is_refused_not_made_a_directory(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture
) -> None:
    source = study(tmp_path / "scan.nii.gz")
    assert segment(source, "-o", tmp_path / "x.png", model=model) == 1
    assert "unknown output format" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()
    assert segment(source, "-o", f"{tmp_path / 'x.v2'}/", model=model) == 0  # a trailing / means a directory
    assert (tmp_path / "x.v2" / "scan_seg.nii.gz").is_file()


def test_uncertainty_with_several_studies_needs_a_directory(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = study(tmp_path / "a.nii.gz", 1), study(tmp_path / "b.nii.gz", 2)
    assert segment(a, b, "-o", tmp_path / "out", "--uncertainty", tmp_path / "u.nii.gz", model=model) == 1
    assert "directory" in one_error_line(capsys.readouterr().err) and not (tmp_path / "out").exists()
    assert segment(a, b, "-o", tmp_path / "out", "--uncertainty", tmp_path / "unc", model=model) == 0
    assert sorted(p.name for p in (tmp_path / "unc").glob("*.nii.gz")) == [
        "a_uncertainty.nii.gz",
        "b_uncertainty.nii.gz",
    ]


def test_an_interrupt_keeps_labels_and_uncertainty_together(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    source = study(tmp_path / "scan.nii.gz")
    labels, unc = tmp_path / "l.nii.gz", tmp_path / "u.nii.gz"
    assert segment(source, "-o", labels, "--uncertainty", unc, model=model) == 0
    before = snapshot(labels, unc)
    study(source, seed=5)  # another study at the same path: new labels and a new map
    write = sio.write_volume

    def interrupted(volume, path, **kwargs):
        if Path(path).name.startswith(".u.nii.gz") or Path(path) == unc:
            raise KeyboardInterrupt
        return write(volume, path, **kwargs)

    monkeypatch.setattr(sio, "write_volume", interrupted)
    assert main(["segment", str(source), "-o", str(labels), "--uncertainty", str(unc), "--model", str(model)]) == 130
    assert "no partial output was left" in capsys.readouterr().err
    assert snapshot(labels, unc) == before  # both old: never new labels beside an old map
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        record_path(p).name for p in (labels, unc)
    )


# 10 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 7.0, float("nan")])
def test_studies_with_nothing_to_segment_are_refused(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture, value: float
) -> None:
    source = study(tmp_path / "flat.nii.gz", value=value)
    assert segment(source, model=model) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "nothing to segment" in line
    assert not list(tmp_path.glob("flat_seg*"))


def test_cohort_refuses_a_constant_study(tmp_path: Path, model: Path) -> None:
    study(tmp_path / "flat.nii.gz", value=0.0)
    study(tmp_path / "real.nii.gz", 1)
    results = {p.result.study: p.result for p in segment_cohort(tmp_path, model=model)}
    assert results["flat"].status == "error" and "nothing to segment" in results["flat"].error
    assert results["real"].status == "done" and not (tmp_path / "flat_seg.nii.gz").exists()


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    source = study(tmp_path / "scan.nii.gz")
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "napari_spineseg.cli", "info", str(source), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()  # like `| head` that has already exited
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert err == "", err


def test_records_are_small_json_beside_the_output(tmp_path: Path, model: Path) -> None:
    source = study(tmp_path / "scan.nii.gz")
    assert segment(source, model=model) == 0
    record = json.loads(record_path(tmp_path / "scan_seg.nii.gz").read_text())
    assert record["kind"] == "labels" and record["source"] == str(source.resolve())
    assert record["model_sha256"] and record["source_sha256"] and record["sha256"]
