"""``spineseg train`` / ``spineseg evaluate`` and distributed training under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_spineseg.cli import main
from napari_spineseg.io import read_volume, write_volume
from napari_spineseg.modelfile import load_model
from napari_spineseg.volume import Volume

TINY_TRAIN = ["--recipe", "unet-bce", "--steps", "2", "--val-every", "2", "--batch-size", "2", "--crop", "32"]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_seg(data_dir) -> Path:
    return data_dir / "lumbar-mri" / "VB3" / "01_seg.nii.gz"


def test_evaluate_a_real_segmentation_against_itself(real_seg, capsys):
    assert main(["evaluate", str(real_seg), str(real_seg), "--json", "--classes", "1,2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [c["value"] for c in record["classes"]] == [1, 2]
    for item in record["classes"]:
        assert item["dice"] == 1.0 and item["hd95_mm"] == 0.0 and not item["empty_truth"]
    assert record["summary"]["mean"]["dice"] == 1.0
    assert record["region"].startswith("labelled span")
    assert main(["evaluate", str(real_seg), str(real_seg), "--no-surface", "--span-axis", "none"]) == 0
    table = capsys.readouterr().out
    assert "Dice" in table and "1.000" in table


def test_evaluate_refuses_mismatched_geometry(real_seg, tmp_path, capsys):
    truth = read_volume(real_seg)
    shifted = Volume.from_array(truth.array, spacing=(1.0, 1.0, 2.0), direction=truth.direction)
    other = write_volume(shifted, tmp_path / "other_seg.nii.gz")
    assert main(["evaluate", str(other), str(real_seg)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("spineseg: error:") and "geometry" in error and "spacing" in error


def test_train_on_phantoms_writes_a_loadable_model(tmp_path, capsys):
    output = tmp_path / "m.safetensors"
    log = tmp_path / "log.csv"
    argv = ["train", *TINY_TRAIN, "--phantoms", "1", "--planes", "sagittal", "-o", str(output), "--log", str(log), "-q"]
    assert main(argv) == 0
    assert "best model" in capsys.readouterr().out
    model = load_model(output)
    training = model.metadata.training
    assert training["recipe"] == "unet-bce" and training["phantoms"] == 1 and training["steps"] == 2
    assert training["split"]["kind"] == "fraction" and training["train_cases"] == ["phantom-1000"]
    assert log.read_text().splitlines()[0].startswith("step,")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--phantoms", "0"], "--data"),
        (["--recipe", "nope", "--phantoms", "1"], "unknown recipe"),
        (["--phantoms", "1", "--fold", "1"], "--fold and --folds"),
        (["--phantoms", "1", "--data", "/nonexistent/lumbar"], "not found"),
    ],
)
def test_train_errors_are_one_line(extra, message, tmp_path, capsys):
    assert main(["train", *TINY_TRAIN, *extra, "-o", str(tmp_path / "m.safetensors")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("spineseg: error:") and message in error
    assert not (tmp_path / "m.safetensors").exists()


def test_train_refuses_a_non_safetensors_output(tmp_path, capsys):
    assert main(["train", *TINY_TRAIN, "--phantoms", "1", "-o", str(tmp_path / "m.pt")]) == 1
    assert ".safetensors" in capsys.readouterr().err


def test_distributed_training_with_two_gloo_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside the interpreter")
    output = tmp_path / "m.safetensors"
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "napari_spineseg.training.distributed",
        "--backend",
        "gloo",
        "--recipe",
        "unet-bce",
        "--steps",
        "3",
        "--val-every",
        "2",
        "--batch-size",
        "2",
        "--crop",
        "32",
        "--phantoms",
        "2",
        "--planes",
        "sagittal",
        "--device",
        "cpu",
        "-o",
        str(output),
        "--log-csv",
        str(tmp_path / "log.csv"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    models = sorted(p.name for p in tmp_path.glob("*.safetensors") if not p.name.endswith(".resume.safetensors"))
    assert models == ["m.safetensors"]
    model = load_model(output)
    assert model.metadata.training["world_size"] == 2 and model.metadata.training["steps"] == 3
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per validation, written by rank 0 only
    assert np.isfinite(float(rows[-1].split(",")[2]))


def _torchrun_log(tmp_path: Path, data_dir: Path, processes: int, global_batch: int = 8) -> list[dict[str, str]]:
    """Train the same recipe, data and seed under torchrun with ``processes`` gloo ranks."""
    import csv

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside the interpreter")
    log = tmp_path / f"log{processes}.csv"
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "napari_spineseg.training.distributed",
        "--backend",
        "gloo",
        "--recipe",
        "unet-bce",
        "--data",
        str(data_dir / "lumbar-mri"),
        "--datasets",
        "VB3",
        "--val-patients",
        "VB3-01",
        "--steps",
        "80",
        "--val-every",
        "40",
        "--lr",
        "1e-3",
        "--batch-size",
        str(global_batch // processes),  # per process: the same global batch
        "--crop",
        "96",
        "--planes",
        "sagittal",
        "--device",
        "cpu",
        "--seed",
        "0",
        "-o",
        str(tmp_path / f"m{processes}.safetensors"),
        "--log-csv",
        str(log),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with log.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tmp_path, data_dir):
    """Same data, seed and global batch: 2 DDP ranks reach the metrics of 1 process (within noise)."""
    single, double = _torchrun_log(tmp_path, data_dir, 1), _torchrun_log(tmp_path, data_dir, 2)
    assert [r["step"] for r in single] == [r["step"] for r in double] == ["40", "80"]
    for one, two in zip(single, double):  # gradient averaging: the same loss curve up to sampling noise
        assert abs(float(one["train_loss"]) - float(two["train_loss"])) < 0.05, (one, two)
    best_one = max(float(r["val_mean_dice"]) for r in single)
    best_two = max(float(r["val_mean_dice"]) for r in double)
    assert min(best_one, best_two) > 0.6 and abs(best_one - best_two) < 0.15, (best_one, best_two)


def test_train_init_starts_from_an_existing_model(tmp_path, capsys):
    """``--init``: architecture, classes and weights come from the given model (fine-tuning on a dataset)."""
    import torch

    from napari_spineseg.modelfile import ModelMetadata, save_model
    from napari_spineseg.models import build_model

    torch.manual_seed(1)
    net = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2)
    classes = [c for c in ModelMetadata("x", "unet", {}).classes if c.value < 4]
    base = tmp_path / "base.safetensors"
    save_model(net, ModelMetadata("base", "unet", {"base": 4, "depth": 2}, classes=classes, context_slices=1), base)
    output = tmp_path / "init.safetensors"
    argv = ["train", *TINY_TRAIN, "--phantoms", "1", "--lr", "1e-12", "--init", str(base), "-o", str(output), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    trained = load_model(output)
    assert trained.metadata.architecture_kwargs["base"] == 4 and trained.metadata.num_classes == 4
    assert trained.metadata.training["config"]["init_from"] == str(base)
    for name, value in net.state_dict().items():  # lr 1e-12: still the base weights
        if value.dtype.is_floating_point and "running" not in name:
            torch.testing.assert_close(trained.network.state_dict()[name], value, atol=1e-6, rtol=0)
