"""Training engine: data/partial labels, splits, datasets, the loop (overfit, cancel, resume, kill -9), recipes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from napari_spineseg.augment import IGNORE, AugmentConfig
from napari_spineseg.errors import InputError
from napari_spineseg.modelfile import load_model
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.preprocess import PreprocessConfig
from napari_spineseg.training import (
    TrainConfig,
    TrainingCase,
    get_recipe,
    kfold_by_patient,
    lumbar_patient_id,
    patient_split,
    phantom_cases,
    recipe_names,
    run_training,
    train,
)
from napari_spineseg.training.data import load_case
from napari_spineseg.training.datasets import PatchDataset, SliceDataset
from napari_spineseg.training.loop import _build_network, build_training_dataset, load_resume_state, resume_path_for
from napari_spineseg.volume import Volume

TINY = {"size": (64, 64, 8), "spacing": (3.0, 3.0, 6.0)}
NATIVE = PreprocessConfig(pixel_spacing_mm=None)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: predictable timing on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantom():
    return phantom_cases(1, seed=1, **TINY)[0]


def tiny_config(**overrides) -> TrainConfig:
    settings = {
        "architecture": "unet",
        "architecture_kwargs": {"base": 4, "depth": 2},
        "context_slices": 0,
        "steps": 4,
        "batch_size": 2,
        "val_every": 2,
        "planes": ["sagittal"],
        "crop_size": None,
        "preprocess": PreprocessConfig(pixel_spacing_mm=None),
        "augment": None,
        "mixed_precision": "off",
        "device": "cpu",
        "lr": 1e-2,
        "schedule": "none",
        "model_name": "tiny",
    }
    settings.update(overrides)
    return TrainConfig(**settings)


class Repeat(Dataset):
    """One sample of ``base`` repeated ``n`` times (overfitting)."""

    def __init__(self, base, index: int, n: int = 4) -> None:
        self.sample = base[index]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.sample


def _slice_with(dataset: SliceDataset, classes: set[int], without: set[int] = frozenset()) -> int:
    for i in range(len(dataset)):
        present = set(np.flatnonzero(dataset.presence[i]).tolist())
        if classes <= present and not (without & present):
            return i
    raise AssertionError("no suitable slice")


def _fake_case(dataset: str, case: str) -> TrainingCase:
    image = Volume.from_array(np.zeros((2, 2, 2), np.float32))
    return TrainingCase(
        image,
        image.with_array(np.zeros((2, 2, 2), np.uint8)),
        {1},
        lumbar_patient_id(dataset, case),
        dataset,
        f"{dataset}-{case}",
    )


# ------------------------------------------------------------------------------------------------
# Data: patients, splits, partial labels
# ------------------------------------------------------------------------------------------------
def test_patient_ids():
    assert lumbar_patient_id("VB1", "02") == lumbar_patient_id("VB1", "03") == "VB1-P02"
    assert {lumbar_patient_id("VB1", c) for c in ("06", "07", "08")} == {"VB1-P06"}
    assert lumbar_patient_id("VB1", "15") == "VB1-15"
    assert lumbar_patient_id("VB3", "01") == "VB3-01"
    assert lumbar_patient_id("IVD", "11") == "IVD-11"


def test_patient_splits_never_split_a_patient():
    cases = [_fake_case("VB1", c) for c in ("02", "03", "06", "07", "08", "15", "16", "17")]
    cases += [_fake_case("VB3", c) for c in ("01", "02", "04", "05", "06")]
    cases += [_fake_case("IVD", c) for c in ("11", "20", "25", "46")]
    for seed in range(12):
        for fraction in (0.2, 0.5):
            train_cases, val_cases = patient_split(cases, val_fraction=fraction, seed=seed)
            assert not {c.patient for c in train_cases} & {c.patient for c in val_cases}
            assert {c.dataset for c in val_cases} == {"VB1", "VB3", "IVD"}  # stratified by dataset
        folds = kfold_by_patient(cases, 3, seed=seed)
        seen = []
        for train_cases, val_cases in folds:
            assert not {c.patient for c in train_cases} & {c.patient for c in val_cases}
            seen += [c.case_id for c in val_cases]
        assert sorted(seen) == sorted(c.case_id for c in cases)
    # deterministic
    assert patient_split(cases, seed=3) == patient_split(cases, seed=3)
    # explicit ids: a case id takes its whole patient along
    train_cases, val_cases = patient_split(cases, val_patients=["VB1-07", "IVD-11"])
    assert {c.case_id for c in val_cases} == {"VB1-06", "VB1-07", "VB1-08", "IVD-11"}
    with pytest.raises(InputError, match="unknown patient"):
        patient_split(cases, val_patients=["VB9-99"])


def test_level_span_is_ignored_on_a_real_case(data_dir):
    folder = data_dir / "lumbar-mri" / "VB3"
    case = load_case(folder / "01_img.nii.gz", folder / "01_seg.nii.gz", "VB3", "01")
    assert case.known_classes == {1} and case.patient == "VB3-01"
    labels = case.labels.array
    axis = plane_array_axis(case.labels.geometry, Plane.AXIAL)
    assert axis == 1  # PIR storage: array[z, y, x] with y running superior -> inferior
    rows = np.flatnonzero(np.any((labels != 0) & (labels != IGNORE), axis=(0, 2)))
    first, last = int(rows[0]), int(rows[-1])
    assert first > 0 and last < labels.shape[1] - 1  # T12 / sacrum are in view
    assert np.all(labels[:, :first, :] == IGNORE) and np.all(labels[:, last + 1 :, :] == IGNORE)
    assert not np.any(labels[:, first : last + 1, :] == IGNORE)
    assert set(np.unique(labels).tolist()) == {0, 1, IGNORE}
    # axial training slices outside the span are dropped; the others keep the same IGNORE rows
    dataset = SliceDataset([case], planes=["sagittal"], context_slices=1, crop_size=None, augment=None)
    image, target, known = dataset.raw_sample(len(dataset) // 2)
    assert image.shape[0] == 3 and known.tolist() == [True, True, False, False, False]
    assert np.all(target[:first] == IGNORE) and np.all(target[last + 1 :] == IGNORE)  # rows run S -> I
    assert not np.any(target[first : last + 1] == IGNORE)


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
def test_slice_dataset_shapes_crop_and_determinism(phantom):
    dataset = SliceDataset(
        [phantom],
        planes=["axial", "coronal", "sagittal"],
        context_slices=1,
        preprocess=PreprocessConfig(pixel_spacing_mm=2.0),
        augment=AugmentConfig(),
        crop_size=40,
        seed=3,
    )
    sample = dataset[5]
    assert sample["image"].shape == (3, 40, 40) and sample["image"].dtype == torch.float32
    assert sample["target"].shape == (40, 40) and sample["target"].dtype == torch.int64
    assert sample["known"].tolist() == [True] * 5
    assert torch.equal(dataset[5]["image"], sample["image"])  # same epoch -> same sample
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5]["image"], sample["image"])
    weights = dataset.sample_weights()
    assert weights.shape == (len(dataset),) and np.isclose(weights.sum(), len(dataset))
    lesion = dataset.presence[:, 4]
    assert weights[lesion].mean() > weights[~lesion].mean()  # rare classes are upsampled
    # a big crop pads the image with 0 and the target with IGNORE
    native = PreprocessConfig(pixel_spacing_mm=None)
    big = SliceDataset([phantom], planes=["sagittal"], context_slices=0, crop_size=200, augment=None, preprocess=native)
    padded = big[0]
    assert padded["target"].shape == (200, 200) and (padded["target"] == IGNORE).sum() > 200 * 200 - 64 * 64 - 1


def test_slice_filtration(phantom):
    everything = SliceDataset([phantom], planes=["coronal"], context_slices=0, crop_size=None)
    filtered = SliceDataset(
        [phantom], planes=["coronal"], context_slices=0, crop_size=None, foreground_only=True, keep_empty_fraction=0.0
    )
    assert len(filtered) < len(everything)
    assert filtered.presence[:, 1:].any(axis=1).all()


def test_patch_dataset(phantom):
    preprocess = PreprocessConfig(pixel_spacing_mm=1.5)
    slices = SliceDataset([phantom], planes=["sagittal"], context_slices=0, crop_size=None, preprocess=preprocess)
    patches = PatchDataset(slices, patch_size=32, stride=8, positive_fraction=0.6, positive_ratio=0.6)
    labels = patches.patches[:, 3]
    positives = int((labels > 0).sum())
    assert positives > 0
    assert abs(positives / len(labels) - 0.6) < 0.05 or (labels == 0).sum() == 0
    sample = patches[0]
    assert sample["image"].shape == (1, 32, 32)
    assert torch.unique(sample["target"]).numel() == 1


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    p, t = pred == value, truth == value
    return 2 * np.count_nonzero(p & t) / max(1, np.count_nonzero(p) + np.count_nonzero(t))


def test_tiny_network_overfits_a_phantom_slice(phantom):
    torch.manual_seed(0)
    base = SliceDataset(
        [phantom], planes=["sagittal"], context_slices=0, crop_size=None, augment=None, preprocess=NATIVE
    )
    index = _slice_with(base, {1, 2, 3}, without={4})
    config = tiny_config(architecture_kwargs={"base": 8, "depth": 3}, steps=150, val_every=150, batch_size=4)
    events = list(train(config, [phantom], dataset=Repeat(base, index)))
    kinds = {e.kind for e in events}
    assert {"step", "validation", "done"} <= kinds
    result = events[-1].result
    assert result.steps == 150 and result.best_model_path is None
    image, target, _ = base.raw_sample(index)
    with torch.no_grad():
        pred = result.network(torch.from_numpy(image[None])).argmax(1)[0].numpy()
    dice = [_dice(pred, target, v) for v in (1, 2, 3)]
    assert min(dice) > 0.95, dice


def _disc_background_probability(case: TrainingCase, known: set[int], phantom_truth: np.ndarray) -> float:
    torch.manual_seed(0)
    labelled = TrainingCase(case.image, case.labels, known, case.patient, case.dataset, case.case_id)
    base = SliceDataset(
        [labelled], planes=["sagittal"], context_slices=0, crop_size=None, augment=None, preprocess=NATIVE
    )
    index = len(base) // 2
    config = tiny_config(architecture_kwargs={"base": 8, "depth": 3}, steps=80, val_every=80, batch_size=4)
    result = run_training(config, [labelled], dataset=Repeat(base, index))
    image, _, _ = base.raw_sample(index)
    truth = np.moveaxis(phantom_truth, 2, 0)[base.index[index][2]]  # canonical sagittal slice
    with torch.no_grad():
        probs = torch.softmax(result.network(torch.from_numpy(image[None])), 1)[0].numpy()
    return float(probs[0][truth == 2].mean())


def test_partial_labels_do_not_push_unlabelled_discs_to_background(phantom):
    from napari_spineseg.slicing import canonical_labels

    truth = canonical_labels(phantom.labels)
    vertebra_only = np.where(np.isin(phantom.labels.array, (2, 3, 4)), 0, phantom.labels.array).astype(np.uint8)
    case = TrainingCase(phantom.image, phantom.labels.with_array(vertebra_only), {1}, "p", "phantom", "p")
    partial = _disc_background_probability(case, {1}, truth)  # discs unannotated: marginal loss
    naive = _disc_background_probability(case, {1, 2, 3, 4}, truth)  # wrongly claiming discs are background
    assert naive > 0.9
    assert partial < naive - 0.3, (partial, naive)


def test_closing_mid_run_keeps_the_previous_model_loadable(phantom, tmp_path):
    output = tmp_path / "m.safetensors"
    log = tmp_path / "log.csv"
    generator = train(tiny_config(steps=50, output=output, log_csv=log), [phantom])
    saved_at = None
    for event in generator:
        if event.kind == "checkpoint":
            saved_at = event.step
        if event.kind == "step" and event.step == 5:
            break
    generator.close()
    assert saved_at == 4
    model = load_model(output)
    assert model.metadata.training["steps"] == 4
    assert model.metadata.context_slices == 0 and model.metadata.planes == ["sagittal"]
    rows = log.read_text().strip().splitlines()
    assert rows[0].startswith("step,epoch,train_loss") and len(rows) == 3
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_cancel_event_and_resume_continue_the_step_count(phantom, tmp_path):
    output = tmp_path / "m.safetensors"
    cancel = threading.Event()
    steps_seen = []
    for event in train(tiny_config(steps=10, output=output), [phantom], cancel=cancel):
        if event.kind == "step":
            steps_seen.append(event.step)
            if event.step == 3:
                cancel.set()
        if event.kind == "done":
            result = event.result
    assert steps_seen == [1, 2, 3] and result.cancelled
    resume = resume_path_for(output)
    _, optimizer_state, state = load_resume_state(resume)
    assert state["step"] == 3 and optimizer_state["state"]
    events = list(train(tiny_config(steps=6, output=output, resume=resume), [phantom]))
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == [4, 5, 6]
    assert events[-1].result.steps == 6
    assert [row["step"] for row in events[-1].result.history] == [2, 4, 6]
    assert load_model(output).metadata.training["steps"] == 6
    with pytest.raises(InputError, match="checkpoint"):
        list(train(tiny_config(architecture="resunet", resume=resume), [phantom]))


def test_validation_runs_inference_on_whole_volumes(phantom, tmp_path):
    config = tiny_config(steps=2, val_every=2, planes=["sagittal", "axial"], output=tmp_path / "m.safetensors")
    events = list(train(config, [phantom], [phantom]))
    validation = next(e for e in events if e.kind == "validation")
    assert set(validation.val_dice) == {"vertebral body", "intervertebral disc", "spinal canal", "lesion"}
    assert validation.val_mean == pytest.approx(np.mean(list(validation.val_dice.values())), abs=1e-4)
    metadata = load_model(tmp_path / "m.safetensors").metadata
    assert metadata.metrics["val_mean_dice"] == pytest.approx(validation.val_mean)
    assert metadata.training["val_cases"] == [phantom.case_id]
    assert metadata.training["config"]["loss"] == "ce+dice"


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from napari_spineseg.preprocess import PreprocessConfig
    from napari_spineseg.training import TrainConfig, phantom_cases, train
    case = phantom_cases(1, seed=1, size=(48, 48, 6), spacing=(4.0, 4.0, 8.0))[0]
    config = TrainConfig(architecture="unet", architecture_kwargs={"base": 4, "depth": 2}, context_slices=0,
                         steps=10**6, batch_size=2, val_every=1, planes=["sagittal"], crop_size=None,
                         preprocess=PreprocessConfig(pixel_spacing_mm=None), augment=None, mixed_precision="off",
                         device="cpu", output=sys.argv[1])
    for event in train(config, [case]):
        if event.kind == "checkpoint":
            print(event.step, flush=True)
    """
)


def test_kill_9_while_saving_leaves_a_loadable_model(tmp_path):
    output = tmp_path / "m.safetensors"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    rng = np.random.default_rng(0)
    for trial in range(2):
        process = subprocess.Popen([sys.executable, str(script), str(output)], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            for _ in range(1 + trial):
                assert process.stdout.readline().strip(), "the training subprocess died"
            time.sleep(float(rng.uniform(0.0, 0.2)))
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.wait(timeout=30)
        model = load_model(output)
        assert model.metadata.name == "spineseg-model"


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------
def test_recipes_are_complete_and_unknown_is_an_error():
    assert set(recipe_names()) >= {
        "default",
        "unet-bce",
        "fcn-resnet50",
        "penn",
        "unet-focal-dice",
        "resunet-tversky",
        "vgg19-unet-tversky",
    }
    default = get_recipe("default").config
    assert default.architecture == "unet" and default.architecture_kwargs["base"] == 16
    assert default.context_slices == 1 and default.crop_size == 192
    assert [c.value for c in default.classes] == [0, 1, 2, 3]  # no lesion class: no labelled lesion MRI exists
    assert default.planes == ["axial", "coronal", "sagittal"] and default.preprocess.pixel_spacing_mm == 1.0
    assert default.augment.invert_prob > 0 and default.augment.gamma_prob > 0 and default.augment.bias_field > 0
    assert get_recipe("unet-bce").config.augment is None and get_recipe("unet-bce").config.lr == 1e-4
    assert get_recipe("fcn-resnet50").folds == 5
    with pytest.raises(InputError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(InputError, match="unknown setting"):
        get_recipe("default", colour="red")


@pytest.mark.parametrize("name", ["unet-bce", "penn", "unet-focal-dice", "resunet-tversky", "vgg19-unet-tversky"])
def test_every_recipe_trains_a_step(name, tmp_path):
    case = phantom_cases(1, seed=2, size=(48, 48, 6), spacing=(4.0, 4.0, 8.0))[0]
    recipe = get_recipe(name, steps=1, val_every=1, batch_size=2, crop_size=32, device="cpu", planes=["sagittal"])
    config = recipe.config
    config.preprocess.pixel_spacing_mm = 4.0
    if config.patches is not None:  # patches need structures larger than 60 % of 32 pixels
        config.preprocess.pixel_spacing_mm = 1.0
        config.patches = {**config.patches, "stride": 8}
    result = run_training(config, [case])
    assert result.steps == 1


def test_default_recipe_end_to_end_on_one_real_case(data_dir, tmp_path):
    folder = data_dir / "lumbar-mri" / "VB3"
    full = load_case(folder / "02_img.nii.gz", folder / "02_seg.nii.gz", "VB3", "02")

    def crop(volume: Volume) -> Volume:
        array = volume.array[30:42, 60:156, 40:136]  # 12 sagittal slices, 96 x 96 mm around the spine
        return Volume.from_array(np.ascontiguousarray(array), spacing=volume.spacing, direction=volume.direction)

    case = TrainingCase(crop(full.image), crop(full.labels), full.known_classes, full.patient, "VB3", full.case_id)
    assert np.any(case.labels.array == 1)
    output = tmp_path / "default.safetensors"
    recipe = get_recipe("default", steps=3, val_every=3, batch_size=2, crop_size=64, output=output)
    events = list(train(recipe.config, [case], [case]))
    result = events[-1].result
    assert result.steps == 3 and result.best_model_path == output
    model = load_model(output)
    assert model.metadata.training["recipe"] == "default"
    assert model.metadata.in_channels == 3 and model.metadata.num_classes == 4
    assert "vertebral body" in model.metadata.metrics["val_dice"]


def test_train_config_round_trip():
    config = get_recipe("default").config
    again = TrainConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    with pytest.raises(InputError):
        TrainConfig(schedule="sometimes")


def test_build_training_dataset_uses_patches_for_penn(phantom):
    config = get_recipe("penn", planes=["sagittal"]).config
    config.preprocess.pixel_spacing_mm = 1.5
    assert isinstance(build_training_dataset(config, [phantom]), PatchDataset)


def test_no_pickle_files_are_written(phantom, tmp_path):
    list(train(tiny_config(steps=2, output=tmp_path / "m.safetensors", log_csv=tmp_path / "l.csv"), [phantom]))
    names = sorted(p.name for p in Path(tmp_path).iterdir())
    assert names == ["l.csv", "m.resume.safetensors", "m.safetensors"]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_model(path).network.state_dict()


def test_weight_average_is_what_is_validated_and_saved(phantom, tmp_path):
    """With ``ema_decay`` the saved model is decay·start + (1 - decay)·stepped, batch-norm statistics included."""
    start = _build_network(tiny_config())
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    output = tmp_path / "m.safetensors"
    list(train(tiny_config(steps=1, val_every=1, ema_decay=0.9, output=output), [phantom], network=start))
    stepped, _, state = load_resume_state(resume_path_for(output))
    saved = _weights(output)
    assert set(state["averaged_weights"]) == set(saved)
    moved = 0
    for name, value in saved.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, stepped[name])
            continue
        expected = 0.9 * start_state[name] + 0.1 * stepped[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(stepped[name], start_state[name]))
    assert moved > 0  # the step changed the raw weights, so the comparison has teeth


def test_weight_average_survives_a_resume(phantom, tmp_path):
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    list(train(tiny_config(steps=4, ema_decay=0.8, output=straight, seed=3), [phantom]))
    list(train(tiny_config(steps=2, ema_decay=0.8, output=split, seed=3), [phantom]))
    resume = resume_path_for(split)
    list(train(tiny_config(steps=4, ema_decay=0.8, output=split, seed=3, resume=resume), [phantom]))
    for name, value in _weights(straight).items():
        torch.testing.assert_close(_weights(split)[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="ema_decay"):
        tiny_config(ema_decay=1.0)
