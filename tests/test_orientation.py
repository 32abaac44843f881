"""Plane logic and lossless reorientation against SimpleITK and nibabel."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_spineseg.io import read_volume
from napari_spineseg.orientation import (
    CANONICAL_ORIENTATION,
    Plane,
    orientation_code,
    plane_array_axis,
    plane_axes,
    reorient,
    to_canonical,
)
from napari_spineseg.volume import Volume

SIGNED_PERMUTATIONS = [
    np.stack([sign[c] * np.eye(3)[perm[c]] for c in range(3)], axis=1)
    for perm in itertools.permutations(range(3))
    for sign in itertools.product((1, -1), repeat=3)
]


def test_there_are_48_axis_arrangements() -> None:
    assert len({m.tobytes() for m in SIGNED_PERMUTATIONS}) == 48


def test_orientation_and_planes_agree_with_nibabel(data_dir: Path) -> None:
    path = data_dir / "spinal-cord-t2" / "t2.nii.gz"
    volume = read_volume(path)
    codes = nib.aff2axcodes(nib.load(str(path)).affine)
    assert orientation_code(volume.direction) == "".join(codes) == "PSR"
    # Each plane is stacked along the index axis whose nibabel code is on that anatomical axis.
    anatomical = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}
    for plane, axis in plane_axes(volume.geometry).items():
        assert codes[axis] in anatomical[plane]


def test_orientation_code_matches_simpleitk_for_all_48() -> None:
    for matrix in SIGNED_PERMUTATIONS:
        direction = tuple(matrix.ravel())
        assert orientation_code(direction) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)


@settings(max_examples=48 * 3, deadline=None)
@given(
    index=st.integers(0, 47),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    spacing=st.tuples(*[st.floats(0.2, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
)
def test_canonical_round_trip_is_identity_and_keeps_positions(index, size, spacing, origin) -> None:
    direction = tuple(SIGNED_PERMUTATIONS[index].ravel())
    array = np.random.default_rng(index).integers(0, 1000, size=size[::-1]).astype(np.int16)
    volume = Volume.from_array(array, spacing=spacing, origin=origin, direction=direction)
    canonical, transform = to_canonical(volume)
    assert orientation_code(canonical.direction) == CANONICAL_ORIENTATION
    np.testing.assert_array_equal(transform.inverse(canonical.array), array)
    # Every voxel keeps its physical position: compare the positions of a few voxels.
    for zyx in [(0, 0, 0), tuple(s - 1 for s in array.shape), (array.shape[0] // 2, 0, array.shape[2] - 1)]:
        value = array[zyx]
        position = volume.geometry.index_to_lps(np.array(zyx[::-1]))[0]
        # where is that position in the canonical grid?
        inverse = np.linalg.inv(canonical.geometry.affine_lps())
        ijk = np.rint((inverse @ np.append(position, 1.0))[:3]).astype(int)
        assert canonical.array[tuple(ijk[::-1])] == value


def test_reorient_matches_simpleitk_dicomorient(data_dir: Path) -> None:
    image = sitk.ReadImage(str(data_dir / "spinal-cord-t2" / "t2.nii.gz"))
    volume = Volume.from_sitk(image)
    for code in ("LPI", "RAS", "SPL", "IAR"):
        ours, _ = reorient(volume, code)
        reference = sitk.DICOMOrient(image, code)
        np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(reference))
        np.testing.assert_allclose(ours.origin, reference.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(ours.direction, reference.GetDirection(), atol=1e-12)


def test_canonical_planes_are_fixed_array_axes() -> None:
    direction = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation("PIR")
    volume = Volume.from_array(np.zeros((7, 5, 3)), direction=direction)
    assert plane_axes(volume.geometry) == {"axial": 1, "coronal": 0, "sagittal": 2}
    canonical, _ = to_canonical(volume)
    for plane in Plane:
        assert plane_array_axis(canonical.geometry, plane) == plane.canonical_array_axis


def test_oblique_scan_uses_nearest_axis_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    angle = np.radians(30)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    volume = Volume.from_array(np.zeros((4, 4, 4)), direction=tuple(rotation.ravel()))
    with caplog.at_level(logging.WARNING):
        planes = plane_axes(volume.geometry)
    assert planes == {"axial": 2, "coronal": 1, "sagittal": 0}
    assert "oblique" in caplog.text
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        small = Volume.from_array(np.zeros((4, 4, 4)), direction=tuple(np.eye(3).ravel()))
        plane_axes(small.geometry)
    assert "oblique" not in caplog.text


def test_plane_parse_rejects_unknown() -> None:
    assert Plane.parse("axial, sagittal") == [Plane.AXIAL, Plane.SAGITTAL]
    with pytest.raises(Exception, match="unknown plane"):
        Plane.parse("transverse")
