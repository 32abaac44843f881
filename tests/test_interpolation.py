"""Shape-based interpolation between corrected slices (napari_spineseg.interpolation)."""

from __future__ import annotations

import hashlib
from itertools import pairwise

import numpy as np
import pytest
from scipy import ndimage

from napari_spineseg.errors import InputError
from napari_spineseg.interpolation import (
    interpolate_between_slices,
    next_slice_to_paint,
    painted_slices,
    signed_distance,
)
from napari_spineseg.phantom import make_phantom
from napari_spineseg.schema import INTERVERTEBRAL_DISC, VERTEBRAL_BODY


@pytest.fixture(scope="module")
def phantom_disc() -> np.ndarray:
    """The largest intervertebral disc of a small noise-free phantom (boolean mask)."""
    phantom = make_phantom(size=(128, 128, 48), spacing=(1.5, 1.5, 1.5), snr=float("inf"), lesions=0)
    disc = phantom.labels.array == INTERVERTEBRAL_DISC
    parts, count = ndimage.label(disc)
    sizes = ndimage.sum_labels(disc, parts, range(1, count + 1))
    return parts == int(np.argmax(sizes)) + 1


def _take(axis: int, index: int) -> tuple:
    key: list = [slice(None)] * 3
    key[axis] = index
    return tuple(key)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.parametrize("axis", [0, 2])  # sagittal (left-right) and coronal-like stacking of the disc
def test_two_painted_disc_slices_reproduce_the_phantom_disc_within_one_voxel(phantom_disc, axis):
    other = tuple(a for a in range(3) if a != axis)
    extent = np.flatnonzero(phantom_disc.any(axis=other))
    a = int(extent[len(extent) // 2 - 2])
    b = a + 5
    work = np.zeros(phantom_disc.shape, np.uint8)
    for k in (a, b):
        work[_take(axis, k)] = np.where(phantom_disc[_take(axis, k)], INTERVERTEBRAL_DISC, 0)
    change = interpolate_between_slices(work, axis, slices=[a, b])
    change.apply(work)
    for s in range(a + 1, b):
        truth = phantom_disc[_take(axis, s)]
        result = work[_take(axis, s)] == INTERVERTEBRAL_DISC
        assert result.any()
        wrong = result ^ truth
        # every wrong voxel touches the true outline: distance to the other side ≤ 1 voxel
        depth = np.where(truth, ndimage.distance_transform_edt(truth), ndimage.distance_transform_edt(~truth))
        assert wrong.sum() == 0 or depth[wrong].max() <= 1.0, f"slice {s}: {depth[wrong].max()} voxels off"
        assert wrong.sum() <= 0.1 * truth.sum()
    outside = np.ones(work.shape, bool)
    outside[_take(axis, slice(a, b + 1))] = False
    assert not work[outside].any()  # nothing beyond the two painted slices


def test_painted_voxels_and_corrected_slices_are_never_changed():
    labels = np.zeros((9, 20, 20), np.uint8)
    labels[0, 5:15, 5:15] = VERTEBRAL_BODY
    labels[8, 6:14, 6:14] = VERTEBRAL_BODY
    labels[2:7, 0:4, 0:4] = VERTEBRAL_BODY  # a model's stray body the interpolation removes ...
    painted = np.zeros(labels.shape, bool)
    painted[0] = painted[8] = True
    painted[4, 0:2, 0:2] = True  # ... except where the annotator painted it
    painted[4, 8:10, 8:10] = True  # painted background inside the interpolated body
    labels[4, 8:10, 8:10] = 0
    before = _digest(labels[painted])
    assert painted_slices(painted, 0).tolist() == [0, 4, 8]  # by default slice 4 would be a corrected slice
    assert interpolate_between_slices(labels, 0, painted=painted).indices[0].tolist() != []
    change = interpolate_between_slices(labels, 0, slices=[0, 8], painted=painted)
    assert change.size > 0
    assert not painted[change.indices].any()
    result = labels.copy()
    change.apply(result)
    assert _digest(result[painted]) == before
    assert _digest(result[0]) == _digest(labels[0]) and _digest(result[8]) == _digest(labels[8])
    assert (result[4, 0:2, 0:2] == VERTEBRAL_BODY).all()  # painted stray survives
    assert (result[4, 2:4, 2:4] == 0).all()  # unpainted stray removed
    assert (result[4, 8:10, 8:10] == 0).all()
    assert (result[4, 7:13, 7:8] == VERTEBRAL_BODY).all()
    change.revert(result)
    assert _digest(result) == _digest(labels)


def test_several_slices_and_values_one_sided_shrinks_and_others_kept():
    labels = np.zeros((13, 30, 30), np.uint8)
    for k in (0, 6, 12):
        labels[k, 2:12, 2:12] = VERTEBRAL_BODY
    labels[0, 15:28, 15:28] = INTERVERTEBRAL_DISC  # disc on slice 0 only: shrinks, gone half-way to 6
    labels[3, 20:22, 20:22] = 3  # another structure between: kept (not on the corrected slices)
    labels[9, 25:27, 25:27] = 3
    change = interpolate_between_slices(labels, 0, slices=[0, 6, 12])
    result = labels.copy()
    change.apply(result)
    for s in range(1, 12):
        assert (result[s, 2:12, 2:12] == VERTEBRAL_BODY).all(), s
    disc_area = [np.isin(result[s], [INTERVERTEBRAL_DISC, 3]).sum() for s in range(0, 7)]
    assert all(x >= y for x, y in pairwise(disc_area)) and disc_area[2] > 0
    assert not (result[3:] == INTERVERTEBRAL_DISC).any()  # gone from half-way on
    assert (result[9, 25:27, 25:27] == 3).all()  # value on neither corrected slice: untouched
    assert (result[3, 20:22, 20:22] == 3).all()  # other value inside the shrinking disc kept by default
    forced = labels.copy()
    forced[1, 20:22, 20:22] = 3
    interpolate_between_slices(forced, 0, slices=[0, 6], overwrite_other=True).apply(forced)
    assert (forced[1, 20:22, 20:22] == INTERVERTEBRAL_DISC).all()
    only_body = interpolate_between_slices(labels, 0, slices=[0, 6, 12], values=[VERTEBRAL_BODY])
    assert set(np.unique(only_body.values)) <= {VERTEBRAL_BODY, 0}


def test_helpers_and_errors():
    painted = np.zeros((5, 4, 6), bool)
    painted[:, 1, 0] = True
    assert painted_slices(painted, 1).tolist() == [1]
    assert painted_slices(painted, 0).tolist() == [0, 1, 2, 3, 4]
    distance = signed_distance(np.pad(np.ones((3, 3), bool), 2))
    assert distance[3, 3] == 1.5 and distance[2, 2] == 0.5 and distance[1, 3] == -0.5
    assert (signed_distance(np.zeros((3, 3), bool)) < 0).all()
    labels = np.zeros((5, 4, 4), np.uint8)
    assert interpolate_between_slices(labels, 0, slices=[0, 4]).size == 0
    with pytest.raises(InputError, match="out of range"):
        interpolate_between_slices(labels, 3, slices=[0, 4])
    with pytest.raises(InputError, match="slice indices"):
        interpolate_between_slices(labels, 0, slices=[0, 5])
    with pytest.raises(InputError, match="painted"):
        interpolate_between_slices(labels, 0)
    with pytest.raises(InputError, match="integers"):
        interpolate_between_slices(labels.astype(float), 0, slices=[0, 4])
    with pytest.raises(InputError, match="shape"):
        interpolate_between_slices(labels, 0, painted=np.zeros((5, 4), bool))


def test_next_slice_to_paint_spreads_out_from_painted_slices():
    uncertainty = np.zeros((30, 4, 4), np.float32)
    uncertainty[10:14] = 1.0  # one cluster of uncertain slices ...
    uncertainty[25] = 0.6  # ... and a lone, less uncertain one
    assert next_slice_to_paint(uncertainty, 0) in range(10, 14)
    assert next_slice_to_paint(uncertainty, 0, painted=[11]) == 25  # not the cluster's neighbour
    assert next_slice_to_paint(uncertainty, 0, painted=[11], spread=0) in (10, 12, 13)  # plain ranking
    assert next_slice_to_paint(uncertainty[:2], 0, painted=[0, 1]) is None
    with pytest.raises(InputError, match="painted slice"):
        next_slice_to_paint(uncertainty, 0, painted=[30])
