"""Simulated hemangioma-like lesions in real vertebral bodies (clearly simulated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_spineseg.errors import InputError
from napari_spineseg.io import read_volume
from napari_spineseg.lesion_sim import simulate_hemangioma


def test_lesion_is_inside_a_body_bright_and_textured(data_dir: Path) -> None:
    image = read_volume(data_dir / "lumbar-mri" / "VB1" / "02_img.nii.gz")
    raw = read_volume(data_dir / "lumbar-mri" / "VB1" / "02_seg.nii.gz")
    bodies = raw.with_array((raw.array > 0).astype(np.uint8))
    new_image, new_labels, record = simulate_hemangioma(image, bodies, np.random.default_rng(0))
    lesion = new_labels.array == 4
    assert lesion.sum() == record.voxels > 50
    assert np.all(bodies.array[lesion] == 1)  # only body voxels became lesion
    assert np.array_equal(new_labels.array[~lesion], bodies.array[~lesion])
    marrow = image.array[(bodies.array == 1) & ~lesion].astype(float)
    assert new_image.array[lesion].mean() > 1.2 * np.median(marrow)
    assert new_image.array[lesion].std() > 0  # trabecular columns, not a flat blob
    assert new_image.geometry == image.geometry and new_image.array.dtype == image.array.dtype
    far = np.ones_like(lesion)
    z, y, x = record.centre_index
    far[max(z - 15, 0) : z + 16, max(y - 15, 0) : y + 16, max(x - 15, 0) : x + 16] = False
    assert np.array_equal(new_image.array[far], image.array[far])  # nothing changes far away
    again = simulate_hemangioma(image, bodies, np.random.default_rng(0))[1]
    assert np.array_equal(again.array, new_labels.array)


def test_no_body_is_a_clear_error(data_dir: Path) -> None:
    image = read_volume(data_dir / "spinal-cord-t2" / "t2.nii.gz")
    empty = image.with_array(np.zeros(image.shape, np.uint8))
    with pytest.raises(InputError, match="no vertebral body"):
        simulate_hemangioma(image, empty, np.random.default_rng(0))
