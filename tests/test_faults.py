"""Fault injection: kill -9 during writes, disk full, read-only folders, stale temporary files.

The kill test is a small version of ``benchmarks/bench_faults.py`` (170 trials there).  Disk-full
is produced for real with a file-size limit (``RLIMIT_FSIZE``: the kernel fails the write with
EFBIG exactly where ENOSPC would fail it) and by injecting ENOSPC; a read-only folder by injecting
EROFS / EACCES (root ignores directory permissions, so ``chmod`` proves nothing here).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fault_harness as fh
from napari_spineseg.errors import VolumeWriteError
from napari_spineseg.io import read_volume, write_labels
from napari_spineseg.volume import Volume


@pytest.mark.slow
def test_kill_minus_9_never_leaves_a_corrupt_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    trials = []
    labels = fh.labels_loop(tmp_path / "labels", shape=(24, 96, 96))
    trials += [fh.run_trial(labels, rng, mode) for mode in ("on-temp", "blind", "on-temp", "blind", "on-temp")]
    models = fh.model_loop(tmp_path / "models", base=8)
    trials += [fh.run_trial(models, rng, mode) for mode in ("on-temp", "blind", "on-temp")]
    segment = fh.segment_cli(tmp_path / "segment", shape=(16, 64, 64))
    trials += [fh.run_trial(segment, rng, mode) for mode in ("on-temp", "blind")]
    summary = fh.summarise(trials)
    assert sum(row["corrupt"] for row in summary) == 0, fh.dump(trials)
    assert sum(t.killed for t in trials) >= 8, fh.dump(trials)
    assert any(t.mid_write for t in trials), "no kill landed during a write: the timing is off"
    for trial in trials:  # a kill may leave a temporary file, but only a hidden, clearly named one
        assert all(name.startswith(".") and ".part" in name for name in trial.leftovers), trial


def _old_file(tmp_path: Path) -> tuple[Path, bytes, Volume]:
    volume = Volume.from_array((np.arange(4 * 5 * 6) % 5).reshape(4, 5, 6).astype(np.uint8))
    path = write_labels(volume, tmp_path / "labels.nii.gz")
    return path, path.read_bytes(), volume


def test_disk_full_during_a_real_write_keeps_the_old_file(tmp_path: Path) -> None:
    """The kernel fails the write (EFBIG under RLIMIT_FSIZE, as ENOSPC would): ITK's NIfTI writer
    ignored that and left a truncated file, which the atomic rename put over the good one."""
    path, before, _ = _old_file(tmp_path)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"old model")
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import numpy as np
        import torch
        from napari_spineseg.errors import VolumeWriteError
        from napari_spineseg.io import write_labels
        from napari_spineseg.modelfile import ModelMetadata, save_model
        from napari_spineseg.models import build_model
        from napari_spineseg.volume import Volume
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        big = Volume.from_array(np.random.default_rng(0).integers(0, 5, (30, 60, 60)).astype(np.uint8))
        network = build_model("unet", in_channels=1, num_classes=5, base=8, depth=2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        for target, write in ((sys.argv[1], lambda p: write_labels(big, p)),
                              (sys.argv[2], lambda p: save_model(network, ModelMetadata("m", "unet", {}), p))):
            try:
                write(target)
                print("WROTE", target)
            except VolumeWriteError as error:
                print("ERROR", error)
        """
    )
    run = subprocess.run([sys.executable, "-c", script, str(path), str(model)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith(f"ERROR {path}: cannot write (") and "disk full" in lines[0], lines
    assert lines[1].startswith(f"ERROR {model}: cannot save the model (") and "File too large" in lines[1], lines
    assert path.read_bytes() == before and model.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "model.safetensors"]


def test_injected_disk_full_and_silent_truncation(tmp_path: Path, monkeypatch) -> None:
    import SimpleITK as sitk

    path, before, volume = _old_file(tmp_path)
    real_write = sitk.WriteImage

    def full_disk(image, name, *args, **kwargs):
        Path(name).write_bytes(b"partial")
        raise RuntimeError(f"ITK ERROR: ImageFileWriter: could not write {name}: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(VolumeWriteError, match=r"labels\.nii\.gz: cannot write .*No space left on device"):
        write_labels(volume, path)

    def silently_truncated(image, name, *args, **kwargs):  # what ITK's NIfTI writer really does
        real_write(image, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", silently_truncated)
    with pytest.raises(VolumeWriteError, match=r"labels\.nii\.gz: cannot write \(the file was not written completely"):
        write_labels(volume, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def test_injected_disk_full_while_saving_models_and_checkpoints(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from napari_spineseg.modelfile import ModelMetadata, save_model
    from napari_spineseg.models import build_model
    from napari_spineseg.training.loop import _save_resume

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    network = build_model("unet", in_channels=1, num_classes=5, base=2, depth=1)
    model, checkpoint = tmp_path / "m.safetensors", tmp_path / "m.resume.safetensors"
    model.write_bytes(b"old")
    checkpoint.write_bytes(b"old checkpoint")
    with pytest.raises(VolumeWriteError, match=r"m\.safetensors: cannot save the model .*No space left"):
        save_model(network, ModelMetadata("m", "unet", network.arch_kwargs), model)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    with pytest.raises(VolumeWriteError, match=r"m\.resume\.safetensors: cannot save the resume checkpoint"):
        _save_resume(checkpoint, network, optimizer, {"step": 1})
    assert model.read_bytes() == b"old" and checkpoint.read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.resume.safetensors", "m.safetensors"]


@pytest.mark.parametrize(("code", "reason"), [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission")])
def test_read_only_folder_is_a_clear_error(tmp_path: Path, monkeypatch, capsys, code: int, reason: str) -> None:
    import tempfile

    import torch

    from napari_spineseg.cli import main
    from napari_spineseg.io import write_volume
    from napari_spineseg.modelfile import ModelMetadata, save_model
    from napari_spineseg.models import build_model

    path, before, volume = _old_file(tmp_path)
    study = write_volume(volume.with_array(volume.array.astype(np.float32)), tmp_path / "study.nii.gz")
    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=2, depth=1)
    model = save_model(network, ModelMetadata("tiny", "unet", network.arch_kwargs), tmp_path / "tiny.safetensors")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(VolumeWriteError, match=rf"labels\.nii\.gz: cannot write \({reason}"):
        write_labels(volume, path)
    assert path.read_bytes() == before
    # Through the CLI: one line naming the file and the reason, exit status 1, the old file kept.
    capsys.readouterr()
    argv = ["segment", str(study), "-o", str(path), "--model", str(model), "--device", "cpu", "-q", "--overwrite"]
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("spineseg: error: "), errors
    assert f"{path}: cannot write ({reason}" in errors[0]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "study.nii.gz", "tiny.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder_for_real(tmp_path: Path) -> None:  # pragma: no cover - CI runs as a user
    path, before, volume = _old_file(tmp_path)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(VolumeWriteError, match=r"labels\.nii\.gz: cannot write \(Permission denied"):
            write_labels(volume, path)
    finally:
        tmp_path.chmod(0o700)
    assert path.read_bytes() == before


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path: Path) -> None:
    from napari_spineseg.io import STALE_TEMPORARY_SECONDS

    path, _, volume = _old_file(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    old = time.time() - STALE_TEMPORARY_SECONDS - 60
    stale = tmp_path / f".labels.nii.gz.{dead_pid}.abc123.part.nii.gz"
    recent = tmp_path / f".labels.nii.gz.{dead_pid}.def456.part.nii.gz"
    running = tmp_path / f".labels.nii.gz.{os.getppid()}.ghi789.part.nii.gz"  # a live process
    other = tmp_path / f".other.nii.gz.{dead_pid}.jkl012.part.nii.gz"  # another target's
    for leftover in (stale, recent, running, other):
        leftover.write_bytes(b"partial")
    for leftover in (stale, running, other):
        os.utime(leftover, (old, old))
    write_labels(volume, path)
    assert not stale.exists()
    assert recent.exists() and running.exists() and other.exists()
    assert read_volume(path).array.tolist() == volume.array.tolist()
