"""DICOM Segmentation export/import (highdicom) and DICOM series export of any study.

* :func:`write_dicom_seg` stores a label map as a DICOM Segmentation object (BINARY, one segment
  per class present, empty frames omitted) that references its source MR series, so any DICOM
  viewer overlays it on the right slices.
* :func:`read_dicom_seg` reads such an object back onto the source series' voxel grid.
* :func:`write_dicom_series` writes any :class:`Volume` as a single-frame MR DICOM series
  (synthetic UIDs), e.g. to send a NIfTI study to a PACS.

Axis convention: as everywhere in napari-spineseg, ``array[k, j, i]`` with ``(i, j, k)`` the ITK
index; for a DICOM series ``i`` is the column, ``j`` the row and ``k`` the slice, so
``direction`` column 0 is the ImageOrientationPatient row cosine, column 1 the column cosine and
slice ``k`` lies at ``origin + k * spacing_z * direction[:, 2]``.  Label slices are matched to
source instances by ImagePositionPatient, never by file order.

Patient identifiers: the Segmentation copies the Patient and Study modules of the source, as the
standard requires (it must belong to the source's patient and study).  Nothing here logs or puts
into an error message any patient attribute; highdicom/pydicom warnings (which may quote them)
are swallowed and only counted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dicom_series import POSITION_TOLERANCE_MM, series_geometry
from .dicom_series import quiet_dicom_libraries as _quiet_dicom_libraries
from .errors import GeometryMismatchError, InputError, VolumeReadError, VolumeWriteError
from .io import atomic_path, is_dicom_file, label_dtype
from .schema import DEFAULT_CLASSES, LabelClass, class_for_value
from .volume import Geometry, Volume

if TYPE_CHECKING:
    import pydicom

    from .modelfile import ModelMetadata

logger = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NOT_DICOM_MESSAGE = "DICOM-SEG needs a DICOM source series"


# Coded terms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentCoding:
    """Segmented property category and type of one class (code value, scheme, meaning)."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]


# Categories from DICOM CID 7150 "Segmentation Property Category" as bundled with pydicom
# (pydicom.sr.codedict codes.cid7150).
_ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
_MORPHOLOGICALLY_ABNORMAL = ("49755003", "SCT", "Morphologically Abnormal Structure")
_TISSUE = ("85756007", "SCT", "Tissue")

# Property types.  Spinal canal (61853006) and Lesion (52988006, in DICOM CID 7151/7194) are in
# pydicom's bundled SNOMED CT concepts; pydicom has no generic vertebral body / intervertebral disc
# concept (only level-specific ones such as L4/L5 disc), so 3572006 "Vertebral body" and
# 360499006 "Intervertebral disc" are the SNOMED CT body-structure concepts TotalSegmentator's
# DICOM-SEG mapping uses for the same structures.
SEGMENT_CODES: dict[str, SegmentCoding] = {
    "vertebral body": SegmentCoding(_ANATOMICAL_STRUCTURE, ("3572006", "SCT", "Vertebral body")),
    "intervertebral disc": SegmentCoding(_ANATOMICAL_STRUCTURE, ("360499006", "SCT", "Intervertebral disc")),
    "spinal canal": SegmentCoding(_ANATOMICAL_STRUCTURE, ("61853006", "SCT", "Spinal canal")),
    "lesion": SegmentCoding(_MORPHOLOGICALLY_ABNORMAL, ("52988006", "SCT", "Lesion")),
}
# Classes a model or annotator added without a known meaning.
GENERIC_CODING = SegmentCoding(_TISSUE, _TISSUE)


def coding_key(name: str) -> str:
    """The class name a coding is looked up by: lower case, without a parenthesised caveat
    (``"spinal canal (experimental: ...)"`` is coded as the spinal canal)."""
    return name.split(" (", 1)[0].strip().lower()


def segment_coding(label_class: LabelClass) -> SegmentCoding:
    """The coded category/type of a class (by name; unknown classes are generic "Tissue")."""
    return SEGMENT_CODES.get(coding_key(label_class.name), GENERIC_CODING)


# Source series ---------------------------------------------------------------------------------


def _read_header(path: Path) -> pydicom.Dataset | None:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
        return None


def _headers_in(directory: Path) -> list[pydicom.Dataset]:
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    with _quiet_dicom_libraries():
        headers = [_read_header(p) for p in candidates]
    return [h for h in headers if h is not None and "ImagePositionPatient" in h and "SeriesInstanceUID" in h]


def _dicom_files_of(volume: Volume) -> list[Path] | None:
    files = volume.metadata.get("dicom_files")
    if files:
        return [Path(f) for f in files]
    return None


def is_dicom_source(volume: Volume) -> bool:
    """True when ``volume`` was read from a DICOM series (so a DICOM-SEG can reference it)."""
    if volume.metadata.get("format") == "dicom" or _dicom_files_of(volume):
        return True
    path = volume.path
    return path is not None and (Path(path).is_dir() or is_dicom_file(path))


def require_dicom_source(volume: Volume) -> None:
    """Raise :class:`InputError` unless ``volume`` came from a DICOM series."""
    if not is_dicom_source(volume):
        kind = volume.metadata.get("format") or (Path(volume.path).suffix if volume.path else "an array")
        raise InputError(
            f"{volume.name}: {NOT_DICOM_MESSAGE}; this study was read from {kind}. "
            "Write the labels as NIfTI instead, or convert the study with write_dicom_series first"
        )


def _series_candidates(source: str | os.PathLike | Sequence[pydicom.Dataset] | Volume) -> list[list[pydicom.Dataset]]:
    """The DICOM series (lists of headers) ``source`` may mean, grouped by SeriesInstanceUID."""
    import pydicom

    if isinstance(source, Volume):
        files = _dicom_files_of(source)
        if files is None:
            require_dicom_source(source)
            if source.path is None:
                raise InputError(f"{source.name}: {NOT_DICOM_MESSAGE}; the study does not record its files")
            return _series_candidates(Path(source.path))
        with _quiet_dicom_libraries():
            headers = [_read_header(f) for f in files]
        missing = [f for f, h in zip(files, headers) if h is None]
        if missing:
            raise VolumeReadError(f"{missing[0]}: source DICOM file is missing or unreadable")
        datasets: list[pydicom.Dataset] = [h for h in headers if h is not None]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise VolumeReadError(f"{path}: no such file or directory")
        if path.is_dir():
            datasets = _headers_in(path)
            if not datasets:
                raise InputError(f"{path}: {NOT_DICOM_MESSAGE}; no DICOM images found in this directory")
        elif is_dicom_file(path):
            with _quiet_dicom_libraries():
                first = _read_header(path)
            if first is None or "SeriesInstanceUID" not in first:
                raise VolumeReadError(f"{path}: not a readable DICOM image")
            datasets = [d for d in _headers_in(path.parent) if d.SeriesInstanceUID == first.SeriesInstanceUID]
        else:
            raise InputError(f"{path}: {NOT_DICOM_MESSAGE}; this is not a DICOM file or directory")
    else:
        datasets = list(source)
        if not datasets or not all(isinstance(d, pydicom.Dataset) for d in datasets):
            raise InputError(f"{NOT_DICOM_MESSAGE}: give a directory, a file of the series or pydicom datasets")
    groups: dict[str, list[pydicom.Dataset]] = {}
    for dataset in datasets:
        needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
        if not all(keyword in dataset for keyword in needed):
            raise InputError(f"{NOT_DICOM_MESSAGE} of images with a position and orientation (e.g. MR or CT)")
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError("multi-frame (enhanced) DICOM sources are not supported; use a single-frame series")
        groups.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    return list(groups.values())


def _slice_order(geometry: Geometry, datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset] | str:
    """``datasets`` reordered so item ``k`` is slice ``k`` of ``geometry``, or why they do not fit."""
    size = geometry.size
    if len(datasets) != size[2]:
        return f"{len(datasets)} source slices vs {size[2]} label slices"
    direction = geometry.direction_matrix
    origin = np.asarray(geometry.origin)
    spacing = np.asarray(geometry.spacing)
    ordered: list[pydicom.Dataset | None] = [None] * size[2]
    for dataset in datasets:
        if (int(dataset.Columns), int(dataset.Rows)) != (size[0], size[1]):
            return f"source slices are {dataset.Columns}×{dataset.Rows} pixels, labels {size[0]}×{size[1]}"
        orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient])
        if not np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-3):
            return "source slice orientation differs from the labels' direction"
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
        if not np.allclose([column_spacing, row_spacing], spacing[:2], rtol=1e-3, atol=1e-4):
            return f"source pixel spacing {column_spacing:g}×{row_spacing:g} mm vs labels {spacing[0]:g}×{spacing[1]:g}"
        offset = np.asarray([float(v) for v in dataset.ImagePositionPatient]) - origin
        k_float = float(offset @ direction[:, 2]) / spacing[2]
        k = round(k_float)
        in_plane = offset - k * spacing[2] * direction[:, 2]
        if not 0 <= k < size[2] or np.linalg.norm(in_plane) > POSITION_TOLERANCE_MM:
            return "a source slice lies outside the labels' grid"
        if abs(k_float - k) * spacing[2] > POSITION_TOLERANCE_MM or ordered[k] is not None:
            return "source slice positions do not match the labels' slices"
        ordered[k] = dataset
    return [d for d in ordered if d is not None]


def source_series(
    labels: Volume, source: str | os.PathLike | Sequence[pydicom.Dataset] | Volume | None = None
) -> list[pydicom.Dataset]:
    """The source series' headers ordered so item ``k`` is label slice ``k`` (matched by position).

    Raises :class:`GeometryMismatchError` when no series of ``source`` lies on the labels' grid.
    """
    candidates = _series_candidates(labels if source is None else source)
    reasons = []
    for datasets in candidates:
        ordered = _slice_order(labels.geometry, datasets)
        if not isinstance(ordered, str):
            return ordered
        reasons.append(ordered)
    if len(candidates) == 1:
        difference = labels.geometry.describe_difference(series_geometry(candidates[0]))
        raise GeometryMismatchError(
            f"{labels.name}: labels are not on the source DICOM series' grid ({reasons[0]}; {difference})"
        )
    raise GeometryMismatchError(
        f"{labels.name}: none of the {len(candidates)} DICOM series of the source lies on the labels' grid"
    )


# Export ----------------------------------------------------------------------------------------


def _code(triple: tuple[str, str, str]):
    from pydicom.sr.coding import Code

    value, scheme, meaning = triple
    return Code(value, scheme, meaning)


def _lo(text: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash."""
    return text.replace("\\", "/")[:64]


def _redacted(text: str, dataset: pydicom.Dataset) -> str:
    """``text`` with the source's patient attributes blanked (library messages may quote them)."""
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber"):
        value = str(dataset.get(keyword, "") or "").strip()
        if len(value) > 1:
            text = text.replace(value, "<redacted>")
    return text


def _display_colour(label_class: LabelClass):
    import highdicom as hd

    red, green, blue = (round(255 * float(c)) for c in label_class.color[:3])
    return hd.color.CIELabColor.from_rgb(red, green, blue)


def write_dicom_seg(
    labels: Volume,
    source: str | os.PathLike | Sequence[pydicom.Dataset] | Volume | None,
    path: str | os.PathLike,
    classes: Sequence[LabelClass] | None = None,
    model_metadata: ModelMetadata | None = None,
    *,
    algorithm_type: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
    codings: Mapping[int, SegmentCoding] | None = None,
) -> Path:
    """Write ``labels`` (``array[z, y, x]`` on the source series' grid) as a DICOM Segmentation.

    ``source`` is the DICOM series the labels were made on: the study :class:`Volume` (its recorded
    files), a directory or file of the series, or pydicom datasets; ``None`` uses ``labels``'
    own metadata/path.  One BINARY segment per class present (empty classes and frames are
    skipped) with the schema's name, recommended display colour and SNOMED CT codes.
    ``model_metadata`` gives the algorithm identification (name, version); without it the
    segments are MANUAL.  A label map with no labelled voxel raises :class:`InputError`: a
    Segmentation needs at least one segment.  The file is written atomically.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    path = Path(path).expanduser()
    array = np.asarray(labels.array)
    label_dtype(array)  # integer, non-negative, fits uint16
    values = [int(v) for v in np.unique(array) if v != 0]
    if not values:
        raise InputError(f"{labels.name}: no labelled voxels; a DICOM Segmentation needs at least one segment")
    known = (
        list(classes) if classes is not None else list(model_metadata.classes if model_metadata else DEFAULT_CLASSES)
    )
    segment_classes = [class_for_value(v, known) for v in values]
    datasets = source_series(labels, source)

    model_name = _lo(model_metadata.name) if model_metadata else None
    algorithm_type = (algorithm_type or ("AUTOMATIC" if model_metadata else "MANUAL")).upper()
    if algorithm_type not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        raise InputError(f"algorithm type {algorithm_type!r}: use AUTOMATIC, SEMIAUTOMATIC or MANUAL")
    if algorithm_type != "MANUAL" and model_metadata is None:
        raise InputError(f"{algorithm_type} segments need the model's metadata (name and version)")
    algorithm = None
    if model_metadata is not None and algorithm_type != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(
            name=model_name,
            family=codes.cid7162.ArtificialIntelligence,
            version=_lo(str(model_metadata.version)),
            source="napari-spineseg",
            parameters={"architecture": _lo(model_metadata.architecture), "planes": ",".join(model_metadata.planes)},
        )
    descriptions = []
    for number, label_class in enumerate(segment_classes, start=1):
        coding = (codings or {}).get(label_class.value) or segment_coding(label_class)  # e.g. per-level codes
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_lo(label_class.name),
                segmented_property_category=_code(coding.category),
                segmented_property_type=_code(coding.type),
                algorithm_type=algorithm_type,
                algorithm_identification=algorithm,
                display_color=_display_colour(label_class),
            )
        )
    lookup = np.zeros(int(array.max()) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    segment_array = lookup[array]
    first = datasets[0]
    if series_number is None:
        series_number = (int(first.get("SeriesNumber") or 0) % 100000) + 1000
    description = series_description or f"spineseg {model_name or 'labels'}"
    try:
        with _quiet_dicom_libraries():
            segmentation = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=segment_array,
                segmentation_type="BINARY",
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="napari-spineseg",
                manufacturer_model_name=(model_name or "napari-spineseg")[:64],
                software_versions=f"napari-spineseg {__version__}",
                device_serial_number="none",
                content_description=f"{description} segmentation"[:64],
                content_label="SPINESEG",
                content_qualification="RESEARCH",
                series_description=description[:64],
                omit_empty_frames=True,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        reason = _redacted(str(error), first)[:200]
        raise VolumeWriteError(f"{path}: cannot build the DICOM Segmentation ({reason})") from None
    try:
        with atomic_path(path) as temp, _quiet_dicom_libraries():
            segmentation.save_as(temp, enforce_file_format=True)
    except OSError as error:
        raise VolumeWriteError(f"{path}: cannot write ({error.strerror or error})") from None
    logger.info(
        "DICOM-SEG %s: %d segment(s), %d frame(s) over %d source slices",
        path,
        len(descriptions),
        int(segmentation.NumberOfFrames),
        len(datasets),
    )
    return path


# Import ----------------------------------------------------------------------------------------


def _segment_values(segmentation: Any, classes: Sequence[LabelClass]) -> dict[int, int]:
    """Segment number -> label value: by class name, the coded type, a generated ``class N`` name, else the number."""
    by_name = {c.name.strip().lower(): c.value for c in classes}
    by_code = {}
    for label_class in classes:
        coding = SEGMENT_CODES.get(coding_key(label_class.name))
        if coding is not None:
            by_code[coding.type[:2]] = label_class.value
    mapping = {}
    for item in segmentation.SegmentSequence:
        number = int(item.SegmentNumber)
        name = str(item.get("SegmentLabel", "")).strip().lower()
        code = item.SegmentedPropertyTypeCodeSequence[0]
        value = by_name.get(name)
        if value is None:
            value = by_code.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
        if value is None:
            generated = re.fullmatch(r"class (\d+)", name)  # schema.class_for_value's name for extra values
            value = int(generated.group(1)) if generated and 0 < int(generated.group(1)) <= 65535 else number
        mapping[number] = int(value)
    return mapping


def read_dicom_seg(
    path: str | os.PathLike,
    source: str | os.PathLike | Sequence[pydicom.Dataset] | Volume | Geometry,
    classes: Sequence[LabelClass] | None = None,
) -> Volume:
    """A DICOM Segmentation as a label :class:`Volume` (``array[z, y, x]``) on the source grid.

    ``source`` is the series the segmentation was made on (a :class:`Volume`/``Geometry``, a
    directory or file of the series, or pydicom datasets).  Every frame is placed by its
    ImagePositionPatient; frames off the grid raise :class:`GeometryMismatchError`.  Segments
    become label values by class name (``classes``, default the schema), else by coded type.
    """
    import highdicom as hd

    path = Path(path).expanduser()
    try:
        with _quiet_dicom_libraries():
            segmentation = hd.seg.segread(path)
            frames = np.asarray(segmentation.pixel_array)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
        raise VolumeReadError(f"{path}: not a readable DICOM Segmentation ({type(error).__name__})") from None
    if str(segmentation.SOPClassUID) != SEGMENTATION_STORAGE:
        raise VolumeReadError(f"{path}: not a DICOM Segmentation object")
    if isinstance(source, (Geometry, Volume)):
        geometry = source if isinstance(source, Geometry) else source.geometry
    else:
        candidates = _series_candidates(source)
        referenced = str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
        chosen = next((c for c in candidates if str(c[0].SeriesInstanceUID) == referenced), candidates[0])
        geometry = series_geometry(chosen)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    direction = geometry.direction_matrix
    if not np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-3):
        raise GeometryMismatchError(f"{path}: frame orientation differs from the source series'")
    if frames.shape[1:] != geometry.shape[1:]:
        raise GeometryMismatchError(f"{path}: frames of {frames.shape[1:]} pixels vs source {geometry.shape[1:]}")
    values = _segment_values(segmentation, classes if classes is not None else DEFAULT_CLASSES)
    array = np.zeros(geometry.shape, dtype=np.uint8 if max(values.values(), default=0) < 256 else np.uint16)
    origin = np.asarray(geometry.origin)
    spacing_z = geometry.spacing[2]
    for index, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence):
        # highdicom moves a value shared by all frames (e.g. the only segment) to the shared groups
        position_item = (item.get("PlanePositionSequence") or shared.PlanePositionSequence)[0]
        position = np.asarray([float(v) for v in position_item.ImagePositionPatient])
        segment_item = (item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence)[0]
        number = int(segment_item.ReferencedSegmentNumber)
        offset = position - origin
        k_float = float(offset @ direction[:, 2]) / spacing_z
        k = round(k_float)
        in_plane = offset - k * spacing_z * direction[:, 2]
        if (
            not 0 <= k < geometry.size[2]
            or abs(k_float - k) * spacing_z > POSITION_TOLERANCE_MM
            or np.linalg.norm(in_plane) > POSITION_TOLERANCE_MM
        ):
            raise GeometryMismatchError(f"{path}: frame {index + 1} does not lie on a slice of the source series")
        array[k][frames[index] > 0] = values[number]
    return Volume(array, geometry, name=f"{path.name} labels", path=path, metadata={"format": "dicom-seg"})


# DICOM series export ---------------------------------------------------------------------------


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    text = format_number_as_ds(float(value) + 0.0)
    return "0" if text in ("-0", "-0.0") else text


def _stored_int16(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 pixels and (slope, intercept) so that ``stored * slope + intercept`` gives ``array``."""
    data = np.asarray(array)
    if data.dtype.kind == "b":
        data = data.astype(np.int16)
    finite = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.array_equal(finite, np.round(finite)) and low >= -32768 and high <= 32767:
        return finite.astype(np.int16), 1.0, 0.0
    slope = (high - low) / 65535.0 if high > low else 1.0
    intercept = low + 32768.0 * slope
    stored = np.clip(np.round((finite - intercept) / slope), -32768, 32767).astype(np.int16)
    return stored, slope, intercept


def write_dicom_series(
    volume: Volume,
    directory: str | os.PathLike,
    *,
    patient_name: str = "ANONYMOUS",
    patient_id: str = "",
    series_description: str | None = None,
    series_number: int = 1,
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> list[Path]:
    """Write ``volume`` as a single-frame MR Image Storage series, one file per slice ``k``.

    Synthetic UIDs (pydicom ``generate_uid``), int16 pixels with RescaleSlope/Intercept for
    non-integer or out-of-range intensities, and ImagePositionPatient/ImageOrientationPatient/
    PixelSpacing/SliceThickness from the exact geometry (LPS).  A left-handed grid (slice axis
    against the row×column normal) is stored as is: readers that sort slices along the normal
    (ITK, most viewers) return it with ``k`` reversed, every voxel at the same position.
    ``directory`` must be empty or new; files are ``0001.dcm``, ``0002.dcm``, ... (slice order).
    """
    import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from . import __version__

    directory = Path(directory).expanduser()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise VolumeWriteError(f"{directory}: must be a new or empty directory (series are not mixed)")
    geometry = volume.geometry
    if volume.array.size == 0:
        raise InputError(f"{volume.name}: an empty volume cannot be written as a DICOM series")
    direction = geometry.direction_matrix
    stored, slope, intercept = _stored_int16(volume.array)
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    spacing_x, spacing_y, spacing_z = geometry.spacing
    orientation = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    window_low, window_high = float(stored.min()) * slope + intercept, float(stored.max()) * slope + intercept
    written = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for k in range(geometry.size[2]):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = MR_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.Modality = "MR"
            ds.Manufacturer = "napari-spineseg"
            ds.SoftwareVersions = f"napari-spineseg {__version__}"
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
            ds.StudyID = ""
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = int(series_number)
            ds.SeriesDescription = (series_description or volume.name)[:64]
            ds.InstanceNumber = k + 1
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.ScanningSequence = "RM"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = ""
            ds.RepetitionTime = ""
            ds.EchoTrainLength = ""
            ds.ImagePositionPatient = [_ds(v) for v in geometry.index_to_lps([[0, 0, k]])[0]]
            ds.ImageOrientationPatient = orientation
            ds.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]
            ds.SliceThickness = _ds(spacing_z)
            ds.SpacingBetweenSlices = _ds(spacing_z)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = geometry.size[1], geometry.size[0]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleSlope = _ds(slope)
            ds.RescaleType = "US"
            ds.WindowCenter = _ds((window_low + window_high) / 2)
            ds.WindowWidth = _ds(max(window_high - window_low, 1.0))
            ds.PixelData = np.ascontiguousarray(stored[k], dtype="<i2").tobytes()
            target = directory / f"{k + 1:04d}.dcm"
            with atomic_path(target) as temp:
                ds.save_as(temp, enforce_file_format=True)
            written.append(target)
    except OSError as error:
        raise VolumeWriteError(f"{directory}: cannot write the DICOM series ({error.strerror or error})") from None
    logger.info("DICOM series %s: %d slice(s)", directory, len(written))
    return written
