"""Trusted targets of one correction pair: which voxels an annotator vouches for."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError
from ...orientation import Plane, plane_array_axis
from ...schema import IGNORE
from ...volume import Volume, check_same_grid
from .config import MAX_LABEL_VALUE, CorrectionPair

logger = logging.getLogger(__name__)


@dataclass
class CorrectionTargets:
    """Training targets of a pair (schema values on the study's grid, IGNORE where untrusted)."""

    labels: np.ndarray  # uint8, study array order
    changed: np.ndarray  # bool: voxels the annotator changed (or of new classes) among the trusted
    edit_plane: str | None  # plane the changes were detected in (None: no prediction/changes)
    trusted_slices: dict[str, list[int]]  # plane -> slices (study array axis) that are fully trusted
    whole_map: bool  # True when everything was trusted (no prediction and no reviewed slices)

    @property
    def trusted(self) -> np.ndarray:
        return self.labels != IGNORE


def pair_name(pair: CorrectionPair, index: int) -> str:
    if pair.name:
        return pair.name
    if pair.labels.path is not None:
        return str(pair.labels.path)
    if pair.image.path is not None:
        return str(pair.image.path)
    return pair.image.name or f"pair {index}"


def label_array(volume: Volume, what: str) -> np.ndarray:
    """Integer labels 0..254 (255 = not annotated) as uint8; clear error otherwise."""
    array = np.asarray(volume.array)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{what}: label maps must hold whole numbers")
    elif array.dtype.kind not in "iub":
        raise InputError(f"{what}: unsupported label type {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > IGNORE):
        raise InputError(
            f"{what}: label values must be in 0..{MAX_LABEL_VALUE} ({IGNORE} = not annotated), "
            f"found {array.min()}..{array.max()}"
        )
    return array.astype(np.uint8, copy=False)


def _take(mask: np.ndarray, axis: int, index: int) -> tuple:
    sl: list[Any] = [slice(None)] * mask.ndim
    sl[axis] = index
    return tuple(sl)


def detect_edit_plane(changed: np.ndarray, geometry) -> Plane:
    """The plane whose slices hold the changes most compactly (ties: the thickest slices)."""
    spacing = geometry.spacing_zyx
    best, best_key = Plane.SAGITTAL, None
    for plane in (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL):
        axis = plane_array_axis(geometry, plane)
        other = tuple(a for a in range(3) if a != axis)
        count = int(np.count_nonzero(changed.any(axis=other)))
        key = (count, -float(spacing[axis]))
        if best_key is None or key < best_key:
            best, best_key = plane, key
    return best


def correction_targets(
    pair: CorrectionPair,
    new_values: Iterable[int] = (),
    edit_plane: str = "auto",
    name: str = "corrections",
) -> CorrectionTargets:
    """The trusted targets of ``pair`` (see the module docstring).

    Raises :class:`~napari_spineseg.errors.GeometryMismatchError` when image, labels and
    prediction do not share one grid and :class:`InputError` when nothing is trusted.
    """
    labels_name = str(pair.labels.path) if pair.labels.path else pair.labels.name
    image_name = str(pair.image.path) if pair.image.path else pair.image.name
    check_same_grid(pair.image, pair.labels, what=f"{image_name} and {labels_name}")
    labels = label_array(pair.labels, labels_name)
    geometry = pair.labels.geometry
    trusted_slices: dict[str, list[int]] = {}
    if pair.prediction is None and not pair.reviewed_slices:
        if not np.any((labels != 0) & (labels != IGNORE)):
            raise InputError(f"{name}: the corrected label map {labels_name} is empty (no labelled voxel)")
        new = np.isin(labels, np.asarray(sorted(set(new_values)), dtype=np.uint8))
        if not new.any():
            return CorrectionTargets(labels.copy(), new, None, {}, True)
        return _new_class_slices_only(labels, new, geometry, edit_plane, name)

    trusted = np.zeros(labels.shape, dtype=bool)
    for plane_name, indices in (pair.reviewed_slices or {}).items():
        plane = Plane(plane_name) if isinstance(plane_name, Plane) else Plane.parse(str(plane_name))[0]
        axis = plane_array_axis(geometry, plane)
        count = labels.shape[axis]
        chosen = sorted({int(i) for i in indices})
        bad = [i for i in chosen if not 0 <= i < count]
        if bad:
            raise InputError(f"{name}: {plane.value} slices {bad} outside 0..{count - 1}")
        for index in chosen:
            trusted[_take(trusted, axis, index)] = True
        trusted_slices.setdefault(plane.value, []).extend(chosen)

    changed = np.zeros(labels.shape, dtype=bool)
    detected: Plane | None = None
    if pair.prediction is not None:
        prediction_name = str(pair.prediction.path) if pair.prediction.path else pair.prediction.name
        check_same_grid(pair.labels, pair.prediction, what=f"{labels_name} and {prediction_name}")
        original = np.asarray(pair.prediction.array)
        changed = (labels != original) & (labels != IGNORE)
        if changed.any():
            detected = Plane(edit_plane) if edit_plane != "auto" else detect_edit_plane(changed, geometry)
            axis = plane_array_axis(geometry, detected)
            other = tuple(a for a in range(3) if a != axis)
            for index in np.flatnonzero(changed.any(axis=other)):
                trusted[_take(trusted, axis, int(index))] = True
                trusted_slices.setdefault(detected.value, []).append(int(index))
    trusted &= labels != IGNORE
    if not trusted.any():
        what = "no voxel differs from the prediction" if pair.prediction is not None else "nothing was reviewed"
        raise InputError(
            f"{name}: empty corrections ({what}, no reviewed slices): no trusted labelled voxel to learn from"
        )
    new = np.isin(labels, np.asarray(sorted(set(new_values)), dtype=np.uint8)) & trusted
    target = np.where(trusted, labels, np.uint8(IGNORE)).astype(np.uint8)
    trusted_slices = {k: sorted(set(v)) for k, v in trusted_slices.items()}
    return CorrectionTargets(
        target, (changed & trusted) | new, detected.value if detected else None, trusted_slices, False
    )


def _new_class_slices_only(
    labels: np.ndarray, new: np.ndarray, geometry, edit_plane: str, name: str
) -> CorrectionTargets:
    """A whole label map holding a new class: only the slices the new class was painted on are trusted.

    Everywhere else the map cannot vouch that the new class is absent: a lesion painted on one
    sagittal slice is still labelled vertebral body on its other slices, and trusting those taught
    the model that the lesion is body (issue 17: lesion Dice 0 on the painted study and on the next
    one).  The slices are those of the plane in which the new class is most compact.
    """
    plane = Plane(edit_plane) if edit_plane != "auto" else detect_edit_plane(new, geometry)
    axis = plane_array_axis(geometry, plane)
    other = tuple(a for a in range(3) if a != axis)
    slices = [int(i) for i in np.flatnonzero(new.any(axis=other))]
    if len(slices) == labels.shape[axis]:
        return CorrectionTargets(labels.copy(), new, None, {}, True)
    trusted = np.zeros(labels.shape, dtype=bool)
    for index in slices:
        trusted[_take(trusted, axis, index)] = True
    logger.warning(
        "%s: a new class was painted on %d of %d %s slices and no prediction or reviewed slices were given: "
        "only those slices are trusted (list every slice as reviewed to trust the whole map)",
        name,
        len(slices),
        labels.shape[axis],
        plane.value,
    )
    target = np.where(trusted, labels, np.uint8(IGNORE)).astype(np.uint8)
    return CorrectionTargets(target, new & trusted, plane.value, {plane.value: slices}, False)
