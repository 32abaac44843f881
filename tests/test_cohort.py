"""Cohort segmentation (``spineseg segment DIR [--scheduler ...]``): discovery, a 2-worker LocalCluster
against the serial run, resumability, the CSV report, per-study errors and cancellation."""

from __future__ import annotations

import csv
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_spineseg import cohort
from napari_spineseg.cli import main
from napari_spineseg.cohort import (
    REPORT_NAME,
    discover_studies,
    is_cohort_directory,
    local_workers,
    open_client,
    segment_cohort,
)
from napari_spineseg.errors import Cancelled, InputError
from napari_spineseg.inference import SegmentationSettings
from napari_spineseg.io import read_volume, write_volume
from napari_spineseg.modelfile import ModelMetadata, read_metadata, resolve_model, save_model, user_model_path
from napari_spineseg.models import build_model
from napari_spineseg.phantom import make_phantom
from napari_spineseg.review import review_labels

MODEL = "tiny-cohort"
GOOD = ["case0", "case1", "sub_case2"]


@pytest.fixture(scope="module")
def model_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An untrained tiny U-Net in a temporary user model directory (head scaled so labels vary)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPINESEG_MODEL_DIR", str(tmp_path_factory.mktemp("models")))
        torch.manual_seed(0)
        network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
        with torch.no_grad():
            network.head.conv.weight.mul_(30.0)
            network.head.conv.bias.zero_()
        kwargs = {k: v for k, v in network.arch_kwargs.items() if k not in ("in_channels", "num_classes")}
        metadata = ModelMetadata(MODEL, "unet", kwargs, preprocess={"pixel_spacing_mm": 4.0})
        save_model(network, metadata, user_model_path(MODEL))
        yield MODEL


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small phantoms in three formats, one corrupt file, a label file and a hidden file."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "sub").mkdir()
    for seed, name in enumerate(["case0.nii.gz", "case1.mha", "sub/case2.nrrd"]):
        phantom = make_phantom(size=(48, 48, 12), seed=seed)
        write_volume(phantom.image, root / name)
        if seed == 0:
            write_volume(phantom.labels, root / "case0_seg.nii.gz")  # a label file: not a study
            write_volume(phantom.image, root / ".hidden.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    return root


@pytest.fixture(scope="module")
def client(model_name: str) -> Iterator:
    with open_client("local:2") as dask_client:
        assert len(dask_client.scheduler_info()["workers"]) == 2
        yield dask_client


@pytest.fixture(scope="module")
def serial_out(cohort_dir: Path, model_name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serial")
    results = list(segment_cohort(cohort_dir, out, model=model_name))
    assert [(p.result.study, p.result.status) for p in results] == [
        ("broken", "error"),
        *((name, "done") for name in GOOD),
    ]
    return out


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_discovery_order_names_and_skips(cohort_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    shutil.copytree(cohort_dir, root)
    (root / "p1").mkdir()
    (root / "p1" / "sag").symlink_to(data_dir / "dicom-sagittal-series" / "series", target_is_directory=True)
    (root / "out").mkdir()
    write_volume(make_phantom(size=(16, 16, 4)).image, root / "out" / "stray.nii.gz")  # the output dir is not searched
    studies = discover_studies(root, root / "out")
    assert [s.name for s in studies] == ["broken", "case0", "case1", "p1_sag", "sub_case2"]
    assert [s.output.name for s in studies] == [f"{s.name}_seg.nii.gz" for s in studies]
    assert {s.output.parent for s in studies} == {root / "out"}
    assert studies[3].series_id and studies[3].source == root / "p1" / "sag"
    assert is_cohort_directory(root) and not is_cohort_directory(root / "p1" / "sag")
    assert not is_cohort_directory(root / "case1.mha")


def test_local_cluster_matches_serial(cohort_dir: Path, serial_out: Path, client, model_name: str, tmp_path) -> None:
    statuses = {
        p.result.study: p.result.status
        for p in segment_cohort(cohort_dir, tmp_path, model=model_name, scheduler=client)
    }
    assert statuses == {"broken": "error", **dict.fromkeys(GOOD, "done")}
    for name, source in zip(GOOD, ["case0.nii.gz", "case1.mha", "sub/case2.nrrd"]):
        serial, distributed = serial_out / f"{name}_seg.nii.gz", tmp_path / f"{name}_seg.nii.gz"
        assert serial.read_bytes() == distributed.read_bytes()
        labels = read_volume(distributed)
        assert np.array_equal(read_volume(serial).array, labels.array) and len(np.unique(labels.array)) > 1
        assert labels.geometry.is_close(read_volume(cohort_dir / source).geometry)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in read_report(tmp_path / REPORT_NAME)]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in read_report(serial_out / REPORT_NAME)]


def test_report_columns_volumes_and_errors(serial_out: Path, model_name: str) -> None:
    rows = read_report(serial_out / REPORT_NAME)
    classes = read_metadata(resolve_model(model_name)).classes
    volume_columns = ["volume_ml_vertebral_body", "volume_ml_intervertebral_disc", "volume_ml_spinal_canal"]
    assert list(rows[0]) == ["study", "status", "seconds", "output", *volume_columns, "volume_ml_lesion", "error"]
    assert [(r["study"], r["status"]) for r in rows] == [("broken", "error"), *((n, "done") for n in GOOD)]
    broken = rows[0]
    assert broken["error"].startswith("broken.nii.gz: corrupt or unrecognised NIfTI header")
    assert str(serial_out.parent) not in broken["error"] and broken["output"] == broken["volume_ml_lesion"] == ""
    for row in rows[1:]:
        assert row["error"] == "" and float(row["seconds"]) > 0 and row["output"] == f"{row['study']}_seg.nii.gz"
        labels = read_volume(serial_out / row["output"])
        expected = {c.name: c.volume_ml for c in review_labels(labels.array, labels.geometry, classes).classes}
        assert expected.get("vertebral body", 0) > 0
        for label_class in classes[1:]:
            column = "volume_ml_" + label_class.name.replace(" ", "_")
            assert float(row[column]) == pytest.approx(expected.get(label_class.name, 0.0), abs=1e-6)


def test_resume_skips_complete_outputs(cohort_dir: Path, serial_out: Path, client, model_name: str, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(serial_out, out)
    (out / REPORT_NAME).unlink()
    (out / ".case0_seg.nii.gz.x1.part.nii.gz").write_bytes(b"partial")  # a killed write's leftover
    (out / "case1_seg.nii.gz").write_bytes((out / "case1_seg.nii.gz").read_bytes()[:200])  # truncated output
    before = {name: (out / f"{name}_seg.nii.gz").stat().st_mtime_ns for name in GOOD}
    run = segment_cohort(cohort_dir, out, model=model_name, scheduler=client)
    statuses = {p.result.study: p.result.status for p in run}
    assert statuses == {"case0": "skipped", "sub_case2": "skipped", "case1": "done", "broken": "error"}
    for name in ("case0", "sub_case2"):
        assert (out / f"{name}_seg.nii.gz").stat().st_mtime_ns == before[name]
    assert np.array_equal(
        read_volume(out / "case1_seg.nii.gz").array, read_volume(serial_out / "case1_seg.nii.gz").array
    )
    rows = {r["study"]: r for r in read_report(out / REPORT_NAME)}
    assert (
        rows["case0"]["volume_ml_vertebral_body"]
        == read_report(serial_out / REPORT_NAME)[1]["volume_ml_vertebral_body"]
    )


def test_closing_a_distributed_run_cancels_the_rest(cohort_dir: Path, client, model_name: str, tmp_path: Path) -> None:
    run = segment_cohort(cohort_dir, tmp_path, model=model_name, scheduler=client)
    first = next(run).result
    run.close()

    def scheduler_tasks() -> int:
        return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))

    deadline = time.monotonic() + 90  # a task already running finishes first (slow on a busy machine)
    while scheduler_tasks() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler_tasks() == 0
    assert [r["study"] for r in read_report(tmp_path / REPORT_NAME)] == [first.study]


def test_cli_cohort_on_scheduler_then_serial_resume(
    cohort_dir: Path, client, model_name: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, report = tmp_path / "out", tmp_path / "reports" / "cohort.csv"
    address = client.scheduler.address
    args = ["segment", str(cohort_dir), "-o", str(out), "--model", model_name, "-q"]
    assert main([*args, "--scheduler", address, "--report", str(report)]) == 1  # one study is corrupt
    err = capsys.readouterr().err
    assert "spineseg: error: [1/4] broken: broken.nii.gz:" in err and "3 done, 0 skipped, 1 error, 0 failed" in err
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [f"{n}_seg.nii.gz" for n in GOOD]
    assert [r["status"] for r in read_report(report)] == ["error", "done", "done", "done"]
    assert main(args) == 1  # a directory of studies is a cohort without --scheduler too (serial)
    assert "0 done, 3 skipped, 1 error" in capsys.readouterr().err
    assert [r["status"] for r in read_report(out / REPORT_NAME)] == ["error", "skipped", "skipped", "skipped"]
    assert main([*args, "--scheduler", "local:0"]) == 1
    assert "local:N (N >= 1 workers)" in capsys.readouterr().err


def test_unexpected_exception_is_failed_and_cancel_keeps_report(
    cohort_dir: Path, model_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_study = cohort._read_study

    def flaky(study):
        if study.name == "case1":
            raise RuntimeError("boom")
        return read_study(study)

    monkeypatch.setattr(cohort, "_read_study", flaky)
    results = {p.result.study: p.result for p in segment_cohort(cohort_dir, tmp_path, model=model_name)}
    assert results["case1"].status == "failed" and results["case1"].error == "RuntimeError: boom"
    assert results["sub_case2"].status == "done"

    cancel = threading.Event()
    run = segment_cohort(cohort_dir, tmp_path / "cancelled", model=model_name, cancel=cancel)
    assert next(run).result.study == "broken"
    cancel.set()
    with pytest.raises(Cancelled):
        next(run)
    assert [r["study"] for r in read_report(tmp_path / "cancelled" / REPORT_NAME)] == ["broken"]
    assert not list((tmp_path / "cancelled").glob("*.nii.gz"))


def test_uncertainty_maps_count_for_resuming(cohort_dir: Path, model_name: str, tmp_path: Path) -> None:
    settings = SegmentationSettings(uncertainty="entropy")
    assert {p.result.status for p in segment_cohort(cohort_dir, tmp_path, model=model_name, settings=settings)} == {
        "done",
        "error",
    }
    assert sorted(p.name for p in tmp_path.glob("*_uncertainty.nii.gz")) == [f"{n}_uncertainty.nii.gz" for n in GOOD]
    (tmp_path / "case1_uncertainty.nii.gz").unlink()
    rerun = {
        p.result.study: p.result.status
        for p in segment_cohort(cohort_dir, tmp_path, model=model_name, settings=settings)
    }
    assert rerun == {"case0": "skipped", "sub_case2": "skipped", "case1": "done", "broken": "error"}
    assert (tmp_path / "case1_uncertainty.nii.gz").is_file()


def test_scheduler_addresses() -> None:
    assert local_workers("local:3") == 3
    assert local_workers("local") == len(os.sched_getaffinity(0))
    assert local_workers("tcp://10.0.0.1:8786") is None
    with pytest.raises(InputError, match="local:N"):
        local_workers("local:two")
    with pytest.raises(InputError, match="cannot connect to the Dask scheduler"), open_client("tcp://127.0.0.1:9", 1.0):
        pass
