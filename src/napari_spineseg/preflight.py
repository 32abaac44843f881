"""Preflight: what a study is (``spineseg info``: :func:`volume_info`, :func:`format_volume_info`) and what about
it may break spine segmentation (:func:`preflight` warnings), before running a model.

(Checks that keep malformed files away from ITK/GDCM are in :mod:`.header_checks`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .orientation import OBLIQUE_WARNING_DEGREES, orientation_code, plane_axes, tilt_degrees
from .volume import IDENTITY_DIRECTION, Volume

ANISOTROPY_WARNING_RATIO = 6.0
MIN_SLICES = 8


@dataclass(frozen=True)
class PreflightWarning:
    """A named problem (``code``) and the sentence shown to the user."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def preflight(volume: Volume) -> list[PreflightWarning]:
    """Everything about ``volume`` that may degrade segmentation, as warnings (never raises)."""
    warnings = [PreflightWarning("reader", text) for text in volume.metadata.get("warnings", [])]
    geometry = volume.geometry
    spacing = np.asarray(geometry.spacing)
    if (
        np.allclose(spacing, 1.0)
        and np.allclose(geometry.origin, 0.0)
        and np.allclose(geometry.direction, IDENTITY_DIRECTION)
    ):
        warnings.append(
            PreflightWarning(
                "missing-geometry",
                "spacing 1 mm, origin 0 and identity direction look like defaults: the file may carry no "
                "scanner geometry, so millimetre measures and planes may be wrong",
            )
        )
    ratio = float(spacing.max() / spacing.min())
    if ratio > ANISOTROPY_WARNING_RATIO:
        warnings.append(
            PreflightWarning(
                "anisotropy",
                f"extreme anisotropy: voxels are {ratio:.1f}× longer on one axis "
                f"(spacing {tuple(round(s, 3) for s in geometry.spacing)} mm); planes across the thick axis are coarse",
            )
        )
    tilt = tilt_degrees(geometry.direction)
    if tilt > OBLIQUE_WARNING_DEGREES:
        warnings.append(
            PreflightWarning(
                "oblique",
                f"oblique acquisition: index axes are up to {tilt:.0f}° from the anatomical axes; "
                "planes are taken along the nearest anatomical axis",
            )
        )
    if min(geometry.size) < MIN_SLICES:
        warnings.append(
            PreflightWarning("few-slices", f"only {min(geometry.size)} slices along one axis: too thin for 3-D planes")
        )
    array = volume.array
    if array.size and float(array.max()) == float(array.min()):
        warnings.append(PreflightWarning("constant", "the image is constant: there is nothing to segment"))
    return warnings


def check_segmentable(volume: Volume) -> None:
    """Raise :class:`InputError` for a volume that cannot be a study: no finite value, or constant."""
    from .errors import InputError

    array = volume.array
    if not array.size:
        raise InputError("the image has no voxels")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        return
    finite = np.isfinite(array)
    if not finite.any():
        raise InputError("the image has no finite value (all NaN or infinite): there is nothing to segment")
    values = array if finite.all() else array[finite]
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise InputError(f"the image is constant ({low:g} everywhere): there is nothing to segment")


def volume_info(volume) -> dict[str, Any]:
    """The ``spineseg info --json`` record of one volume (keys are a public contract)."""
    geometry = volume.geometry
    array = volume.array
    return {
        "name": volume.name,
        "path": str(volume.path) if volume.path else None,
        "size": list(geometry.size),
        "spacing": [float(s) for s in geometry.spacing],
        "origin": [float(o) for o in geometry.origin],
        "direction": [float(d) + 0.0 for d in geometry.direction],
        "orientation": orientation_code(geometry.direction),
        "planes": plane_axes(geometry, warn_degrees=90.0),
        "tilt_degrees": round(tilt_degrees(geometry.direction), 3),
        "dtype": str(array.dtype),
        "intensity_range": [float(np.min(array)), float(np.max(array))] if array.size else [0.0, 0.0],
        "warnings": [str(w) for w in preflight(volume)],
    }


def format_volume_info(info: dict[str, Any]) -> str:
    """The ``spineseg info`` text of a :func:`volume_info` record."""

    def numbers(values, digits=4):
        return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"

    direction = info["direction"]
    rows = [
        f"{info['name']}  [{info['path']}]",
        f"  size (x, y, z)     {tuple(info['size'])}",
        f"  spacing (x, y, z)  {numbers(info['spacing'])} mm",
        f"  origin (LPS)       {numbers(info['origin'], 6)} mm",
        "  direction          " + " / ".join(numbers(direction[i : i + 3], 3) for i in (0, 3, 6)),
        f"  orientation        {info['orientation']}",
        "  planes             "
        + ", ".join(f"{plane} = index axis {axis} ({'xyz'[axis]})" for plane, axis in info["planes"].items()),
        f"  intensity          {info['intensity_range'][0]:g} .. {info['intensity_range'][1]:g} ({info['dtype']})",
    ]
    rows += [f"  warning: {w}" for w in info["warnings"]]
    return "\n".join(rows)
