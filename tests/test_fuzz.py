"""Property tests over every reader, the model-file loader and the CLI, plus regressions of what fuzzing found.

Property (``fuzz_targets.run_case``): a mutated input is read / loaded / run, or refused with a
one-line :class:`SpinesegError` (the CLI: exit status 1 or an argparse usage error); never another
exception, never a patient identifier in names, metadata, output or messages, and never an
allocation beyond the address-space cap.  ``benchmarks/bench_fuzz.py`` runs the same generators
over 10 000+ cases with hang detection; these tests keep ~40 examples per target (deterministic).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft
from napari_spineseg.errors import ModelFileError, VolumeReadError
from napari_spineseg.io import read_volumes

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def _check(target: str, data, work: Path) -> None:
    case, outcome = ft.build_and_run(target, ft.HypothesisDraw(data), work / "c")
    assert outcome.status in ("ok", "clear"), f"{outcome.status}\n{case.describe()}\n{outcome.detail}"


@pytest.mark.parametrize("target", ["mha", "mhd", "nifti", "nrrd"])
@FUZZ
@given(data=st.data())
def test_image_headers_fuzzed(target: str, data, tmp_path_factory) -> None:
    _check(target, data, tmp_path_factory.mktemp(target))


@FUZZ
@given(data=st.data())
def test_dicom_tags_fuzzed(data, tmp_path_factory) -> None:
    _check("dicom", data, tmp_path_factory.mktemp("dicom"))


@pytest.mark.parametrize("target", ["dicomgeo", "niftigeo"])
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_geometry_families_are_never_silently_wrong(target: str, data, tmp_path_factory) -> None:
    """Red-team families (issue #18): a read that succeeds lies on the source's grid (or says why not)."""
    _check(target, data, tmp_path_factory.mktemp(target))


@FUZZ
@given(data=st.data())
def test_model_files_fuzzed(data, tmp_path_factory) -> None:
    _check("model", data, tmp_path_factory.mktemp("model"))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_cli_arguments_fuzzed(data, tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _check("cli", data, tmp_path_factory.mktemp("cli"))


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_cli_output_paths_fuzzed(data, tmp_path_factory, monkeypatch) -> None:
    """Red-team issue #18: outputs aimed at inputs, source slices, a manual label map, each other."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _check("paths", data, tmp_path_factory.mktemp("paths"))


# --- regressions: what the fuzzer found -------------------------------------------------------


def _mha(tmp_path: Path, replace: dict[str, str] | None = None, extra: str = "", name: str = "x.mha") -> Path:
    import SimpleITK as sitk

    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(path))
    text = path.read_bytes()
    end = text.index(b"\n", text.index(b"ElementDataFile")) + 1
    lines = text[:end].decode().splitlines()
    for key, value in (replace or {}).items():
        lines = [f"{key} = {value}" if line.startswith(key + " ") else line for line in lines]
    if extra:
        lines.insert(2, extra)
    path.write_bytes(("\n".join(lines) + "\n").encode() + text[end:])
    return path


NATIVE_CRASHES = {  # each of these killed the process inside ITK's MetaIO before header_checks
    "NDims -1": ({"NDims": "-1"}, ""),
    "NDims 1000": ({"NDims": "1000"}, ""),
    "NDims 2**31": ({"NDims": "2147483648"}, ""),
    "key without '='": ({}, "NDims"),
    "pattern with step 0": ({"ElementDataFile": "slice%d.raw 5 0 0"}, ""),
    "pattern over 4e9 files": ({"ElementDataFile": "slice%d.raw -2000000000 2000000000 1"}, ""),
    "Name of 400 characters": ({}, "Name = " + "9" * 400),  # overflowed MetaIO's 255-byte buffer
    "direction near the largest double": (
        {"TransformMatrix": "332 -0.2 2.6 0.2 0.78 1.5 -1 1.7976931348623157e308 0"},
        "",
    ),
}


def test_metaimage_headers_that_crashed_itk_are_refused_first(tmp_path: Path) -> None:
    paths = {
        case: _mha(tmp_path, replace, extra, f"c{i}.mha")
        for i, (case, (replace, extra)) in enumerate(NATIVE_CRASHES.items())
    }
    for seed in ("mha:688", "mhd:384"):  # corrupt zlib streams: MetaIO inflated them for ever
        paths[f"fuzz case {seed}"] = ft.TARGETS[seed[:3]](ft.RandomDraw(seed), tmp_path / seed.replace(":", "-")).files[
            0
        ]
    # In a child process: without the checks these end in SIGSEGV / SIGFPE / SIGABRT or loop forever.
    script = textwrap.dedent(
        """
        import json, sys
        from napari_spineseg.io import read_volume
        from napari_spineseg.errors import VolumeReadError
        result = {}
        for case, path in json.loads(sys.argv[1]).items():
            try:
                read_volume(path)
                result[case] = "read"
            except VolumeReadError as error:
                result[case] = str(error)
        print(json.dumps(result))
        """
    )
    argv = [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in paths.items()})]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"reader process died ({run.returncode}): {run.stderr[-2000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for case, path in paths.items():
        assert str(path) in result[case], (case, result[case])
        assert re.search(r"MetaImage header|implausible geometry|corrupt compressed", result[case]), (
            case,
            result[case],
        )
        assert "\n" not in result[case]


def test_declared_sizes_are_refused_before_allocation(tmp_path: Path) -> None:
    huge = _mha(tmp_path, {"DimSize": "100000 100000 100000"}, name="huge.mha")
    with pytest.raises(VolumeReadError, match=r"GiB\), more than the 4 GiB"):
        read_volumes(huge)
    empty = _mha(tmp_path, {"DimSize": "0 4 3"}, name="empty.mha")
    with pytest.raises(VolumeReadError, match=r"DimSize|no voxels"):
        read_volumes(empty)
    import SimpleITK as sitk

    nifti = tmp_path / "big.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)), str(nifti))
    data = bytearray(nifti.read_bytes())
    struct.pack_into("<8h", data, 40, 7, 32767, 32767, 32767, 32767, 32767, 32767, 32767)
    nifti.write_bytes(bytes(data))  # np.prod of these dims overflowed int64 before the fix
    with pytest.raises(VolumeReadError, match="GiB"):
        read_volumes(nifti)


def test_dicom_garbage_after_the_pixels_is_refused_quickly(tmp_path: Path) -> None:
    """8 stray bytes made GDCM allocate and zero ~4 GB for 1.5 s per file (a memory bomb)."""
    ft.write_dicom_series(tmp_path, slices=3)
    victim = tmp_path / "slice001.dcm"
    victim.write_bytes(victim.read_bytes() + b"=J\xae\xd2\xd9\x8b\xd0\xdf")
    started = time.perf_counter()
    for target in (tmp_path, victim, tmp_path / "slice000.dcm"):
        with pytest.raises(VolumeReadError, match=r"slice001\.dcm: corrupt DICOM file \(element"):
            read_volumes(target)
    assert time.perf_counter() - started < 1.0


def test_unusable_paths_are_read_errors(tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match=r"not a usable path|no such file"):  # NUL byte
        read_volumes(str(tmp_path / "a\x00b.nii.gz"))
    with pytest.raises(VolumeReadError, match="File name too long") as info:
        read_volumes(tmp_path / ("x" * 5000 + ".nii.gz"))
    assert len(str(info.value)) < 300


def _model_with_table(tmp_path: Path, edit) -> Path:
    raw = ft.tiny_model_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    table = json.loads(raw[8 : 8 + length])
    text = edit(table)
    encoded = (text if isinstance(text, str) else json.dumps(table)).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    return path


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t["head.conv.bias"].pop("data_offsets"),  # KeyError before the fix
        lambda t: t.__setitem__("head.conv.bias", True),  # TypeError
        lambda t: t["head.conv.bias"].__setitem__("shape", None),  # TypeError in load_model
        lambda t: t["head.conv.bias"].__setitem__("shape", [2**62, 4]),  # torch overflow
        lambda t: t["head.conv.bias"].__setitem__("dtype", "X"),
        lambda t: t["head.conv.bias"].__setitem__("data_offsets", [8, 4]),
        lambda t: t.__setitem__("__metadata__", ["spineseg"]),
    ],
)
def test_malformed_tensor_tables_are_model_file_errors(tmp_path: Path, edit) -> None:
    from napari_spineseg.modelfile import load_model

    with pytest.raises(ModelFileError):
        load_model(_model_with_table(tmp_path, edit))


def test_absurd_architecture_arguments_do_not_allocate(tmp_path: Path) -> None:
    def grow(table):
        record = json.loads(table["__metadata__"]["spineseg"])
        record["architecture"]["kwargs"]["base"] = 10**9  # ~10^20 parameters if built for real
        table["__metadata__"]["spineseg"] = json.dumps(record)

    from napari_spineseg.modelfile import load_model

    started = time.perf_counter()
    with ft.memory_cap(2 * 2**30), pytest.raises(ModelFileError, match=r"do not match|unbuildable"):
        load_model(_model_with_table(tmp_path, grow))
    assert time.perf_counter() - started < 5.0
