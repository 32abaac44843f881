"""Reading studies and writing label maps with exact geometry (SimpleITK/GDCM underneath).

Formats: MHA/MHD, NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), and DICOM series (a directory, or
any one file of the series).  Every failure is a :class:`VolumeReadError`/:class:`VolumeWriteError`
with one line naming the file and the problem.  Writes are atomic: a temporary file in the
target directory is renamed over the destination only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
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
    text = re.sub(r"\S+\.(?:cxx|hxx|cpp|txx|h):\d+:(?:\s*\(\))?:?\s*", "", text).strip()
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


def _check_nifti_complete(path: Path, shown: Path, limit: bool = True) -> None:
    """ITK reads a truncated NIfTI without complaint (missing voxels become 0): check sizes first."""
    import gzip
    import zlib

    import nibabel as nib

    from .header_checks import check_declared_bytes

    try:
        header = nib.load(str(path)).header
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        needed = int(header.get_data_offset()) + math.prod(shape) * itemsize  # exact: np.prod can overflow
    except Exception as error:  # nibabel raises many types for bad headers
        raise VolumeReadError(f"{shown}: corrupt or unrecognised NIfTI header ({_first_line(error)})") from None
    if limit:
        check_declared_bytes(shape, itemsize, shown)
    if path.name.lower().endswith(".gz"):
        available = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    available += len(chunk)
                    if available >= needed:
                        return
        except (OSError, EOFError, zlib.error) as error:
            raise VolumeReadError(f"{shown}: truncated or corrupt compressed data ({_first_line(error)})") from None
    else:
        available = path.stat().st_size
    if available < needed:
        raise VolumeReadError(f"{shown}: truncated voxel data ({available} of {needed} bytes)")


def _reader_image(path: Path, shown: Path | None = None):
    """Read ``path`` with SimpleITK; errors name ``shown`` (the user's path)."""
    import SimpleITK as sitk

    shown = shown or path
    if _nifti_sibling_clash(path):
        with tempfile.TemporaryDirectory() as private:
            link = Path(private) / path.name
            link.symlink_to(path.resolve())
            image = _reader_image(link, shown)
        return image
    if volume_suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path, shown)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise VolumeReadError(f"{shown}: corrupt or unrecognised header ({_first_line(error)})") from None
    from .header_checks import check_declared_bytes, check_geometry, sitk_item_bytes

    item = sitk_item_bytes(sitk.GetPixelIDValueAsString(reader.GetPixelID()), reader.GetNumberOfComponents())
    check_declared_bytes(tuple(reader.GetSize()), item, shown)
    check_geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), shown)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(f"{shown}: truncated or corrupt voxel data ({_first_line(error)})") from None
    return image


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
    image = _reader_image(path)
    metadata: dict[str, Any] = {"format": suffix.lstrip(".")}
    return [_finish(image, path, strip_suffix(path), metadata, [])]


# DICOM ---------------------------------------------------------------------------------------


def series_ids(directory: Path) -> list[str]:
    import SimpleITK as sitk

    from .header_checks import check_dicom_directory

    check_dicom_directory(directory)  # GDCM can allocate gigabytes for one corrupt element
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)))
    except RuntimeError as error:
        raise VolumeReadError(f"{directory}: cannot scan for DICOM series ({_first_line(error)})") from None


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
    import SimpleITK as sitk

    files = _series_files(directory, series_id)
    if not files:
        raise VolumeReadError(f"{directory}: DICOM series {series_id} has no readable files")
    _check_series_size(files, directory)
    tags = safe_dicom_tags(files[0])
    warnings: list[str] = []
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(f"{directory}: cannot read DICOM series {series_id} ({_first_line(error)})") from None
    if image.GetDimension() == 3 and image.GetSize()[2] != len(files) and len(files) > 1:
        warnings.append(f"{len(files)} files gave {image.GetSize()[2]} slices")
    if len(files) == 1 and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise VolumeReadError(f"{directory}: DICOM series {series_id} has a single slice, not a volume")
    description = tags.get("series_description") or "series"
    number = tags.get("series_number", "")
    name = f"{description} ({number})" if number else description
    metadata = {"format": "dicom", "dicom": tags, "dicom_files": files, "series_id": series_id}
    return _finish(image, directory, name, metadata, warnings)


def _series_files(directory: Path, series_id: str) -> list[str]:
    import SimpleITK as sitk

    try:
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
    check_geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), files[0])


def _read_dicom_directory(directory: Path) -> list[Volume]:
    series = series_ids(directory)
    if not series:
        files = [p for p in directory.iterdir() if p.is_file()]
        if not files:
            raise VolumeReadError(f"{directory}: empty directory (no DICOM files)")
        raise VolumeReadError(f"{directory}: no DICOM series found among {len(files)} file(s)")
    return [read_series(directory, series_id) for series_id in series]


def _read_dicom_series_of_file(path: Path) -> Volume:
    directory = path.parent
    target = os.path.realpath(path)
    for series_id in series_ids(directory):
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
