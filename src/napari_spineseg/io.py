"""Reading studies and writing label maps with exact geometry (SimpleITK/GDCM underneath).

Formats: MHA/MHD, NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), and DICOM series (a directory, or
any one file of the series).  Every failure is a :class:`VolumeReadError`/:class:`VolumeWriteError`
with one line naming the file and the problem.  Writes are atomic: a temporary file in the
target directory is renamed over the destination only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, VolumeReadError, VolumeWriteError
from .volume import Geometry, Volume

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".nrrd", ".nhdr")
LABEL_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
LABEL_NAME_MARKERS = ("_seg", "_labels", "_label", "-seg", "_mask")

# DICOM tags that are safe to keep (no patient identifiers).
_DICOM_SAFE_TAGS = {
    "0008|0060": "modality",
    "0008|103e": "series_description",
    "0020|0011": "series_number",
    "0020|000e": "series_instance_uid",
    "0020|000d": "study_instance_uid",
    "0018|0015": "body_part",
    "0008|0070": "manufacturer",
    "0018|0087": "field_strength",
    "0020|0052": "frame_of_reference_uid",
}


def volume_suffix(path: str | os.PathLike) -> str:
    """The recognised volume suffix of ``path`` (``.nii.gz`` counts as one), or ``""``."""
    name = Path(path).name.lower()
    for suffix in sorted(VOLUME_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: str | os.PathLike) -> str:
    """The file name of ``path`` without its volume suffix."""
    name = Path(path).name
    suffix = volume_suffix(path)
    return name[: -len(suffix)] if suffix else name


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with a DICOM suffix or the ``DICM`` preamble marker."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_label_file(path: str | os.PathLike) -> bool:
    """True when the file name marks a label map (``*_seg.*``, ``*_labels.*``, ...)."""
    stem = strip_suffix(path).lower()
    return any(stem.endswith(marker) for marker in LABEL_NAME_MARKERS)


def _first_line(error: BaseException) -> str:
    """The useful sentence of a (multi-line, source-path-laden) SimpleITK/ITK error."""
    text = str(error)
    for marker in ("ERROR:", "Description:", "what():"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    text = re.sub(r"\w+IO\(0x[0-9a-f]+\):\s*", "", " ".join(text.split())).strip()
    text = re.sub(r"Exception thrown in SimpleITK \w+:\s*", "", text)
    text = re.sub(r"\S+\.(?:cxx|hxx|cpp|txx|h)(?::\d+|,? line \d+)?:?(?:\s*\(\))?:?\s*", "", text).strip()
    text = re.sub(r"\S*/\.[^/\s]+\.part[^\s:]*", "the temporary file", text)  # atomic_path's names
    if "Unable to determine ImageIO reader" in text:
        text = "not a recognised image format"
    elif "File cannot be read" in text or "trouble reading" in text:
        text = "the data ends early or cannot be decoded"
    return text[:160] or type(error).__name__


def _nifti_sibling_clash(path: Path) -> bool:
    """ITK's NIfTI reader given ``x.nii.gz`` takes the voxels of ``x.nii`` when both exist (and the
    reverse): such files are read through a private link so each name means its own file."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return path.with_name(path.name[:-3]).exists()
    if name.endswith(".nii"):
        return path.with_name(path.name + ".gz").exists()
    return False


_QUIET_LOCK = threading.Lock()
_QUIET_DEPTH = 0
_QUIET_PREVIOUS = True


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's global warning display (multi-line messages naming C++ files) while reading.

    What matters in those warnings (uneven DICOM slices, non-orthogonal matrices, qform/sform
    choices) is checked here and reported as one-line warnings or errors instead.
    """
    import SimpleITK as sitk

    global _QUIET_DEPTH, _QUIET_PREVIOUS
    with _QUIET_LOCK:  # reads may run in worker threads: the first in switches off, the last out restores
        if _QUIET_DEPTH == 0:
            _QUIET_PREVIOUS = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _QUIET_DEPTH += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_DEPTH -= 1
            if _QUIET_DEPTH == 0:
                sitk.ProcessObject.SetGlobalWarningDisplay(_QUIET_PREVIOUS)


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs header fixes ("vox offset not divisible by 16 ...") to stderr: keep them at debug."""
    library = logging.getLogger("nibabel")
    level = library.level
    library.setLevel(logging.CRITICAL + 10)
    try:
        yield
    finally:
        library.setLevel(level)


@contextlib.contextmanager
def _native_stderr_silenced(active: bool = True) -> Iterator[None]:
    """Discard what C libraries print on file descriptor 2 (the NIfTI library's "pixdim[1,2,3] should be
    positive" line, reported here as our own warning instead)."""
    if not active:
        yield
        return
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclasses.dataclass
class _NiftiInfo:
    """What the NIfTI pre-read learned: nibabel's header and the count of NaN/infinite voxels."""

    header: Any
    non_finite: int = 0
    negative_pixdim: bool = False  # in the file (nibabel's loaded header holds the absolute values)


_NIFTI_UNITS_MM = {"mm": 1.0, "micron": 1e-3, "meter": 1e3}


def _scan_nifti_data(stream, offset: int, count: int, dtype: np.dtype, scan: bool) -> tuple[int, int]:
    """Bytes available for ``count`` voxels after ``offset`` in ``stream``, and (for a float ``dtype``)
    how many of them are NaN or infinite; reads in chunks, never the whole file at once."""
    skipped = 0
    while skipped < offset:
        chunk = stream.read(min(1 << 22, offset - skipped))
        if not chunk:
            return skipped, 0
        skipped += len(chunk)
    item = dtype.itemsize
    wanted, got, bad, carry = count * item, 0, 0, b""
    while got < wanted:
        chunk = stream.read(min(1 << 22, wanted - got))
        if not chunk:
            break
        got += len(chunk)
        if scan:
            chunk = carry + chunk
            whole = len(chunk) - len(chunk) % item
            bad += int((~np.isfinite(np.frombuffer(chunk[:whole], dtype))).sum())
            carry = chunk[whole:]
    return offset + got, bad


def _check_nifti_complete(path: Path, shown: Path, limit: bool = True) -> _NiftiInfo:
    """ITK reads a truncated NIfTI without complaint (missing voxels become 0, and so do NaN/infinite
    values): check the size against the real data offset first, and count non-finite voxels."""
    import gzip
    import zlib

    import nibabel as nib

    from .header_checks import check_declared_bytes

    try:
        with _quiet_nibabel():
            image = nib.load(str(path))
        header = image.header
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        # The loaded header reports vox_offset 0 (nibabel resets it for saving): use the data's offset.
        offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
        with _quiet_nibabel(), nib.openers.ImageOpener(str(path)) as stream:
            raw = type(header).from_fileobj(stream, check=False)
        negative = bool(np.any(np.asarray(raw["pixdim"][1:4]) < 0))
        if bytes(header["magic"]).startswith((b"n+1", b"n+2")):  # a single file: the NIfTI library's minimum
            offset = max(offset, int(getattr(header, "single_vox_offset", 0)))
    except Exception as error:  # nibabel raises many types for bad headers
        raise VolumeReadError(f"{shown}: corrupt or unrecognised NIfTI header ({_first_line(error)})") from None
    if limit and len(shape) < 3:
        raise VolumeReadError(
            f"{shown}: a 2-D image ({' x '.join(map(str, shape))} pixels), not a volume: a study must be 3-D"
        )
    if limit:
        check_declared_bytes(shape, dtype.itemsize, shown)
    count = math.prod(shape)  # exact: np.prod can overflow
    needed = offset + count * dtype.itemsize
    compressed = path.name.lower().endswith(".gz")
    scan = dtype.kind == "f" and limit
    if not compressed:
        size = path.stat().st_size
        if offset > size:
            raise VolumeReadError(f"{shown}: the voxel data offset ({offset} bytes) lies past the end of the file")
        if size < needed:
            raise VolumeReadError(f"{shown}: truncated voxel data ({size} of {needed} bytes)")
        if not scan:
            return _NiftiInfo(header, 0, negative)
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
            available, bad = _scan_nifti_data(stream, offset, count, dtype, scan)
    except (OSError, EOFError, zlib.error) as error:
        raise VolumeReadError(f"{shown}: truncated or corrupt compressed data ({_first_line(error)})") from None
    if available <= offset < needed:
        raise VolumeReadError(f"{shown}: the voxel data offset ({offset} bytes) lies past the end of the data")
    if available < needed:
        raise VolumeReadError(f"{shown}: truncated voxel data ({available} of {needed} bytes)")
    return _NiftiInfo(header, bad, negative)


def _nifti_units(header) -> str:
    try:
        return str(header.get_xyzt_units()[0])
    except Exception:  # an unknown code
        return "unknown"


def _nifti_geometry(header, itk: Geometry, shown: Path, warnings: list[str]) -> Geometry:
    """The geometry nibabel documents for this header: the sform when ``sform_code`` > 0, else the qform
    when ``qform_code`` > 0 (``Nifti1Header.get_best_affine``), in the header's units.

    ITK prefers a scanner-coded qform over an sform of another code, and ignores the sign of a
    negative pixdim; labels must land where nibabel (and most NIfTI tools) place the study, so that
    geometry is used, with a one-line warning whenever the two readings differ.
    """
    try:
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        affine = header.get_sform() if sform_code > 0 else header.get_qform() if qform_code > 0 else None
    except Exception:  # nibabel refuses e.g. a qform with negative pixdim: ITK's reading stands
        affine = None
    if affine is None or not np.isfinite(affine).all():
        return itk
    which = "sform" if sform_code > 0 else "qform"
    scale = _NIFTI_UNITS_MM.get(_nifti_units(header), 1.0)
    lps = np.diag([-1.0, -1.0, 1.0]) @ (np.asarray(affine[:3], dtype=float) * scale)
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if not np.all(spacing > 0):
        return itk
    direction = lps[:, :3] / spacing
    from .header_checks import check_orthonormal

    check_orthonormal(direction.ravel(), f"{shown} ({which})")
    geometry = Geometry(itk.size, tuple(spacing), tuple(lps[:, 3]), tuple(direction.ravel()))
    if sform_code > 0 and qform_code > 0:
        with contextlib.suppress(Exception):
            qform = header.get_qform()
            corners = np.array(
                [[i, j, k, 1] for i in (0, itk.size[0] - 1) for j in (0, itk.size[1] - 1) for k in (0, itk.size[2] - 1)]
            )
            apart = float(np.abs((corners @ (qform - affine).T)[:, :3]).max() * scale)
            if apart > 0.01:
                warnings.append(
                    f"qform and sform disagree (up to {apart:.3g} mm apart): using the sform, as nibabel does"
                )
                return geometry
    if not geometry.is_close(itk, tolerance=1e-3):
        warnings.append(f"ITK and nibabel read this header differently: using the {which}, as nibabel does")
        return geometry
    return itk


def _reader_image(path: Path, shown: Path | None = None) -> tuple[Any, _NiftiInfo | None]:
    """Read ``path`` with SimpleITK; errors name ``shown`` (the user's path).  For NIfTI, also what
    the pre-read found (nibabel's header, non-finite voxels)."""
    import SimpleITK as sitk

    shown = shown or path
    if _nifti_sibling_clash(path):
        with tempfile.TemporaryDirectory() as private:
            link = Path(private) / path.name
            link.symlink_to(path.resolve())
            return _reader_image(link, shown)
    info = _check_nifti_complete(path, shown) if volume_suffix(path) in (".nii", ".nii.gz") else None
    negative = info is not None and info.negative_pixdim
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk(), _native_stderr_silenced(negative):
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise VolumeReadError(f"{shown}: corrupt or unrecognised header ({_first_line(error)})") from None
    from .header_checks import check_declared_bytes, check_geometry, sitk_item_bytes

    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel_type:
        raise VolumeReadError(
            f"{shown}: complex-valued voxels (raw or phase data) are not supported: give a magnitude image"
        )
    item = sitk_item_bytes(pixel_type, reader.GetNumberOfComponents())
    check_declared_bytes(tuple(reader.GetSize()), item, shown)
    units = _nifti_units(info.header) if info is not None else ""
    check_geometry(
        reader.GetSpacing(),
        reader.GetOrigin(),
        reader.GetDirection(),
        shown,
        "" if units in ("mm", "unknown") else units,
    )
    try:
        with quiet_itk(), _native_stderr_silenced(negative):
            image = reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(f"{shown}: truncated or corrupt voxel data ({_first_line(error)})") from None
    return image, info


def _to_scalar_3d(image, path: Path, warnings: list[str]):
    """Reduce 4-D / vector / 2-D images to one 3-D scalar image, recording what was done."""
    import SimpleITK as sitk

    dimension = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        components = image.GetNumberOfComponentsPerPixel()
        if components in (3, 4):
            warnings.append(f"RGB(A) image with {components} components: converted to grey levels")
            channels = [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32) for i in range(3)]
            image = channels[0] * 0.299 + channels[1] * 0.587 + channels[2] * 0.114
        else:
            raise VolumeReadError(f"{path}: {components} values per voxel are not supported (expected one)")
    if dimension == 4:
        frames = image.GetSize()[3]
        if frames != 1:
            warnings.append(f"4-D image with {frames} volumes: using the first")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, 0])
    elif dimension == 2:
        raise VolumeReadError(f"{path}: a 2-D image, not a volume (need 3-D: several slices)")
    elif dimension != 3:
        raise VolumeReadError(f"{path}: unsupported dimensionality {dimension}-D (need 3-D)")
    return image


def _finish(image, path: Path, name: str, metadata: dict[str, Any], warnings: list[str]) -> Volume:
    image = _to_scalar_3d(image, path, warnings)
    try:
        volume = Volume.from_sitk(image, name=name, path=path, metadata=metadata)
    except InputError as error:
        raise VolumeReadError(f"{path}: {error}") from None
    array = volume.array
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        warnings.append(f"{bad} voxels are NaN or infinite: treated as 0")
        volume.array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    volume.metadata["warnings"] = list(warnings) + volume.metadata.get("warnings", [])
    for warning in warnings:
        logger.warning("%s: %s", path, warning)
    return volume


def read_volume(path: str | os.PathLike) -> Volume:
    """Read one 3-D study (file or single-series DICOM directory) as a :class:`Volume`.

    A DICOM directory holding several series raises :class:`InputError` naming them; use
    :func:`read_volumes` to get each series.
    """
    volumes = read_volumes(path)
    if len(volumes) > 1:
        names = ", ".join(v.name for v in volumes)
        raise InputError(f"{path}: holds {len(volumes)} DICOM series ({names}); choose one or read all of them")
    return volumes[0]


def read_volumes(path: str | os.PathLike) -> list[Volume]:
    """Read every volume at ``path``: one for a file, one per series for a DICOM directory."""
    path = Path(path).expanduser()
    try:
        return _read_volumes(path)
    except OSError as error:  # the file vanished, an I/O error, a name too long, ...
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise VolumeReadError(f"{shown}: cannot read ({error.strerror or error})") from None
    except ValueError as error:  # an embedded NUL byte in the path
        if "null" not in str(error):
            raise
        raise VolumeReadError(f"{str(path)[:200]!r}: not a usable path ({error})") from None


def _read_volumes(path: Path) -> list[Volume]:
    if not path.exists():
        raise VolumeReadError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_dicom_directory(path)
    if is_dicom_file(path):
        return [_read_dicom_series_of_file(path)]
    if not os.access(path, os.R_OK):
        raise VolumeReadError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise VolumeReadError(f"{path}: empty file")
    suffix = volume_suffix(path)
    if not suffix:
        raise VolumeReadError(f"{path}: unknown format (expected {', '.join(VOLUME_SUFFIXES)} or DICOM)")
    from .header_checks import check_metaimage_header, check_nrrd_header

    if suffix in (".mha", ".mhd"):
        check_metaimage_header(path, path)  # ITK's MetaIO crashes on some malformed headers
    elif suffix in (".nrrd", ".nhdr"):
        check_nrrd_header(path, path)
    image, info = _reader_image(path)
    metadata: dict[str, Any] = {"format": suffix.lstrip(".")}
    warnings: list[str] = []
    if info is not None and info.non_finite:
        warnings.append(f"{info.non_finite} voxels are NaN or infinite: treated as 0")
    if info is not None and info.negative_pixdim:
        warnings.append("negative pixdim in the header: read as positive (as nibabel and the NIfTI library do)")
    volume = _finish(image, path, strip_suffix(path), metadata, warnings)
    if info is not None:
        extra: list[str] = []
        geometry = _nifti_geometry(info.header, volume.geometry, path, extra)
        if extra:
            volume.geometry = geometry
            volume.metadata["warnings"] = volume.metadata["warnings"] + extra
            for warning in extra:
                logger.warning("%s: %s", path, warning)
    return [volume]


# DICOM ---------------------------------------------------------------------------------------


def series_ids(directory: Path) -> list[str]:
    """The image series of ``directory`` (GDCM's series ids), without non-image objects and localizers."""
    return [series_id for series_id, _ in _image_series(directory)[0]]


def _gdcm_series_ids(directory: Path) -> list[str]:
    import SimpleITK as sitk

    from .header_checks import check_dicom_directory

    check_dicom_directory(directory)  # GDCM can allocate gigabytes for one corrupt element
    try:
        with quiet_itk():
            return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)))
    except RuntimeError as error:
        raise VolumeReadError(f"{directory}: cannot scan for DICOM series ({_first_line(error)})") from None


def _image_series(directory: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The series of ``directory`` holding images (id and files), and one-line notes on the series
    skipped: non-image objects (DICOM-SEG, SR, presentation states, ...) and, beside other series,
    one-slice localizers."""
    from .dicom_series import describe_skipped, non_image_kind, read_header

    kept: list[tuple[str, list[str], bool]] = []
    skipped: list[str] = []
    for series_id in _gdcm_series_ids(directory):
        files = _series_files(directory, series_id)
        header = read_header(files[0]) if files else None
        kind = non_image_kind(header) if header is not None else None
        if kind:  # a series whose first file is a SEG, SR, ...: kept if any file of it is an image
            kinds = [non_image_kind(h) if h is not None else None for h in map(read_header, files)]
            if all(kinds):
                skipped += kinds
                continue
        frames = header.get("NumberOfFrames", 1) if header is not None else 1
        single = len(files) == 1 and str(frames or 1).strip() in ("", "1")
        kept.append((series_id, files, single))
    notes = [f"skipped {describe_skipped(skipped)} (not images)"] if skipped else []
    volumes = [(series_id, files) for series_id, files, single in kept if not single]
    if volumes and len(volumes) < len(kept):
        notes.append(f"skipped {len(kept) - len(volumes)} one-slice series (localizers?)")
        return volumes, notes
    return [(series_id, files) for series_id, files, _ in kept], notes


def safe_dicom_tags(file_name: str) -> dict[str, str]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    tags = {}
    for tag, key in _DICOM_SAFE_TAGS.items():
        if reader.HasMetaDataKey(tag):
            tags[key] = reader.GetMetaData(tag).strip()
    return tags


def read_series(directory: Path, series_id: str) -> Volume:
    """Read the series ``series_id`` of ``directory`` (GDCM's grouping)."""
    files = _series_files(directory, series_id)
    if not files:
        raise VolumeReadError(f"{directory}: DICOM series {series_id} has no readable files")
    return _read_series_files(directory, series_id, files)


def _read_series_files(directory: Path, series_id: str, files: list[str]) -> Volume:
    """Read one series from its files: headers checked and laid out first (:mod:`.dicom_series`), then
    the voxels read by GDCM/ITK in slice order onto that grid (resampled when the slices are uneven)."""
    import SimpleITK as sitk

    from .dicom_series import plan_series, resample_slices

    tags = safe_dicom_tags(files[0])
    description = tags.get("series_description") or "series"
    number = tags.get("series_number", "")
    name = f"{description} ({number})" if number else description
    plan = plan_series(files, f"{directory}: DICOM series {name!r}")
    if plan is not None:
        files = plan.files
    _check_series_size(files, directory)
    warnings: list[str] = list(plan.warnings) if plan is not None else []
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(f"{directory}: cannot read DICOM series {series_id} ({_first_line(error)})") from None
    if image.GetDimension() == 3 and image.GetSize()[2] != len(files) and len(files) > 1:
        warnings.append(f"{len(files)} files gave {image.GetSize()[2]} slices")
    if len(files) == 1 and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise VolumeReadError(f"{directory}: DICOM series {series_id} has a single slice, not a volume")
    metadata = {"format": "dicom", "dicom": tags, "dicom_files": files, "series_id": series_id}
    volume = _finish(image, directory, name, metadata, warnings)
    if plan is not None and volume.shape[0] == len(files) and volume.shape[1:] == plan.geometry.shape[1:]:
        array = volume.array
        if plan.resample:
            array = resample_slices(array, plan.positions, plan.geometry.spacing[2], plan.geometry.size[2])
            volume.metadata["resampled"] = True
        volume = dataclasses.replace(volume, array=array, geometry=plan.geometry)
    return volume


def _series_files(directory: Path, series_id: str) -> list[str]:
    import SimpleITK as sitk

    try:
        with quiet_itk():
            return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_id))
    except RuntimeError as error:
        raise VolumeReadError(f"{directory}: cannot list DICOM series {series_id} ({_first_line(error)})") from None


def _check_series_size(files: list[str], directory: Path) -> None:
    """Refuse a series whose slices declare more voxel data than a study may hold (before allocating)."""
    import SimpleITK as sitk

    from .header_checks import check_declared_bytes, check_geometry, sitk_item_bytes

    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # the series reader reports it
    item = sitk_item_bytes(sitk.GetPixelIDValueAsString(reader.GetPixelID()), reader.GetNumberOfComponents())
    size = list(reader.GetSize())
    if len(size) == 3:
        size[2] *= len(files)
    check_declared_bytes(tuple(size), item, directory)
    # One file's third spacing is its SliceThickness, not the series' step (checked with the positions).
    in_plane = (*reader.GetSpacing()[:2], 1.0)[:3] if len(reader.GetSpacing()) >= 2 else reader.GetSpacing()
    check_geometry(in_plane, reader.GetOrigin(), reader.GetDirection(), files[0])


def _read_dicom_directory(directory: Path) -> list[Volume]:
    dicomdir = next((p for p in directory.iterdir() if p.name.upper() == "DICOMDIR" and p.is_file()), None)
    if dicomdir is not None:
        from .dicom_series import dicomdir_files

        if dicomdir_files(dicomdir, strict=False):
            return _read_dicomdir(dicomdir)
        logger.warning("%s: unreadable or empty DICOMDIR ignored; the folder is scanned instead", dicomdir)
    series, notes = _image_series(directory)
    if not series:
        files = [p for p in directory.iterdir() if p.is_file()]
        if not files:
            raise VolumeReadError(f"{directory}: empty directory (no DICOM files)")
        found = f" ({'; '.join(notes)})" if notes else ""
        raise VolumeReadError(f"{directory}: no DICOM image series found among {len(files)} file(s){found}")
    volumes = [
        _read_series_files(directory, series_id, files) if files else read_series(directory, series_id)
        for series_id, files in series
    ]
    return [_noted(volume, notes) for volume in volumes]


def _noted(volume: Volume, notes: list[str]) -> Volume:
    """``volume`` with the folder's notes (series skipped) added to its warnings, and logged."""
    for note in notes:
        logger.warning("%s: %s", volume.path, note)
    volume.metadata["warnings"] = list(notes) + list(volume.metadata.get("warnings", []))
    return volume


def _read_dicomdir(path: Path) -> list[Volume]:
    """Every image series a DICOMDIR references (files in its sub-folders), grouped by SeriesInstanceUID."""
    from .dicom_series import describe_skipped, dicomdir_files, non_image_kind, read_header
    from .header_checks import dicom_structure_problem

    groups: dict[str, list[str]] = {}
    skipped: list[str] = []
    for file in dicomdir_files(path):
        problem = dicom_structure_problem(file)
        if problem:
            raise VolumeReadError(f"{file}: corrupt DICOM file ({problem})")
        header = read_header(file)
        kind = non_image_kind(header) if header is not None else "unreadable file"
        if kind:
            skipped.append(kind)
            continue
        groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(str(file))
    notes = [f"skipped {describe_skipped(skipped)} (not images)"] if skipped else []
    if not groups:
        raise VolumeReadError(
            f"{path}: the DICOMDIR references no DICOM images{' (' + notes[0] + ')' if notes else ''}"
        )
    several = {uid: files for uid, files in groups.items() if len(files) > 1}
    if several and len(several) < len(groups):
        notes.append(f"skipped {len(groups) - len(several)} one-slice series (localizers?)")
        groups = several
    return [_noted(_read_series_files(path.parent, uid, files), notes) for uid, files in groups.items()]


def _read_dicom_series_of_file(path: Path) -> Volume:
    if path.name.upper() == "DICOMDIR":
        volumes = _read_dicomdir(path)
        if len(volumes) > 1:
            names = ", ".join(v.name for v in volumes)
            raise InputError(f"{path}: references {len(volumes)} DICOM series ({names}); give its folder to read all")
        return volumes[0]
    directory = path.parent
    target = os.path.realpath(path)
    for series_id in _gdcm_series_ids(directory):
        files = _series_files(directory, series_id)
        if target in {os.path.realpath(f) for f in files}:
            return read_series(directory, series_id)
    raise VolumeReadError(f"{path}: not a readable DICOM image (no series contains it)")


# Writing -------------------------------------------------------------------------------------


def label_dtype(array: np.ndarray) -> np.dtype:
    """uint8 when all values fit, else uint16; clear error for non-integer or negative labels."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise InputError("label map holds non-integer values")
    elif array.dtype.kind not in "iub":
        raise InputError(f"label map has unsupported type {array.dtype}")
    if array.size and array.min() < 0:
        raise InputError("label map holds negative values")
    maximum = int(array.max()) if array.size else 0
    if maximum > 65535:
        raise InputError(f"label value {maximum} does not fit uint16")
    return np.dtype(np.uint8) if maximum < 256 else np.dtype(np.uint16)


STALE_TEMPORARY_SECONDS = 15 * 60


def _remove_stale_temporaries(destination: Path, suffix: str) -> None:
    """Delete temporary files that earlier writes of ``destination`` left when killed (kill -9, power cut).

    A temporary file is stale when the process named in it (``.<name>.<pid>.<random>.part<suffix>``)
    no longer runs here and it has not changed for :data:`STALE_TEMPORARY_SECONDS` (so a write from
    another machine sharing the folder is never disturbed).
    """
    import glob
    import time

    for stale in destination.parent.glob(f".{glob.escape(destination.name)}.*.part{glob.escape(suffix)}"):
        pid = stale.name[len(destination.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:  # alive under another user, or cannot tell
            continue
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                stale.unlink()
                logger.info("removed %s, left by an interrupted write", stale)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it over ``destination`` on success.

    The temporary name keeps the destination's suffix so writers pick the same format.  On any
    failure (including KeyboardInterrupt) the temporary file is removed and the destination is
    untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    suffix = volume_suffix(destination) or destination.suffix
    _remove_stale_temporaries(destination, suffix)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.{os.getpid()}.", suffix=f".part{suffix}", dir=destination.parent
    )
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(temp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` (any dtype) with its exact geometry; the format follows the suffix."""
    import SimpleITK as sitk

    path = Path(path).expanduser()
    suffix = volume_suffix(path)
    if suffix not in VOLUME_SUFFIXES:
        raise VolumeWriteError(f"{path}: cannot write this format (use {', '.join(LABEL_SUFFIXES)})")
    if "\x00" in str(path):
        raise VolumeWriteError(f"{str(path)[:200]!r}: not a usable file name (NUL byte)")
    image = volume.to_sitk()
    try:
        if suffix in (".mhd", ".nhdr"):
            _write_detached(image, path, compress)
        else:
            with atomic_path(path) as temp:
                sitk.WriteImage(image, str(temp), useCompression=compress)
                if suffix in (".nii", ".nii.gz"):
                    _check_written_nifti(temp, path)
    except RuntimeError as error:
        raise VolumeWriteError(f"{path}: cannot write ({_first_line(error)})") from None
    except OSError as error:
        raise VolumeWriteError(f"{path}: cannot write ({error.strerror or error})") from None
    return path


def _check_written_nifti(temp: Path, path: Path) -> None:
    """ITK's NIfTI writer ignores failed writes (disk full, quota, file size limit) and leaves a short
    file, which must not replace a good one: check the whole file (gzip CRC included) before the rename."""
    import gzip
    import zlib

    try:
        _check_nifti_complete(temp, path, limit=False)
        if temp.name.lower().endswith(".gz"):
            with gzip.open(temp, "rb") as stream:
                while stream.read(1 << 22):
                    pass
    except (VolumeReadError, OSError, EOFError, zlib.error):
        raise VolumeWriteError(
            f"{path}: cannot write (the file was not written completely: is the disk full or over quota?)"
        ) from None


def _write_detached(image, path: Path, compress: bool) -> None:
    """Header + data file pairs: write both in a temporary directory, move data first, header last."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as temp_dir:
        temp_header = Path(temp_dir) / path.name
        sitk.WriteImage(image, str(temp_header), useCompression=compress)
        for item in sorted(Path(temp_dir).iterdir(), key=lambda p: p == temp_header):
            os.replace(item, path.parent / item.name)


def write_labels(
    labels: np.ndarray | Volume, path: str | os.PathLike, reference: Volume | Geometry | None = None
) -> Path:
    """Write a label map (uint8, or uint16 when values exceed 255) in the geometry of ``reference``.

    ``labels`` is a ``(z, y, x)`` array on ``reference``'s grid, or a :class:`Volume` (then its
    own geometry is used unless ``reference`` is given, which must match).
    """
    if isinstance(labels, Volume):
        geometry = labels.geometry
        array = labels.array
        name = labels.name
        if reference is not None:
            ref_geometry = reference.geometry if isinstance(reference, Volume) else reference
            if not geometry.is_close(ref_geometry):
                raise InputError(f"{path}: labels and reference differ ({geometry.describe_difference(ref_geometry)})")
            geometry = ref_geometry
    else:
        if reference is None:
            raise InputError(f"{path}: a label array needs a reference volume or geometry to be written")
        geometry = reference.geometry if isinstance(reference, Volume) else reference
        array = np.asarray(labels)
        name = "labels"
        if tuple(array.shape) != geometry.shape:
            raise InputError(f"{path}: label shape {array.shape} differs from the study's {geometry.shape} (z, y, x)")
    dtype = label_dtype(array)
    volume = Volume(np.ascontiguousarray(array.astype(dtype, copy=False)), geometry, name=name)
    return write_volume(volume, path)


def default_output_path(
    source: str | os.PathLike, output_dir: str | os.PathLike | None = None, suffix: str = ".nii.gz"
) -> Path:
    """``<name>_seg.nii.gz`` beside the source (or in ``output_dir``)."""
    source = Path(source)
    stem = strip_suffix(source) if source.is_file() or volume_suffix(source) else source.name
    directory = Path(output_dir) if output_dir is not None else (source if source.is_dir() else source.parent)
    return directory / f"{stem}_seg{suffix}"


def find_label_file(image_path: str | os.PathLike) -> Path | None:
    """A label map stored next to an image: ``<stem>_seg.*`` or ``<stem>_labels.*``.

    Also understands the ``<id>_img`` / ``<id>_seg`` naming of the lumbar datasets.
    """
    image_path = Path(image_path)
    if not image_path.is_file():
        return None
    stem = strip_suffix(image_path)
    stems = [stem]
    if stem.endswith("_img"):
        stems.append(stem[: -len("_img")])
    for base in stems:
        for marker in ("_seg", "_labels", "_label"):
            for suffix in LABEL_SUFFIXES:
                candidate = image_path.with_name(f"{base}{marker}{suffix}")
                if candidate.is_file() and candidate != image_path:
                    return candidate
    return None
