"""Fine-tuning from corrections: trusted targets, new classes, replay/priority sampling, fixed
validation across rounds, cancel, never overwriting the base, and the ``spineseg finetune`` CLI.

Tiny on purpose: 64×64×16 phantoms and a 4-class U-Net (base 4, depth 2, sagittal plane) trained
for a few seconds; torch runs on one thread here (the machine's 2 cores are shared).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_spineseg.augment import IGNORE
from napari_spineseg.cli import main
from napari_spineseg.errors import Cancelled, GeometryMismatchError, InputError
from napari_spineseg.gate import GateRecord, LesionGate, attach_gate
from napari_spineseg.io import write_volume
from napari_spineseg.modelfile import LoadedModel, ModelMetadata, load_model, save_model
from napari_spineseg.models import build_model
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.phantom import make_phantom
from napari_spineseg.preprocess import PreprocessConfig
from napari_spineseg.schema import LESION, VERTEBRAL_BODY, default_classes
from napari_spineseg.training import TrainConfig, TrainingCase, run_training
from napari_spineseg.training.finetune import (
    CorrectionPair,
    FinetuneConfig,
    FinetuneResult,
    _fuse_new_rows,
    _grow_head,
    _param_groups,
    _ReplayDistillation,
    _select_step,
    _speed_up_new_rows,
    _WeightAnchor,
    build_finetune_dataset,
    carried_gate,
    case_record,
    cases_from_base_metadata,
    correction_targets,
    finetune,
    fixed_origin,
    fixed_validation_ids,
    forgetting_beyond_limit,
    load_case_record,
    run_finetune,
    save_finetuned,
)
from napari_spineseg.training.finetune_command import format_before_after
from napari_spineseg.volume import Volume

SIZE, SPACING = (64, 64, 16), (3.5, 3.5, 8.0)
PAINTED = [6, 7, 8]  # sagittal slices (array axis 0 of these PIR phantoms) where "lesion" is painted
PREPROCESS = PreprocessConfig(pixel_spacing_mm=None)


@pytest.fixture(scope="module", autouse=True)
def _private_model_dir(tmp_path_factory):
    """The fixed-set cache (and any saved model) goes to a temporary user model directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPINESEG_MODEL_DIR", str(tmp_path_factory.mktemp("user-models")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def phantom_case(seed: int) -> TrainingCase:
    phantom = make_phantom(size=SIZE, spacing=SPACING, seed=seed, contrast="T1" if seed % 2 == 0 else "T2")
    labels = phantom.labels.with_array(phantom.labels.array.astype(np.uint8))
    return TrainingCase(phantom.image, labels, {1, 2, 3}, f"phantom-{seed}", "phantom", f"phantom-{seed}")


def painted_labels(case: TrainingCase, slices=PAINTED) -> np.ndarray:
    """The truth with a "lesion" (4) painted over the vertebral body inside a box on ``slices``."""
    labels = case.labels.array.copy()
    box = np.zeros(labels.shape, dtype=bool)
    box[slices, 20:40, 15:50] = True
    labels[box & (labels == VERTEBRAL_BODY)] = LESION
    assert np.count_nonzero(labels == LESION) > 50
    return labels


def fast_config(**overrides) -> FinetuneConfig:
    options = {"steps": 12, "lr": 1e-4, "batch_size": 4, "crop_size": 64, "val_every": 12, "device": "cpu"}
    return FinetuneConfig(**{**options, "mixed_precision": "off", **overrides})


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    """A 4-class (no lesion) sagittal U-Net trained briefly on two phantoms."""
    config = TrainConfig(
        architecture_kwargs={"base": 4, "depth": 2},
        classes=default_classes()[:4],
        loss="ce",
        lr=1e-2,
        schedule="none",
        steps=150,
        batch_size=8,
        val_every=150,
        crop_size=64,
        planes=["sagittal"],
        preprocess=PREPROCESS,
        augment=None,
        mixed_precision="off",
        device="cpu",
        sampling="balanced",
        foreground_only=True,
    )
    torch.manual_seed(0)
    network = run_training(config, [phantom_case(0), phantom_case(1)]).network
    metadata = ModelMetadata(
        "tiny",
        "unet",
        {k: v for k, v in network.arch_kwargs.items() if k not in ("in_channels", "num_classes")},
        classes=default_classes()[:4],
        context_slices=1,
        preprocess=PREPROCESS.to_dict(),
        planes=["sagittal"],
    )
    return save_model(network, metadata, tmp_path_factory.mktemp("base") / "tiny.safetensors")


@pytest.fixture(scope="module")
def fixed_case() -> TrainingCase:
    return phantom_case(3)


@pytest.fixture(scope="module")
def study() -> TrainingCase:
    return phantom_case(5)


@pytest.fixture(scope="module")
def round1(base_path: Path, fixed_case: TrainingCase, study: TrainingCase):
    """Round 1: "lesion" painted on three reviewed sagittal slices of a phantom, one reference case."""
    before = base_path.read_bytes()
    pair = CorrectionPair(
        study.image, study.labels.with_array(painted_labels(study)), reviewed_slices={"sagittal": PAINTED}, name="s5"
    )
    result = run_finetune(
        base_path,
        [pair],
        fast_config(steps=30, replay_fraction=0.3),
        reference_cases=[phantom_case(1)],
        fixed_validation=[fixed_case],
    )
    return result, before


# ------------------------------------------------------------------------------------------------
def test_new_class_from_three_painted_slices(round1, base_path: Path) -> None:
    result, _ = round1
    assert not result.cancelled and result.steps == 30
    assert [c.value for c in result.new_classes] == [LESION]
    assert result.new_classes[0].name == "lesion"
    assert result.metadata.class_values == [0, 1, 2, 3, 4]
    assert result.network.head.conv.out_channels == 5
    # the base model could not predict a lesion; the before/after tables cover every class
    assert result.before["corrections"]["lesion"] == 0.0
    assert set(result.after["corrections"]) >= {"vertebral body", "lesion"}
    # (an invisible "lesion": a box painted over the body) learned a little in 30 steps: 0.12 here;
    # 0.0 when the new row starts as a copy of the body's (no linear probe)
    assert result.after["corrections"]["lesion"] > 0.05
    # old classes on the fixed validation set stay within tolerance
    for name, before in result.before["fixed_validation"].items():
        assert before > 0.3, name  # the tiny base does segment the phantom
        assert result.after["fixed_validation"][name] >= before - 0.1, name
    training = result.metadata.training
    assert training["finetuned_from"]["name"] == "tiny"
    assert len(training["finetuned_from"]["content_sha256"]) == 64
    assert training["finetuned_from"]["file_sha256"] and training["finetuned_from"]["path"] == str(base_path)
    assert training["pairs"] == ["s5"] and training["steps"] == 30 and training["lr"] == 1e-4
    assert training["new_classes"][0]["name"] == "lesion"
    assert training["new_class_parents"] == {"4": VERTEBRAL_BODY}  # grown from the body's row
    assert training["reference_cases"][0]["case_id"] == "phantom-1"
    assert training["before"]["fixed_validation"] and training["after"]["corrections"]


def test_grown_head_keeps_the_base_predictions() -> None:
    torch.manual_seed(0)
    network = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        old = network(x)
        _grow_head(network, 5, {4: VERTEBRAL_BODY}, margin=1.5)
        new = network(x)
    assert new.shape[1] == 5 and network.arch_kwargs["num_classes"] == 5
    assert torch.equal(new[:, :4], old)
    assert torch.allclose(new[:, 4], old[:, VERTEBRAL_BODY] - 1.5, atol=1e-5)
    assert torch.equal(new.argmax(1), old.argmax(1))


def test_fast_new_rows_fuse_back_exactly() -> None:
    torch.manual_seed(0)
    network = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2).eval()
    _grow_head(network, 5, {4: VERTEBRAL_BODY}, margin=1.0)
    keys = {k: v.shape for k, v in network.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        grown = network(x)
        assert _speed_up_new_rows(network, 4, 10.0)
        assert torch.allclose(network(x), grown, atol=1e-5)
        network.head.conv.new_weight.add_(0.01)  # one "Adam step" on u moves the row by 0.1
        moved = network(x)
    _fuse_new_rows(network)
    assert {k: v.shape for k, v in network.state_dict().items()} == keys
    with torch.no_grad():
        assert torch.allclose(network(x), moved, atol=1e-5)
        assert not torch.allclose(moved[:, 4], grown[:, 4]) and torch.allclose(moved[:, :4], grown[:, :4])


def test_unreviewed_slices_are_ignore_in_the_targets(study: TrainingCase) -> None:
    labels = painted_labels(study)
    pair = CorrectionPair(study.image, study.labels.with_array(labels), reviewed_slices={"sagittal": PAINTED})
    targets = correction_targets(pair)
    axis = plane_array_axis(study.image.geometry, Plane.SAGITTAL)
    assert axis == 0
    trusted = np.zeros(labels.shape[axis], dtype=bool)
    trusted[PAINTED] = True
    assert np.all(targets.labels[~trusted] == IGNORE)
    assert np.array_equal(targets.labels[trusted], labels[trusted])
    assert targets.trusted_slices == {"sagittal": PAINTED}

    # With the original prediction: only the slices that changed are trusted, found in the sagittal plane.
    with_prediction = CorrectionPair(study.image, study.labels.with_array(labels), prediction=study.labels)
    targets = correction_targets(with_prediction)
    assert targets.edit_plane == "sagittal" and targets.trusted_slices == {"sagittal": PAINTED}
    assert np.array_equal(targets.trusted, np.broadcast_to(trusted[:, None, None], labels.shape))
    assert np.array_equal(targets.changed, labels != study.labels.array)

    # In the other planes only the voxels on the reviewed slices are targets (a line per slice).
    dataset = build_finetune_dataset(
        [TrainingCase(study.image, study.labels.with_array(targets.labels), {1, 2, 3, 4}, "p", "c", "p")],
        [targets.changed],
        planes=["axial", "coronal", "sagittal"],
        context_slices=1,
        num_classes=5,
        preprocess=PREPROCESS,
        config=fast_config(),
    )
    sagittal = dataset.corrections.planes.index(Plane.SAGITTAL)
    index = dataset.corrections.index
    assert np.count_nonzero(index[:, 1] == sagittal) == len(PAINTED)
    others = [i for i in range(len(index)) if index[i, 1] != sagittal]
    assert others  # axial and coronal slices crossing the reviewed sagittal slices
    weights = dataset.sample_weights()  # ... weigh less than the reviewed slices themselves
    assert weights[index[:, 1] == sagittal].min() > 3 * weights[others].max()
    for i in others:
        _, target, _ = dataset.corrections.raw_sample(i)
        columns = np.flatnonzero((target != IGNORE).any(axis=0))  # columns run left-right in both planes
        assert len(columns) == len(PAINTED) and np.ptp(columns) == len(PAINTED) - 1


def test_new_class_slices_of_every_plane_are_sampled_at_full_priority(study: TrainingCase) -> None:
    """A lesion painted on sagittal slices shows in the axial/coronal planes only on thinly covered
    slices; those still weigh as much as a reviewed slice (else the fused planes outvote it)."""
    labels = painted_labels(study)
    pair = CorrectionPair(study.image, study.labels.with_array(labels), prediction=study.labels)
    targets = correction_targets(pair)
    case = TrainingCase(study.image, study.labels.with_array(targets.labels), {1, 2, 3, 4}, "p", "c", "p")
    common = {
        "planes": ["axial", "coronal", "sagittal"],
        "context_slices": 1,
        "num_classes": 5,
        "preprocess": PREPROCESS,
    }
    plain = build_finetune_dataset([case], [targets.changed], config=fast_config(), **common)
    grown = build_finetune_dataset([case], [targets.changed], config=fast_config(), new_class_indices=[4], **common)
    index = grown.corrections.index
    sagittal = grown.corrections.planes.index(Plane.SAGITTAL)
    holds_lesion = np.array([(grown.corrections.raw_sample(i)[1] == 4).any() for i in range(len(index))])
    crossing = holds_lesion & (index[:, 1] != sagittal)
    assert crossing.any() and not plain.new_class.any() and np.array_equal(grown.new_class, holds_lesion)
    reviewed = plain.sample_weights()[index[:, 1] == sagittal].max()
    assert plain.sample_weights()[crossing].max() < 0.2 * reviewed  # thin coverage: rarely drawn ...
    grown_reviewed = grown.sample_weights()[index[:, 1] == sagittal].max()
    assert grown.sample_weights()[crossing] == pytest.approx(grown_reviewed)  # ... unless it holds the new class


def test_changed_slices_are_sampled_more(study: TrainingCase) -> None:
    labels = painted_labels(study, slices=[7])
    reviewed = {"sagittal": [3, 5, 7, 9, 11]}
    pair = CorrectionPair(study.image, study.labels.with_array(labels), study.labels, reviewed)
    targets = correction_targets(pair)
    assert targets.trusted_slices == {"sagittal": [3, 5, 7, 9, 11]}
    config = fast_config(replay_fraction=0.3, changed_priority=4.0)
    dataset = build_finetune_dataset(
        [TrainingCase(study.image, study.labels.with_array(targets.labels), {1, 2, 3, 4}, "p", "c", "p")],
        [targets.changed],
        [phantom_case(1)],
        planes=["sagittal"],
        context_slices=1,
        num_classes=5,
        preprocess=PREPROCESS,
        config=config,
    )
    n = len(dataset.corrections)
    assert n == 5 and dataset.changed.tolist() == [False, False, True, False, False]
    weights = dataset.sample_weights()
    assert weights[:n][dataset.changed][0] == pytest.approx(4 * weights[:n][~dataset.changed][0])
    draws = torch.multinomial(
        torch.as_tensor(weights), 20000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    draws = draws.numpy()
    replay_share = np.mean(draws >= n)
    changed_share = np.mean(draws == int(np.flatnonzero(dataset.changed)[0])) / (1 - replay_share)
    assert replay_share == pytest.approx(0.3, abs=0.02)
    assert changed_share == pytest.approx(4 / 8, abs=0.03)  # 4 of 4+1+1+1+1, against 1/5 uniformly


def test_replay_distillation_guards_only_replay_samples() -> None:
    torch.manual_seed(0)
    base = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2).eval()
    student = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2)
    student.load_state_dict(base.state_dict())
    student.eval()  # batch-norm statistics frozen, as during fine-tuning
    _grow_head(student, 5, {4: VERTEBRAL_BODY}, margin=6.0)
    hook = _ReplayDistillation(base, 4, 1.0, "cpu", "fp32")
    image = torch.randn(4, 3, 32, 32)
    logits = student(image)
    assert hook(student, {"image": image, "replay": torch.tensor([False] * 4)}, logits) is None
    loss = hook(student, {"image": image, "replay": torch.tensor([True, False, True, False])}, logits)
    assert 0 <= loss.item() < 0.05  # the grown model still agrees with its base
    loss.backward()
    with torch.no_grad():
        student.head.conv.bias[4] += 8.0  # now "lesion" spreads over the bodies: the guard objects
    with torch.no_grad():
        assert hook(student, {"image": image, "replay": torch.tensor([True] * 4)}, student(image)).item() > 0.5


def test_base_file_is_never_overwritten(round1, base_path: Path, tmp_path: Path, monkeypatch) -> None:
    result, before = round1
    assert base_path.read_bytes() == before
    with pytest.raises(InputError, match="refusing to overwrite the base model"):
        save_finetuned(result, base_path)
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(base_path.parent))
    with pytest.raises(InputError, match="refusing to overwrite the base model"):
        save_finetuned(result, "tiny")  # the user model of that name *is* the base file
    assert base_path.read_bytes() == before
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path / "models"))
    saved = save_finetuned(result, "tiny lesion")
    assert saved == tmp_path / "models" / "tiny lesion.safetensors"
    loaded = load_model("tiny lesion")
    assert loaded.metadata.name == "tiny lesion" and loaded.metadata.classes[-1].name == "lesion"


def test_fixed_validation_is_carried_to_the_next_round(round1, fixed_case, study, tmp_path: Path) -> None:
    result, _ = round1
    assert fixed_validation_ids(result.metadata) == ["phantom-3"]
    assert list(result.before["fixed_validation_cases"]) == ["phantom-3"]
    first = save_finetuned(result, tmp_path / "round1.safetensors")
    pair = CorrectionPair(study.image, study.labels.with_array(painted_labels(study)), study.labels, name="again")
    # round 2: no fixed set given -> the recorded one is rebuilt (phantom config) and reused
    second = run_finetune(first, [pair], fast_config(steps=3, replay_fraction=0.0))
    assert fixed_validation_ids(second.metadata) == ["phantom-3"]
    assert list(second.after["fixed_validation_cases"]) == ["phantom-3"]
    assert second.new_classes == [] and second.network.head.conv.out_channels == 5
    assert second.metadata.training["round"] == 2
    assert [e["name"] for e in second.metadata.training["lineage"]] == ["tiny", result.metadata.name]
    # the original model's fixed-set figures are carried from round 1 to round 2 (issue #17)
    origin = result.metadata.training["fixed_validation_origin"]
    assert origin["model"]["name"] == "tiny" and origin["cases"] == ["phantom-3"]
    assert origin["fixed_validation"] == result.before["fixed_validation"]
    assert "fixed_validation_origin" not in result.before  # round 1: the original model is the base
    assert second.metadata.training["fixed_validation_origin"] == origin
    assert second.before["fixed_validation_origin"] == result.before["fixed_validation"]
    assert "fixed vs original" in format_before_after(second.before, second.after)
    with pytest.raises(InputError, match="fixed set"):
        run_finetune(first, [pair], fast_config(steps=1), fixed_validation=[phantom_case(4)])


def test_cancel_stops_within_one_step_and_writes_nothing(base_path: Path, study, tmp_path: Path) -> None:
    cancel = threading.Event()
    pair = CorrectionPair(study.image, study.labels.with_array(painted_labels(study)), study.labels)
    events = finetune(base_path, [pair], fast_config(steps=50, val_every=1000), cancel=cancel, fixed_validation=[])
    steps = []
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            result = stop.value
            break
        if event.kind == "step":
            steps.append(event.step)
            cancel.set()
    assert steps == [1]
    assert result.cancelled and result.steps == 1 and result.after == {}
    with pytest.raises(Cancelled):
        save_finetuned(result, tmp_path / "never.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_whole_map_with_a_painted_new_class_trusts_only_the_painted_slices(
    base_path: Path, study: TrainingCase
) -> None:
    """Issue 17: a label map given without a prediction or reviewed slices, with a lesion painted on
    a few sagittal slices, labels the rest of each lesion as body; trusting the whole map taught the
    model that the lesion is body (lesion Dice 0 on the painted study and on the next one)."""
    labels = painted_labels(study)
    pair = CorrectionPair(study.image, study.labels.with_array(labels), name="whole")
    targets = correction_targets(pair, {LESION})
    assert not targets.whole_map and targets.trusted_slices == {"sagittal": PAINTED}
    assert np.all(targets.labels[[i for i in range(labels.shape[0]) if i not in PAINTED]] == IGNORE)
    assert np.array_equal(targets.labels[PAINTED], labels[PAINTED])
    assert np.array_equal(targets.changed, labels == LESION)
    assert correction_targets(pair).whole_map  # no new class: the whole map is trusted, as before

    # fine-tuning knows which values are new (those the base model lacks) and trusts the same slices
    result = run_finetune(base_path, [pair], fast_config(steps=2, val_every=2, replay_fraction=0.0))
    details = result.metadata.training["pair_details"][0]
    assert details["trusted_slices"] == {"sagittal": PAINTED} and not details["whole_map_trusted"]
    assert [c.value for c in result.new_classes] == [LESION]


def test_corrections_must_share_the_grid_and_hold_something(study: TrainingCase) -> None:
    shifted = Volume(
        study.labels.array,
        study.labels.geometry.__class__(
            study.labels.geometry.size, (3.5, 3.5, 9.0), study.labels.geometry.origin, study.labels.geometry.direction
        ),
    )
    with pytest.raises(GeometryMismatchError):
        correction_targets(CorrectionPair(study.image, shifted))
    with pytest.raises(InputError, match="empty corrections"):
        correction_targets(CorrectionPair(study.image, study.labels, prediction=study.labels))
    with pytest.raises(InputError, match="empty"):
        correction_targets(CorrectionPair(study.image, study.labels.with_array(np.zeros_like(study.labels.array))))


# --- CLI ----------------------------------------------------------------------------------------
@pytest.fixture()
def files(tmp_path: Path, study: TrainingCase) -> dict[str, Path]:
    paths = {
        "image": write_volume(study.image, tmp_path / "study_img.nii.gz"),
        "prediction": write_volume(study.labels, tmp_path / "study_pred.nii.gz"),
        "labels": write_volume(study.labels.with_array(painted_labels(study)), tmp_path / "study_fixed.nii.gz"),
    }
    geometry = study.labels.geometry
    other = geometry.__class__(geometry.size, (3.0, 3.5, 8.0), geometry.origin, geometry.direction)
    paths["shifted"] = write_volume(Volume(study.labels.array, other), tmp_path / "shifted_seg.nii.gz")
    paths["wreck"] = write_volume(_wrecking_pair(study).labels, tmp_path / "study_wreck.nii.gz")
    return paths


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_cli_errors_exit_1_with_one_line(files, base_path: Path, tmp_path: Path, capsys) -> None:
    out = ["-o", str(tmp_path / "new.safetensors"), "-q"]
    common = ["finetune", "--model", str(base_path), "--image", str(files["image"])]
    assert main([*common, "--labels", str(files["shifted"]), *out]) == 1
    line = _error_line(capsys)
    assert "study_img.nii.gz" in line and "shifted_seg.nii.gz" in line and "geometry" in line
    empty = [*common, "--labels", str(files["prediction"]), "--prediction", str(files["prediction"]), *out]
    assert main(empty) == 1
    assert "empty corrections" in _error_line(capsys)
    unknown = ["finetune", "--model", "no-such-model", "--image", str(files["image"]), "--labels", str(files["labels"])]
    assert main([*unknown, *out]) == 1
    assert "unknown model 'no-such-model'" in _error_line(capsys)
    assert main([*common, "--labels", str(files["labels"]), "-o", str(base_path), "-q"]) == 1
    assert "refusing to overwrite the base model" in _error_line(capsys)
    assert not (tmp_path / "new.safetensors").exists()


def test_cli_happy_path_writes_a_loadable_model(files, base_path: Path, tmp_path: Path, capsys) -> None:
    before = base_path.read_bytes()
    output = tmp_path / "models" / "fixed.safetensors"
    args = ["finetune", "--model", str(base_path), "--image", str(files["image"]), "--labels", str(files["labels"])]
    args += ["--slices", "sagittal:6,7,8", "--steps", "3", "--lr", "1e-3", "--batch-size", "4", "--crop", "64"]
    args += ["--class-name", "4=hemangioma", "--precision", "off", "--device", "cpu", "-o", str(output), "-q"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "hemangioma" in stdout and "before" in stdout and "after" in stdout
    model = load_model(output)
    assert model.metadata.class_values == [0, 1, 2, 3, 4]
    assert model.metadata.classes[4].name == "hemangioma"
    assert model.metadata.training["pair_details"][0]["trusted_slices"] == {"sagittal": [6, 7, 8]}
    assert base_path.read_bytes() == before


def test_case_records_from_a_trained_base_model(data_dir: Path) -> None:
    root = data_dir / "lumbar-mri"
    paths = [str(root / "VB3" / f"01_{kind}.nii.gz") for kind in ("img", "seg")]
    paths += [str(root / "IVD" / f"11_{kind}.nii.gz") for kind in ("img", "seg")]
    training = {"val_cases": ["VB3-01", "IVD-11", "VB3-99"], "data_paths": paths}
    metadata = ModelMetadata("m", "unet", {}, training=training)
    (first,) = cases_from_base_metadata(metadata, "val", limit=1)
    assert first.case_id == "IVD-11"  # dealt round-robin over datasets, sorted; missing files skipped
    record = case_record(first)
    assert record["source"] == "lumbar" and record["known_classes"] == [2]
    again = load_case_record(record)
    assert again.case_id == "IVD-11" and np.array_equal(again.labels.array, first.labels.array)
    assert [c.case_id for c in cases_from_base_metadata(metadata, "val")] == ["IVD-11", "VB3-01"]


# ------------------------------------------------------------------------------------------------
# Forgetting guards: each test fails when its guard is removed
# ------------------------------------------------------------------------------------------------
def test_select_step_prefers_the_best_corrections_within_the_tolerance() -> None:
    before = {"vertebral body": 0.80, "intervertebral disc": 0.90}

    def record(step, body, disc, corrected):
        fixed = {"vertebral body": body, "intervertebral disc": disc}
        return {"step": step, "fixed_validation": fixed, "corrections": {"vertebral body": corrected}}

    history = [
        record(10, 0.795, 0.898, 0.70),  # within 1 point
        record(20, 0.792, 0.900, 0.75),  # within: best corrections of those within
        record(30, 0.780, 0.905, 0.85),  # bodies −2 points: out however good the corrections
    ]
    assert _select_step(history, before, 0.01) == 1
    assert _select_step(history, before, 0.03) == 2
    # nothing within the tolerance: the step that forgot least
    assert _select_step(history, before, 0.001) == 0
    assert _select_step([], before, 0.01) is None


def test_select_step_bounds_the_cumulative_loss_since_the_original_model() -> None:
    before = {"intervertebral disc": 0.892}  # round 1's model, already 0.5 points below the original
    origin = {"intervertebral disc": 0.897}

    def record(step, disc, corrected):
        return {"step": step, "fixed_validation": {"intervertebral disc": disc}, "corrections": {"x": corrected}}

    history = [record(10, 0.890, 0.70), record(20, 0.885, 0.80)]  # −0.2 / −0.7 this round: both within 1 point
    assert _select_step(history, before, 0.01) == 1  # this round's loss alone: the better corrections win
    # −1.2 points since the original model: step 20 is out
    assert _select_step(history, before, 0.01, origin) == 0


def test_fixed_origin_is_the_base_its_record_or_a_warned_fallback(round1) -> None:
    result, _ = round1
    base = dataclasses.replace(result.metadata, training={})
    figures = {"vertebral body": 0.8}
    own, warning = fixed_origin(base, "d" * 64, figures, ["phantom-3"])
    assert warning is None and own["fixed_validation"] == figures and own["model"]["content_sha256"] == "d" * 64
    # a fine-tuned base measured on the same fixed set: its recorded origin
    recorded = result.metadata.training["fixed_validation_origin"]
    carried, warning = fixed_origin(result.metadata, "e" * 64, figures, ["phantom-3"])
    assert warning is None and carried == recorded
    # a first-round model saved before the record existed: rebuilt from its "before" figures
    legacy = dataclasses.replace(
        result.metadata, training={k: v for k, v in result.metadata.training.items() if k != "fixed_validation_origin"}
    )
    rebuilt, warning = fixed_origin(legacy, "e" * 64, figures, ["phantom-3"])
    assert warning is None and rebuilt["fixed_validation"] == recorded["fixed_validation"]
    # another fixed set: only this round is guarded, with a warning
    fallback, warning = fixed_origin(result.metadata, "e" * 64, figures, ["phantom-4"])
    assert fallback["fixed_validation"] == figures and "only this round's forgetting is guarded" in warning


def _wrecking_pair(study: TrainingCase) -> CorrectionPair:
    """ "Corrections" that erase every vertebral body of the study: training on them makes the
    model forget the bodies everywhere, the fixed validation case included."""
    labels = study.labels.array.copy()
    labels[labels == VERTEBRAL_BODY] = 0
    return CorrectionPair(study.image, study.labels.with_array(labels), name="wreck")


def test_selection_by_validation_keeps_weights_that_did_not_forget(base_path: Path, fixed_case, study) -> None:
    options = {"steps": 12, "val_every": 3, "lr": 3e-3, "replay_fraction": 0.0, "distill_weight": 0.0}
    options.update(l2sp_weight=0.0, max_forgetting=0.02, decoder_lr_scale=1.0)
    unguarded = fast_config(**options, select_by_validation=False)
    free = run_finetune(base_path, [_wrecking_pair(study)], unguarded, fixed_validation=[fixed_case])
    guarded = run_finetune(base_path, [_wrecking_pair(study)], fast_config(**options), fixed_validation=[fixed_case])
    body_before = free.before["fixed_validation"]["vertebral body"]
    assert free.selected_step is None and free.metadata.training["selected_step"] == 12
    assert free.after["fixed_validation"]["vertebral body"] < body_before - 0.1  # the scenario does forget
    # the guard keeps the evaluated step whose fixed-set Dice dropped least (or within 2 points)
    drops = [body_before - h["fixed_validation"]["vertebral body"] for h in guarded.history]
    assert [h["step"] for h in guarded.history] == [3, 6, 9, 12]
    kept = guarded.selected_step
    assert kept is not None and kept < 12 and guarded.metadata.training["selected_step"] == kept
    assert body_before - guarded.after["fixed_validation"]["vertebral body"] <= max(0.02, min(drops)) + 1e-6
    assert guarded.after["fixed_validation"]["vertebral body"] > free.after["fixed_validation"]["vertebral body"] + 0.1
    # the saved network is the kept step's, not the last one: re-measuring it gives the kept record
    again = run_finetune(
        LoadedModel(guarded.network, guarded.metadata, None),
        [_wrecking_pair(study)],
        fast_config(steps=1, lr=1e-12, replay_fraction=0.0, select_by_validation=False),
        fixed_validation=[fixed_case],
    )
    assert again.before["fixed_validation"] == pytest.approx(guarded.after["fixed_validation"], abs=1e-4)


def test_batchnorm_statistics_stay_the_base_models(round1, base_path: Path) -> None:
    result, _ = round1
    base = load_model(base_path).network.state_dict()
    tuned = result.network.state_dict()
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert stats  # the tiny U-Net has batch norm
    for key in stats:  # a small corrections batch must not re-estimate the base's normalisation
        assert torch.equal(tuned[key], base[key]), key
    assert result.metadata.training["frozen_batchnorm_layers"] > 0


def test_weight_anchor_pulls_toward_the_base_weights() -> None:
    torch.manual_seed(0)
    base = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2)
    student = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2)
    student.load_state_dict(base.state_dict())
    anchor = _WeightAnchor(student, base, 2.0)
    assert anchor(student, {}, None).item() == 0.0
    with torch.no_grad():
        student.inc[0].weight.add_(0.1)
    loss = anchor(student, {}, None)
    assert loss.item() == pytest.approx(2.0 * 0.01 * student.inc[0].weight.numel(), rel=1e-4)
    loss.backward()
    assert student.inc[0].weight.grad.min() > 0  # gradient descent moves it back


def test_cli_selection_options(files, base_path: Path, tmp_path: Path, capsys) -> None:
    common = ["finetune", "--model", str(base_path), "--image", str(files["image"]), "--labels", str(files["labels"])]
    common += ["--slices", "sagittal:6,7,8", "--batch-size", "4", "--crop", "64", "--precision", "off", "-q"]
    assert main([*common, "--max-forgetting", "-1", "-o", str(tmp_path / "bad.safetensors")]) == 1
    assert "max_forgetting" in _error_line(capsys)
    output = tmp_path / "sel.safetensors"
    assert main([*common, "--steps", "2", "--val-every", "1", "--max-forgetting", "0.5", "-o", str(output)]) == 0
    training = load_model(output).metadata.training
    assert training["selection"]["by_validation"] and training["selection"]["max_forgetting"] == 0.005
    assert training["config"]["val_every"] == 1 and training["selected_step"] in (1, 2)
    last = tmp_path / "last.safetensors"
    assert main([*common, "--steps", "2", "--keep-last", "-o", str(last)]) == 0
    training = load_model(last).metadata.training
    assert training["selection"] == {"by_validation": False} and training["selected_step"] == 2


def test_replay_distillation_splits_into_base_classes_and_new_class_veto() -> None:
    torch.manual_seed(0)
    base = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2).eval()
    student = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2)
    student.load_state_dict(base.state_dict())
    student.eval()
    _grow_head(student, 5, {4: VERTEBRAL_BODY}, margin=0.0)
    with torch.no_grad():
        student.head.conv.bias[4] += 2.0  # the new class claims part of the bodies
        student.head.conv.bias[1] -= 1.0  # and the base classes drift
    image = torch.randn(2, 3, 32, 32)
    batch = {"image": image, "replay": torch.tensor([True, True])}
    logits = student(image)
    same = _ReplayDistillation(base, 4, 2.0, "cpu", "fp32")(student, batch, logits).item()
    split = _ReplayDistillation(base, 4, 2.0, "cpu", "fp32", new_weight=2.0)(student, batch, logits).item()
    assert split == pytest.approx(same, rel=1e-5)  # equal weights: the plain divergence
    no_veto = _ReplayDistillation(base, 4, 2.0, "cpu", "fp32", new_weight=0.0)(student, batch, logits).item()
    veto = -torch.log1p(-torch.softmax(logits, 1)[:, 4]).mean().item()
    assert no_veto == pytest.approx(same - 2.0 * veto, rel=1e-4) and 0 < no_veto < same


def test_param_groups_scale_the_decoder_and_can_freeze_the_encoder() -> None:
    network = build_model("unet", in_channels=3, num_classes=4, base=4, depth=2)
    assert _param_groups(network, 1.0, 1.0) is None
    groups = _param_groups(network, 0.5, 10.0)
    scales = {g["lr_scale"]: sum(p.numel() for p in g["params"]) for g in groups}
    encoder = sum(p.numel() for n, p in network.named_parameters() if n.startswith(("inc.", "downs.")))
    total = sum(p.numel() for p in network.parameters())
    assert scales == {10.0: total - encoder, 0.5: encoder}
    frozen = _param_groups(network, 0.0, 10.0)
    assert len(frozen) == 1 and sum(p.numel() for p in frozen[0]["params"]) == total - encoder
    assert not any(p.requires_grad for n, p in network.named_parameters() if n.startswith("inc."))


def test_frozen_input_stages_keep_the_first_encoder_stage(base_path: Path, fixed_case, study) -> None:
    pair = CorrectionPair(study.image, study.labels.with_array(painted_labels(study)), study.labels, name="f")
    result = run_finetune(
        base_path, [pair], fast_config(steps=3, lr=1e-3, frozen_input_stages=1), fixed_validation=[fixed_case]
    )
    base = load_model(base_path).network.state_dict()
    tuned = result.network.state_dict()
    inc = [k for k in base if k.startswith("inc.")]
    assert inc and all(torch.equal(tuned[k], base[k]) for k in inc)
    assert not torch.equal(tuned["downs.0.1.0.weight"], base["downs.0.1.0.weight"])  # the next stage learns
    assert all(p.requires_grad for p in result.network.parameters())  # thawed for whoever trains it next


# ------------------------------------------------------------------------------------------------
# Lesion-presence gate of the base model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated_base(round1, tmp_path_factory) -> Path:
    """The round-1 model (with a lesion class, value 4) plus a tiny untrained lesion gate."""
    result, _ = round1
    folder = tmp_path_factory.mktemp("gated")
    plain = load_model(save_finetuned(result, folder / "round1.safetensors"))
    record = GateRecord("lesion-classifier", {"width": 1 / 16, "dropout": 0.0, "pool": "avg"}, 1, 0.4, [LESION])
    torch.manual_seed(3)
    gate = LesionGate(record.build().eval(), record)
    return attach_gate(plain, gate, folder / "gated.safetensors")


def test_finetune_carries_the_base_gate_over_unchanged(gated_base: Path, fixed_case, study, tmp_path: Path) -> None:
    base = load_model(gated_base)
    assert base.gate is not None
    pair = CorrectionPair(study.image, study.labels.with_array(painted_labels(study)), study.labels, name="again")
    result = run_finetune(gated_base, [pair], fast_config(steps=2, replay_fraction=0.0), fixed_validation=[fixed_case])
    assert result.gate is not None and not any("gate" in w for w in result.warnings)
    assert result.metadata.training["lesion_gate"] == "carried over unchanged from the base model"
    # (2 steps may forget a point or so on the tiny base: this test is about the gate, so save regardless)
    loaded = load_model(save_finetuned(result, tmp_path / "round2.safetensors", force=True))  # digest checked
    assert loaded.gate is not None
    assert loaded.gate.record.to_dict() == base.gate.record.to_dict()
    for key, value in base.gate.network.state_dict().items():
        torch.testing.assert_close(loaded.gate.network.state_dict()[key], value, rtol=0, atol=0)
    batch = np.random.default_rng(0).normal(size=(3, 3, 48, 48)).astype(np.float32)
    np.testing.assert_array_equal(loaded.gate.scores(batch), base.gate.scores(batch))
    assert any(not np.allclose(loaded.network.state_dict()[k], v) for k, v in base.network.state_dict().items())


def test_a_gate_that_no_longer_fits_is_dropped_with_a_warning(gated_base: Path, tmp_path: Path, caplog) -> None:
    base = load_model(gated_base)
    # Another context -> no carry-over, and the reason is given.
    gate, warning = carried_gate(base.gate, dataclasses.replace(base.metadata, context_slices=2), "b")
    assert gate is None and "lesion gate of the base model 'b' is not carried over" in warning
    kept, none = carried_gate(base.gate, base.metadata)
    assert kept is base.gate and none is None
    # A result whose lesion class value is gone (the classes were changed after fine-tuning).
    classes = list(base.metadata.classes)
    classes[-1] = dataclasses.replace(classes[-1], value=6)
    result = FinetuneResult(
        base.network, dataclasses.replace(base.metadata, classes=classes), {}, {}, [], gate=base.gate
    )
    with caplog.at_level(logging.WARNING, logger="napari_spineseg"):
        path = save_finetuned(result, tmp_path / "changed.safetensors")
    assert any("not carried over" in w and "[4]" in w for w in result.warnings)
    assert any("not carried over" in r.getMessage() for r in caplog.records)
    loaded = load_model(path)
    assert loaded.gate is None and [c.value for c in loaded.metadata.classes][-1] == 6


# ------------------------------------------------------------------------------------------------
# Refusals instead of tracebacks or silently worse models (issue #18, items 16 and 18)
# ------------------------------------------------------------------------------------------------
def _forgetful(result):
    """``result`` as if the fixed-set disc Dice had fallen by 24 points (the reported case)."""
    after = dict(result.after)
    fixed = dict(after["fixed_validation"])
    fixed["intervertebral disc"] = result.before["fixed_validation"]["intervertebral disc"] - 0.24
    after["fixed_validation"] = fixed
    return dataclasses.replace(result, after=after)


def test_a_model_that_forgot_more_than_the_limit_is_saved_only_when_forced(round1, tmp_path: Path) -> None:
    result = _forgetful(round1[0])
    with pytest.raises(InputError, match=r"forgot more than the limit of 1 Dice point.*intervertebral disc -24"):
        save_finetuned(result, tmp_path / "worse.safetensors")
    assert not (tmp_path / "worse.safetensors").exists()
    saved = save_finetuned(result, tmp_path / "worse.safetensors", force=True)
    assert load_model(saved).metadata.class_values == [0, 1, 2, 3, 4]


def test_a_model_within_the_round_limit_but_beyond_it_since_the_original_is_refused(round1, tmp_path: Path) -> None:
    result = round1[0]
    disc = result.before["fixed_validation"]["intervertebral disc"]
    before = {
        **result.before,
        "fixed_validation_origin": {**result.before["fixed_validation"], "intervertebral disc": disc + 0.008},
    }
    after = {
        **result.after,
        "fixed_validation": {**result.before["fixed_validation"], "intervertebral disc": disc - 0.005},
    }
    round2 = dataclasses.replace(result, before=before, after=after)  # −0.5 this round, −1.3 since the original
    assert forgetting_beyond_limit(dataclasses.replace(round2, before=result.before)) is None
    with pytest.raises(InputError, match=r"intervertebral disc -1\.3 since the original model"):
        save_finetuned(round2, tmp_path / "worse.safetensors")
    assert not (tmp_path / "worse.safetensors").exists()
    assert save_finetuned(round2, tmp_path / "worse.safetensors", force=True).is_file()


def test_cli_refuses_a_forgetful_model_unless_forced(round1, files, base_path, tmp_path, capsys, monkeypatch) -> None:
    result = _forgetful(round1[0])

    def forgetful_finetune(*args, **kwargs):
        yield from ()
        return result

    monkeypatch.setattr("napari_spineseg.training.finetune.finetune", forgetful_finetune)
    output = tmp_path / "worse.safetensors"  # a whole map that erases every body: it forgets
    args = ["finetune", "--model", str(base_path), "--image", str(files["image"]), "--labels", str(files["wreck"])]
    args += ["-o", str(output), "-q"]
    assert main(args) == 1
    assert "forgot more than the limit" in _error_line(capsys) and not output.exists()
    assert main([*args, "--force"]) == 0
    assert output.is_file()


@pytest.mark.parametrize("kind", ["one new class", "image as labels"])
def test_corrections_holding_only_new_classes_are_refused(base_path: Path, study: TrainingCase, kind: str) -> None:
    if kind == "one new class":
        labels = np.full(study.labels.array.shape, LESION, dtype=np.uint8)
    else:  # the image given as the labels: every voxel a "class"
        image = study.image.array.astype(np.float64)
        labels = (10 + 190 * (image - image.min()) / max(float(np.ptp(image)), 1e-6)).astype(np.uint8)
    pair = CorrectionPair(study.image, study.labels.with_array(labels), name="all-new")
    with pytest.raises(InputError, match="every trusted voxel of the corrections is a new class"):
        run_finetune(base_path, [pair], fast_config(steps=2, val_every=2))


@pytest.mark.parametrize(("option", "message"), [(["--crop", "0"], "crop size"), (["--seed", "-1"], "seed")])
def test_cli_bad_crop_or_seed_is_one_line(files, base_path: Path, tmp_path: Path, capsys, option, message) -> None:
    args = ["finetune", "--model", str(base_path), "--image", str(files["image"]), "--labels", str(files["labels"])]
    assert main([*args, *option, "-o", str(tmp_path / "new.safetensors"), "-q"]) == 1
    assert message in _error_line(capsys)


def test_measuring_reports_progress_reuses_the_base_figures_and_can_be_skipped(
    base_path: Path, fixed_case, study
) -> None:
    from napari_spineseg.training.finetune import fixed_cache_path

    pair = CorrectionPair(study.image, study.labels.with_array(painted_labels(study)), name="s5")

    def run(**options):
        events = finetune(
            base_path, [pair], fast_config(steps=2, val_every=2, **options), fixed_validation=[fixed_case]
        )
        messages = []
        while True:
            try:
                messages.append(next(events).message)
            except StopIteration as stop:
                return stop.value, [m for m in messages if m]

    first, messages = run()
    progress = [m for m in messages if m.startswith("measuring the base model: ")]
    assert progress[-1] == "measuring the base model: 100 % (study 2 of 2)", messages  # fixed + corrected
    assert any(m.startswith("measuring step 2: ") for m in messages)
    assert not any("validation took" in m for m in messages)  # the real measurement's time instead
    assert fixed_cache_path().is_file()
    second, messages = run()
    assert "measuring the base model: fixed-set figures of this model reused (cached)" in messages
    assert second.before["fixed_validation"] == first.before["fixed_validation"]
    assert second.before["corrections"] == first.before["corrections"]  # the corrections are measured again
    skipped, _ = run(measure_forgetting=False)
    assert not skipped.before["fixed_validation"] and skipped.before["corrections"]
    assert any("forgetting is not measured" in w for w in skipped.warnings)


def test_whole_slices_of_studies_of_different_sizes_share_batches(base_path: Path, study) -> None:
    """``crop_size=None``: slices of differently sized studies used to fail to stack into one batch."""
    pair = CorrectionPair(study.image, study.labels.with_array(painted_labels(study)), study.labels, name="s5")
    small = make_phantom(size=tuple(n - 8 for n in SIZE), spacing=SPACING, seed=7)
    reference = TrainingCase(
        small.image, small.labels.with_array(small.labels.array.astype(np.uint8)), {1, 2, 3}, "small", "phantom", "s"
    )
    config = fast_config(steps=3, crop_size=None, val_every=1000, batch_size=8, replay_fraction=0.5)
    result = run_finetune(base_path, [pair], config, reference_cases=[reference], fixed_validation=[])
    assert result.steps == 3 and not result.cancelled
