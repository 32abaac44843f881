"""Security: crafted model files never run code or allocate huge memory; no path traversal; no PHI in output.

Rules checked here (docs/reliability.md): model files are safetensors only (pickle-based files are
refused by suffix and, disguised as ``.safetensors``, fail the header check before any unpickling);
the package never calls ``torch.load``/``pickle.load``; the header's tensor table is validated
(dtype, shape, offsets, total size) before anything is allocated and the network is first built
on the ``meta`` device; header and metadata JSON of absurd size or nesting are refused; model names
never become paths outside the model folder; detached image headers cannot point at files outside
their folder; DICOM patient identifiers never reach names, logs, printed output or reports.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fuzz_targets as ft
from napari_spineseg.cli import main
from napari_spineseg.errors import InputError, ModelFileError, VolumeReadError
from napari_spineseg.io import read_volumes
from napari_spineseg.modelfile import ModelMetadata, list_models, load_model, read_metadata, save_model
from napari_spineseg.models import build_model

SOURCE = Path(__file__).resolve().parents[1] / "src" / "napari_spineseg"
MARKER_NAME = "spineseg_security_marker"


class _Payload:
    """Unpickling this touches a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickles(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / MARKER_NAME
    files = []
    for name in ("evil.pt", "evil.pth", "evil.ckpt", "evil.bin", "evil.pkl", "evil.safetensors", "evil2.safetensors"):
        path = tmp_path / name
        payload = {"state_dict": _Payload(marker)}
        if name == "evil2.safetensors":  # the legacy (non-zip) torch format
            torch.save(payload, path, _use_new_zipfile_serialization=False)
        else:
            torch.save(payload, path)
        files.append(path)
    return marker, files


def test_pickle_payloads_are_never_executed(tmp_path: Path, monkeypatch, capsys) -> None:
    marker, files = _pickles(tmp_path)
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path))
    for path in files:
        with pytest.raises(ModelFileError) as info:
            load_model(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
        if path.suffix != ".safetensors":
            assert "pickle-based model files" in message and "never loaded" in message
        else:
            assert "not a safetensors model file" in message or "corrupt model header" in message
            with pytest.raises(ModelFileError):
                read_metadata(path)
        assert main(["segment", str(tmp_path / "x.nii.gz"), "--model", str(path), "--device", "cpu"]) == 1
        assert "spineseg: error:" in capsys.readouterr().err
    # Listed as unusable (by file name), never opened with pickle.
    listed = {m.name: m for m in list_models() if m.source == "user"}
    assert listed["evil"].metadata is None and listed["evil"].error
    assert main(["models", "--json"]) == 0
    capsys.readouterr()
    assert not marker.exists()


def test_package_never_unpickles() -> None:
    """No torch.load / pickle.load / numpy pickles anywhere in the package (static check)."""
    offenders = []
    for path in SOURCE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            unpickles = r"\btorch\.load\(|\bpickle\.loads?\(|\bdill\.|\bjoblib\.load|allow_pickle\s*=\s*True"
            if re.search(unpickles, code) and "weights_only=True" not in code:
                offenders.append(f"{path.relative_to(SOURCE)}:{number}: {line.strip()}")
            if re.search(r"\btorch\.hub\.|load_state_dict_from_url", code):
                offenders.append(f"{path.relative_to(SOURCE)}:{number}: {line.strip()}")
    assert not offenders, offenders


def _header_file(tmp_path: Path, table: dict, body: bytes = b"", name: str = "m.safetensors") -> Path:
    encoded = json.dumps(table).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
    return path


def _record(**changes) -> str:
    network = build_model("unet", in_channels=1, num_classes=5, base=2, depth=1)
    record = ModelMetadata("m", "unet", network.arch_kwargs).to_dict()
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize(
    "shape",
    [[100000, 100000, 100], [2**40, 2**40], [2**62], [1] * 63 + [2**31]],
)
def test_huge_declared_tensor_shapes_are_rejected_before_allocation(tmp_path: Path, shape) -> None:
    count = int(np.prod(np.array(shape, dtype=object)))
    table = {
        "__metadata__": {"spineseg": _record()},
        "head.conv.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * count]},
    }
    path = _header_file(tmp_path, table, body=b"\0" * 64)
    started = time.perf_counter()
    with ft.memory_cap(1 * 2**30), pytest.raises(ModelFileError, match=r"implausibly large|truncated"):
        load_model(path)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("architecture", "kwargs"),
    [
        ("unet", {"base": 10**9}),
        ("unet", {"base": 2**62, "depth": 4}),
        ("unet", {"base": 2**63}),  # torch's overflow error carried a 60-line C++ trace
        ("unet", {"depth": 10**9}),  # looped for ever building the network before the fix
        ("penn", {"hidden": [10**6] * 10**5}),
        ("vgg19-unet", {"width": 1e300}),
        ("fcn-resnet50", {"width": float("inf")}),
    ],
)
def test_huge_architectures_in_metadata_are_rejected_without_building_them(
    tmp_path: Path, architecture: str, kwargs: dict
) -> None:
    record = json.loads(_record())
    record["architecture"] = {"name": architecture, "kwargs": kwargs}
    table = {
        "__metadata__": {"spineseg": json.dumps(record)},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    started = time.perf_counter()
    with ft.memory_cap(1 * 2**30), pytest.raises(ModelFileError, match=r"unbuildable|do not match") as info:
        load_model(_header_file(tmp_path, table, b"\0" * 4))
    assert time.perf_counter() - started < 5.0
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


@pytest.mark.parametrize("where", ["header", "metadata"])
@pytest.mark.parametrize("bomb", ["[" * 200000 + "]" * 200000, '{"a":' * 100000 + "1" + "}" * 100000])
def test_json_bombs_are_model_file_errors(tmp_path: Path, where: str, bomb: str) -> None:
    if where == "header":
        encoded = bomb.encode()
    else:
        encoded = ('{"__metadata__": {"spineseg": ' + json.dumps(bomb) + "}}").encode()
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    with pytest.raises(ModelFileError, match="corrupt model"):
        load_model(path)


def test_oversized_headers_are_refused_without_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ModelFileError, match="bad header length"):
        load_model(path)
    table = {"__metadata__": {"spineseg": _record(extra={"pad": "x" * 5_000_000, "list": list(range(200000))})}}
    started = time.perf_counter()
    with pytest.raises(ModelFileError, match="do not match"):  # parsed quickly, then the tensors are missing
        load_model(_header_file(tmp_path, table))
    assert time.perf_counter() - started < 5.0


def test_path_like_names_never_become_paths(tmp_path: Path, monkeypatch, capsys) -> None:
    from napari_spineseg.training.finetune import finetuned_output_path

    models = tmp_path / "models"
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(models))
    models.mkdir()
    network = build_model("unet", in_channels=1, num_classes=5, base=2, depth=1)
    for name in ("../../escaped", "/etc/passwd", "..", "a/../../b"):
        metadata = ModelMetadata(name, "unet", network.arch_kwargs, description=name)
        save_model(network, metadata, models / "plain.safetensors")
        loaded = load_model("plain")  # the metadata name is a label, never a path
        assert loaded.metadata.name == name and loaded.path == models / "plain.safetensors"
        assert [m.name for m in list_models() if m.source == "user"] == ["plain"]
        assert main(["models", "--json"]) == 0
        capsys.readouterr()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["plain.safetensors"]
    for bad in ("../evil", "..", "a/b", "/abs/evil", "..\\evil", "evil\x00"):
        with pytest.raises((InputError, ModelFileError)):
            load_model(bad) if "/" not in bad and "\\" not in bad else finetuned_output_path(bad)
    with pytest.raises(InputError):
        finetuned_output_path("..")


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_headers_cannot_read_files_outside_their_folder(tmp_path: Path, suffix: str) -> None:
    import SimpleITK as sitk

    folder = tmp_path / "case"
    folder.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(256)) * 4)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(folder / f"x{suffix}"))
    header = (folder / f"x{suffix}").read_text()
    key = "ElementDataFile = " if suffix == ".mhd" else "data file: "
    for target in (
        "../secret.raw",
        str(secret),
        "/etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
        "sub/../../secret.raw",
    ):
        text = re.sub(rf"{re.escape(key)}.*", key + target, header)
        (folder / f"x{suffix}").write_text(text)
        with pytest.raises(VolumeReadError, match=r"data file .* (lies outside|is missing or not a regular)"):
            read_volumes(folder / f"x{suffix}")


# --- patient identifiers ------------------------------------------------------------------------


def _assert_no_phi(text: str, where: str) -> None:
    for marker in ft.PHI_STRINGS:
        assert marker not in text, f"patient identifier {marker!r} in {where}"


def test_patient_identifiers_never_reach_output_logs_or_reports(
    tmp_path: Path, monkeypatch, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    series = tmp_path / "series"
    ft.write_dicom_series(series, slices=6, rows=24, columns=20)
    caplog.set_level(logging.DEBUG)
    volume = read_volumes(series)[0]
    _assert_no_phi(repr((volume.name, volume.metadata)), "the volume's name or metadata")
    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=2, depth=1)
    model = save_model(network, ModelMetadata("tiny", "unet", network.arch_kwargs), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    commands = [
        ["-v", "info", str(series)],
        ["-v", "info", "--json", str(series)],
        ["-v", "info", str(series / "slice002.dcm")],
        ["-v", "segment", str(series), "-o", str(out), "--model", str(model), "--device", "cpu"],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
        captured = capsys.readouterr()
        _assert_no_phi(captured.out + captured.err, f"the output of spineseg {' '.join(argv[:2])}")
    (seg,) = out.glob("*_seg.nii.gz")
    report = tmp_path / "report.html"
    assert main(["-v", "report", str(series), str(seg), "-o", str(report), "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    _assert_no_phi(captured.out + captured.err, "the output of spineseg report")
    _assert_no_phi(caplog.text, "the log")
    import gzip

    for path in [report, tmp_path / "r.json", seg]:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        _assert_no_phi(data.decode("latin-1"), path.name)


def test_phi_is_not_in_error_messages(tmp_path: Path, capsys) -> None:
    series = tmp_path / "series"
    ft.write_dicom_series(series, slices=1)  # a single slice: refused, naming the series
    assert main(["info", str(series)]) == 1
    captured = capsys.readouterr()
    assert "single slice" in captured.err
    _assert_no_phi(captured.out + captured.err, "an error message")
