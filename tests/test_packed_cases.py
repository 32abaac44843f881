"""Packed training data (.npz): crops keep the geometry, the loader needs NumPy only."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spineseg.augment import IGNORE
from napari_spineseg.errors import InputError
from napari_spineseg.training.data import phantom_cases
from napari_spineseg.training.packed import crop_to_labels, load_packed_cases, pack_cases


def _physical(geometry, index_zyx):
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return np.asarray(geometry.origin) + direction @ (np.asarray(index_zyx[::-1]) * np.asarray(geometry.spacing))


def test_crop_keeps_every_labelled_voxel_at_its_physical_position():
    (case,) = phantom_cases(1, size=(64, 64, 24))
    # Only part of it labelled: IGNORE elsewhere, as on the partial lumbar labels.
    case.labels.array[:, :20] = IGNORE
    cropped = crop_to_labels(case, margin_mm=4.0)
    assert cropped.image.array.size < case.image.array.size
    truth = (case.labels.array != IGNORE) & (case.labels.array != 0)
    assert ((cropped.labels.array != IGNORE) & (cropped.labels.array != 0)).sum() == truth.sum()
    first = np.argwhere(truth)[0]
    # the same voxel in the crop: find it by physical position
    point = _physical(case.image.geometry, first)
    inverse = np.linalg.inv(np.asarray(cropped.image.geometry.direction).reshape(3, 3))
    index_xyz = (
        inverse @ (point - np.asarray(cropped.image.geometry.origin)) / np.asarray(cropped.image.geometry.spacing)
    )
    z, y, x = np.round(index_xyz[::-1]).astype(int)
    assert cropped.image.array[z, y, x] == case.image.array[tuple(first)]
    assert cropped.labels.array[z, y, x] == case.labels.array[tuple(first)]


def test_packed_cases_round_trip_through_the_training_loader(tmp_path):
    cases = phantom_cases(2, size=(64, 64, 24))
    path = pack_cases(cases, tmp_path / "cases.npz", margin_mm=6.0)
    loaded = load_packed_cases(path, datasets=sorted({c.dataset for c in cases}))
    assert [c.case_id for c in loaded] == [c.case_id for c in cases]
    for original, back in zip(cases, loaded):
        cropped = crop_to_labels(original, margin_mm=6.0)
        assert back.known_classes == original.known_classes and back.patient == original.patient
        assert np.array_equal(back.labels.array, cropped.labels.array)
        assert np.allclose(back.image.array, cropped.image.array)
        assert back.image.geometry.is_close(cropped.image.geometry)
    assert [c.case_id for c in load_packed_cases(path, cases=[cases[1].case_id])] == [cases[1].case_id]


def test_a_file_that_is_not_a_packed_dataset_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, image=np.zeros(3))
    with pytest.raises(InputError, match="packed dataset"):
        load_packed_cases(path)
