"""Studies resampled from thick slices (resampled.py): runs found, corrections copied to their twins."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spineseg.interpolation import next_slice_to_paint
from napari_spineseg.phantom import make_phantom
from napari_spineseg.resampled import copy_within_runs, fill_from_corrections, resampled_runs
from napari_spineseg.schema import VERTEBRAL_BODY

STEP = 4  # acquired every 4th slice, as the lumbar data (4 mm -> 1 mm)


def thick_then_resampled(array: np.ndarray, step: int = STEP, linear: bool = True) -> np.ndarray:
    """``array`` as if acquired every ``step`` slices along axis 0 and resampled back: the image
    linearly (rounded to 8 bits, as stored); labels (``linear=False``) one shape per run of resampled
    slices, as in the lumbar data (drawn once on the thick slice)."""
    acquired = array[::step].astype(np.float32)
    index = np.arange(array.shape[0])
    lower = np.minimum(index // step, acquired.shape[0] - 1)
    upper = np.minimum(lower + 1, acquired.shape[0] - 1)
    t = ((index % step) / step).astype(np.float32)[:, None, None]
    if not linear:
        return acquired[np.maximum(index - 1, 0) // step].astype(array.dtype)
    blend = (1 - t) * acquired[lower] + t * acquired[upper]
    scaled = 255 * (blend - blend.min()) / max(float(blend.max() - blend.min()), 1e-6)
    return np.round(scaled).astype(np.uint8)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(size=(96, 96, 49), spacing=(1.0, 1.0, 1.0), lesions=0, seed=4)


def test_runs_are_the_slices_between_acquired_ones_and_a_native_study_has_none(phantom):
    native = phantom.image.array
    resampled = thick_then_resampled(native)
    runs = resampled_runs(resampled, axis=0)
    assert [tuple(r) for r in runs] == [tuple(range(k + 1, k + STEP)) for k in range(0, 48, STEP)]
    assert resampled_runs(native, axis=0) == []
    assert resampled_runs(resampled, axis=1) == [] and resampled_runs(resampled, axis=2) == []
    assert resampled_runs(np.zeros((20, 8, 8), np.uint8), axis=0) == []  # constant: nothing to tell


def test_a_corrected_slice_is_copied_to_its_run_without_touching_painting_or_other_values():
    labels = np.zeros((9, 6, 6), np.uint8)
    labels[:, 0, 0] = 3  # another structure, kept
    labels[2, 2:4, 2:4] = 1  # the corrected slice's body
    labels[3, 4, 4] = 1  # a stray body voxel on a twin: cleared
    painted = np.zeros(labels.shape, bool)
    painted[1, 5, 5] = True  # the annotator painted here earlier (stays 0)
    change, filled = copy_within_runs(labels, 0, [2], [range(1, 4), range(5, 8)], painted=painted)
    after = labels.copy()
    change.apply(after)
    assert filled == [1, 3]
    for twin in (1, 3):
        assert (after[twin][1:] == labels[2][1:]).all() and after[twin, 0, 0] == 3
    assert after[1, 5, 5] == 0 and (after[5:8] == labels[5:8]).all()  # another run: untouched
    change.revert(after)
    assert (after == labels).all()


def test_painting_one_slice_of_a_resampled_study_fixes_its_twins_and_the_fill_between(phantom):
    truth = thick_then_resampled(phantom.labels.array, linear=False) == VERTEBRAL_BODY
    image = thick_then_resampled(phantom.image.array)
    model = np.zeros(truth.shape, np.uint8)  # a model that missed one side of every body
    model[truth] = VERTEBRAL_BODY
    model[:, :, :40] = 0
    corrected = model.copy()
    painted = np.zeros(truth.shape, bool)
    for k in (18, 26):  # middle slices of two runs
        painted[k] = truth[k] != (corrected[k] == VERTEBRAL_BODY)
        corrected[k] = np.where(truth[k], VERTEBRAL_BODY, 0)
    change, slices = fill_from_corrections(corrected, 0, painted, image=image, prior=model, values=[VERTEBRAL_BODY])
    assert slices == {"painted": [18, 26], "copied": [17, 19, 25, 27]}
    after = corrected.copy()
    change.apply(after)
    for k in (17, 19, 25, 27):
        assert ((after[k] == VERTEBRAL_BODY) == truth[k]).all()  # nearest-neighbour labels: exact
    assert ((after[22] == VERTEBRAL_BODY) != truth[22]).sum() < ((model[22] == VERTEBRAL_BODY) != truth[22]).sum()
    plain, plain_slices = fill_from_corrections(corrected, 0, painted, prior=model, values=[VERTEBRAL_BODY])
    assert plain_slices["copied"] == [] and plain.size < change.size  # without the image: no copies


def test_proposals_take_one_slice_per_run():
    uncertainty = np.zeros((12, 4, 4), np.float32)
    uncertainty[4] = 9.0  # the most uncertain slice is an acquired one (no twins)
    uncertainty[2] = 5.0
    uncertainty[6] = 3.0
    uncertainty[10] = 1.0
    runs = [range(1, 4), range(5, 8), range(9, 12)]
    assert next_slice_to_paint(uncertainty, 0, spread=0, runs=runs) == 2
    assert next_slice_to_paint(uncertainty, 0, [2], spread=0, runs=runs) == 6
    assert next_slice_to_paint(uncertainty, 0, [2, 7], spread=0, runs=runs) == 10  # run 5-7 is done
    assert next_slice_to_paint(uncertainty, 0, spread=0) == 4  # without runs: the plain proposal
