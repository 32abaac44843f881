"""Model files: round trip, validation, and rejection of truncated/tampered/pickle files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from napari_spineseg.errors import InputError, ModelFileError
from napari_spineseg.modelfile import (
    ModelMetadata,
    list_models,
    load_model,
    read_metadata,
    resolve_model,
    safe_model_name,
    save_model,
)
from napari_spineseg.models import build_model


def tiny_model(tmp_path: Path, name: str = "tiny") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    network = build_model("unet", in_channels=3, num_classes=5, base=4, depth=2)
    metadata = ModelMetadata(name, "unet", network.arch_kwargs, context_slices=1, metrics={"dice": {"1": 0.9}})
    return save_model(network, metadata, tmp_path / f"{name}.safetensors"), network


def test_round_trip_restores_weights_and_metadata(tmp_path: Path) -> None:
    path, network = tiny_model(tmp_path)
    loaded = load_model(path)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(loaded.network.state_dict()[key], value, rtol=0, atol=0)
    assert loaded.metadata.in_channels == 3 and loaded.metadata.num_classes == 5
    assert loaded.metadata.metrics == {"dice": {"1": 0.9}}
    assert [c.name for c in loaded.metadata.classes][1] == "vertebral body"
    assert not loaded.network.training
    x = torch.randn(1, 3, 20, 24)
    network.eval()
    torch.testing.assert_close(loaded.network(x), network(x))


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    path, _ = tiny_model(tmp_path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=str(broken)):
            load_model(broken)


def _rewrite_header(path: Path, edit) -> Path:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    out = path.with_name("edited.safetensors")
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    return out


def test_tampered_weights_fail_the_checksum(tmp_path: Path) -> None:
    path, _ = tiny_model(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_mismatched_architecture_is_rejected(tmp_path: Path) -> None:
    path, _ = tiny_model(tmp_path)

    def grow(header):
        record = json.loads(header["__metadata__"]["spineseg"])
        record["architecture"]["kwargs"]["base"] = 8
        header["__metadata__"]["spineseg"] = json.dumps(record)

    with pytest.raises(ModelFileError, match="do not match"):
        load_model(_rewrite_header(path, grow))


def test_huge_shapes_and_bad_metadata_are_rejected(tmp_path: Path) -> None:
    path, _ = tiny_model(tmp_path)

    def huge(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [100000, 100000, 100]

    with pytest.raises(ModelFileError):
        load_model(_rewrite_header(path, huge))

    def not_ours(header):
        header["__metadata__"] = {"format": "pt"}

    with pytest.raises(ModelFileError, match="without napari-spineseg metadata"):
        load_model(_rewrite_header(path, not_ours))

    def bad_classes(header):
        record = json.loads(header["__metadata__"]["spineseg"])
        record["classes"] = [{"value": 3, "name": "x", "color": [1, 0, 0]}]
        header["__metadata__"]["spineseg"] = json.dumps(record)

    with pytest.raises(ModelFileError, match="background"):
        read_metadata(_rewrite_header(path, bad_classes))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/spineseg_pickle_executed"),))


def test_pickle_files_are_never_unpickled(tmp_path: Path) -> None:
    marker = Path("/tmp/spineseg_pickle_executed")
    marker.unlink(missing_ok=True)
    for name in ("evil.pt", "evil.pth", "evil.ckpt"):
        evil = tmp_path / name
        evil.write_bytes(pickle.dumps(_Payload()))
        with pytest.raises(ModelFileError, match="pickle"):
            load_model(evil)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ModelFileError):
        load_model(disguised)
    assert not marker.exists()


def test_names_resolve_in_user_dir_and_traversal_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    tiny_model(tmp_path / "models", "mine")
    assert resolve_model("mine") == tmp_path / "models" / "mine.safetensors"
    assert any(m.name == "mine" and m.source == "user" for m in list_models())
    with pytest.raises(ModelFileError, match="unknown model"):
        resolve_model("nobody")
    for bad in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises((InputError, ModelFileError)):
            safe_model_name(bad)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    path, _ = tiny_model(tmp_path)
    before = path.read_bytes()
    import safetensors.torch

    def exploding_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", exploding_save)
    network = build_model("unet", in_channels=3, num_classes=5, base=4, depth=2)
    from napari_spineseg.errors import VolumeWriteError

    with pytest.raises(VolumeWriteError, match="No space left"):
        save_model(network, ModelMetadata("tiny", "unet", network.arch_kwargs, context_slices=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_leftover_temporary_files_are_not_listed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path))
    path, _ = tiny_model(tmp_path, "kept")
    (tmp_path / ".kept.safetensors.abc.part.safetensors").write_bytes(b"partial")
    assert [m.name for m in list_models() if m.source == "user"] == ["kept"]
    assert path.stat().st_mode & 0o044  # readable by group/others like any file the user writes
