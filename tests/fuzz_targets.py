"""Fuzz-case generators shared by ``tests/test_fuzz.py`` (hypothesis) and ``benchmarks/bench_fuzz.py``.

Every target builds one small, valid input, mutates it and returns a :class:`Case` whose ``run``
exercises the public entry point (``read_volumes``, ``read_metadata``/``load_model``/inference,
``cli.main``).  The property is the same everywhere: the call succeeds, or raises a
:class:`~napari_spineseg.errors.SpinesegError` (the CLI: returns non-zero or exits through argparse)
with a one-line message; any other exception is a crash.  Patient identifiers written into DICOM
inputs must never appear in volume names, metadata or error messages.

Random choices go through a :class:`Draw`: :class:`RandomDraw` (seeded ``random.Random``, used by the
benchmark, so a seed is a complete repro) or :class:`HypothesisDraw` (``st.data()``, so hypothesis
can shrink failures).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import random
import re
import resource
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Patient identifiers written into every fuzzed DICOM file: none may leak.
PHI_MARKERS = ("Zzphiname^Secret", "ZZPHIID0042", "19011231")
PHI_STRINGS = ("Zzphiname", "Secret", "ZZPHIID0042", "19011231")

# The property's memory bound: readers must reject absurd sizes before allocating.  Virtual memory
# above the process's size at the start of a case is capped at this (the readers' own limit on one
# volume is 4 GiB, so honest reads of small files never come near it).
MEMORY_HEADROOM = 6 * 2**30


# --------------------------------------------------------------------------------------------
# Random choices
# --------------------------------------------------------------------------------------------
class Draw:
    """The random choices a generator makes (implemented by a seeded RNG or by hypothesis)."""

    def int(self, lo: int, hi: int) -> int:  # inclusive bounds
        raise NotImplementedError

    def choice(self, items: Sequence[Any]) -> Any:
        raise NotImplementedError

    def bool(self, p: float = 0.5) -> bool:
        raise NotImplementedError

    def bytes(self, lo: int, hi: int) -> bytes:
        raise NotImplementedError


class RandomDraw(Draw):
    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.rng.randrange(len(items))]

    def bool(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def bytes(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))


class HypothesisDraw(Draw):
    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.data.draw(self.st.integers(0, len(items) - 1))]

    def bool(self, p: float = 0.5) -> bool:
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        return self.data.draw(self.st.booleans())

    def bytes(self, lo: int, hi: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=lo, max_size=hi))


INT_POOL = [0, 1, 2, 3, 4, 5, -1, -2, 7, 8, 11, 16, 255, 256, 1000, 65535, 65536, 2**31 - 1, 2**31, 2**32 + 1]
INT_POOL += [2**63 - 1, 2**63, 10**20, -(2**31)]
FLOAT_POOL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.5, 1e-300, 5e-324, 1e300, 1.7976931348623157e308, 1e-7, 1e7]
FLOAT_POOL += [math.nan, math.inf, -math.inf]
TEXT_POOL = ["", " ", "x", "nan", "NaN", "inf", "-inf", "1e999", "-0", "0x1F", "1,5", "True", "None", "(1,2,3)"]
TEXT_POOL += ["%d", "%s%s%n", "\x01", "é", "1 2", "  7  ", "\t", "9" * 400, "../../etc/passwd", "[]", "{}"]


def any_int(d: Draw) -> int:
    return d.choice(INT_POOL) if d.bool(0.6) else d.int(-5, 300)


def any_float(d: Draw) -> float:
    return d.choice(FLOAT_POOL) if d.bool(0.6) else d.int(-1000, 1000) / d.choice([1, 3, 7, 1000])


def any_token(d: Draw) -> str:
    kind = d.int(0, 2)
    if kind == 0:
        return str(any_int(d))
    if kind == 1:
        return repr(any_float(d))
    return d.choice(TEXT_POOL)


def number_list(d: Draw, n: int, integer: bool = False) -> str:
    """``n`` numbers (usually), or a wrong count; mostly numbers, sometimes junk."""
    count = n if d.bool(0.7) else d.int(0, 12)
    values = []
    for _ in range(count):
        if d.bool(0.15):
            values.append(any_token(d))
        elif integer:
            values.append(str(any_int(d) if d.bool(0.4) else d.int(1, 6)))
        else:
            values.append(repr(any_float(d) if d.bool(0.4) else d.int(1, 30) / 10))
    return " ".join(values)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One fuzz input: a description of the mutations and the call to make."""

    target: str
    run: Callable[[], Any]
    steps: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    cli: bool = False

    def describe(self) -> str:
        return "\n".join(self.steps)


@dataclass
class Outcome:
    status: str  # "ok", "clear" (our error type), "unclear" (our type, multi-line/long), "crash"
    detail: str = ""


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the address space at the current size + ``headroom`` (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    cap = size + headroom
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _leaks_phi(text: str) -> bool:
    return any(marker in text for marker in PHI_STRINGS)


def shorten(text: str) -> str:
    """``text`` with long runs of one character collapsed (5000-character file names in tracebacks)."""
    return re.sub(r"(.)\1{39,}", lambda m: f"{m.group(1) * 3}...[x{len(m.group(0))}]", text)


def run_case(case: Case) -> Outcome:
    """Run ``case`` (output silenced, memory capped) and classify the result."""
    outcome = _run_case(case)
    outcome.detail = shorten(outcome.detail)
    return outcome


def _run_case(case: Case) -> Outcome:
    from napari_spineseg.errors import SpinesegError

    out, err = io.StringIO(), io.StringIO()
    try:
        with memory_cap(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = case.run()
    except SystemExit as stop:
        if case.cli and stop.code in (0, 2, None):
            return Outcome("clear", f"argparse exit {stop.code}")
        return Outcome("crash", f"SystemExit({stop.code!r})")
    except SpinesegError as error:
        message = str(error)
        if _leaks_phi(message):
            return Outcome("crash", f"patient identifier in an error message: {message}")
        if "\n" in message or len(message) > 500 or not message.strip():
            return Outcome("unclear", f"{type(error).__name__}: {message[:2000]}")
        return Outcome("clear", f"{type(error).__name__}: {message}")
    except Exception as error:
        import traceback

        text = shorten("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        return Outcome("crash", text[-4000:])
    except MemoryError as error:  # pragma: no cover - MemoryError is an Exception; kept for clarity
        return Outcome("crash", f"MemoryError {error}")
    text = out.getvalue() + err.getvalue() + repr(result)
    if _leaks_phi(text):
        return Outcome("crash", "patient identifier in output or volume metadata")
    if case.cli:
        if result not in (0, 1):
            return Outcome("crash", f"exit status {result!r}")
        if result == 1:
            lines = [line for line in err.getvalue().splitlines() if "error" in line.lower()]
            if not lines or any(not line.startswith("spineseg: error:") for line in lines):
                return Outcome("unclear", err.getvalue()[-2000:])
            return Outcome("clear", lines[-1])
    return Outcome("ok")


def _read_all(path: Path) -> Callable[[], Any]:
    def read() -> str:
        from napari_spineseg.io import read_volumes

        volumes = read_volumes(path)
        return repr([(v.name, v.shape, v.geometry, v.metadata) for v in volumes])

    return read


# --------------------------------------------------------------------------------------------
# Small valid images
# --------------------------------------------------------------------------------------------
_DTYPES = ["uint8", "int16", "uint16", "float32", "float64", "int32"]


def _small_image(d: Draw):
    import SimpleITK as sitk

    dtype = np.dtype(d.choice(_DTYPES))
    shape = (d.int(1, 4), d.int(1, 5), d.int(1, 6))
    array = (np.arange(int(np.prod(shape))).reshape(shape) % 97).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.75, 3.0))
    image.SetOrigin((-10.0, 5.0, 2.5))
    return image, f"image {array.dtype} shape (z, y, x) {shape}"


def _write_image(image, path: Path, compress: bool) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path), useCompression=compress)


def _mutate_bytes(d: Draw, data: bytes, steps: list[str], what: str) -> bytes:
    op = d.choice(["truncate", "append", "flip", "keep", "keep"])
    if op == "truncate" and data:
        cut = d.int(0, len(data) - 1)
        steps.append(f"{what}: truncate to {cut} of {len(data)} bytes")
        return data[:cut]
    if op == "append":
        extra = d.bytes(1, 64)
        steps.append(f"{what}: append {extra!r}")
        return data + extra
    if op == "flip" and data:
        buffer = bytearray(data)
        for _ in range(d.int(1, 8)):
            at = d.int(0, len(buffer) - 1)
            buffer[at] ^= d.int(1, 255)
            steps.append(f"{what}: flip byte {at}")
        return bytes(buffer)
    return data


def _data_file_value(d: Draw, own: str) -> str:
    """ElementDataFile / NRRD ``data file`` values: the real one, traversal, devices, patterns."""
    return d.choice(
        [
            own,
            own,
            "../secret.raw",
            "../../../../../../../etc/passwd",
            "/etc/passwd",
            "/etc/hostname",
            "/proc/self/environ",
            "/dev/zero",
            "/dev/urandom",
            "/dev/null",
            "/dev/stdin",
            "missing.raw",
            ".",
            "..",
            "",
            "sub/../" + own,
            "LIST",
            "slice%03d.raw 0 3 1",
            "slice%d.raw -2000000000 2000000000 1",
            "slice%d.raw 5 0 0",
            own + "\x01",
            "x" * 5000,
            "/",
        ]
    )


def _prepare_dirs(work: Path) -> Path:
    """``work/case`` for the files, ``work/secret.raw`` outside it (a traversal target)."""
    case_dir = work / "case"
    case_dir.mkdir(parents=True, exist_ok=True)
    (work / "secret.raw").write_bytes(bytes(range(256)) * 64)
    return case_dir


# --------------------------------------------------------------------------------------------
# MetaImage (.mha / .mhd)
# --------------------------------------------------------------------------------------------
MET_TYPES = ["MET_UCHAR", "MET_CHAR", "MET_SHORT", "MET_USHORT", "MET_INT", "MET_UINT", "MET_LONG", "MET_ULONG"]
MET_TYPES += ["MET_LONG_LONG", "MET_ULONG_LONG", "MET_FLOAT", "MET_DOUBLE", "MET_STRING", "MET_NONE", "MET_OTHER"]
MET_TYPES += ["MET_UCHAR_ARRAY", "MET_FLOAT_MATRIX", "MET_ASCII_CHAR", "MET_FOO", "", "MET_SHORT MET_SHORT"]
MHA_KEYS = ["NDims", "DimSize", "ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation"]
MHA_KEYS += ["TransformMatrix", "Rotation", "Orientation", "ElementType", "ElementNumberOfChannels", "HeaderSize"]
MHA_KEYS += ["BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData", "CompressedDataSize"]
MHA_KEYS += ["AnatomicalOrientation", "ObjectType", "ElementMin", "ElementMax", "ElementDataFile", "Comment", "Name"]


def _mha_value(d: Draw, key: str, n: int, own: str) -> str:
    if key == "NDims":
        return (
            str(d.choice([0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 16, 100, 1000, -1, 2**31, 2**63]))
            if d.bool(0.8)
            else any_token(d)
        )
    if key == "DimSize":
        return number_list(d, n, integer=True)
    if key in ("ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation"):
        return number_list(d, n)
    if key in ("TransformMatrix", "Rotation", "Orientation"):
        return number_list(d, n * n)
    if key == "ElementType":
        return d.choice(MET_TYPES)
    if key in ("ElementNumberOfChannels", "HeaderSize", "CompressedDataSize"):
        return str(any_int(d)) if d.bool(0.8) else any_token(d)
    if key in ("BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData"):
        return d.choice(["True", "False", "1", "0", "yes", "", "x"])
    if key == "AnatomicalOrientation":
        return d.choice(["RAI", "LPS", "???", "RRR", "", "RAIX", "AAA"])
    if key == "ObjectType":
        return d.choice(["Image", "Mesh", "", "Tube", "Scene"])
    if key == "ElementDataFile":
        return _data_file_value(d, own)
    return any_token(d)


def metaimage_case(d: Draw, work: Path, detached: bool) -> Case:
    image, what = _small_image(d)
    compress = d.bool(0.4)
    case_dir = _prepare_dirs(work)
    name = "image.mhd" if detached else "image.mha"
    path = case_dir / name
    _write_image(image, path, compress)
    steps = [f"{what}, compressed={compress}, {name}"]
    raw = path.read_bytes()
    marker = raw.index(b"ElementDataFile")
    end = raw.index(b"\n", marker) + 1
    header_lines = raw[:end].decode("latin-1").splitlines()
    data = raw[end:]
    own = header_lines[-1].split("=", 1)[1].strip()
    n = image.GetDimension()
    for _ in range(d.int(1, 4)):
        op = d.choice(["set", "set", "set", "set", "delete", "duplicate", "insert", "swap", "data"])
        if op == "set":
            key = d.choice(MHA_KEYS)
            value = _mha_value(d, key, n, own)
            line = f"{key} = {value}"
            at = next((i for i, text in enumerate(header_lines) if text.split("=")[0].strip() == key), None)
            if at is None:
                at = len(header_lines) - 1 if d.bool(0.8) else 0
                header_lines.insert(at, line)
            else:
                header_lines[at] = line
            steps.append(f"set {line!r}")
        elif op == "delete" and len(header_lines) > 1:
            at = d.int(0, len(header_lines) - 1)
            steps.append(f"delete {header_lines.pop(at)!r}")
        elif op == "duplicate":
            at = d.int(0, len(header_lines) - 1)
            header_lines.insert(at, header_lines[at])
            steps.append(f"duplicate {header_lines[at]!r}")
        elif op == "insert":
            line = d.choice(
                ["garbage", "=", "= 5", "NDims", "Key = " + "v" * 3000, "\x01\x02", "  = 1 2 3", "K" * 300 + " = 1"]
            )
            header_lines.insert(d.int(0, len(header_lines)), line)
            steps.append(f"insert {line!r}")
        elif op == "swap" and len(header_lines) > 1:
            i, j = d.int(0, len(header_lines) - 1), d.int(0, len(header_lines) - 1)
            header_lines[i], header_lines[j] = header_lines[j], header_lines[i]
            steps.append(f"swap lines {i} and {j}")
        elif op == "data":
            if detached:
                data_path = case_dir / own
                data_path.write_bytes(_mutate_bytes(d, data_path.read_bytes(), steps, own))
            else:
                data = _mutate_bytes(d, data, steps, "inline data")
    header = ("\n".join(header_lines) + "\n").encode("latin-1", "replace")
    path.write_bytes(header + data)
    if any("LIST" in line for line in header_lines if line.startswith("ElementDataFile")):
        path.write_bytes(header + f"{own}\nmissing.raw\n../secret.raw\n".encode() + data)
    steps.append(f"header: {header[:1500]!r}")
    return Case("mhd" if detached else "mha", _read_all(path), steps, [path])


# --------------------------------------------------------------------------------------------
# NIfTI-1
# --------------------------------------------------------------------------------------------
# field -> (offset, struct format of one item, item count)
NIFTI_FIELDS: dict[str, tuple[int, str, int]] = {
    "sizeof_hdr": (0, "i", 1),
    "dim_info": (39, "B", 1),
    "dim": (40, "h", 8),
    "intent_p1": (56, "f", 1),
    "intent_code": (68, "h", 1),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "slice_start": (74, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "scl_inter": (116, "f", 1),
    "slice_end": (120, "h", 1),
    "slice_code": (122, "B", 1),
    "xyzt_units": (123, "B", 1),
    "cal_max": (124, "f", 1),
    "cal_min": (128, "f", 1),
    "slice_duration": (132, "f", 1),
    "toffset": (136, "f", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern": (256, "f", 3),
    "qoffset": (268, "f", 3),
    "srow_x": (280, "f", 4),
    "srow_y": (296, "f", 4),
    "srow_z": (312, "f", 4),
    "magic": (344, "4s", 1),
    "extension": (348, "4B", 1),
}
NIFTI_DATATYPES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 0, 1, 3, 255, -1]
NIFTI_DATATYPES += [32767, 2**15 - 1]


def _nifti_item(d: Draw, name: str, fmt: str, index: int) -> Any:
    if fmt == "4s":
        return d.choice([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"xxxx"])
    if fmt == "4B":
        return None
    if fmt == "f":
        return any_float(d)
    limits = {"h": (-(2**15), 2**15 - 1), "B": (0, 255), "i": (-(2**31), 2**31 - 1)}[fmt]
    if name == "datatype":
        return d.choice(NIFTI_DATATYPES)
    if name == "dim" and index == 0:
        value = d.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, -1, 255, 2**15 - 1, -(2**15)])
    elif name == "dim":
        value = d.choice([0, 1, 2, 3, 5, -1, 255, 4096, 32767, -(2**15)]) if d.bool(0.8) else d.int(0, 8)
    elif name == "sizeof_hdr":
        value = d.choice([348, 540, 0, -1, 1543569408, 2**31 - 1])
    else:
        value = any_int(d)
    return min(max(value, limits[0]), limits[1])


def nifti_case(d: Draw, work: Path) -> Case:
    image, what = _small_image(d)
    case_dir = _prepare_dirs(work)
    gz = d.bool(0.35)
    plain = case_dir / "plain.nii"
    _write_image(image, plain, False)
    data = bytearray(plain.read_bytes())
    plain.unlink()
    steps = [what + (", gzip" if gz else "")]
    resize: bytearray | None = None
    for _ in range(d.int(1, 4)):
        op = d.choice(["field", "field", "field", "field", "flip", "extension", "endian", "tail"])
        if op == "field":
            name = d.choice(list(NIFTI_FIELDS))
            offset, fmt, count = NIFTI_FIELDS[name]
            if fmt == "4B":  # an extension flagged, with a header that may claim any size
                size = d.choice([0, 8, 16, 17, -8, 2**31 - 8, 1000000])
                code = d.choice([0, 2, 4, 6, 40, 44])
                data[348:352] = bytes([1, 0, 0, 0])
                data[352:360] = struct.pack("<ii", size, code)
                steps.append(f"extension esize={size} ecode={code}")
                continue
            index = d.int(0, count - 1)
            value = _nifti_item(d, name, fmt, index)
            position = offset + index * struct.calcsize("<" + fmt)
            if fmt == "f":
                with np.errstate(over="ignore"):
                    value = float(np.float32(value))  # out-of-range doubles become +-inf
            struct.pack_into("<" + fmt, data, position, value)
            steps.append(f"{name}[{index}] = {value!r}")
        elif op == "flip":
            at = d.int(0, min(351, len(data) - 1))
            data[at] ^= d.int(1, 255)
            steps.append(f"flip header byte {at}")
        elif op == "extension":
            data[348:352] = bytes([d.int(0, 255), 0, 0, 0])
            steps.append(f"extension flag {data[348]}")
        elif op == "endian":  # declare big-endian by swapping sizeof_hdr only
            data[0:4] = struct.pack(">i", 348)
            steps.append("sizeof_hdr big-endian")
        elif op == "tail":  # applied after the field edits
            cut = d.int(0, len(data))
            resize = data[:cut] if d.bool() else data + bytearray(d.bytes(0, 32))
            steps.append(f"resize to {len(resize)} bytes")
    if resize is not None:
        data = resize
    payload = bytes(data)
    if gz:
        payload = gzip.compress(payload, mtime=0)
        if d.bool(0.2):
            payload = _mutate_bytes(d, payload, steps, "gzip stream")
    path = case_dir / ("image.nii.gz" if gz else "image.nii")
    path.write_bytes(payload)
    steps.append(f"header: {bytes(data[:352]).hex()}")
    return Case("nifti", _read_all(path), steps, [path])


# --------------------------------------------------------------------------------------------
# NRRD (.nrrd / .nhdr)
# --------------------------------------------------------------------------------------------
NRRD_TYPES = ["signed char", "uchar", "short", "ushort", "int", "uint", "longlong", "ulonglong", "float", "double"]
NRRD_TYPES += ["block", "int8", "uint8_t", "float32", "", "complex"]
NRRD_KEYS = ["type", "dimension", "sizes", "space", "space dimension", "space directions", "space origin", "kinds"]
NRRD_KEYS += ["endian", "encoding", "data file", "byte skip", "line skip", "block size", "spacings", "thicknesses"]
NRRD_KEYS += ["axis mins", "axis maxs", "centerings", "units", "space units", "measurement frame", "labels", "min"]
NRRD_KEYS += ["old min", "content", "sample units"]


def _vector(d: Draw, n: int) -> str:
    if d.bool(0.1):
        return "none"
    count = n if d.bool(0.8) else d.int(0, 5)
    return "(" + ",".join(repr(any_float(d) if d.bool(0.4) else d.int(-3, 3) / 2) for _ in range(count)) + ")"


def _nrrd_value(d: Draw, key: str, n: int, own: str) -> str:
    if key == "type":
        return d.choice(NRRD_TYPES)
    if key in ("dimension", "space dimension", "byte skip", "line skip", "block size"):
        return str(d.choice([0, 1, 2, 3, 4, 5, 10, 16, 17, 100, -1, 2**31, 2**63])) if d.bool(0.8) else any_token(d)
    if key == "sizes":
        return number_list(d, n, integer=True)
    if key in ("space directions", "measurement frame"):
        return " ".join(_vector(d, n) for _ in range(n if d.bool(0.8) else d.int(0, 5)))
    if key == "space origin":
        return _vector(d, n)
    if key == "space":
        return d.choice(["left-posterior-superior", "right-anterior-superior", "3D-right-handed", "scanner-xyz", "x"])
    if key == "endian":
        return d.choice(["little", "big", "middle", ""])
    if key == "encoding":
        return d.choice(["raw", "gzip", "gz", "bzip2", "ascii", "text", "hex", "zrl", "none", ""])
    if key == "data file":
        return _data_file_value(d, own)
    if key == "kinds":
        return " ".join(d.choice(["domain", "space", "list", "RGB-color", "3-vector", "none", "???"]) for _ in range(n))
    if key in ("spacings", "thicknesses", "axis mins", "axis maxs"):
        return number_list(d, n)
    return any_token(d)


def nrrd_case(d: Draw, work: Path, detached: bool) -> Case:
    image, what = _small_image(d)
    compress = d.bool(0.4)
    case_dir = _prepare_dirs(work)
    name = "image.nhdr" if detached else "image.nrrd"
    path = case_dir / name
    _write_image(image, path, compress)
    raw = path.read_bytes()
    split = raw.index(b"\n\n") + 1 if not detached else len(raw)
    header_lines = raw[:split].decode("latin-1").splitlines()
    data = raw[split + 1 :] if not detached else b""
    own = next((line.split(":", 1)[1].strip() for line in header_lines if line.startswith("data file:")), "")
    n = image.GetDimension()
    steps = [f"{what}, compressed={compress}, {name}"]
    for _ in range(d.int(1, 4)):
        op = d.choice(["set", "set", "set", "set", "delete", "duplicate", "insert", "magic", "data"])
        if op == "set":
            key = d.choice(NRRD_KEYS)
            line = f"{key}: {_nrrd_value(d, key, n, own or 'image.raw')}"
            at = next((i for i, text in enumerate(header_lines) if text.split(":")[0] == key), None)
            if at is None:
                header_lines.insert(d.int(1, len(header_lines)), line)
            else:
                header_lines[at] = line
            steps.append(f"set {line!r}")
        elif op == "delete" and len(header_lines) > 1:
            steps.append(f"delete {header_lines.pop(d.int(1, len(header_lines) - 1))!r}")
        elif op == "duplicate":
            at = d.int(0, len(header_lines) - 1)
            header_lines.insert(at, header_lines[at])
            steps.append(f"duplicate {header_lines[at]!r}")
        elif op == "insert":
            line = d.choice(["garbage", ":", "key:=value", "a: ", "#" * 3000, "\x01", "sizes:", "type: short short"])
            header_lines.insert(d.int(1, len(header_lines)), line)
            steps.append(f"insert {line!r}")
        elif op == "magic":
            header_lines[0] = d.choice(["NRRD0001", "NRRD0005", "NRRD0009", "NRRD", "NRRD00041", "nrrd0004", ""])
            steps.append(f"magic {header_lines[0]!r}")
        elif op == "data":
            if detached and own:
                data_path = case_dir / own
                if data_path.is_file():
                    data_path.write_bytes(_mutate_bytes(d, data_path.read_bytes(), steps, own))
            else:
                data = _mutate_bytes(d, data, steps, "inline data")
    header = ("\n".join(header_lines) + "\n").encode("latin-1", "replace")
    payload = header + (b"\n" + data if not detached else b"")
    if any(line.startswith("data file: LIST") for line in header_lines):
        payload = header + f"{own}\nmissing.raw\n../secret.raw\n".encode()
    path.write_bytes(payload)
    steps.append(f"header: {header[:1500]!r}")
    return Case("nrrd", _read_all(path), steps, [path])


# --------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (data is not JPEG)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.3.4.5.6",  # unknown
    "",
]


def _dicom_value(d: Draw, keyword: str) -> Any:
    us = lambda: d.choice([0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 24, 32, 64, 255, 4096, 65535])  # noqa: E731
    if keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel"):
        return us()
    if keyword in ("PixelRepresentation", "PlanarConfiguration"):
        return d.choice([0, 1, 2, 255])
    if keyword == "PhotometricInterpretation":
        return d.choice(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "XYZ", ""])
    if keyword in ("ImagePositionPatient", "PixelSpacing", "ImageOrientationPatient"):
        n = {"ImagePositionPatient": 3, "PixelSpacing": 2, "ImageOrientationPatient": 6}[keyword]
        count = n if d.bool(0.7) else d.int(0, 8)
        pool = ["0", "1", "-1", "0.5", "nan", "inf", "-inf", "1e308", "-1e308", "1e-30", "abc", "", "1e999", "7"]
        return [d.choice(pool) for _ in range(count)]
    if keyword in ("SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept"):
        return d.choice(["0", "-1", "nan", "inf", "1e308", "abc", "", "2.5", "1e-300"])
    if keyword in ("NumberOfFrames", "InstanceNumber", "SeriesNumber"):
        return d.choice(["0", "1", "2", "3", "1000", "2147483647", "99999999999", "-1", "x", ""])
    if keyword in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        return d.choice(["1.2.3", "", "1.2.3.4.5.6.7", "x" * 64, "0.0", "1..2"])
    if keyword == "SeriesDescription":
        return d.choice(["", "../../etc", "a/b\\c", "x" * 64, "\u00e9t\u00e9", "T2 sag"])
    return any_token(d)


DICOM_KEYWORDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel"]
DICOM_KEYWORDS += ["PixelRepresentation", "PlanarConfiguration", "PhotometricInterpretation", "ImagePositionPatient"]
DICOM_KEYWORDS += ["ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices"]
DICOM_KEYWORDS += ["RescaleSlope", "RescaleIntercept", "NumberOfFrames", "InstanceNumber", "SeriesNumber"]
DICOM_KEYWORDS += ["SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"]
DICOM_KEYWORDS += ["SeriesDescription"]


def _dicom_dataset(index: int, rows: int, columns: int, signed: bool, series_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{index + 1}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.100"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.300"
    ds.PatientName = PHI_MARKERS[0]
    ds.PatientID = PHI_MARKERS[1]
    ds.PatientBirthDate = PHI_MARKERS[2]
    ds.OtherPatientIDs = PHI_MARKERS[1]
    ds.Modality = "MR"
    ds.SeriesDescription = "fuzz series"
    ds.SeriesNumber = 7
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.8, 0.9]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    dtype = np.int16 if signed else np.uint16
    ds.PixelData = (np.arange(rows * columns, dtype=np.int64) % 251 + index).astype(dtype).tobytes()
    return ds


def write_dicom_series(directory: Path, slices: int = 3, rows: int = 6, columns: int = 5) -> list[Path]:
    """A small valid MR series (with the PHI markers as patient identifiers)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(slices):
        ds = _dicom_dataset(index, rows, columns, False, "1.2.826.0.1.3680043.8.498.200")
        path = directory / f"slice{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _set_tag(ds: Any, keyword: str, value: Any) -> None:
    """Set a tag even to a value its VR cannot hold (then written as text, as a broken file would be)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    try:
        setattr(ds, keyword, value)
    except (ValueError, TypeError, OverflowError):
        text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
        ds[tag_for_keyword(keyword)] = DataElement(tag_for_keyword(keyword), "LO", text)


def dicom_case(d: Draw, work: Path) -> Case:
    from pydicom import config

    config.settings.writing_validation_mode = config.IGNORE
    config.settings.reading_validation_mode = config.IGNORE
    case_dir = _prepare_dirs(work)
    slices, rows, columns, signed = d.int(1, 4), d.int(1, 6), d.int(1, 6), d.bool()
    steps = [f"series of {slices} slices {rows}x{columns}, signed={signed}"]
    datasets = [_dicom_dataset(i, rows, columns, signed, "1.2.826.0.1.3680043.8.498.200") for i in range(slices)]
    for _ in range(d.int(1, 4)):
        scope = list(range(slices)) if d.bool() else [d.int(0, slices - 1)]
        op = d.choice(["set", "set", "set", "delete", "pixels", "syntax"])
        if op == "set":
            keyword = d.choice(DICOM_KEYWORDS)
            value = _dicom_value(d, keyword)
            for i in scope:
                _set_tag(datasets[i], keyword, value)
            steps.append(f"slices {scope}: {keyword} = {value!r}")
        elif op == "delete":
            keyword = d.choice([*DICOM_KEYWORDS, "PixelData"])
            for i in scope:
                if keyword in datasets[i]:
                    delattr(datasets[i], keyword)
            steps.append(f"slices {scope}: delete {keyword}")
        elif op == "pixels":
            size = d.choice([0, 1, 2, 3, rows * columns, rows * columns * 2 - 1, rows * columns * 4, 100000])
            for i in scope:
                datasets[i].PixelData = bytes(size)
            steps.append(f"slices {scope}: PixelData of {size} bytes")
        elif op == "syntax":
            uid = d.choice(TRANSFER_SYNTAXES)
            for i in scope:
                datasets[i].file_meta.TransferSyntaxUID = uid
            steps.append(f"slices {scope}: transfer syntax {uid!r}")
    paths = []
    for i, ds in enumerate(datasets):
        path = case_dir / f"slice{i:03d}.dcm"
        buffer = io.BytesIO()
        try:
            syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            implicit = syntax == "1.2.840.10008.1.2"
            ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        except Exception as error:  # pydicom refuses some values; keep the file as pydicom's best effort
            steps.append(f"slice {i}: pydicom could not write ({type(error).__name__}); raw fallback")
            buffer = io.BytesIO(b"\0" * 128 + b"DICM" + d.bytes(0, 64))
        data = buffer.getvalue()
        if d.bool(0.15):
            data = _mutate_bytes(d, data, steps, path.name)
        path.write_bytes(data)
        paths.append(path)
    target: Path = case_dir if d.bool(0.6) else d.choice(paths)
    steps.append(f"read {target.name}")
    return Case("dicom", _read_all(target), steps, paths)


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------
_MODEL_CACHE: dict[str, bytes] = {}


def tiny_model_bytes(architecture: str = "unet") -> bytes:
    """A valid, tiny model file (cached per process)."""
    if architecture not in _MODEL_CACHE:
        import tempfile

        import torch

        from napari_spineseg.modelfile import ModelMetadata, save_model
        from napari_spineseg.models import build_model

        torch.manual_seed(0)
        kwargs = {"base": 2, "depth": 1} if architecture in ("unet", "unet-leaky", "attention-unet", "resunet") else {}
        network = build_model(architecture, in_channels=1, num_classes=5, **kwargs)
        metadata = ModelMetadata(
            "tiny",
            architecture,
            network.arch_kwargs,
            preprocess={"pixel_spacing_mm": 1.0},
            training={"saved": "2024-01-01T00:00:00+00:00"},
        )
        with tempfile.TemporaryDirectory() as temp:
            path = save_model(network, metadata, Path(temp) / "tiny.safetensors")
            _MODEL_CACHE[architecture] = path.read_bytes()
    return _MODEL_CACHE[architecture]


def json_value(d: Draw, depth: int = 0) -> Any:
    kind = d.choice(["null", "bool", "int", "float", "str", "list", "dict"] if depth < 3 else ["int", "str", "null"])
    if kind == "null":
        return None
    if kind == "bool":
        return d.bool()
    if kind == "int":
        return any_int(d)
    if kind == "float":
        return any_float(d)
    if kind == "str":
        return d.choice([*TEXT_POOL, "unet", "axial", "../../x", "/etc/passwd", "C:\\x", "a" * 10000])
    if kind == "list":
        return [json_value(d, depth + 1) for _ in range(d.int(0, 4))]
    return {d.choice(["a", "name", "value", "", "__class__"]): json_value(d, depth + 1) for _ in range(d.int(0, 3))}


BOMB = "__BOMB__"


def _bomb(d: Draw) -> str:
    depth = d.choice([100, 5000, 100000, 1000000])
    return "[" * depth + "]" * depth if d.bool() else '{"a":' * depth + "1" + "}" * depth


def _mutate_record(d: Draw, record: dict[str, Any], steps: list[str]) -> None:
    op = d.choice(["field", "arch", "kwargs", "classes", "specific", "delete", "bomb"])
    if op == "field":
        key = d.choice([*record, "extra_key"])
        record[key] = json_value(d)
        steps.append(f"record[{key!r}] = {str(record[key])[:200]}")
    elif op == "arch":
        record["architecture"] = d.choice(
            [
                {"name": d.choice(["unet", "unknown", "fcn-resnet50", "penn", "lesion-classifier", ""]), "kwargs": {}},
                "unet",
                None,
                [],
                {"name": "unet"},
                {"kwargs": {}},
                {"name": "os.system", "kwargs": {"command": "touch /tmp/pwned"}},
            ]
        )
        steps.append(f"architecture = {record['architecture']!r}")
    elif op == "kwargs":
        arch = record.get("architecture")
        if not (isinstance(arch, dict) and isinstance(arch.get("kwargs"), dict)):
            return
        kwargs = arch["kwargs"]
        key = d.choice(["base", "depth", "dropout", "in_channels", "num_classes", "attention", "variant", "bogus"])
        value = d.choice([10**9, 10**6, 2**63, -1, 0, 1, 1.5, "x", True, None, [], [1, 2], math.nan, 64, 7])
        kwargs[key] = value
        steps.append(f"architecture.kwargs[{key!r}] = {value!r}")
    elif op == "classes":
        choice = d.int(0, 7)
        if choice == 0:
            record["classes"] = []
        elif choice == 1:
            record["classes"] = [{"value": i, "name": f"c{i}", "color": [0.5, 0.5, 0.5]} for i in range(100000)]
        elif choice == 2:
            record["classes"] = [{"value": 0, "name": "bg", "color": [0, 0, 0]}] * 3
        elif choice == 3:
            record["classes"] = "background"
        else:
            classes = record.get("classes") if isinstance(record.get("classes"), list) else []
            if classes:
                item = dict(classes[d.int(0, len(classes) - 1)]) if isinstance(classes[0], dict) else {}
                key = d.choice(["value", "name", "color", "extra"])
                item[key] = json_value(d)
                classes[d.int(0, len(classes) - 1)] = item
                steps.append(f"class field {key} = {str(item[key])[:100]}")
        steps.append(f"classes mutation {choice}")
    elif op == "specific":
        key = d.choice(["context_slices", "planes", "plane_weights", "preprocess", "postprocess", "format_version"])
        values = {
            "context_slices": [-1, 9, 8, 10**9, "2", 1.5, None],
            "planes": [[], ["axial", "axial"], ["oblique"], "axial", [1], None],
            "plane_weights": [{"axial": "x"}, {"axial": math.inf}, {"x": 1}, [], {"axial": None}],
            "preprocess": [
                {"pixel_spacing_mm": 1e-6},
                {"pixel_spacing_mm": 0.01},
                {"pixel_spacing_mm": 1e9},
                {"pixel_spacing_mm": -1},
                {"pixel_spacing_mm": None},
                {"clahe": True, "clahe_kernel_mm": 1e-9},
                {"gaussian_sigma_mm": 1e9},
                {"bogus": 1},
                "x",
                {"lower_percentile": 50, "upper_percentile": 40},
            ],
            "postprocess": [
                {"per_class": {"1": {"min_component_mm3": -1}}},
                {"per_class": {"x": {}}},
                {"per_class": {"1": {"closing_mm": 1e9}}},
                {"bogus": 1},
                [],
                {"per_class": {"99999": {"fill_holes": True}}},
            ],
            "format_version": [0, 2, "1", None, 1.0, 10**30],
        }[key]
        record[key] = d.choice(values)
        steps.append(f"record[{key!r}] = {str(record[key])[:200]}")
    elif op == "delete" and record:
        key = d.choice(list(record))
        del record[key]
        steps.append(f"delete record[{key!r}]")
    elif op == "bomb":
        key = d.choice(["training", "extra", "metrics", "description"])
        record[key] = BOMB
        steps.append(f"record[{key!r}] = JSON bomb")


def _mutate_table(d: Draw, table: dict[str, Any], steps: list[str]) -> None:
    names = [k for k in table if k != "__metadata__"]
    op = d.choice(["dtype", "shape", "offsets", "delete", "add", "rename", "entry"])
    name = d.choice(names) if names else "x"
    entry = table.get(name) if isinstance(table.get(name), dict) else {}
    if op == "dtype":
        entry["dtype"] = d.choice(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X", 3, None, "F32"])
        steps.append(f"{name}.dtype = {entry['dtype']!r}")
    elif op == "shape":
        entry["shape"] = d.choice(
            [[10**6, 10**6, 10**3], [2**62, 4], [-1], [], ["a"], 2**63, [0], [[1]], [1] * 64, [2**64], None]
        )
        steps.append(f"{name}.shape = {entry['shape']!r}")
    elif op == "offsets":
        end = d.choice([0, 1, 4, 2**40, 2**64 - 1, -1])
        entry["data_offsets"] = d.choice([[0, end], [end, 0], [-1, 4], [0], "x", [0, 4, 8], None, [2**63, 2**63 + 4]])
        steps.append(f"{name}.data_offsets = {entry['data_offsets']!r}")
    elif op == "delete" and names:
        del table[name]
        steps.append(f"delete tensor {name}")
    elif op == "add":
        table[d.choice(["extra", "../../evil", name + ".x", ""])] = {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [0, 4],
        }
        steps.append("add a tensor entry")
    elif op == "rename" and names:
        table[d.choice(["../../" + name, name.upper(), "/abs"])] = table.pop(name)
        steps.append(f"rename tensor {name}")
    elif op == "entry":
        table[name] = json_value(d)
        steps.append(f"{name} = {str(table[name])[:100]}")
    if op in ("dtype", "shape", "offsets") and name in table:
        table[name] = entry


def model_case(d: Draw, work: Path) -> Case:
    case_dir = _prepare_dirs(work)
    arch = "unet" if d.bool(0.85) else d.choice(["penn", "unet-leaky"])
    raw = tiny_model_bytes(arch)
    length = struct.unpack("<Q", raw[:8])[0]
    table = json.loads(raw[8 : 8 + length])
    body = raw[8 + length :]
    record = json.loads(table["__metadata__"]["spineseg"])
    steps = [f"tiny {arch} model"]
    bombs: list[str] = []
    prefix: int | None = None
    for _ in range(d.int(1, 3)):
        op = d.choice(["record", "record", "record", "table", "metadata", "prefix", "body"])
        if op == "record":
            _mutate_record(d, record, steps)
        elif op == "table":
            _mutate_table(d, table, steps)
        elif op == "metadata":
            choice = d.int(0, 5)
            table["__metadata__"] = [
                None,
                "x",
                {"spineseg": 5},
                {"spineseg": "{not json"},
                {"other": "1"},
                {"spineseg": BOMB},
            ][choice]
            steps.append(f"__metadata__ variant {choice}")
        elif op == "prefix":
            prefix = d.choice([0, 1, 7, length - 1, length + 1, 2**63, 2**64 - 1, 50_000_001, len(raw)])
            steps.append(f"length prefix {prefix}")
        elif op == "body":
            body = _mutate_bytes(d, body, steps, "tensor data")
    meta = table.get("__metadata__")
    if isinstance(meta, dict) and isinstance(meta.get("spineseg"), str) and meta["spineseg"] != BOMB:
        meta["spineseg"] = json.dumps(record)
    text = json.dumps(table)
    if BOMB in text:
        bomb = _bomb(d)
        bombs.append(f"bomb of {len(bomb)} characters")
        # Inside the metadata string the bomb is escaped JSON text; as the string itself, a JSON string.
        text = text.replace('\\"__BOMB__\\"', json.dumps(bomb)[1:-1]).replace('"__BOMB__"', json.dumps(bomb))
    steps += bombs
    encoded = text.encode()
    header_length = len(encoded) if prefix is None else prefix
    path = case_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", header_length % 2**64) + encoded + body)
    steps.append(f"header: {encoded[:1500]!r}")
    deep = d.bool(0.5)
    models_dir = case_dir

    def run() -> Any:
        from napari_spineseg.errors import SpinesegError
        from napari_spineseg.modelfile import list_models, load_model, read_metadata

        first: SpinesegError | None = None
        with environment(SPINESEG_MODEL_DIR=str(models_dir)):
            infos = list_models()
            for info in infos:
                if info.error and ("\n" in info.error or _leaks_phi(info.error)):
                    raise AssertionError(f"unclear listing error: {info.error!r}")
        try:
            read_metadata(path)
        except SpinesegError as error:
            first = error
        try:
            loaded = load_model(path)
        except SpinesegError as error:
            raise (first or error) from None
        if deep:
            from napari_spineseg.inference import Predictor, SegmentationSettings
            from napari_spineseg.volume import Volume

            volume = Volume.from_array(np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), spacing=(1, 1, 2))
            predictor = Predictor(SegmentationSettings(device="cpu", precision="fp32", batch_size=4))
            predictor.load(loaded)
            predictor.predict(volume)
        if first is not None:
            raise first
        return loaded.metadata.name

    return Case("model", run, steps, [path])


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def _cli_fixtures(case_dir: Path) -> dict[str, str]:
    """Small files the generated command lines point at."""
    import SimpleITK as sitk

    array = (np.arange(6 * 7 * 8) % 13).astype(np.float32).reshape(6, 7, 8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(case_dir / "study.nii.gz"))
    labels = sitk.GetImageFromArray((array > 6).astype(np.uint8))
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(case_dir / "study_seg.nii.gz"))
    other = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8))
    sitk.WriteImage(other, str(case_dir / "other.mha"))
    (case_dir / "model.safetensors").write_bytes(tiny_model_bytes())
    models = case_dir / "models"
    models.mkdir(exist_ok=True)
    (models / "mine.safetensors").write_bytes(tiny_model_bytes())
    (models / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (case_dir / "garbage.nii.gz").write_bytes(b"not an image" * 10)
    (case_dir / "empty.mha").write_bytes(b"")
    (case_dir / "evil.pt").write_bytes(b"\x80\x04K\x01.")
    (case_dir / "emptydir").mkdir(exist_ok=True)
    (case_dir / "out").mkdir(exist_ok=True)
    write_dicom_series(case_dir / "dicom", slices=3, rows=6, columns=5)
    files = {
        "study": "study.nii.gz",
        "labels": "study_seg.nii.gz",
        "other": "other.mha",
        "model": "model.safetensors",
        "garbage": "garbage.nii.gz",
        "empty": "empty.mha",
        "pickle": "evil.pt",
        "emptydir": "emptydir",
        "dicom": "dicom",
        "missing": "missing.nii.gz",
        "outdir": "out",
        "outfile": "out/result_seg.nii.gz",
        "outmha": "out/result.mha",
        "outtxt": "out/result.txt",
        "newdir": "new/deeper/",
        "devnull": "/dev/null",
        "proc": "/proc/version",
        "nul": "a\x00b.nii.gz",
        "long": "x" * 5000 + ".nii.gz",
        "dash": "-",
        "blank": "",
        "traversal": "../../../../etc/passwd",
        "modelname": "mine",
        "badname": "../mine",
        "brokenname": "broken",
        "unknownname": "nobody",
    }
    return {
        k: v
        if v.startswith("/") or k in ("nul", "long", "dash", "blank", "traversal") or "name" in k
        else str(case_dir / v)
        for k, v in files.items()
    }


def _cli_argv(d: Draw, files: dict[str, str]) -> list[str]:
    def path(*kinds: str) -> str:
        return files[d.choice(kinds)] if kinds else files[d.choice(list(files))]

    def junk() -> str:
        return d.choice([*TEXT_POOL, "-1", "0", "1", "2", "1000000000", "--json", "-o"])

    inputs = ("study", "dicom", "garbage", "empty", "emptydir", "missing", "other", "devnull", "nul", "long")
    command = d.choice(["info", "segment", "segment", "models", "evaluate", "train", "finetune", "nonsense", ""])
    argv: list[str] = []
    if d.bool(0.2):
        argv.append(d.choice(["-v", "--verbose", "--version", "-h", "--bogus"]))
    argv.append(command)
    if command == "info":
        argv += [path(*inputs, "labels", "proc", "traversal") for _ in range(d.int(0, 3))]
        if d.bool():
            argv.append("--json")
    elif command == "segment":
        argv += [path(*inputs) for _ in range(d.int(0, 2))]
        options = {
            "-o": lambda: path("outdir", "outfile", "outmha", "outtxt", "newdir", "devnull", "nul", "long", "proc"),
            "--model": lambda: path(
                "model",
                "modelname",
                "badname",
                "brokenname",
                "unknownname",
                "pickle",
                "garbage",
                "missing",
                "nul",
                "blank",
            ),
            "--planes": lambda: d.choice(["axial", "coronal,sagittal", "axial,axial", "", "transverse", ",", junk()]),
            "--fusion": lambda: d.choice(["mean", "weighted", "vote", "max"]),
            "--device": lambda: d.choice(["cpu", "auto", "cuda", "mps", "cuda:7", "tpu", ""]),
            "--precision": lambda: d.choice(["auto", "fp32", "bf16", "fp16", "fp8"]),
            "--batch-size": lambda: d.choice(["1", "2", "16", "0", "-1", "1000000", "x"]),
            "--uncertainty": lambda: path("outfile", "outmha", "outtxt", "outdir", "nul"),
            "--uncertainty-mode": lambda: d.choice(["disagreement", "entropy", "variance"]),
        }
        for option in options:
            if d.bool(0.35):
                argv += [option, options[option]()]
        argv += [flag for flag in ("--no-postprocess", "-q") if d.bool(0.3)]
        if "--model" not in argv and d.bool(0.9):
            argv += ["--model", files["model"]]  # the bundled model is slow; prefer the tiny one
        if "--device" not in argv:
            argv += ["--device", "cpu"]
    elif command == "models":
        if d.bool():
            argv.append("--json")
    elif command == "evaluate":
        argv += [path("labels", "study", "other", "garbage", "missing", "empty", "dicom") for _ in range(d.int(0, 3))]
        if d.bool():
            argv += ["--classes", d.choice(["1", "1,2", "", "x", "-1", "1,,2", "99999999999999999999", junk()])]
        if d.bool():
            argv += ["--span-axis", d.choice(["auto", "none", "0", "1", "2", "3", "-1", "x"])]
        argv += [flag for flag in ("--json", "--no-surface") if d.bool(0.4)]
    elif command == "train":
        # Only argument combinations that fail before training starts (a real run takes minutes).
        argv += ["--phantoms", d.choice(["0", "-1", "x", "0"])]
        if d.bool(0.7):
            argv += ["--data", path("emptydir", "missing", "garbage", "study", "devnull", "nul", "dicom")]
        argv += ["-o", path("outfile", "outtxt", "outdir", "nul", "long") if d.bool(0.8) else files["model"]]
        for option, values in (
            ("--recipe", ["default", "nonsense", "", "fast"]),
            ("--steps", ["1", "0", "-1", "x"]),
            ("--val-fraction", ["0.2", "1.5", "-1", "nan"]),
            ("--fold", ["0", "5", "-1"]),
            ("--folds", ["0", "1", "3"]),
            ("--planes", ["axial", "x", ""]),
            ("--crop", ["16", "0", "-4"]),
            ("--resume", [files["garbage"], files["missing"], files["model"]]),
        ):
            if d.bool(0.3):
                argv += [option, d.choice(values)]
    elif command == "finetune":
        argv += ["--model", path("model", "modelname", "badname", "pickle", "missing", "garbage")]
        for _ in range(d.int(0, 2)):
            argv += ["--image", path("study", "other", "garbage", "missing", "dicom", "nul")]
        for _ in range(d.int(0, 2)):
            argv += ["--labels", path("labels", "other", "study", "garbage", "missing")]
        argv += ["-o", d.choice([files["outfile"], files["badname"], "new-name", files["outtxt"], files["nul"]])]
        for option, values in (
            ("--steps", ["1", "0", "-1", "x"]),
            ("--crop", ["16", "0", "-8"]),
            ("--batch-size", ["1", "0", "-1"]),
            ("--lr", ["1e-4", "nan", "-1", "inf"]),
            ("--class-name", ["5=new", "x", "0=background", "=", "70000=big"]),
            ("--replay-fraction", ["0.3", "2", "-1", "nan"]),
            ("--device", ["cpu", "cuda", "tpu"]),
        ):
            if d.bool(0.3):
                argv += [option, d.choice(values)]
        if "--steps" not in argv:
            argv += ["--steps", d.choice(["0", "-1", "x"])]
    else:
        argv += [junk() for _ in range(d.int(0, 3))]
    if d.bool(0.1):
        argv.insert(d.int(0, len(argv)), junk())
    return argv


def cli_case(d: Draw, work: Path) -> Case:
    case_dir = _prepare_dirs(work)
    files = _cli_fixtures(case_dir)
    argv = _cli_argv(d, files)
    steps = [f"argv: {argv!r}"[:3000]]

    def run() -> Any:
        from napari_spineseg.cli import main

        with environment(SPINESEG_MODEL_DIR=str(case_dir / "models")):
            return main(argv)

    return Case("cli", run, steps, [], cli=True)


# --------------------------------------------------------------------------------------------
# Output paths of the command line (red-team issue #18)
# --------------------------------------------------------------------------------------------
def paths_case(d: Draw, work: Path) -> Case:
    """``segment`` with outputs drawn among the inputs, a source series' slices and folder, a manual
    label file, each other and odd names.  Property: no file that existed before changes (the manual
    label file, or any file not a study, may with ``--overwrite``), and one run never writes one output
    path twice."""
    case_dir = _prepare_dirs(work)
    files = _cli_fixtures(case_dir)
    (case_dir / "twin").mkdir()
    shutil.copy(files["study"], case_dir / "twin" / "study.nii.gz")  # same name, other folder
    dicom = case_dir / "dicom"
    names = {
        "study": files["study"],
        "twin": str(case_dir / "twin" / "study.nii.gz"),
        "other": files["other"],
        "dicom": str(dicom),
        "slice": str(dicom / "slice001.dcm"),
        "manual": files["labels"],  # study_seg.nii.gz: the user's label map beside the study
        "outdir": files["outdir"],
        "outfile": files["outfile"],
        "png": str(case_dir / "x.png"),
        "dcmnew": str(dicom / "new.dcm"),
        "dcmout": str(case_dir / "out" / "seg.dcm"),
    }
    inputs = [names[d.choice(["study", "twin", "other", "dicom", "slice"])] for _ in range(d.int(1, 3))]
    argv = ["segment", *inputs, "--model", files["model"], "--device", "cpu", "-q"]
    targets = [*names.values(), *inputs]
    for option, chance in (("-o", 0.8), ("--uncertainty", 0.4), ("--dicom-seg", 0.2)):
        if d.bool(chance):
            argv += [option, d.choice(targets) if d.bool(0.7) else d.choice(argv[1 : len(inputs) + 1])]
    overwrite = d.bool(0.2)
    if overwrite:
        argv.append("--overwrite")
    before = {p: p.read_bytes() for p in case_dir.rglob("*") if p.is_file()}
    steps = [f"argv: {argv!r}"]

    def run() -> Any:
        from napari_spineseg import io as sio
        from napari_spineseg.cli import main

        written: list[str] = []
        write = sio.atomic_path

        def recording(destination):  # every final rename of this run
            written.append(os.path.realpath(destination))
            return write(destination)

        sio.atomic_path = recording
        try:
            with environment(SPINESEG_MODEL_DIR=str(case_dir / "models")):
                status = main(argv)
        finally:
            sio.atomic_path = write
        changed = [p for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
        if overwrite:  # the user insists: only the studies themselves stay protected
            studies = {os.path.realpath(i) for i in inputs} | {os.path.realpath(dicom)}
            changed = [p for p in changed if {os.path.realpath(p), os.path.realpath(p.parent)} & studies]
        if changed:
            raise AssertionError(f"files that existed before were changed: {[p.name for p in changed]}")
        finals = [w for w in written if ".part" not in os.path.basename(w)]
        if len(finals) != len(set(finals)):
            raise AssertionError(f"one output path written twice: {sorted(finals)}")
        return status

    return Case("paths", run, steps, [], cli=True)


# --------------------------------------------------------------------------------------------
# Red-team families (issue #18): DICOM series geometry and NIfTI geometry header fields.
# These cases also carry an oracle: a read that succeeds must not be silently wrong.
# --------------------------------------------------------------------------------------------
GEOMETRY_ORIENTATIONS = {
    "axial": (1, 0, 0, 0, 1, 0),
    "sagittal": (0, 1, 0, 0, 0, -1),
    "coronal": (1, 0, 0, 0, 0, -1),
    "oblique": (1, 0, 0, 0, math.cos(0.3), math.sin(0.3)),
}
GEOMETRY_EDITS = ["gap", "uneven", "duplicate", "same-file", "equal", "tilt", "localizer", "shear"]
GEOMETRY_EDITS += ["no-position", "no-orientation", "no-spacing", "long-orientation", "seg", "one-slice-series"]


def _slice_pixels(index: int, rows: int, columns: int) -> np.ndarray:
    return (np.arange(rows * columns, dtype=np.uint16) + 100 * (index + 1)).reshape(rows, columns)


def _check_dicom_grid(volumes: list[Any], files: list[Path]) -> None:
    """Oracle: every slice of a volume read without resampling is a source slice at the position,
    orientation and pixel spacing the volume's geometry gives it."""
    import pydicom

    sources = []
    for path in files:
        with contextlib.suppress(Exception):
            ds = pydicom.dcmread(path, force=True)
            sources.append(ds)
    for volume in volumes:
        if volume.metadata.get("resampled"):
            continue
        geometry = volume.geometry
        matrix = geometry.direction_matrix
        for k in range(volume.shape[0]):
            where = geometry.index_to_lps([[0, 0, k]])[0]
            match = False
            for ds in sources:
                try:
                    position = np.asarray([float(v) for v in ds.ImagePositionPatient])
                    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
                    pixels = ds.pixel_array
                except Exception:
                    continue
                spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
                match = (
                    np.allclose(position, where, atol=0.05)
                    and np.allclose(orientation, np.r_[matrix[:, 0], matrix[:, 1]], atol=1e-3)
                    and np.allclose(spacing[::-1], geometry.spacing[:2], rtol=1e-4)
                    and pixels.shape == volume.shape[1:]
                    and np.array_equal(pixels, volume.array[k])
                )
                if match:
                    break
            if not match:
                raise AssertionError(f"slice {k} of {volume.name} lies on no source slice: a silently wrong grid")


def dicom_geometry_case(d: Draw, work: Path) -> Case:
    """A small MR series (3-6 slices, any of four orientations) with 1-3 geometry edits (a gap,
    uneven or duplicate positions, a tilted slice, a localizer, an in-plane shift, missing position,
    orientation or pixel spacing, a DICOM-SEG or a one-slice series beside it)."""
    from pydicom import config

    config.settings.writing_validation_mode = config.IGNORE
    case_dir = _prepare_dirs(work)
    count, rows, columns = d.int(3, 6), d.int(2, 4), d.int(2, 4)
    name = d.choice(list(GEOMETRY_ORIENTATIONS))
    orientation = np.asarray(GEOMETRY_ORIENTATIONS[name], dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    step = d.choice([0.5, 1.0, 2.5, 4.0])
    origin = np.asarray([d.choice([0.0, -20.5, 13.25]), 7.0, -3.5])
    steps = [f"{name} series of {count} slices {rows}x{columns}, {step} mm apart"]
    slices: list[dict[str, Any]] = [
        {"position": origin + k * step * normal, "orientation": orientation.copy(), "series": "200", "index": k}
        for k in range(count)
    ]
    for _ in range(d.int(1, 3)):
        edit = d.choice(GEOMETRY_EDITS)
        k = d.int(1, len(slices) - 1) if len(slices) > 1 else 0
        if edit == "gap" and len(slices) > 2:
            del slices[d.int(1, len(slices) - 2)]
        elif edit == "uneven":
            slices[k]["position"] = slices[k]["position"] + d.choice([0.3, -0.7, 1.1]) * normal
        elif edit in ("duplicate", "equal"):
            copy = dict(slices[k], index=len(slices) + 10)
            if edit == "equal":
                copy["position"] = slices[0]["position"]
            slices.append(copy)
        elif edit == "same-file":
            slices.append(dict(slices[k], same_as=slices[k]["index"]))
        elif edit == "tilt":
            angle = d.choice([0.01, 0.05, 0.2])
            slices[k]["orientation"] = np.r_[orientation[:3], np.cos(angle) * orientation[3:] + np.sin(angle) * normal]
        elif edit == "localizer":
            other = GEOMETRY_ORIENTATIONS[d.choice([n for n in GEOMETRY_ORIENTATIONS if n != name])]
            slices.append({"position": origin, "orientation": np.asarray(other, float), "index": 50, "series": "200"})
        elif edit == "shear":
            slices[k]["position"] = slices[k]["position"] + d.choice([0.2, 1.0, 5.0]) * orientation[:3]
        elif edit in ("no-position", "no-orientation", "no-spacing"):
            for item in slices if d.bool() else [slices[k]]:
                item[edit] = True
        elif edit == "long-orientation":
            slices[k]["orientation"] = slices[k]["orientation"] * 1.5
        elif edit == "seg":
            slices.append(
                {"position": origin, "orientation": orientation, "index": 60, "series": d.choice(["200", "900"])}
            )
            slices[-1]["sop_class"] = "1.2.840.10008.5.1.4.1.1.66.4"
        elif edit == "one-slice-series":
            slices.append({"position": origin, "orientation": orientation, "index": 70, "series": "300"})
        steps.append(f"{edit} (slice {k})")
    paths = []
    for number, item in enumerate(slices):
        index = item.get("same_as", item["index"])
        ds = _dicom_dataset(index, rows, columns, False, f"1.2.826.0.1.3680043.8.498.{item['series']}")
        ds.ImagePositionPatient = [round(float(v), 4) for v in item["position"]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in item["orientation"]]
        ds.PixelData = _slice_pixels(index, rows, columns).tobytes()
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if item.get(
                "no-"
                + {"ImagePositionPatient": "position", "ImageOrientationPatient": "orientation"}.get(keyword, "spacing")
            ):
                delattr(ds, keyword)
        if "sop_class" in item:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = item["sop_class"]
        path = case_dir / f"im{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    steps.append("positions: " + "; ".join(f"{np.round(item['position'], 3).tolist()}" for item in slices))

    def run() -> str:
        from napari_spineseg.io import read_volumes

        volumes = read_volumes(case_dir)
        _check_dicom_grid(volumes, paths)
        return repr([(v.name, v.shape, v.geometry, v.metadata.get("warnings")) for v in volumes])

    return Case("dicomgeo", run, steps, paths)


NIFTI_UNITS = {"mm": 2, "micron": 3, "meter": 1, "unknown": 0}


def _rotation(d: Draw) -> np.ndarray:
    angle = d.choice([0.0, 0.0, 0.3, math.pi / 2, math.pi])
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def nifti_geometry_case(d: Draw, work: Path) -> Case:
    """A small NIfTI-1 written by nibabel with random geometry fields: qform and sform (codes 0-4,
    disagreeing offsets, shear), pixdim size and sign, xyzt_units, vox_offset, a short file, NaN/Inf
    voxels, complex or 2-D data."""
    import nibabel as nib

    case_dir = _prepare_dirs(work)
    shape = (d.int(2, 5), d.int(2, 5), d.int(2, 4)) if d.bool(0.9) else (d.int(2, 5), d.int(2, 5))
    dtype = d.choice(["float32", "int16", "uint8", "complex64"] if d.bool(0.2) else ["float32", "int16"])
    array = (np.arange(int(np.prod(shape))).reshape(shape) % 50).astype(dtype)
    steps = [f"{dtype} shape {shape}"]
    if dtype == "float32" and d.bool(0.3):
        array.flat[d.int(0, array.size - 1)] = d.choice([np.nan, np.inf, -np.inf])
        steps.append("a NaN/Inf voxel")
    zooms = np.asarray([d.choice([1.0, 0.5, 3.0, 1e-30, 1e-3, 2e3]) if d.bool(0.3) else 1.0 for _ in range(3)])
    sform = np.eye(4)
    sform[:3, :3] = _rotation(d) @ np.diag(zooms)
    sform[:3, 3] = [d.choice([0.0, -40.0, 12.5]) for _ in range(3)]
    image = nib.Nifti1Image(array, sform)
    qform = sform.copy()
    if d.bool(0.3):
        qform[:3, 3] += [d.choice([0.0, 3.0, -10.0]), 0.0, 0.0]
        steps.append(f"qform offset {qform[:3, 3].tolist()}")
    image.set_qform(qform, code=d.choice([0, 1, 1, 2]))
    if d.bool(0.2):
        sform[0, 1] += d.choice([0.2, 1.0])
        steps.append("sheared sform")
    image.set_sform(sform, code=d.choice([0, 1, 2, 2, 4]))
    image.header.set_xyzt_units(d.choice(list(NIFTI_UNITS)))
    path = case_dir / ("image.nii.gz" if d.bool(0.3) else "image.nii")
    nib.save(image, path)
    data = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    if d.bool(0.2):  # in the bytes: nibabel refuses to save it
        at = 76 + 4 * d.int(1, 3)
        struct.pack_into("<f", data, at, -struct.unpack_from("<f", data, at)[0])
        steps.append(f"negative pixdim at byte {at}")
    if d.bool(0.15):
        struct.pack_into("<f", data, 108, d.choice([0.0, 348.0, 1e9, float(len(data) + 4)]))
        steps.append(f"vox_offset {struct.unpack_from('<f', data, 108)[0]}")
    if d.bool(0.15):
        data = data[: -d.int(1, min(200, len(data) - 352))]
        steps.append(f"cut to {len(data)} bytes")
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if path.suffix == ".gz" else bytes(data))
    pixdim = struct.unpack_from("<3f", data, 80)
    codes = struct.unpack_from("<2h", data, 252)
    steps.append(f"codes q{codes[0]} s{codes[1]}, xyzt_units {data[123]}, pixdim {pixdim}")

    def run() -> str:
        from napari_spineseg.io import read_volumes

        (volume,) = read_volumes(path)
        _check_nifti_geometry(volume, path)
        return repr((volume.shape, volume.geometry, volume.metadata.get("warnings")))

    return Case("niftigeo", run, steps, [path])


def _check_nifti_geometry(volume: Any, path: Path) -> None:
    """Oracle: a NIfTI read without a warning lies where nibabel places it, with plausible spacing,
    and its voxels are nibabel's (NaN/Inf only with a warning)."""
    import nibabel as nib

    image = nib.load(path)
    header = image.header
    warnings = volume.metadata.get("warnings", [])
    if not all(0.01 <= s <= 100 for s in volume.spacing):
        raise AssertionError(f"implausible spacing {volume.spacing} accepted")
    voxels = np.asanyarray(image.dataobj)
    if np.iscomplexobj(voxels):
        raise AssertionError("complex voxels accepted")
    if voxels.ndim == 3 and image.dataobj.offset >= 352 and not any("NaN" in w for w in warnings):
        if not np.isfinite(voxels).all():
            raise AssertionError("NaN/Inf voxels read without a warning")
        if not np.allclose(np.transpose(voxels, (2, 1, 0)), volume.array, equal_nan=True):
            raise AssertionError("voxels differ from nibabel's")
    codes = int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0
    if codes and not any("pixdim" in w for w in warnings):
        scale = {"micron": 1e-3, "meter": 1e3}.get(header.get_xyzt_units()[0], 1.0)
        expected = image.affine.copy()
        expected[:3] *= scale
        if not np.allclose(volume.geometry.affine_ras(), expected, atol=1e-3):
            raise AssertionError("labels would not land where nibabel places the study")


# --------------------------------------------------------------------------------------------
TARGETS: dict[str, Callable[[Draw, Path], Case]] = {
    "mha": lambda d, w: metaimage_case(d, w, detached=False),
    "mhd": lambda d, w: metaimage_case(d, w, detached=True),
    "nifti": nifti_case,
    "nrrd": lambda d, w: nrrd_case(d, w, detached=d.bool(0.3)),
    "dicom": dicom_case,
    "dicomgeo": dicom_geometry_case,
    "niftigeo": nifti_geometry_case,
    "model": model_case,
    "cli": cli_case,
    "paths": paths_case,
}


def fresh_dir(root: Path) -> Path:
    """An empty working directory for one case (previous contents removed)."""
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def build_and_run(target: str, draw: Draw, work: Path) -> tuple[Case, Outcome]:
    """Generate one case of ``target`` in ``work`` (emptied first) and run it."""
    case = TARGETS[target](draw, fresh_dir(work))
    return case, run_case(case)


__all__ = [
    "PHI_MARKERS",
    "TARGETS",
    "Case",
    "Draw",
    "HypothesisDraw",
    "Outcome",
    "RandomDraw",
    "build_and_run",
    "memory_cap",
    "run_case",
    "write_dicom_series",
]
