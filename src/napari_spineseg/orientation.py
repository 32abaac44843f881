"""Anatomical planes and lossless reorientation.

Which array axis is "axial" depends on the direction cosines, not on the file's axis order.
Index axis ``c`` (ITK order x=0, y=1, z=2) points along column ``c`` of the LPS direction
matrix; each index axis is matched to the nearest anatomical axis (L-R, P-A, S-I) by the
assignment that maximises the total alignment, so even oblique scans get one plane per axis.

* slices across the S-I axis are **axial**, across A-P **coronal**, across L-R **sagittal**;
* the canonical orientation is ITK ``"LPI"``: in NumPy order ``array[I, P, L]``, i.e. axis 0 runs
  superior→inferior, axis 1 anterior→posterior, axis 2 patient right→left.  Sagittal slices of
  a canonical array show superior at the top and anterior on the left; axial slices show
  anterior at the top and the patient's right on the image's left (radiological convention).

Reorientation only permutes and flips axes (never resamples) and carries geometry exactly.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .errors import InputError
from .volume import Geometry, Volume

logger = logging.getLogger(__name__)

CANONICAL_ORIENTATION = "LPI"
OBLIQUE_WARNING_DEGREES = 20.0

# Anatomical LPS axis (0 = L-R, 1 = P-A, 2 = S-I) whose normal defines each plane.
_LETTER_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
_LETTER_SIGN = {"L": 1, "R": -1, "P": 1, "A": -1, "S": 1, "I": -1}


class Plane(str, Enum):
    """An anatomical slicing plane, named by the anatomical axis its slices are stacked along."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    @property
    def lps_axis(self) -> int:
        """The LPS axis (0 L-R, 1 P-A, 2 S-I) normal to this plane."""
        return {Plane.SAGITTAL: 0, Plane.CORONAL: 1, Plane.AXIAL: 2}[self]

    @property
    def canonical_array_axis(self) -> int:
        """The NumPy axis this plane's slices are stacked along in a canonical (LPI) array."""
        return {Plane.AXIAL: 0, Plane.CORONAL: 1, Plane.SAGITTAL: 2}[self]

    @classmethod
    def parse(cls, text: str) -> list[Plane]:
        """``"axial,coronal"`` → planes; clear error on unknown names."""
        planes = []
        for name in (t.strip().lower() for t in text.split(",") if t.strip()):
            try:
                planes.append(cls(name))
            except ValueError:
                raise InputError(f"unknown plane {name!r}: choose from axial, coronal, sagittal") from None
        if not planes:
            raise InputError("no plane given: choose from axial, coronal, sagittal")
        return list(dict.fromkeys(planes))


ALL_PLANES: tuple[Plane, ...] = (Plane.AXIAL, Plane.CORONAL, Plane.SAGITTAL)


def _anatomical_assignment(direction: tuple[float, ...] | np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """For each ITK index axis, the LPS axis it is matched to, and the cosines of that match."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    best, best_score = (0, 1, 2), -1.0
    for perm in itertools.permutations(range(3)):  # perm[c] = LPS axis of index axis c
        score = sum(abs(matrix[perm[c], c]) for c in range(3))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    cosines = np.array([matrix[best[c], c] for c in range(3)])
    return best, cosines  # type: ignore[return-value]


def orientation_code(direction: tuple[float, ...] | np.ndarray) -> str:
    """The 3-letter code of SimpleITK's ``DICOMOrientImageFilter`` (e.g. ``"PIR"``).

    Letter ``c`` names the anatomical direction index axis ``c`` points *towards*
    (identity direction = ``"LPS"``); it matches nibabel's ``aff2axcodes``.
    """
    assignment, cosines = _anatomical_assignment(direction)
    letters = ("LR", "PA", "SI")
    return "".join(letters[axis][0 if cos > 0 else 1] for axis, cos in zip(assignment, cosines))


def tilt_degrees(direction: tuple[float, ...] | np.ndarray) -> float:
    """The largest angle between an index axis and its nearest anatomical axis."""
    _, cosines = _anatomical_assignment(direction)
    return float(np.degrees(np.arccos(np.clip(np.abs(cosines).min(), 0.0, 1.0))))


def plane_axes(geometry: Geometry, warn_degrees: float = OBLIQUE_WARNING_DEGREES) -> dict[str, int]:
    """``{"axial": i, "coronal": j, "sagittal": k}``: the ITK index axis (0=x, 1=y, 2=z) each plane's
    slices are stacked along.  Logs a warning when the scan is tilted more than ``warn_degrees``."""
    assignment, _ = _anatomical_assignment(geometry.direction)
    tilt = tilt_degrees(geometry.direction)
    if tilt > warn_degrees:
        logger.warning("oblique acquisition: index axes are up to %.1f° from the anatomical axes", tilt)
    return {plane.value: assignment.index(plane.lps_axis) for plane in ALL_PLANES}


def plane_array_axis(geometry: Geometry, plane: Plane) -> int:
    """The NumPy axis (of ``Volume.array[z, y, x]``) along which ``plane``'s slices are stacked."""
    return 2 - plane_axes(geometry, warn_degrees=90.0)[Plane(plane).value]


@dataclass(frozen=True)
class Reorientation:
    """A permutation and flips of NumPy axes taking an array to a target orientation.

    ``forward(a) = flip(transpose(a, axes), flips)``; ``inverse`` undoes it exactly.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def forward(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes + tuple(range(3, array.ndim)))
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        return np.flip(out, flip_axes) if flip_axes else out

    def inverse(self, array: np.ndarray) -> np.ndarray:
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        out = np.flip(array, flip_axes) if flip_axes else array
        inverse_axes = tuple(int(i) for i in np.argsort(self.axes))
        return np.transpose(out, inverse_axes + tuple(range(3, array.ndim)))

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)


def reorientation_to(geometry: Geometry, code: str = CANONICAL_ORIENTATION) -> tuple[Reorientation, Geometry]:
    """The axis permutation/flips that bring ``geometry`` to orientation ``code`` and the new geometry."""
    code = code.upper()
    if len(code) != 3 or sorted(_LETTER_AXIS[c] for c in code if c in _LETTER_AXIS) != [0, 1, 2]:
        raise InputError(f"invalid orientation code {code!r}: need one of L/R, P/A, S/I each, e.g. 'LPI'")
    assignment, cosines = _anatomical_assignment(geometry.direction)
    matrix = geometry.direction_matrix
    source = [0, 0, 0]  # source[a]: old ITK axis that becomes new ITK axis a
    sign = [1, 1, 1]
    for a, letter in enumerate(code):
        b = assignment.index(_LETTER_AXIS[letter])
        source[a] = b
        sign[a] = 1 if math.copysign(1.0, cosines[b]) == _LETTER_SIGN[letter] else -1
    new_direction = np.zeros((3, 3))
    old_index_of_new_zero = np.zeros(3)
    for a in range(3):
        b = source[a]
        new_direction[:, a] = sign[a] * matrix[:, b]
        if sign[a] < 0:
            old_index_of_new_zero[b] = geometry.size[b] - 1
    new_origin = geometry.index_to_lps(old_index_of_new_zero)[0]
    new_geometry = Geometry(
        size=tuple(geometry.size[source[a]] for a in range(3)),
        spacing=tuple(geometry.spacing[source[a]] for a in range(3)),
        origin=tuple(new_origin),
        direction=tuple(new_direction.ravel()),
    )
    # NumPy axis n holds ITK axis 2-n; new NumPy axis n comes from old NumPy axis 2 - source[2-n].
    axes = tuple(2 - source[2 - n] for n in range(3))
    flips = tuple(sign[2 - n] < 0 for n in range(3))
    return Reorientation(axes, flips), new_geometry  # type: ignore[arg-type]


def reorient(volume: Volume, code: str = CANONICAL_ORIENTATION) -> tuple[Volume, Reorientation]:
    """``volume`` with its axes permuted/flipped to orientation ``code`` (no resampling)."""
    transform, geometry = reorientation_to(volume.geometry, code)
    array = np.ascontiguousarray(transform.forward(volume.array))
    return Volume(array, geometry, volume.name, volume.path, dict(volume.metadata)), transform


def to_canonical(volume: Volume) -> tuple[Volume, Reorientation]:
    """``volume`` in the canonical ``LPI`` orientation and the transform to undo it."""
    return reorient(volume, CANONICAL_ORIENTATION)
