"""The :class:`Volume` type: a voxel array that always travels with its geometry.

Axis convention (used everywhere in napari-spineseg)
----------------------------------------------------
* ``Volume.array`` is indexed ``array[k, j, i]``: NumPy order, the *reverse* of the ITK index
  ``(i, j, k) = (x, y, z)``.  This is what ``SimpleITK.GetArrayFromImage`` returns and what
  napari displays (the last array axis is the horizontal screen axis).
* ``spacing``, ``origin`` and ``size`` are in ITK index order ``(x, y, z)``, in millimetres.
* ``direction`` is the ITK 3×3 direction-cosine matrix in the LPS patient frame, stored
  row-major: column ``c`` is the LPS unit vector of index axis ``c``.
* The physical (LPS) position of ITK index ``(i, j, k)`` is
  ``origin + direction @ (spacing * (i, j, k))``.

Helpers convert to napari's array order (``spacing_zyx``, ``origin_zyx``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GeometryMismatchError, InputError

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3-D study: size, spacing, origin (ITK x, y, z order) and direction."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.ravel(self.direction)))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError("geometry must be 3-D: size, spacing and origin of 3 values, direction of 9")
        if not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise InputError(f"voxel spacing must be positive and finite, got {self.spacing}")
        if not all(np.isfinite(self.origin)) or not all(np.isfinite(self.direction)):
            raise InputError("origin and direction must be finite numbers")

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as a 3×3 array (column c = LPS direction of index axis c)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The NumPy array shape ``(z, y, x)`` of this grid."""
        return self.size[::-1]  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.spacing[::-1]  # type: ignore[return-value]

    @property
    def origin_zyx(self) -> tuple[float, float, float]:
        return self.origin[::-1]  # type: ignore[return-value]

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Physical LPS positions (N×3) of ITK indices ``ijk`` (N×3, x-y-z order)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction_matrix.T

    def affine_lps(self) -> np.ndarray:
        """4×4 affine mapping ITK index (x, y, z, 1) to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """4×4 affine mapping ITK index to RAS millimetres (the NIfTI/nibabel convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()

    def is_close(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        """Same size and, within ``tolerance`` (mm / cosine), the same spacing, origin, direction."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tolerance, rtol=0)
            and np.allclose(self.origin, other.origin, atol=tolerance * 10, rtol=0)
            and np.allclose(self.direction, other.direction, atol=tolerance, rtol=0)
        )

    def describe_difference(self, other: Geometry) -> str:
        parts = []
        for name in ("size", "spacing", "origin", "direction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "size":
                if mine != theirs:
                    parts.append(f"size {mine} vs {theirs}")
            elif not np.allclose(mine, theirs, atol=1e-3, rtol=0):
                parts.append(f"{name} {tuple(round(v, 4) for v in mine)} vs {tuple(round(v, 4) for v in theirs)}")
        return "; ".join(parts) or "geometry differs"

    def to_dict(self) -> dict[str, list]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(tuple(data["size"]), tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))


@dataclass
class Volume:
    """A 3-D voxel array (``array[z, y, x]``) with its geometry, name, source path and metadata.

    ``metadata`` holds reader-specific records (DICOM series information with patient
    identifiers removed, NIfTI header fields, ...), never needed to place voxels.
    """

    array: np.ndarray
    geometry: Geometry
    name: str = "volume"
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"{self.name}: a volume must be 3-D, got an array of shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape:
            raise GeometryMismatchError(
                f"{self.name}: array shape {self.array.shape} (z, y, x) does not match geometry size "
                f"{self.geometry.size} (x, y, z)"
            )

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        direction: tuple[float, ...] = IDENTITY_DIRECTION,
        name: str = "volume",
        **kwargs: Any,
    ) -> Volume:
        """Wrap a ``(z, y, x)`` array; ``spacing``/``origin`` are given in ITK ``(x, y, z)`` order."""
        array = np.asarray(array)
        if array.ndim != 3:
            raise InputError(f"{name}: a volume must be 3-D, got an array of shape {array.shape}")
        geometry = Geometry(array.shape[::-1], spacing, origin, direction)
        return cls(array, geometry, name=name, **kwargs)

    # Convenience accessors -------------------------------------------------------------------
    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray, name: str | None = None, **metadata: Any) -> Volume:
        """A new volume on the same voxel grid (for label maps and probability maps)."""
        array = np.asarray(array)
        if tuple(array.shape) != self.shape:
            raise GeometryMismatchError(
                f"{name or self.name}: array shape {array.shape} differs from the study's {self.shape}"
            )
        return replace(self, array=array, name=name or self.name, metadata={**self.metadata, **metadata})

    # SimpleITK bridge --------------------------------------------------------------------------
    def to_sitk(self):  # -> SimpleITK.Image
        """A SimpleITK image with this volume's voxels and exact geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=False)
        image.SetSpacing(self.geometry.spacing)
        image.SetOrigin(self.geometry.origin)
        image.SetDirection(self.geometry.direction)
        return image

    @classmethod
    def from_sitk(cls, image, name: str = "volume", path: Path | None = None, metadata: dict | None = None) -> Volume:
        """A volume from a 3-D scalar SimpleITK image (geometry copied exactly)."""
        import SimpleITK as sitk

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"{name}: expected a 3-D scalar image, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
            )
        geometry = Geometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        return cls(sitk.GetArrayFromImage(image), geometry, name=name, path=path, metadata=dict(metadata or {}))


def check_same_grid(a: Volume | Geometry, b: Volume | Geometry, what: str = "volumes") -> None:
    """Raise :class:`GeometryMismatchError` unless ``a`` and ``b`` share one voxel grid."""
    ga = a.geometry if isinstance(a, Volume) else a
    gb = b.geometry if isinstance(b, Volume) else b
    if not ga.is_close(gb):
        raise GeometryMismatchError(f"{what} do not share geometry: {ga.describe_difference(gb)}")
