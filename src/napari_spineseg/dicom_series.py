"""DICOM series geometry: which files of a series form one regular 3-D grid, and where it lies.

GDCM/ITK read a series on whatever grid its first two slices suggest: a missing slice, duplicate
positions, uneven spacing, a localizer of another orientation inside the series, slices shifted
within their plane or without ImagePositionPatient/ImageOrientationPatient all gave a wrong grid
(identity direction, origin 0, spacing from two slices) with at most a multi-line ITK warning
(red-team issue #18).  :func:`plan_series` checks the headers first (pydicom) and

* refuses, in one line, what has no single grid: missing position or orientation, several slices
  at one position (echoes or acquisitions mixed in one series), slices shifted within their plane
  (a sheared stack, e.g. gantry tilt), orientations mixed half and half, slices of different size
  or pixel spacing, an orientation that is not two perpendicular unit vectors;
* skips, with a one-line warning, slices of another orientation when they are a minority
  (a localizer inside the series) and non-image objects (DICOM-SEG, SR, presentation states, RT);
* resamples an unevenly spaced stack (a missing slice, uneven spacing) onto a regular grid along
  the slice normal, with a one-line warning (labels then follow that grid; a DICOM-SEG cannot
  reference it and is refused by :mod:`napari_spineseg.dicomseg`).

The same geometry rules serve the DICOM-SEG writer (:func:`series_geometry`,
:data:`POSITION_TOLERANCE_MM`).  Nothing here logs or reports a patient attribute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import VolumeReadError
from .volume import Geometry

if TYPE_CHECKING:
    import pydicom

logger = logging.getLogger(__name__)

# Positions closer than this (mm) are the same slice; in-plane offsets must be smaller too.
POSITION_TOLERANCE_MM = 0.05
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of one stack agree to this (about 0.06 degrees)
MAX_RESAMPLE_FACTOR = 4  # a regular grid may have at most this many times the slices of the series

# SOP classes that are not images of a study (matched as prefixes of SOPClassUID).
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, segmentation (66.4), surface segmentation
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.68.",  # surface scans
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects (structure sets, plans, doses, images)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)


@contextlib.contextmanager
def quiet_dicom_libraries() -> Iterator[None]:
    """Swallow highdicom/pydicom warnings and INFO logs: their text may quote patient attributes."""
    library_loggers = [logging.getLogger(name) for name in ("highdicom", "pydicom")]
    levels = [lib.level for lib in library_loggers]
    for lib in library_loggers:
        lib.setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for lib, level in zip(library_loggers, levels):
                lib.setLevel(level)
    if caught:
        logger.debug("%d DICOM library warning(s) not shown (they may quote patient attributes)", len(caught))


def read_header(path: str | os.PathLike) -> pydicom.Dataset | None:
    """The header of a DICOM file (no pixel data), or None when pydicom cannot read it."""
    import pydicom

    try:
        with quiet_dicom_libraries():
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pydicom raises many types for broken files; GDCM reports them
        return None


def sop_class(dataset: pydicom.Dataset) -> str:
    """The SOP class UID of ``dataset`` (from the data set, else its file meta information)."""
    try:
        uid = dataset.get("SOPClassUID") or dataset.file_meta.get("MediaStorageSOPClassUID", "")
    except AttributeError:
        uid = dataset.get("SOPClassUID", "")
    return str(uid or "").strip()


def non_image_kind(dataset: pydicom.Dataset) -> str | None:
    """What ``dataset`` is when it is not an image of a study ("Segmentation Storage", ...), else None."""
    uid = sop_class(dataset)
    if uid and any(uid == p or uid.startswith(p if p.endswith(".") else p + ".") for p in NON_IMAGE_SOP_CLASS_PREFIXES):
        import pydicom

        name = pydicom.uid.UID(uid).name
        return name if name != uid else "non-image object"
    if "Rows" not in dataset or "Columns" not in dataset:
        return "object without pixel data"
    return None


def describe_skipped(kinds: Sequence[str]) -> str:
    """``"2 x Segmentation Storage, 1 x Basic Text SR Storage"`` for the warnings."""
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} x {kind}" for kind, n in counts.items())


def _floats(dataset: pydicom.Dataset, keyword: str, count: int) -> np.ndarray | None:
    try:
        values = dataset.get(keyword)
        if values is None:
            return None
        array = np.asarray([float(v) for v in (values if isinstance(values, Sequence) else [values])], dtype=float)
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError):
        return None
    if array.shape != (count,) or not np.isfinite(array).all():
        return None
    return array


@dataclass
class SeriesPlan:
    """How to read a series: its files in slice order, its grid, and what was skipped or changed.

    ``positions`` are the slices' offsets along the normal (mm, first slice 0); when ``resample``
    is set they are uneven and the voxels must be interpolated onto ``geometry`` (whose slices
    lie ``geometry.spacing[2]`` apart).
    """

    files: list[str]
    geometry: Geometry
    positions: np.ndarray
    resample: bool = False
    warnings: list[str] = field(default_factory=list)


def _orientation_groups(orientations: list[np.ndarray]) -> list[list[int]]:
    groups: list[list[int]] = []
    for index, orientation in enumerate(orientations):
        for group in groups:
            if np.allclose(orientations[group[0]], orientation, atol=ORIENTATION_TOLERANCE, rtol=0):
                group.append(index)
                break
        else:
            groups.append([index])
    return sorted(groups, key=len, reverse=True)


def plan_series(files: Sequence[str], shown: str) -> SeriesPlan | None:
    """Check one series' headers and lay out its grid (see the module docstring).

    Returns None when the headers cannot be planned here (unreadable by pydicom, a single slice,
    multi-frame files, values of the wrong type): GDCM/ITK then read the series as before.  Raises
    :class:`VolumeReadError` (one line, naming ``shown``) for a series that has no single regular grid.
    """
    try:
        return _plan(files, shown)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError):
        return None  # values pydicom cannot convert: GDCM reports what it makes of them


def _plan(files: Sequence[str], shown: str) -> SeriesPlan | None:
    headers = [(str(f), read_header(f)) for f in files]
    if any(h is None for _, h in headers):
        return None
    notes: list[str] = []
    skipped = [(f, non_image_kind(h)) for f, h in headers]
    others = [kind for _, kind in skipped if kind]
    if others:
        notes.append(f"skipped {describe_skipped(others)} in the series (not images)")
    images = [(f, h) for (f, h), (_, kind) in zip(headers, skipped) if not kind]
    unique: dict[str, tuple[str, pydicom.Dataset]] = {}
    for name, dataset in images:
        unique.setdefault(str(dataset.get("SOPInstanceUID", "")) or name, (name, dataset))
    if len(unique) < len(images):
        notes.append(f"ignored {len(images) - len(unique)} duplicate file(s) of the same image")
    images = list(unique.values())
    try:
        if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for _, h in images):
            return None
    except (TypeError, ValueError):
        return None
    if len(images) < 2:
        if others and not images:
            raise VolumeReadError(f"{shown}: holds no images ({describe_skipped(others)})")
        if images and len(headers) - len(others) > 1:
            raise VolumeReadError(f"{shown}: has a single slice (in several copies of one file), not a volume")
        return None
    positions = [_floats(h, "ImagePositionPatient", 3) for _, h in images]
    orientations = [_floats(h, "ImageOrientationPatient", 6) for _, h in images]
    unplaced = sum(p is None or o is None for p, o in zip(positions, orientations))
    if unplaced:
        raise VolumeReadError(
            f"{shown}: {unplaced} of {len(images)} slices have no usable ImagePositionPatient or "
            "ImageOrientationPatient: the slices cannot be placed on a grid"
        )
    groups = _orientation_groups(orientations)  # type: ignore[arg-type]
    if len(groups) > 1:
        if 2 * len(groups[0]) <= len(images):
            sizes = " + ".join(str(len(g)) for g in groups)
            raise VolumeReadError(
                f"{shown}: slices of {len(groups)} orientations ({sizes} slices) in one series: no single grid"
            )
        dropped = len(images) - len(groups[0])
        notes.append(f"skipped {dropped} slice(s) of another orientation (a localizer?)")
        keep = sorted(groups[0])
        images = [images[i] for i in keep]
        positions = [positions[i] for i in keep]
        orientations = [orientations[i] for i in keep]
        if len(images) < 2:
            return None
    return _lay_out(images, np.asarray(positions), orientations[0], shown, notes)  # type: ignore[arg-type]


def _lay_out(
    images: list[tuple[str, pydicom.Dataset]], positions: np.ndarray, orientation: np.ndarray, shown: str, notes: list
) -> SeriesPlan:
    """The grid of slices with one orientation (see :func:`plan_series`)."""
    from .header_checks import check_geometry

    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE:
        raise VolumeReadError(f"{shown}: ImageOrientationPatient is not two unit vectors")
    if abs(float(row @ column)) > ORIENTATION_TOLERANCE:
        raise VolumeReadError(f"{shown}: ImageOrientationPatient's row and column are not perpendicular")
    sizes = {(int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for _, h in images}
    spacings = [_floats(h, "PixelSpacing", 2) for _, h in images]
    if len(sizes) > 1:
        raise VolumeReadError(f"{shown}: slices of different sizes ({len(sizes)} sizes) in one series")
    if all(s is None for s in spacings):
        notes.append("no PixelSpacing in the series: 1 mm pixels assumed")
        pixel = np.array([1.0, 1.0])
    elif any(s is None for s in spacings) or not all(np.allclose(s, spacings[0], rtol=1e-4) for s in spacings):
        raise VolumeReadError(f"{shown}: slices of different (or missing) PixelSpacing in one series")
    else:
        pixel = spacings[0]  # type: ignore[assignment]
    normal = np.cross(row, column)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order] - along[order][0]
    positions = positions[order]
    shifted = positions - positions[0] - np.outer(along, normal)
    drift = float(np.linalg.norm(shifted, axis=1).max())
    gaps = np.diff(along)
    tolerance = max(POSITION_TOLERANCE_MM, 0.01 * float(np.median(gaps)))
    if drift > tolerance:
        raise VolumeReadError(
            f"{shown}: slices are shifted within their plane by up to {drift:.3g} mm (a sheared or tilted stack): "
            "not a rectangular grid"
        )
    shared = int((gaps <= POSITION_TOLERANCE_MM).sum())
    if shared:
        raise VolumeReadError(
            f"{shown}: {shared + 1 if shared == len(gaps) else shared} slice(s) share a position with another "
            f"({_mixed_stacks(images)}): no single grid; put each stack in its own folder"
        )
    step = float(along[-1]) / (len(along) - 1)
    resample = bool(np.abs(along - step * np.arange(len(along))).max() > tolerance)
    if resample:
        step = float(np.median(gaps))
        count = round(float(along[-1]) / step) + 1
        if count > MAX_RESAMPLE_FACTOR * len(along):
            raise VolumeReadError(
                f"{shown}: slice positions are too irregular ({gaps.min():.3g} to {gaps.max():.3g} mm apart) "
                "for one grid"
            )
        multiples = np.round(gaps / step)
        missing = int((multiples - 1).sum()) if np.allclose(gaps, multiples * step, atol=tolerance) else 0
        why = f"; {missing} missing slice(s)?" if missing > 0 else ""
        notes.append(
            f"slice spacing is uneven ({gaps.min():.3g} to {gaps.max():.3g} mm{why}): "
            f"resampled to a regular {step:.3g} mm grid of {count} slices"
        )
    else:
        count = len(along)
    columns, rows = int(images[0][1].Columns), int(images[0][1].Rows)
    spacing = (float(pixel[1]), float(pixel[0]), step)
    direction = tuple(np.column_stack([row, column, normal]).ravel())
    check_geometry(spacing, tuple(positions[0]), direction, shown)
    geometry = Geometry((columns, rows, count), spacing, tuple(positions[0]), direction)
    files = [images[i][0] for i in order]
    return SeriesPlan(files, geometry, along, resample, notes)


STACK_KEYWORDS = ("EchoNumbers", "EchoTime", "AcquisitionNumber", "TemporalPositionIdentifier", "ImageType")


def _mixed_stacks(images: list[tuple[str, pydicom.Dataset]]) -> str:
    """Which attribute tells apart stacks mixed in one series ("2 values of EchoNumbers"), for the message."""
    for keyword in STACK_KEYWORDS:
        values = {str(h.get(keyword, "")) for _, h in images}
        if len(values) > 1:
            return f"{len(values)} values of {keyword} in one series"
    return "several echoes or acquisitions in one series?"


def resample_slices(array: np.ndarray, positions: np.ndarray, step: float, count: int) -> np.ndarray:
    """Linear interpolation of ``array[k]`` (slices at ``positions`` mm) onto ``count`` slices ``step`` apart."""
    targets = np.arange(count) * step
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = np.clip((targets - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
    weight = weight.astype(np.float32)[:, None, None]
    source = array.astype(np.float32, copy=False)
    return (1 - weight) * source[lower] + weight * source[upper]


def dicomdir_files(path: Path, strict: bool = True) -> list[Path]:
    """The files a DICOMDIR (``path``) references, resolved inside its folder; :class:`VolumeReadError`
    for an unreadable DICOMDIR (unless not ``strict``: then an empty list), references outside its
    folder or missing files."""
    import pydicom

    try:
        with quiet_dicom_libraries():
            dicomdir = pydicom.dcmread(path, force=True)
        records = list(dicomdir.get("DirectoryRecordSequence", []))
    except Exception:  # pydicom raises many types for broken files
        if not strict:
            return []
        raise VolumeReadError(f"{path}: not a readable DICOMDIR") from None
    root = path.parent.resolve()
    found: list[Path] = []
    missing = 0
    for record in records:
        reference = record.get("ReferencedFileID")
        if reference is None:
            continue
        parts = [
            str(p)
            for p in (reference if isinstance(reference, Sequence) and not isinstance(reference, str) else [reference])
        ]
        candidate = (root / Path(*parts)).resolve() if parts else root
        if root not in candidate.parents:
            raise VolumeReadError(f"{path}: the DICOMDIR references a file outside its folder (refused)")
        if not candidate.is_file():
            matches = [p for p in candidate.parent.glob("*") if p.name.lower() == candidate.name.lower()]
            if not matches:
                missing += 1
                continue
            candidate = matches[0]
        found.append(candidate)
    if missing:
        raise VolumeReadError(f"{path}: the DICOMDIR lists {missing} file(s) that are missing")
    return list(dict.fromkeys(found))


def series_geometry(datasets: Sequence[pydicom.Dataset]) -> Geometry:
    """The voxel grid of a single-frame series, slices sorted along the normal (as ITK/GDCM read it)."""
    first = datasets[0]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=float)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = np.asarray([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    order = np.argsort(positions @ normal)
    positions = positions[order]
    if len(datasets) > 1:
        slice_spacing = float((positions[-1] - positions[0]) @ normal) / (len(datasets) - 1)
    else:
        slice_spacing = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    direction = np.column_stack([row, column, normal])
    return Geometry(
        (int(first.Columns), int(first.Rows), len(datasets)),
        (column_spacing, row_spacing, max(abs(slice_spacing), 1e-6)),
        tuple(positions[0]),
        tuple(direction.ravel()),
    )
