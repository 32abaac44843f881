"""From a study to 2-D network inputs and back: the one place training and inference share.

A study is brought to the canonical ``LPI`` orientation (lossless), normalised, and cut into
slices along each anatomical plane.  In a canonical array ``c[I, P, L]``:

* ``Plane.AXIAL`` slices are ``c[k, :, :]`` (rows A→P, columns R→L),
* ``Plane.CORONAL`` slices are ``c[:, k, :]`` (rows S→I, columns R→L),
* ``Plane.SAGITTAL`` slices are ``c[:, :, k]`` (rows S→I, columns A→P).

:func:`plane_view` presents any of them as a stack ``[slice, row, column]`` (a view, no copy).
With ``context_slices = k`` a network sees slices ``i-k .. i+k`` as channels (edges clamped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .orientation import CANONICAL_ORIENTATION, Plane, Reorientation, reorientation_to, to_canonical
from .preprocess import PreprocessConfig, inplane_target_shape, preprocess_volume
from .volume import Geometry, Volume


@dataclass
class PreparedStudy:
    """A study in canonical orientation, normalised, ready to be sliced."""

    image: np.ndarray  # float32, canonical [I, P, L]
    spacing_zyx: tuple[float, float, float]  # spacing of the canonical array axes
    reorientation: Reorientation  # canonical = reorientation.forward(original array)
    geometry: Geometry  # the original study's geometry
    canonical_geometry: Geometry

    def to_original(self, canonical_array: np.ndarray) -> np.ndarray:
        """A canonical-grid array (3-D, or 4-D with a trailing channel axis) back on the study's voxels."""
        return np.ascontiguousarray(self.reorientation.inverse(canonical_array))


def prepare_study(volume: Volume, preprocess: PreprocessConfig, dtype: np.dtype | type = np.float32) -> PreparedStudy:
    """Reorient ``volume`` to canonical and apply the volume-level pre-processing.

    The reorientation is a view (no copy); the normalised image (``dtype``: float32, or float16
    for inference on large studies) is the only full-size allocation.
    """
    transform, canonical_geometry = reorientation_to(volume.geometry, CANONICAL_ORIENTATION)
    spacing = canonical_geometry.spacing_zyx
    image = preprocess_volume(transform.forward(volume.array), spacing, preprocess, dtype)
    return PreparedStudy(np.ascontiguousarray(image), spacing, transform, volume.geometry, canonical_geometry)


def canonical_labels(labels: Volume) -> np.ndarray:
    """A label volume in canonical orientation (same transform as :func:`prepare_study`)."""
    canonical, _ = to_canonical(labels)
    return canonical.array


def plane_view(array: np.ndarray, plane: Plane) -> np.ndarray:
    """``array`` (canonical, 3-D or with trailing axes) as a stack of ``plane`` slices: ``[k, rows, cols, ...]``."""
    return np.moveaxis(array, Plane(plane).canonical_array_axis, 0)


def plane_pixel_spacing(spacing_zyx: tuple[float, float, float], plane: Plane) -> tuple[float, float]:
    """In-plane (row, column) spacing of ``plane`` slices of a canonical array."""
    axis = Plane(plane).canonical_array_axis
    rows, cols = (s for i, s in enumerate(spacing_zyx) if i != axis)
    return (float(rows), float(cols))


def context_indices(index: int, count: int, context_slices: int) -> np.ndarray:
    """Slice indices ``index-k .. index+k`` clamped to ``0..count-1``."""
    return np.clip(np.arange(index - context_slices, index + context_slices + 1), 0, count - 1)


def slice_batch(stack: np.ndarray, indices: np.ndarray | list[int], context_slices: int) -> np.ndarray:
    """Network input ``[B, 2k+1, H, W]`` (float32) for slices ``indices`` of ``stack``."""
    count = stack.shape[0]
    batch = np.stack([stack[context_indices(int(i), count, context_slices)] for i in indices])
    return np.ascontiguousarray(batch, dtype=np.float32)


def model_slice_shape(
    hw: tuple[int, int], pixel_spacing: tuple[float, float], model_spacing: float | None
) -> tuple[int, int]:
    """The slice size the network sees after in-plane resampling to ``model_spacing`` (mm)."""
    if model_spacing is None:
        return (int(hw[0]), int(hw[1]))
    return inplane_target_shape(hw, pixel_spacing, (model_spacing, model_spacing))
