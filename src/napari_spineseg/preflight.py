"""Preflight: warn about studies that break spine segmentation before running a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .orientation import OBLIQUE_WARNING_DEGREES, tilt_degrees
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
