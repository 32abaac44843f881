"""Model files: safetensors weights with a JSON metadata record in the same file.

A model file is one ``.safetensors`` file (no pickle anywhere).  Its header metadata holds
``{"spineseg": "<JSON>"}`` with the architecture and its arguments, input channels, classes
(names, colours), pre-/post-processing, pixel spacing, planes, training provenance,
validation metrics, the format version and a SHA-256 of the tensors.  Loading checks all of
it before any tensor data is read into the network: tensor names and shapes must be exactly
those of the rebuilt architecture (so a crafted header cannot make us allocate huge tensors),
and the content hash must match (tampering is detected).

Model names resolve to, in order: an existing path, the user model directory
(``platformdirs.user_data_dir("napari-spineseg")/models``, or ``$SPINESEG_MODEL_DIR``), and the
models bundled with the package.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, ModelFileError
from .provenance import tensor_digest
from .schema import LabelClass, default_classes

FORMAT = "napari-spineseg-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".safetensors"
DEFAULT_MODEL_NAME = "spineseg-default"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")
MAX_HEADER_BYTES = 50_000_000
MAX_PARAMETERS = 500_000_000
MAX_TENSORS = 100_000
# Bytes per element of the safetensors dtypes a model file may hold.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
_DTYPE_BYTES |= {"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,99}$")


def bundled_model_dir() -> Path:
    return Path(__file__).resolve().parent / "bundled_models"


def user_model_dir() -> Path:
    """Where user (fine-tuned) models live; ``$SPINESEG_MODEL_DIR`` overrides."""
    override = os.environ.get("SPINESEG_MODEL_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-spineseg", appauthor=False)) / "models"


def safe_model_name(name: str) -> str:
    """``name`` if it is a plain model name (no path separators or traversal), else InputError."""
    name = str(name).strip()
    if not _SAFE_NAME.match(name) or ".." in name:
        raise InputError(
            f"invalid model name {name!r}: use letters, digits, spaces, '.', '_', '+', '-' (no paths), at most 100"
        )
    return name


@dataclass
class ModelMetadata:
    """Everything needed to rebuild, run and judge a model (stored as JSON in the file)."""

    name: str
    architecture: str
    architecture_kwargs: dict[str, Any]
    classes: list[LabelClass] = field(default_factory=default_classes)
    context_slices: int = 0  # k: the network sees 2k+1 adjacent slices as channels
    preprocess: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    planes: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    plane_weights: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    version: str = "1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_values(self) -> list[int]:
        return [c.value for c in self.classes]

    @property
    def validation_cases(self) -> list[str]:
        """The held-out case ids the training run recorded (none for a model without that record)."""
        training = self.training or {}
        split = training.get("split") or {}
        return list(training.get("val_cases") or training.get("validation_cases") or split.get("val_cases") or [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "architecture": {"name": self.architecture, "kwargs": self.architecture_kwargs},
            "context_slices": self.context_slices,
            "in_channels": self.in_channels,
            "classes": [c.to_dict() for c in self.classes],
            "preprocess": self.preprocess,
            "postprocess": self.postprocess,
            "planes": self.planes,
            "plane_weights": self.plane_weights,
            "training": self.training,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model") -> ModelMetadata:
        """Validate and parse a metadata record; any problem is a ModelFileError naming ``source``."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"not a napari-spineseg model (format {data.get('format')!r})")
            version = int(data.get("format_version", -1))
            if version > FORMAT_VERSION or version < 1:
                raise ValueError(f"format version {version} is not supported (this release reads 1..{FORMAT_VERSION})")
            architecture = data["architecture"]
            classes = [LabelClass.from_dict(c) for c in data["classes"]]
            values = [c.value for c in classes]
            if len(classes) < 2 or values[0] != 0 or len(set(values)) != len(values):
                raise ValueError("classes must start with background (0) and have distinct values")
            context = int(data.get("context_slices", 0))
            if not 0 <= context <= 8:
                raise ValueError(f"context_slices {context} outside 0..8")
            planes = [str(p) for p in data.get("planes", [])]
            if not planes or not set(planes) <= {"axial", "coronal", "sagittal"}:
                raise ValueError(f"planes {planes} must be a non-empty subset of axial, coronal, sagittal")
            _check_processing(data.get("preprocess") or {}, data.get("postprocess") or {})
            kwargs = dict(architecture["kwargs"])
            if not all(isinstance(v, (int, float, str, bool, type(None), list)) for v in kwargs.values()):
                raise ValueError("architecture arguments must be plain numbers, strings or lists")
            return cls(
                name=str(data["name"]),
                architecture=str(architecture["name"]),
                architecture_kwargs=kwargs,
                classes=classes,
                context_slices=context,
                preprocess=dict(data.get("preprocess") or {}),
                postprocess=dict(data.get("postprocess") or {}),
                planes=planes,
                plane_weights=check_plane_weights(data.get("plane_weights") or {}),
                training=dict(data.get("training") or {}),
                metrics=dict(data.get("metrics") or {}),
                description=str(data.get("description", "")),
                version=str(data.get("version", "1")),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as error:
            raise ModelFileError(f"{source}: invalid model metadata ({str(error)[:200]})") from None


def check_plane_weights(weights: Any) -> dict[str, float]:
    """Plane weights as ``{plane: weight}``: planes named axial/coronal/sagittal, weights finite and
    non-negative, not all zero (NaN or infinite weights fuse to all-zero labels).  ValueError otherwise."""
    if not isinstance(weights, dict):
        raise ValueError("plane_weights must be a mapping of plane to weight")
    checked = {str(k): float(v) for k, v in weights.items()}
    unknown = set(checked) - {"axial", "coronal", "sagittal"}
    if unknown:
        raise ValueError(f"plane_weights name unknown planes {sorted(unknown)}")
    if not all(math.isfinite(v) and v >= 0 for v in checked.values()):
        raise ValueError(f"plane weights must be finite and non-negative, got {checked}")
    if checked and sum(checked.values()) <= 0:
        raise ValueError(f"plane weights must not all be zero, got {checked}")
    return checked


def _check_processing(preprocess: Any, postprocess: Any) -> None:
    """Pre-/post-processing settings must parse and be plausible (ValueError otherwise)."""
    from .postprocess import PostprocessConfig
    from .preprocess import PreprocessConfig

    try:
        PreprocessConfig.from_dict(dict(preprocess))
        if postprocess:
            PostprocessConfig.from_dict(dict(postprocess))
    except InputError as error:
        raise ValueError(str(error)) from None


@dataclass
class LoadedModel:
    """A network (on CPU, in eval mode) with its metadata and the file it came from."""

    network: Any  # torch.nn.Module
    metadata: ModelMetadata
    path: Path | None = None
    gate: Any = None  # napari_spineseg.lesion_gate.LesionGate: optional slice-level lesion-presence gate


def save_model(network: Any, metadata: ModelMetadata, path: str | os.PathLike, gate: Any = None) -> Path:
    """Write ``network``'s weights and ``metadata`` to ``path`` atomically (temp file + rename).

    ``gate`` (a :class:`napari_spineseg.lesion_gate.LesionGate`) is stored in the same file: its tensors
    under the ``gate.`` prefix and its record as ``gate`` in the metadata (see :mod:`.lesion_gate`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from .io import atomic_path

    path = Path(path).expanduser()
    if path.suffix != MODEL_SUFFIX:
        raise InputError(f"{path}: model files must end in {MODEL_SUFFIX}")
    check_not_hiding_bundled(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    record = metadata.to_dict()
    if gate is not None:
        from .lesion_gate import GATE_PREFIX, gate_record_for_file, gate_tensors

        if any(k.startswith(GATE_PREFIX) for k in tensors):
            raise InputError(f"{path}: the network has tensors named {GATE_PREFIX}*; cannot store a gate beside it")
        record["gate"] = gate_record_for_file(gate, metadata)
        tensors.update(gate_tensors(gate))
    record.setdefault("training", {}).setdefault("saved", _dt.datetime.now(_dt.timezone.utc).isoformat())
    record["content_sha256"] = tensor_digest(tensors)
    try:
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata={"spineseg": json.dumps(record)})
    except (OSError, SafetensorError) as error:  # safetensors reports disk full etc. as SafetensorError
        from .errors import VolumeWriteError

        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise VolumeWriteError(f"{path}: cannot save the model ({reason})") from None
    return path


def attach_gate(model: LoadedModel, gate: Any, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``model`` with ``gate`` (a :class:`napari_spineseg.lesion_gate.LesionGate`) to ``path``
    (atomically; ``gate=None`` writes the model without a gate)."""
    import dataclasses

    metadata = model.metadata if name is None else dataclasses.replace(model.metadata, name=name)
    return save_model(model.network, metadata, path, gate=gate)


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The safetensors header (tensor table) and our metadata, parsed without reading tensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated model file (no header)")
        header_length = int.from_bytes(head, "little")
        if header_length <= 0 or header_length > min(MAX_HEADER_BYTES, size - 8):
            raise ModelFileError(f"{path}: not a safetensors model file (bad header length)")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
            raise ModelFileError(f"{path}: corrupt model header") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt model header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or "spineseg" not in meta:
        raise ModelFileError(f"{path}: safetensors file without napari-spineseg metadata")
    try:
        record = json.loads(meta["spineseg"])
    except (TypeError, ValueError, RecursionError):
        raise ModelFileError(f"{path}: corrupt model metadata (not JSON)") from None
    if not isinstance(record, dict):
        raise ModelFileError(f"{path}: corrupt model metadata")
    data_end = _check_tensor_table(header, path)
    if 8 + header_length + data_end > size:
        raise ModelFileError(
            f"{path}: truncated model file ({size} bytes, header promises {8 + header_length + data_end})"
        )
    return header, record


def _check_tensor_table(table: dict[str, Any], path: Path) -> int:
    """Check every tensor entry (known dtype, shape of non-negative integers, offsets that match the
    shape) and the total size, before anything is allocated; returns the end of the tensor data."""
    if len(table) > MAX_TENSORS:
        raise ModelFileError(f"{path}: implausibly many tensors ({len(table)}) in the model file")
    total, data_end = 0, 0
    for name, entry in table.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (
                isinstance(dtype, str)
                and dtype in _DTYPE_BYTES
                and isinstance(shape, list)
                and all(type(s) is int and s >= 0 for s in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ModelFileError(f"{path}: malformed header entry for tensor {name[:80]!r}")
        count = math.prod(shape)
        total += count
        if total > MAX_PARAMETERS:
            raise ModelFileError(f"{path}: implausibly large tensors in the model file")
        if end - begin != count * _DTYPE_BYTES[dtype]:
            raise ModelFileError(f"{path}: tensor {name[:80]!r} occupies {end - begin} bytes, its shape needs more")
        data_end = max(data_end, end)
    return data_end


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The metadata of a model file, validated, without loading weights."""
    path = Path(path)
    _, record = _read_header(path)
    return ModelMetadata.from_dict(record, str(path))


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL_NAME) -> LoadedModel:
    """Load and validate a model (weights onto the CPU, eval mode)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_model

    path = resolve_model(name_or_path)
    header, record = _read_header(path)
    metadata = ModelMetadata.from_dict(record, str(path))
    gate_record = None
    if "gate" in record:  # a slice-level lesion-presence gate travels in the file (see .lesion_gate)
        from .lesion_gate import check_gate_header, split_gate_header

        header, gate_header = split_gate_header(header)
        gate_record = check_gate_header(record["gate"], gate_header, metadata, path)
    kwargs = dict(metadata.architecture_kwargs)
    kwargs.pop("in_channels", None)
    kwargs.pop("num_classes", None)
    arguments = {"in_channels": metadata.in_channels, "num_classes": metadata.num_classes, **kwargs}
    try:
        # First without memory (meta tensors): the metadata may ask for an absurdly large network.
        with torch.device("meta"):
            skeleton = build_model(metadata.architecture, **arguments)
    except Exception as error:  # InputError, or torch refusing absurd sizes (overflow, ...) with a C++ trace
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ModelFileError(f"{path}: metadata describes an unbuildable network ({reason})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v["shape"]) for k, v in header.items()}
    if expected != stored:
        missing = sorted(set(expected) - set(stored))[:3]
        unexpected = [k[:80] for k in sorted(set(stored) - set(expected))[:3]]
        wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])[:3]
        raise ModelFileError(
            f"{path}: weights do not match the {metadata.architecture} architecture "
            f"(missing {missing}, unexpected {unexpected}, wrong shapes {wrong})"
        )
    network = build_model(metadata.architecture, **arguments)  # as large as the file's tensors (checked)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: cannot read weights ({error})") from None
    if record.get("content_sha256") != tensor_digest(tensors):
        raise ModelFileError(f"{path}: weights do not match their recorded checksum (file modified or corrupt)")
    gate = None
    if gate_record is not None:
        from .lesion_gate import load_gate, split_gate_header

        tensors, gate_state = split_gate_header(tensors)
        gate = load_gate(gate_record, record["gate"], gate_state, path)
    network.load_state_dict(tensors, strict=True)
    network.eval()
    return LoadedModel(network, metadata, path, gate)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The file of a model given as a path, a user model name or a bundled model name."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(
            f"{candidate}: pickle-based model files ({candidate.suffix}) are never loaded, since they can run code; "
            "use a napari-spineseg .safetensors model"
        )
    if candidate.suffix == MODEL_SUFFIX or os.sep in text or "/" in text:
        if not candidate.is_file():
            raise ModelFileError(f"{candidate}: model file not found")
        return candidate
    name = safe_model_name(text)
    for directory in (user_model_dir(), bundled_model_dir()):
        path = directory / f"{name}{MODEL_SUFFIX}"
        if path.is_file():
            return path
    known = ", ".join(info.name for info in list_models()) or "none"
    raise ModelFileError(f"unknown model {name!r} (available: {known})")


@dataclass(frozen=True)
class ModelInfo:
    """One entry of ``spineseg models``."""

    name: str
    path: Path
    source: str  # "bundled" or "user"
    metadata: ModelMetadata | None
    error: str | None = None


def list_models() -> list[ModelInfo]:
    """Bundled and user models (user models shadow bundled ones of the same name)."""
    found: dict[str, ModelInfo] = {}
    for source, directory in (("bundled", bundled_model_dir()), ("user", user_model_dir())):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*{MODEL_SUFFIX}")):
            if path.name.startswith("."):  # temporary files of an interrupted save
                continue
            name = path.name[: -len(MODEL_SUFFIX)]
            try:
                found[name] = ModelInfo(name, path, source, read_metadata(path))
            except ModelFileError as error:
                found[name] = ModelInfo(name, path, source, None, str(error))
    return list(found.values())


def user_model_path(name: str) -> Path:
    """Where a user model called ``name`` is saved."""
    return user_model_dir() / f"{safe_model_name(name)}{MODEL_SUFFIX}"


def bundled_model_names() -> set[str]:
    """The names of the bundled models (the default model's name always among them)."""
    directory = bundled_model_dir()
    names = {p.name[: -len(MODEL_SUFFIX)] for p in directory.glob(f"*{MODEL_SUFFIX}")} if directory.is_dir() else set()
    return names | {DEFAULT_MODEL_NAME}


def check_not_hiding_bundled(path: str | os.PathLike) -> None:
    """Refuse a model file in the user model folder named like a bundled model: it would hide that model."""
    path = Path(path).expanduser()
    name = path.name[: -len(MODEL_SUFFIX)] if path.name.endswith(MODEL_SUFFIX) else ""
    if not name or name.casefold() not in {n.casefold() for n in bundled_model_names()}:
        return
    user = user_model_dir()
    try:
        same = os.path.realpath(path.parent) == os.path.realpath(user) or (
            path.parent.exists() and user.exists() and os.path.samefile(path.parent, user)
        )
    except OSError:
        same = False
    if same:
        raise InputError(
            f"{name!r} is the name of a bundled model: a user model of that name would hide it; choose another name"
        )
