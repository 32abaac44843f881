"""How the viewer shows a study: the plane (axial, coronal, sagittal), oriented the radiological way."""

from __future__ import annotations

from typing import Any

PLANE_NAMES = ("axial", "coronal", "sagittal")
# Orientation letter -> (LPS axis 0 L-R / 1 P-A / 2 S-I, +1 towards L/P/S or -1 towards R/A/I).
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def show_plane(viewer: Any, layer: Any, plane: str, index: int | None = None) -> int:
    """Show ``plane`` slices of ``layer`` the radiological way and go to slice ``index``.

    Sagittal: superior up, anterior left; coronal: superior up, patient right on the left;
    axial: anterior up, patient right on the left.  Returns the array axis of the slider.
    """
    from .._napari_layers import geometry_from_layer
    from ..orientation import Plane, orientation_code, plane_array_axis

    shape = layer.data.shape
    geometry = geometry_from_layer(layer, shape)
    plane = Plane(plane)
    axis = plane_array_axis(geometry, plane)
    code = orientation_code(geometry.direction)  # letter c: where index axis c points (e.g. "PIR")
    lps_axis = {2 - c: _LETTERS[letter] for c, letter in enumerate(code)}  # array axis -> (LPS axis, sign)
    by_lps = {m: a for a, (m, _) in lps_axis.items()}
    # (LPS axis shown as rows, as columns) and whether rows/columns should run towards +LPS.
    rows_lps, cols_lps = {Plane.SAGITTAL: (2, 1), Plane.CORONAL: (2, 0), Plane.AXIAL: (1, 0)}[plane]
    rows_towards_plus = rows_lps == 1  # rows run S→I (towards -S) or A→P (towards +P)
    row_axis, col_axis = by_lps[rows_lps], by_lps[cols_lps]
    row_down = (lps_axis[row_axis][1] > 0) == rows_towards_plus
    col_right = lps_axis[col_axis][1] > 0  # columns run A→P (+P) or R→L (+L)
    if viewer.dims.ndim == 3:
        viewer.dims.order = (axis, row_axis, col_axis)
        viewer.dims.axis_labels = [p.value for p in sorted(Plane, key=lambda p: plane_array_axis(geometry, p))]
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
        camera.orientation2d = ("down" if row_down else "up", "right" if col_right else "left")
    if index is not None:
        index = int(min(max(index, 0), shape[axis] - 1))
        world = layer.translate[-3:][axis] + index * layer.scale[-3:][axis]
        viewer.dims.set_point(viewer.dims.ndim - 3 + axis, world)
    return axis
