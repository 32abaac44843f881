"""Study adaptation ("Apply my corrections to this study"): painted voxels kept, other slices improved."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from napari_spineseg.adaptation import AdaptConfig, adaptation_targets, run_adaptation
from napari_spineseg.errors import InputError
from napari_spineseg.interpolation import next_slice_to_paint
from napari_spineseg.metrics import dice_score
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.phantom import make_phantom
from napari_spineseg.schema import IGNORE, VERTEBRAL_BODY
from napari_spineseg.training.finetune.dataset import whole_slice_size


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(size=(96, 96, 20), spacing=(2.0, 2.0, 2.5), lesions=0, seed=11)


def _paint(labels: np.ndarray, truth: np.ndarray, axis: int, slices, value: int = VERTEBRAL_BODY) -> np.ndarray:
    """The annotator paints ``value`` as in ``truth`` on ``slices``; returns the painted mask."""
    painted = np.zeros(labels.shape, bool)
    for index in slices:
        key = [slice(None)] * 3
        key[axis] = index
        key = tuple(key)
        target = labels[key].copy()
        target[truth[key] == value] = value
        target[(truth[key] != value) & (labels[key] == value)] = 0
        painted[key] = target != labels[key]
        labels[key] = target
    return painted


def test_adaptation_keeps_painted_voxels_bit_identical(phantom) -> None:
    axis = plane_array_axis(phantom.labels.geometry, Plane.SAGITTAL)
    truth = phantom.labels.array
    labels = np.where(truth == VERTEBRAL_BODY, 0, truth).astype(np.uint8)  # the bodies are missing
    painted = _paint(labels, truth, axis, [8, 11])
    painted[5, 40:44, 40:44] = True  # a painted voxel off those slices (its value: whatever it is now)
    before = labels.copy()
    digest = _digest(labels[painted])
    result = run_adaptation(
        "spineseg-default", phantom.image, labels, painted, AdaptConfig(steps=3, crop_size=64, num_threads=1)
    )
    assert result.plane == "sagittal" and set(result.slices) >= {8, 11}
    assert _digest(result.labels[painted]) == digest  # painted voxels exactly as painted
    assert _digest(labels) == _digest(before)  # the input is not modified
    assert result.change.size > 0 and not painted[result.change.indices].any()
    applied = before.copy()
    result.change.apply(applied)
    assert np.array_equal(applied, result.labels)
    result.change.revert(applied)
    assert np.array_equal(applied, before)


def test_adaptation_targets_are_the_painted_slices_and_known_classes_only(phantom) -> None:
    axis = plane_array_axis(phantom.labels.geometry, Plane.SAGITTAL)
    labels = phantom.labels.array.copy()
    painted = np.zeros(labels.shape, bool)
    painted[(slice(None),) * axis + (7,)] = True
    labels[(slice(None),) * axis + (7,)][:3] = 9  # a value the model does not know
    targets, plane, slices = adaptation_targets(labels, painted, phantom.labels.geometry, model_values={0, 1, 2, 3})
    assert plane is Plane.SAGITTAL and slices == [7]
    trusted = targets != IGNORE
    assert trusted.any(axis=tuple(a for a in range(3) if a != axis)).sum() == 1
    assert not np.isin(targets, [9]).any()


def test_adaptation_with_whole_slices_of_several_planes(phantom) -> None:
    """crop_size=None (whole slices) with the three planes: their slices differ in shape and once
    crashed the batching ("stack expects each tensor to be equal size")."""
    axis = plane_array_axis(phantom.labels.geometry, Plane.SAGITTAL)
    truth = phantom.labels.array
    labels = np.where(truth == VERTEBRAL_BODY, 0, truth).astype(np.uint8)
    painted = _paint(labels, truth, axis, [9])
    digest = _digest(labels[painted])
    config = AdaptConfig(steps=2, batch_size=4, crop_size=None, num_threads=1)
    assert len(config.planes) == 3
    result = run_adaptation("spineseg-default", phantom.image, labels, painted, config)
    assert result.steps == 2 and not result.cancelled
    assert _digest(result.labels[painted]) == digest


def test_whole_slice_size_pads_differing_planes_to_one_square() -> None:
    assert whole_slice_size([(20, 192, 192), (192, 192, 50), (192, 192, 50)]) == 192
    assert whole_slice_size([(20, 100, 40), (100, 20, 40)]) == 112  # rounded up to a multiple of 16
    assert whole_slice_size([(20, 100, 40), (7, 100, 40)]) is None  # one plane's slices: left as they are


def test_adaptation_refuses_nothing_painted_and_wrong_shapes(phantom) -> None:
    labels = phantom.labels.array.copy()
    with pytest.raises(InputError, match="nothing painted"):
        run_adaptation("spineseg-default", phantom.image, labels, np.zeros(labels.shape, bool))
    with pytest.raises(InputError, match="shape"):
        run_adaptation("spineseg-default", phantom.image, labels[:-1], np.ones(labels[:-1].shape, bool))


@pytest.mark.slow
def test_adaptation_improves_the_unpainted_slices_of_a_real_study(data_dir) -> None:
    """VB3-01 (a validation patient of the bundled model): bodies painted on 3 sagittal slices."""
    from napari_spineseg.inference import Predictor, SegmentationSettings
    from napari_spineseg.training.data import load_lumbar_dataset

    (case,) = load_lumbar_dataset(data_dir / "lumbar-mri", ("VB3",), cases=["VB3-01"])
    truth = np.asarray(case.labels.array)
    axis = plane_array_axis(case.image.geometry, Plane.SAGITTAL)
    predictor = Predictor(SegmentationSettings(uncertainty="entropy"))
    predictor.load("spineseg-default")
    predicted = predictor.predict(case.image)
    prediction = predicted.labels.array
    chosen: list[int] = []
    for _ in range(3):  # the spread-out uncertainty proposal, as in benchmarks/bench_annotator.py
        chosen.append(next_slice_to_paint(predicted.uncertainty.array, axis, chosen, spread=4.0))
    span = truth != IGNORE
    truth_span = np.where(span, truth, 0)
    labels = prediction.copy()
    painted = _paint(labels, np.where(span, truth, labels), axis, chosen)
    digest = _digest(labels[painted])
    result = run_adaptation("spineseg-default", case.image, labels, painted, AdaptConfig(num_threads=1))
    assert _digest(result.labels[painted]) == digest
    rest = np.ones(truth.shape[axis], bool)
    rest[chosen] = False
    key = tuple(rest if a == axis else slice(None) for a in range(3))

    def body_dice(array: np.ndarray) -> float:
        return dice_score((array[key] == VERTEBRAL_BODY) & span[key], truth_span[key] == VERTEBRAL_BODY)

    assert body_dice(result.labels) > body_dice(labels) + 0.001  # measured (model v5): 0.8774 -> 0.8799
