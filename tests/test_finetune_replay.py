"""Fine-tuning rounds accumulate painted studies: the replay set saved beside a fine-tuned model,
reloaded (or skipped, or refused when it does not fit) by the next round, and the per painted
class report (Dice on this study before this round = the transfer figure, and on the earlier
studies).  Same tiny phantoms and U-Net as test_finetune.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import test_finetune
from napari_spineseg._generators import drain
from napari_spineseg.cli import main
from napari_spineseg.errors import InputError
from napari_spineseg.io import write_volume
from napari_spineseg.modelfile import load_model
from napari_spineseg.orientation import Plane
from napari_spineseg.provenance import file_sha256
from napari_spineseg.schema import IGNORE, LESION
from napari_spineseg.training import TrainingCase
from napari_spineseg.training.finetune import (
    CorrectionPair,
    ReplaySet,
    format_painted_class_report,
    painted_report,
    read_replay,
    replay_path,
    run_finetune,
    save_finetuned,
    write_replay,
)
from napari_spineseg.training.finetune.dataset import ConcatSlices
from napari_spineseg.training.finetune.replay import ReplayCrop, ReplayStudy, merge_replay
from napari_spineseg.training.finetune.run import FinetuneRun

# The shared fixtures and helpers of test_finetune.py (a tiny base model, phantoms, painted lesions).
_private_model_dir, _one_thread = test_finetune._private_model_dir, test_finetune._one_thread
base_path, fixed_case, study = test_finetune.base_path, test_finetune.fixed_case, test_finetune.study
fast_config, painted_labels = test_finetune.fast_config, test_finetune.painted_labels
phantom_case = test_finetune.phantom_case

ROUND2_SLICES = [5, 6, 7]


def _pair(case: TrainingCase, name: str, slices=(6, 7, 8)) -> CorrectionPair:
    labels = case.labels.with_array(painted_labels(case, list(slices)))
    return CorrectionPair(case.image, labels, reviewed_slices={"sagittal": list(slices)}, name=name)


def _finetune(base: Path, pairs, fixed: TrainingCase, **options):
    config = fast_config(**{"steps": 8, "val_every": 8, "replay_fraction": 0.3, **options.pop("config", {})})
    return run_finetune(base, pairs, config, reference_cases=[phantom_case(1)], fixed_validation=[fixed], **options)


@pytest.fixture(scope="module")
def round1_model(base_path: Path, fixed_case, study, tmp_path_factory) -> Path:
    """Round 1: lesion painted on three sagittal slices of phantom 5, saved with its replay set."""
    result = _finetune(base_path, [_pair(study, "s5")], fixed_case, config={"steps": 30, "val_every": 30})
    assert result.replay is not None and result.replay.study_names == ["s5"]
    return save_finetuned(result, tmp_path_factory.mktemp("round1") / "round1.safetensors", force=True)


@pytest.fixture(scope="module")
def round2(round1_model: Path, fixed_case, tmp_path_factory):
    """Round 2: from the round-1 model, lesion painted on phantom 7."""
    result = _finetune(round1_model, [_pair(phantom_case(7), "s7", ROUND2_SLICES)], fixed_case)
    path = save_finetuned(result, tmp_path_factory.mktemp("round2") / "round2.safetensors", force=True)
    return result, path


def _copy_model(model: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, folder / model.name)
    if replay_path(model).is_file():
        shutil.copy(replay_path(model), replay_path(folder / model.name))
    return folder / model.name


# ------------------------------------------------------------------------------------------------
def test_the_replay_set_is_written_beside_the_model_and_recorded_in_it(round1_model: Path) -> None:
    file = replay_path(round1_model)
    assert file.name == "round1.replay.npz" and file.is_file()
    assert not list(round1_model.parent.glob("*.part")) and not list(round1_model.parent.glob("*.new"))
    metadata = load_model(round1_model).metadata
    record = metadata.training["replay"]
    assert record["sha256"] == file_sha256(file) and record["studies"] == ["s5"] and record["file"] == file.name
    assert metadata.training["painted_classes"] == [{"value": LESION, "name": "lesion"}]
    replay = read_replay(file)
    assert replay.context_slices == 1 and replay.painted_classes == [LESION]
    (crop,) = replay.studies[0].crops  # slices 6, 7, 8 with one context slice each side: one slab of 5
    axis = Plane(crop.plane).canonical_array_axis
    assert crop.plane == "sagittal" and crop.image.shape[axis] == 5 and crop.image.dtype == np.float16
    trusted = np.moveaxis(crop.labels, axis, 0).reshape(5, -1) != IGNORE
    assert trusted.any(axis=1).tolist() == [False, True, True, True, False]  # context slices: image only
    assert np.count_nonzero(crop.labels == LESION) == np.count_nonzero(painted_labels(phantom_case(5)) == LESION)


def test_the_second_round_trains_on_the_first_rounds_painted_slices(round1_model: Path, fixed_case) -> None:
    run = FinetuneRun(round1_model, [_pair(phantom_case(7), "s7", ROUND2_SLICES)], fast_config())
    run.load_base()
    run.prepare_corrections()
    run.load_replay()
    run.choose_cases()
    run.setup_evaluation()
    run.setup_replay_evaluation()
    assert run.replay_in is not None and run.replay_in.study_names == ["s5"]
    assert not run.new_classes  # the round-1 model knows the lesion already
    run.network = run.base_network
    drain(run.build_training())
    corrections = run.dataset.corrections
    assert isinstance(corrections, ConcatSlices) and len(corrections.parts) == 2
    replayed = range(len(corrections.parts[0]), len(corrections))
    lesion = int(run.lut[LESION])
    assert any((corrections[i]["target"].numpy() == lesion).any() for i in replayed)
    weights = run.dataset.sample_weights()
    assert all(weights[i] > 0 for i in replayed)
    assert not any(bool(run.dataset[i]["replay"]) for i in replayed)  # trained on, not distilled


def test_the_second_round_reports_the_transfer_and_saves_the_union(round2, round1_model: Path) -> None:
    result, path = round2
    training = result.metadata.training
    assert training["replayed"]["studies"] == ["s5"]
    assert "lesion" in result.before["replay"] and "lesion" in result.after["replay"]
    assert set(result.after["replay_cases"]) == {"s5"}
    # the crops reproduce the study: the round-1 model scores the same on them as on the whole study
    round1_after = load_model(round1_model).metadata.training["after"]["corrections"]
    for name, value in result.before["replay"].items():
        assert value == pytest.approx(round1_after[name], abs=0.02), name
    (row,) = painted_report(result)
    assert row["class"] == "lesion" and row["earlier_study_count"] == 1
    # "this study, before": the round-1 model on study 7's painted slices before training on them
    assert row["this_study_before"] == result.before["corrections"]["lesion"]
    assert row["this_study_before"] is not None and row["earlier_studies_before"] is not None
    table = format_painted_class_report([row])
    assert "painted class" in table and "transfer" in table
    assert read_replay(replay_path(path)).study_names == ["s7", "s5"]  # most recent first
    assert load_model(path).metadata.training["replay"]["studies"] == ["s7", "s5"]


def test_no_replay_skips_it_and_a_missing_file_only_warns(round1_model: Path, fixed_case, tmp_path: Path) -> None:
    pair = _pair(phantom_case(7), "s7", ROUND2_SLICES)
    skipped = _finetune(round1_model, [pair], fixed_case, config={"steps": 2, "replay_painted": False})
    assert skipped.metadata.training["replayed"] is None and "replay" not in skipped.before
    assert skipped.replay.study_names == ["s7"]
    copy = _copy_model(round1_model, tmp_path / "copy")
    replay_path(copy).unlink()
    missing = _finetune(copy, [pair], fixed_case, config={"steps": 2})
    assert missing.metadata.training["replayed"] is None
    assert any("not found" in w and "not replayed" in w for w in missing.warnings)


def _cli_args(base: Path, files: dict[str, Path], output: Path) -> list[str]:
    args = ["finetune", "--model", str(base), "--image", str(files["image"]), "--labels", str(files["labels"])]
    args += ["--slices", "sagittal:5,6,7", "--steps", "2", "--batch-size", "4", "--crop", "64", "--val-every", "2"]
    return [*args, "--precision", "off", "--device", "cpu", "--force", "-o", str(output), "-q"]


@pytest.fixture()
def study7_files(tmp_path: Path) -> dict[str, Path]:
    case = phantom_case(7)
    return {
        "image": write_volume(case.image, tmp_path / "s7_img.nii.gz"),
        "labels": write_volume(case.labels.with_array(painted_labels(case, ROUND2_SLICES)), tmp_path / "s7.nii.gz"),
    }


def test_cli_replays_by_default_prints_the_table_and_no_replay_skips(
    round1_model: Path, study7_files, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out" / "r2.safetensors"
    assert main(_cli_args(round1_model, study7_files, output)) == 0
    out = capsys.readouterr().out
    assert "earlier painted" in out and "painted class" in out and "saved its replay set (2 painted studies" in out
    assert load_model(output).metadata.training["replayed"]["studies"] == ["s5"]
    assert read_replay(replay_path(output)).study_names[1:] == ["s5"]
    skipped = tmp_path / "out" / "r2-no-replay.safetensors"
    assert main([*_cli_args(round1_model, study7_files, skipped), "--no-replay"]) == 0
    assert load_model(skipped).metadata.training["replayed"] is None
    assert len(read_replay(replay_path(skipped)).studies) == 1
    capsys.readouterr()
    both = [*_cli_args(round1_model, study7_files, tmp_path / "x.safetensors"), "--no-replay", "--replay", "f"]
    with pytest.raises(SystemExit):
        main(both)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_corrupt_foreign_or_mismatched_replay_sets_are_one_line_errors(
    round1_model: Path, study7_files, tmp_path: Path, capsys
) -> None:
    model = _copy_model(round1_model, tmp_path / "m")
    model_bytes = model.read_bytes()
    output = tmp_path / "out.safetensors"
    original = read_replay(replay_path(model))

    replay_path(model).write_bytes(b"PK\x03\x04 not really a zip")  # corrupt
    assert main(_cli_args(model, study7_files, output)) == 1
    line = _one_error_line(capsys)
    assert "corrupt" in line and "--no-replay" in line

    other = ReplaySet(original.studies, 1, original.normalisation, original.classes, [LESION, 9])
    write_replay(other, replay_path(model))  # valid, but not the one the model recorded
    assert main(_cli_args(model, study7_files, output)) == 1
    assert "does not belong to model" in _one_error_line(capsys)

    thin = write_replay(ReplaySet(original.studies, 0, original.normalisation), tmp_path / "thin.replay.npz")
    assert main([*_cli_args(model, study7_files, output), "--replay", str(thin)]) == 1
    assert "context slice" in _one_error_line(capsys)

    foreign = original.studies[0]
    foreign = type(foreign)(foreign.name, foreign.crops, foreign.known, [*foreign.values, 9], foreign.model)
    bad = write_replay(ReplaySet([foreign], 1, original.normalisation), tmp_path / "values.replay.npz")
    assert main([*_cli_args(model, study7_files, output), "--replay", str(bad)]) == 1
    assert "class value(s) [9]" in _one_error_line(capsys)

    assert main([*_cli_args(model, study7_files, output), "--replay", str(tmp_path / "none.npz")]) == 1
    assert "not found" in _one_error_line(capsys)
    assert not output.exists() and model.read_bytes() == model_bytes  # nothing written, nothing lost
    empty = tmp_path / "empty.replay.npz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="corrupt"):
        read_replay(empty)


def test_a_replay_set_that_cannot_be_written_never_costs_the_model(round2, tmp_path: Path, monkeypatch) -> None:
    result = dataclasses.replace(round2[0], warnings=[])
    from napari_spineseg.training.finetune import replay as replay_module

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(replay_module, "write_replay", fail)
    path = save_finetuned(result, tmp_path / "kept.safetensors", force=True)
    assert load_model(path).metadata.training.get("replay") is None
    assert not replay_path(path).exists() and not list(tmp_path.glob("*.new"))
    assert any("replay set was not saved" in w for w in result.warnings)
    monkeypatch.undo()

    import napari_spineseg.modelfile as modelfile

    def broken_save(*_args, **_kwargs):
        raise OSError("no space")

    monkeypatch.setattr(modelfile, "attach_gate", broken_save)
    with pytest.raises(OSError):
        save_finetuned(result, tmp_path / "failed.safetensors", force=True)
    assert not list(tmp_path.glob("failed*"))  # neither a replay set nor a temporary file left behind


def test_the_widget_table_shows_the_earlier_painted_studies(round2) -> None:
    from napari_spineseg.widgets._finetune_job import dice_table

    result, _ = round2
    headers, rows = dice_table(result)
    assert headers[:5] == [
        "class",
        "corrected before",
        "corrected after",
        "earlier painted before",
        "earlier painted after",
    ]
    lesion = next(r for r in rows if r[0] == "lesion")
    assert lesion[1:5] == [
        result.before["corrections"]["lesion"],  # the transfer figure: round 1's model on this study
        result.after["corrections"]["lesion"],
        result.before["replay"]["lesion"],
        result.after["replay"]["lesion"],
    ]


def _study(name: str, digest: str, megabytes: float = 0.1) -> ReplayStudy:
    side = int((megabytes * 1e6 / 3 / 3) ** 0.5)
    crop = ReplayCrop(
        "sagittal",
        np.zeros((side, side, 3), np.float16),
        np.full((side, side, 3), IGNORE, np.uint8),
        (1.0, 1.0, 1.0),
        (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
    )
    return ReplayStudy(name, [crop], [0, 1, 4], [0, 4], "m", digest)


def test_merging_keeps_the_most_recent_studies_within_the_caps() -> None:
    earlier = ReplaySet([_study("a", "1"), _study("b", "2"), _study("c", "3")], 1, {}, {4: "lesion"}, [4])
    current = ReplaySet([_study("b", "2"), _study("a", "9")], 1, {}, {4: "lesion"}, [4])
    merged, dropped = merge_replay(current, earlier)
    # "b" painted again replaces its old crops; another study that is also called "a" is kept apart
    assert merged.study_names == ["b", "a", "a [2]", "c"] and not dropped
    capped, dropped = merge_replay(current, earlier, max_studies=3)
    assert capped.study_names == ["b", "a", "a [2]"] and dropped == ["c"]
    small, dropped = merge_replay(current, earlier, max_megabytes=0.25)
    assert small.study_names == ["b", "a"] and dropped == ["a [2]", "c"]
    assert merged.painted_classes == [4]


def test_the_widget_table_shows_the_fixed_set_against_the_original_model() -> None:
    from types import SimpleNamespace

    from napari_spineseg.schema import default_classes
    from napari_spineseg.widgets._finetune_job import dice_table

    before = {"fixed_validation": {"vertebral body": 0.87}, "fixed_validation_origin": {"vertebral body": 0.88}}
    after = {"fixed_validation": {"vertebral body": 0.865}}
    result = SimpleNamespace(before=before, after=after, metadata=SimpleNamespace(classes=default_classes()[:2]))
    headers, rows = dice_table(result)
    assert headers == ["class", "fixed set before", "fixed set after", "fixed set vs original before",
                       "fixed set vs original after"]  # fmt: skip
    assert rows == [["vertebral body", 0.87, 0.865, 0.88, 0.865]]
