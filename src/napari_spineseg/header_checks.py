"""Header checks a file must pass before it reaches ITK or GDCM (some malformed headers crash or exhaust them).

Found by fuzzing (``benchmarks/bench_fuzz.py``, see docs/reliability.md):

* ITK's MetaIO (``.mha``/``.mhd``) kills the process (segmentation fault, abort, division by zero)
  for ``NDims`` outside its arrays, a value longer than its 255-byte string buffers (``Name``), a
  header line without ``=``, or an ``ElementDataFile`` pattern with step 0, and loops for a pattern
  over two billion file names; ITK's reader loops forever on a direction matrix near the largest double;
* GDCM allocates and zero-fills up to 4 GiB, for seconds, for one element whose declared length runs
  past the end of a DICOM file of a few hundred bytes (e.g. 8 bytes of garbage after the pixels);
* every reader allocates whatever size a header declares before finding that the data is missing.

So: MetaImage and NRRD headers are parsed here first; detached data files must be regular files
inside the header's folder (no absolute paths, no ``..``, no devices); a study may declare at most
:data:`MAX_VOLUME_BYTES` of voxel data; every DICOM-looking file is walked element by element and
refused when an element claims more bytes than the file holds.  Each refusal is one
:class:`VolumeReadError` line naming the file.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from pathlib import Path

from .errors import VolumeReadError

MAX_VOLUME_BYTES = 4 * 2**30  # voxel data one study may declare (a 1024 x 1024 x 1024 uint32 volume)
MAX_HEADER_BYTES = 1 << 20
MAX_DIMENSIONS = 4
MAX_METAIMAGE_VALUE = 250
MAX_SPACING_MM = 1e5  # geometry far beyond anything physical (a voxel of 100 m) is refused
MAX_ORIGIN_MM = 1e9
MAX_DIRECTION = 1e3  # direction cosines are at most 1 in size
# Voxel sizes a study can have (10 um .. 100 mm): outside this the header's spacing or units are wrong, and
# a model resampling to millimetres would see nothing (red-team issue #18: pixdim 1e-30, micrometre units).
MIN_STUDY_SPACING_MM = 0.01
MAX_STUDY_SPACING_MM = 100.0
ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I| per entry: float32 headers round at ~1e-6

_MET_BYTES = {"CHAR": 1, "UCHAR": 1, "ASCII_CHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 4}
_MET_BYTES |= {"ULONG": 4, "FLOAT": 4, "LONG_LONG": 8, "ULONG_LONG": 8, "DOUBLE": 8}
_NRRD_BYTES = {"signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1}
_NRRD_BYTES |= {"short": 2, "short int": 2, "signed short": 2, "int16": 2, "int16_t": 2, "ushort": 2, "uint16": 2}
_NRRD_BYTES |= {"unsigned short": 2, "uint16_t": 2, "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4}
_NRRD_BYTES |= {"unsigned int": 4, "uint32": 4, "uint32_t": 4, "float": 4, "double": 8}
_META_ARRAYS = {"ElementSpacing": 1, "ElementSize": 1, "Offset": 1, "Position": 1, "Origin": 1}
_META_ARRAYS |= {"CenterOfRotation": 1, "TransformMatrix": 2, "Rotation": 2, "Orientation": 2}
_INTEGER = re.compile(r"^\d+$")


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_declared_bytes(size: tuple[int, ...], item_bytes: int, shown: Path | str) -> None:
    """Refuse a study that declares no voxels, or more voxel data than :data:`MAX_VOLUME_BYTES`."""
    if not size or min(size) < 1:
        raise VolumeReadError(f"{shown}: the image holds no voxels (size {tuple(size)})")
    total = math.prod(int(s) for s in size) * max(1, int(item_bytes))
    if total > MAX_VOLUME_BYTES:
        amount = f"{total / 2**30:.3g}" if total < 2**1000 else "astronomically many"  # float() overflows
        raise VolumeReadError(
            f"{shown}: the header declares {_short(' x '.join(map(str, size)), 60)} voxels "
            f"({amount} GiB), more than the {MAX_VOLUME_BYTES / 2**30:g} GiB a study may hold"
        )


def check_geometry(spacing, origin, direction, shown: Path | str, units: str = "") -> None:
    """Refuse non-finite, physically absurd or non-orthonormal geometry before ITK computes with it.

    A direction entry near the largest double (non-orthogonal matrix) makes ITK's reader loop
    forever inside its matrix code; far beyond anything physical, these bounds refuse no real study.
    A sheared or scaled direction matrix cannot be kept by the label writers (NIfTI coerces it to
    another, orthogonal one), and a spacing outside :data:`MIN_STUDY_SPACING_MM`..
    :data:`MAX_STUDY_SPACING_MM` is a header error (``units`` names the header's stated units).
    """
    problems = []
    if not all(math.isfinite(s) and 0 < abs(s) <= MAX_SPACING_MM for s in spacing):
        problems.append(f"spacing ({', '.join(f'{s:.4g}' for s in spacing)})")
    if not all(math.isfinite(o) and abs(o) <= MAX_ORIGIN_MM for o in origin):
        problems.append(f"origin ({', '.join(f'{o:.4g}' for o in origin)})")
    if not all(math.isfinite(d) and abs(d) <= MAX_DIRECTION for d in direction):
        problems.append(f"direction ({', '.join(f'{d:.3g}' for d in direction)})")
    if problems:
        raise VolumeReadError(f"{shown}: implausible geometry in the header ({'; '.join(problems)})"[:400])
    spatial = list(spacing)[:3]  # a 4th axis is time (seconds or milliseconds)
    if not all(MIN_STUDY_SPACING_MM <= abs(s) <= MAX_STUDY_SPACING_MM for s in spatial):
        stated = f"; the header gives its units as {units}" if units else ""
        raise VolumeReadError(
            f"{shown}: voxel spacing ({', '.join(f'{s:.4g}' for s in spatial)}) mm is implausible for a study "
            f"(expected {MIN_STUDY_SPACING_MM:g} to {MAX_STUDY_SPACING_MM:g} mm{stated}): "
            "fix the header's spacing or units"
        )
    check_orthonormal(direction, shown)


def check_orthonormal(direction, shown: Path | str) -> None:
    """Refuse a direction matrix that is not a rotation/reflection (sheared or scaled axes)."""
    values = [float(d) for d in direction]
    n = math.isqrt(len(values))
    if n * n != len(values) or n < 2:
        return
    rows = [values[i * n : (i + 1) * n] for i in range(n)]
    worst = max(
        abs(sum(rows[k][i] * rows[k][j] for k in range(n)) - (1.0 if i == j else 0.0))
        for i in range(n)
        for j in range(n)
    )
    if worst > ORTHONORMAL_TOLERANCE:
        raise VolumeReadError(
            f"{shown}: the direction matrix is not orthonormal (sheared or scaled axes, off by {worst:.3g}); "
            "labels could not keep this geometry: resample the study onto an orthogonal grid first"
        )


def sitk_item_bytes(pixel_id_text: str, components: int) -> int:
    """Bytes per voxel from SimpleITK's pixel-type description ("16-bit signed integer", ...)."""
    bits = re.search(r"(\d+)-bit", pixel_id_text)
    item = int(bits.group(1)) // 8 if bits else 8
    if "complex" in pixel_id_text:
        item *= 2
    return max(1, item) * max(1, components)


def check_data_file(name: str, header: Path, shown: Path | str) -> Path:
    """The detached data file ``name`` of ``header``: a regular file inside the header's folder."""
    refuse = f"{shown}: data file {_short(name)!r}"
    if not name or "\x00" in name:
        raise VolumeReadError(f"{refuse} is not a usable file name")
    normal = os.path.normpath(name.replace("\\", "/"))
    if os.path.isabs(normal) or normal == ".." or normal.startswith("../") or normal == ".":
        raise VolumeReadError(f"{refuse} lies outside the header's folder (refused)")
    full = header.parent / normal
    try:
        regular = full.is_file()
    except (OSError, ValueError):
        regular = False
    if not regular:
        raise VolumeReadError(f"{refuse} is missing or not a regular file")
    return full


def _header_text(path: Path, shown: Path | str, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_HEADER_BYTES)
    except OSError as error:
        raise VolumeReadError(f"{shown}: cannot read the {what} header ({error.strerror or error})") from None


def _list_names(rest: bytes) -> list[str]:
    return [line.strip() for line in rest.decode("latin-1").splitlines() if line.strip()]


def check_metaimage_header(path: Path, shown: Path | str) -> None:
    """Parse a MetaImage header strictly before ITK's MetaIO sees it (see the module docstring)."""
    head = _header_text(path, shown, "MetaImage")

    def refuse(reason: str) -> VolumeReadError:
        return VolumeReadError(f"{shown}: unsupported or corrupt MetaImage header ({reason})")

    fields: dict[str, list[str]] = {}
    position, data_file, rest, data_offset = 0, None, b"", 0
    while position < len(head):
        end = head.find(b"\n", position)
        if end < 0:
            raise refuse("the header does not end with an ElementDataFile line")
        line = head[position:end].decode("latin-1").strip()
        position = end + 1
        if not line:
            continue
        key, separator, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not separator or not key or len(key) > 64:
            raise refuse(f"line {_short(line, 40)!r} is not 'Key = Value'")
        if len(value) > MAX_METAIMAGE_VALUE:  # MetaIO copies strings such as Name into 255-byte buffers
            raise refuse(f"{_short(key, 40)} value of {len(value)} characters (at most {MAX_METAIMAGE_VALUE})")
        fields.setdefault(key, []).append(value)
        if key == "ElementDataFile":
            data_file, rest, data_offset = value, head[position:], position
            break
    if data_file is None:
        raise refuse("no ElementDataFile line")
    ndims_values = fields.get("NDims", [])
    if not ndims_values:
        raise refuse("no NDims")
    if len(set(ndims_values)) != 1 or not _INTEGER.match(ndims_values[0]):
        raise refuse(f"NDims {_short(' / '.join(ndims_values), 40)!r}")
    ndims = int(ndims_values[0])
    if not 1 <= ndims <= MAX_DIMENSIONS:
        raise refuse(f"NDims {ndims} outside 1..{MAX_DIMENSIONS}")
    sizes = fields.get("DimSize", [])
    if not sizes:
        raise refuse("no DimSize")
    for text in sizes:
        values = text.split()
        if len(values) != ndims or not all(_INTEGER.match(v) for v in values):
            raise refuse(f"DimSize {_short(text, 40)!r} is not {ndims} whole numbers")
    for key, power in _META_ARRAYS.items():
        for text in fields.get(key, []):
            if len(text.split()) != ndims**power:
                raise refuse(f"{key} needs {ndims**power} values, got {len(text.split())}")
    channels = fields.get("ElementNumberOfChannels", ["1"])
    if not all(_INTEGER.match(c) and 1 <= int(c) <= 64 for c in channels):
        raise refuse(f"ElementNumberOfChannels {_short(' / '.join(channels), 40)!r}")
    for key in ("HeaderSize", "CompressedDataSize"):
        for text in fields.get(key, []):
            if not re.match(r"^-?\d+$", text) or int(text) < -1 or int(text) > 2**62:
                raise refuse(f"{key} {_short(text, 40)!r}")
    element = fields.get("ElementType", ["MET_DOUBLE"])[-1].upper().removeprefix("MET_")
    item = _MET_BYTES.get(element.removesuffix("_ARRAY"), 8) * int(channels[-1])
    shape = tuple(int(v) for v in sizes[-1].split())
    check_declared_bytes(shape, item, shown)
    if data_file.upper() == "LOCAL":
        sources = [path]
    elif "%" in data_file:
        raise refuse("file-name patterns in ElementDataFile are not supported")
    elif data_file.split()[:1] == ["LIST"]:
        names = _list_names(rest)
        if not names:
            raise refuse("ElementDataFile LIST without file names")
        sources = [check_data_file(name, path, shown) for name in names]
    else:
        sources = [check_data_file(data_file, path, shown)]
    available = sum(source.stat().st_size for source in sources)
    for text in fields.get("CompressedDataSize", []):
        if int(text) > available:
            raise refuse(f"CompressedDataSize {text} exceeds the {available} bytes of data")
    if any(value[:1] in ("T", "t", "1") for value in fields.get("CompressedData", [])):
        # MetaIO loops for ever on some corrupt zlib streams: inflate them here first.
        if fields.get("HeaderSize") or len(sources) != 1:
            raise refuse("compressed data with HeaderSize or in several files is not supported")
        lengths = fields.get("CompressedDataSize", [])
        offset = data_offset if data_file.upper() == "LOCAL" else 0
        known = element.removesuffix("_ARRAY") in _MET_BYTES
        expected = math.prod(shape) * item if known else None  # None: inflate to the end of the stream
        _check_zlib(sources[0], offset, int(lengths[-1]) if lengths else None, expected, shown)


def _check_zlib(source: Path, offset: int, length: int | None, expected: int | None, shown: Path | str) -> None:
    """The zlib stream of ``length`` bytes at ``offset`` inflates without error to ``expected`` bytes."""
    import zlib

    decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip framing
    produced = 0
    with source.open("rb") as handle:
        handle.seek(offset)
        remaining = length
        while (expected is None or produced < expected) and not decoder.eof:
            size = 1 << 16 if remaining is None else min(1 << 16, remaining)
            chunk = handle.read(size) if size > 0 else b""
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            try:
                produced += len(decoder.decompress(chunk))
            except zlib.error as error:
                raise VolumeReadError(f"{shown}: corrupt compressed voxel data ({error})") from None
    if expected is not None and produced < expected:
        raise VolumeReadError(f"{shown}: truncated compressed voxel data ({produced} of {expected} bytes)")


def check_nrrd_header(path: Path, shown: Path | str) -> None:
    """Check an NRRD header's sizes and detached data files (path traversal) before ITK reads it."""
    head = _header_text(path, shown, "NRRD")

    def refuse(reason: str) -> VolumeReadError:
        return VolumeReadError(f"{shown}: unsupported or corrupt NRRD header ({reason})")

    lines = head.split(b"\n")
    if not lines or not lines[0].startswith(b"NRRD"):
        raise refuse("no NRRD magic line")
    fields: dict[str, str] = {}
    data_file, rest = None, b""
    offset = len(lines[0]) + 1
    for raw in lines[1:]:
        offset += len(raw) + 1
        line = raw.decode("latin-1").rstrip("\r")
        if not line.strip():
            break  # end of an attached header
        if line.startswith("#") or ":=" in line.partition(": ")[0]:
            continue
        key, separator, value = line.partition(":")
        if not separator:
            continue  # teem reports it clearly
        key, value = key.strip().lower(), value.strip()
        fields[key] = value
        if key in ("data file", "datafile"):
            data_file, rest = value, head[offset:]
            break
    sizes = fields.get("sizes", "").split()
    if sizes and all(_INTEGER.match(s) for s in sizes) and len(sizes) <= 16:
        item = _NRRD_BYTES.get(fields.get("type", "double").lower(), 8)
        check_declared_bytes(tuple(int(s) for s in sizes), item, shown)
    if data_file is None:
        return
    if "%" in data_file:
        raise refuse("file-name patterns in 'data file' are not supported")
    if data_file.split()[:1] == ["LIST"]:
        names = _list_names(rest)
        if not names:
            raise refuse("'data file: LIST' without file names")
        for name in names:
            check_data_file(name, path, shown)
    else:
        check_data_file(data_file, path, shown)


# DICOM -----------------------------------------------------------------------------------------
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH"}
_SHORT_VRS |= {b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_UNDEFINED = 0xFFFFFFFF
_MAX_NESTING = 32
_DEFLATED = "1.2.840.10008.1.2.1.99"


class _Corrupt(Exception):
    pass


def _walk(
    data, position: int, end: int, explicit: bool, little: bool, depth: int, until: int | None, datasets: bool = True
) -> int:
    """Step over the elements in ``data[position:end]``; stops after the ``until`` delimiter tag.

    ``datasets`` is False inside encapsulated pixel data (items are fragments, not data sets).
    Raises :class:`_Corrupt` when an element's length runs past ``end`` (what GDCM would allocate).
    """
    if depth > _MAX_NESTING:
        raise _Corrupt("sequences nested too deeply")
    order = "<" if little else ">"
    while position + 8 <= end:
        group, element = struct.unpack_from(order + "HH", data, position)
        tag = (group << 16) | element
        if group == 0xFFFE:  # item, item delimiter, sequence delimiter: no VR
            (length,) = struct.unpack_from(order + "I", data, position + 4)
            position += 8
            if tag in (0xFFFEE00D, 0xFFFEE0DD):
                if until is not None:
                    return position
                continue
            if length == _UNDEFINED:
                position = _walk(data, position, end, explicit, little, depth + 1, 0xFFFEE00D)
            elif position + length > end:
                raise _Corrupt(f"item declares {length} bytes, {end - position} remain")
            else:
                if datasets:
                    _walk(data, position, position + length, explicit, little, depth + 1, None)
                position += length
            continue
        vr = bytes(data[position + 4 : position + 6])
        if explicit and vr in _LONG_VRS:
            (length,) = struct.unpack_from(order + "I", data, position + 8)
            header = 12
        elif explicit and vr in _SHORT_VRS:
            (length,) = struct.unpack_from(order + "H", data, position + 6)
            header = 8
        else:  # implicit VR, or an invalid VR (GDCM then reads a 4-byte length, as here)
            (length,) = struct.unpack_from(order + "I", data, position + 4)
            header, vr = 8, b""
        start = position + header
        if length == _UNDEFINED:  # a sequence, or encapsulated pixel data: items until the delimiter
            pixels = tag == 0x7FE00010 or vr in (b"OB", b"OW")
            inner_explicit = explicit and vr != b"UN"  # an undefined-length UN is an implicit-VR sequence
            position = _walk(data, start, end, inner_explicit, little, depth + 1, 0xFFFEE0DD, not pixels)
            continue
        if start + length > end:
            raise _Corrupt(f"element ({group:04X},{element:04X}) declares {length} bytes, {max(0, end - start)} remain")
        if vr == b"SQ":
            _walk(data, start, start + length, explicit, little, depth + 1, None)
        position = start + length
    if until is not None and position + 8 > end:
        raise _Corrupt("a sequence or item is not closed before the end of the file")
    return position


def dicom_structure_problem(path: Path) -> str | None:
    """Why GDCM must not parse ``path`` (an element longer than the file, ...), or None if it may."""
    try:
        size = path.stat().st_size
        if size < 8:
            return None  # not DICOM to GDCM either
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            position = 132 if size >= 132 and data[128:132] == b"DICM" else 0
            syntax = None
            # File meta information: always explicit VR little endian, group 0002.
            while position + 8 <= size and struct.unpack_from("<H", data, position)[0] == 0x0002:
                vr = bytes(data[position + 4 : position + 6])
                if vr in _LONG_VRS:
                    (length,) = struct.unpack_from("<I", data, position + 8)
                    start = position + 12
                else:
                    (length,) = struct.unpack_from("<H", data, position + 6)
                    start = position + 8
                if length == _UNDEFINED or start + length > size:
                    return f"file meta element declares {length} bytes, {max(0, size - start)} remain"
                if struct.unpack_from("<H", data, position + 2)[0] == 0x0010:
                    syntax = bytes(data[start : start + length]).decode("latin-1").strip("\x00 ")
                position = start + length
            if syntax == _DEFLATED:
                return None  # GDCM inflates the data set; its own checks apply
            little = syntax != "1.2.840.10008.1.2.2"
            if syntax is None:
                explicit = position + 6 <= size and bytes(data[position + 4 : position + 6]) in _LONG_VRS | _SHORT_VRS
            else:
                explicit = syntax != "1.2.840.10008.1.2"
            # The declared (or guessed) encoding first; GDCM also copes with files that lie about it,
            # so the file is refused only when no encoding walks it to the end.
            encodings = [(explicit, little)] + [(e, b) for e in (True, False) for b in (True, False)]
            first: str | None = None
            for explicit, little in dict.fromkeys(encodings):
                try:
                    _walk(data, position, size, explicit, little, 0, None)
                    return None
                except _Corrupt as problem:
                    first = first or str(problem)
            return first
    except (OSError, ValueError, struct.error):
        return None  # unreadable or unmappable: GDCM reports it
    return None


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def check_dicom_directory(directory: Path) -> None:
    """Refuse a folder holding a DICOM file whose elements run past its end (before GDCM scans it)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise VolumeReadError(f"{directory}: cannot list the folder ({error.strerror or error})") from None
    for entry in entries:
        try:
            if not entry.is_file() or not _looks_like_dicom(entry):
                continue
        except OSError:
            continue
        problem = dicom_structure_problem(entry)
        if problem:
            raise VolumeReadError(f"{entry}: corrupt DICOM file ({problem})")
