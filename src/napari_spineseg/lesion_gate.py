"""The slice-level lesion-presence gate: its record, its place in a model file, its use at inference.

A segmentation model with a lesion class may carry a *gate*: a small slice classifier
(``lesion-classifier``, ResNet-50 style) that sees exactly the network input of each slice
(same pre-processing, pixel spacing and 2.5-D context) and gives the probability that the
slice contains a lesion.  Where that probability is below the gate's threshold, the lesion
class gets zero probability on that slice (the remaining classes are renormalised), i.e. the
lesion decision is skipped on slices the gate is confident are lesion-free.  Everything else
of the segmentation is untouched; a model without a gate, or a segmentation with the gate
switched off (``SegmentationSettings(lesion_gate=False)``), runs exactly as before.

Storage (one ``.safetensors`` file, no pickle): the gate's tensors are stored under the
:data:`GATE_PREFIX` (``gate.``) beside the segmenter's, and the model record holds a ``gate``
entry (:class:`GateRecord`: architecture and arguments, context, threshold, gated class values,
training provenance, validation metrics).  On load the record is validated, the tensor shapes
must be exactly those of the rebuilt classifier, and a digest binds the decision settings
(architecture, arguments, context, threshold, classes) to the gate's tensors, so an edited
threshold is refused like edited weights (the file-wide content hash covers the tensors too).

No labelled lesion MRI exists for this project: gates are trained and validated on SIMULATED
hemangioma-like lesions planted in real lumbar MRI (:mod:`napari_spineseg.lesion_sim`); their
record says so (``simulated: true``) and so must every number quoted from them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ModelFileError
from .provenance import tensor_digest
from .runtime import autocast

__all__ = [
    "GATE_PREFIX",
    "SIMULATED_NOTE",
    "GateRecord",
    "GateRunner",
    "LesionGate",
    "check_compatible",
    "check_gate_header",
    "gate_record_for_file",
    "gate_runner",
    "gate_tensors",
    "lesion_channels",
    "load_gate",
    "split_gate_header",
]

GATE_PREFIX = "gate."
GATE_RECORD_VERSION = 1
SIMULATED_NOTE = (
    "SIMULATED lesions: trained and validated on hemangioma-like lesions planted by napari_spineseg.lesion_sim "
    "in real lumbar MRI; no labelled lesion MRI was available, so these figures say nothing about real lesions"
)


@dataclass
class GateRecord:
    """What a gate is and how it was made (the ``gate`` entry of a model file's record)."""

    architecture: str
    architecture_kwargs: dict[str, Any]
    context_slices: int
    threshold: float
    lesion_values: list[int]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    simulated: bool = True
    note: str = SIMULATED_NOTE
    version: int = GATE_RECORD_VERSION

    @property
    def in_channels(self) -> int:
        return 2 * int(self.context_slices) + 1

    def decision(self) -> dict[str, Any]:
        """The settings that decide what the gate does (bound to its tensors by the digest)."""
        return {
            "architecture": self.architecture,
            "kwargs": self.architecture_kwargs,
            "context_slices": int(self.context_slices),
            "threshold": float(self.threshold),
            "lesion_values": [int(v) for v in self.lesion_values],
        }

    def digest(self, tensor_digest: str) -> str:
        text = json.dumps(self.decision(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((text + "|" + tensor_digest).encode()).hexdigest()

    def to_dict(self, tensor_digest: str | None = None) -> dict[str, Any]:
        out = {
            "version": self.version,
            "architecture": {"name": self.architecture, "kwargs": self.architecture_kwargs},
            "context_slices": int(self.context_slices),
            "in_channels": self.in_channels,
            "threshold": float(self.threshold),
            "lesion_values": [int(v) for v in self.lesion_values],
            "simulated": bool(self.simulated),
            "note": self.note,
            "training": self.training,
            "metrics": self.metrics,
        }
        if tensor_digest is not None:
            out["digest"] = self.digest(tensor_digest)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "model") -> GateRecord:
        """Validate and parse a ``gate`` record; any problem is a :class:`ModelFileError`."""
        from .models.registry import ARCHITECTURES

        try:
            if not isinstance(data, dict):
                raise ValueError("the gate record is not a mapping")
            version = int(data.get("version", -1))
            if not 1 <= version <= GATE_RECORD_VERSION:
                raise ValueError(f"gate record version {version} is not supported (1..{GATE_RECORD_VERSION})")
            architecture = data["architecture"]
            name = str(architecture["name"])
            spec = ARCHITECTURES.get(name)
            if spec is None or spec.kind != "classifier":
                raise ValueError(f"{name!r} is not a slice classifier")
            kwargs = dict(architecture["kwargs"])
            if not all(isinstance(v, (int, float, str, bool, type(None))) for v in kwargs.values()):
                raise ValueError("gate architecture arguments must be plain numbers or strings")
            context = data["context_slices"]
            if type(context) is not int or not 0 <= context <= 8:
                raise ValueError(f"gate context_slices {context!r} outside 0..8")
            threshold = data["threshold"]
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise ValueError(f"gate threshold {threshold!r} is not a number")
            threshold = float(threshold)
            if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                raise ValueError(f"gate threshold {threshold} outside [0, 1]")
            values = data["lesion_values"]
            if (
                not isinstance(values, list)
                or not values
                or not all(type(v) is int and 1 <= v <= 65535 for v in values)
                or len(set(values)) != len(values)
            ):
                raise ValueError(f"gate lesion_values {values!r} must be distinct class values 1..65535")
            if not isinstance(data.get("simulated", True), bool):
                raise ValueError("gate 'simulated' must be true or false")
            return cls(
                architecture=name,
                architecture_kwargs=kwargs,
                context_slices=context,
                threshold=threshold,
                lesion_values=list(values),
                training=dict(data.get("training") or {}),
                metrics=dict(data.get("metrics") or {}),
                simulated=bool(data.get("simulated", True)),
                note=str(data.get("note", "")),
                version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
            raise ModelFileError(f"{source}: invalid lesion gate record ({str(error)[:200]})") from None

    def build(self, device: str | None = None):
        """The (untrained) classifier this record describes."""
        from .models import build_model

        kwargs = {k: v for k, v in self.architecture_kwargs.items() if k not in ("in_channels", "num_classes")}
        if device == "meta":
            import torch

            with torch.device("meta"):
                return build_model(self.architecture, in_channels=self.in_channels, num_classes=1, **kwargs)
        return build_model(self.architecture, in_channels=self.in_channels, num_classes=1, **kwargs)


@dataclass
class LesionGate:
    """A gate network (CPU, eval mode) with its record."""

    network: Any  # torch.nn.Module (LesionClassifier)
    record: GateRecord

    def scores(self, batch: np.ndarray | Any, device: str = "cpu", precision: str = "fp32") -> np.ndarray:
        """Lesion-presence probabilities ``[B]`` of network inputs ``batch`` ``[B, 2k+1, H, W]``."""
        import torch

        tensor = batch if torch.is_tensor(batch) else torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.inference_mode(), autocast(device, precision):
                logits = self.network(tensor.to(device))
        finally:
            self.network.train(was_training)
        return torch.sigmoid(logits.float()).cpu().numpy()


def lesion_channels(class_values: list[int], lesion_values: list[int]) -> list[int]:
    """Indices (in the model's class order) of the gated classes present in the model."""
    return [i for i, v in enumerate(class_values) if v in set(lesion_values) and i > 0]


# ------------------------------------------------------------------------------------------------
# Model files (called from napari_spineseg.modelfile, which also has attach_gate)
# ------------------------------------------------------------------------------------------------
def gate_tensors(gate: LesionGate) -> dict[str, Any]:
    return {GATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in gate.network.state_dict().items()}


def gate_record_for_file(gate: LesionGate, metadata) -> dict[str, Any]:
    """The ``gate`` entry written into a model file (checks the gate fits the segmenter)."""
    check_compatible(gate.record, metadata, InputError, "gate")
    return gate.record.to_dict(tensor_digest(gate_tensors(gate)))


def check_compatible(record: GateRecord, metadata, error: type[Exception], source: str) -> None:
    """Raise ``error`` unless the gate sees the segmenter's input and gates classes the model has."""
    if record.context_slices != metadata.context_slices:
        raise error(
            f"{source}: the lesion gate sees {record.in_channels} slices but the segmenter "
            f"{metadata.in_channels}; a gate must see the segmenter's input"
        )
    missing = sorted(set(record.lesion_values) - set(metadata.class_values))
    if missing:
        raise error(f"{source}: the lesion gate gates class value(s) {missing} the model does not have")


def split_gate_header(header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(segmenter entries, gate entries without the prefix) of a safetensors tensor table."""
    rest = {k: v for k, v in header.items() if not k.startswith(GATE_PREFIX)}
    gate = {k[len(GATE_PREFIX) :]: v for k, v in header.items() if k.startswith(GATE_PREFIX)}
    return rest, gate


def check_gate_header(record_data: Any, gate_header: dict[str, Any], metadata, path: Path) -> GateRecord:
    """Validate a file's gate record against its gate tensor table, before reading tensors."""
    record = GateRecord.from_dict(record_data, str(path))
    check_compatible(record, metadata, ModelFileError, str(path))
    try:
        skeleton = record.build("meta")
    except Exception as error:  # InputError, or torch refusing absurd sizes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ModelFileError(f"{path}: the lesion gate record describes an unbuildable network ({reason})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v["shape"]) for k, v in gate_header.items()}
    if expected != stored:
        raise ModelFileError(f"{path}: the lesion gate's weights do not match its record ({record.architecture})")
    return record


def load_gate(record: GateRecord, record_data: dict[str, Any], tensors: dict[str, Any], path: Path) -> LesionGate:
    """The gate network from its (already checked) record and its tensors (prefix removed)."""
    prefixed = {GATE_PREFIX + k: v for k, v in tensors.items()}
    if record_data.get("digest") != record.digest(tensor_digest(prefixed)):
        raise ModelFileError(
            f"{path}: the lesion gate's settings do not match its weights (threshold or record modified)"
        )
    network = record.build()
    network.load_state_dict(tensors, strict=True)
    network.eval()
    return LesionGate(network, record)


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
class GateRunner:
    """Applies a gate to batches of class probabilities inside :class:`~napari_spineseg.inference.Predictor`.

    Counts slices seen and skipped (``slices``, ``skipped``) over the runner's life.
    """

    def __init__(self, gate: LesionGate, channels: list[int], device: str, precision: str) -> None:
        import torch

        self.record = gate.record
        self.threshold = float(gate.record.threshold)
        self.channels = list(channels)
        self.device = device
        self.precision = precision
        network = gate.network.eval()
        if device != "cpu" or precision == "bf16":
            network = network.to(device=device, memory_format=torch.channels_last)
        self.gate = LesionGate(network, gate.record)
        self.slices = 0
        self.skipped = 0

    def apply(self, tensor, probabilities: np.ndarray) -> np.ndarray:
        """``probabilities`` ``[B, C, H, W]`` with the gated classes zeroed (and the others
        renormalised) on the slices of ``tensor`` (the network input) the gate calls lesion-free."""
        scores = self.gate.scores(tensor, self.device, self.precision)
        skip = scores < self.threshold
        self.slices += int(skip.size)
        self.skipped += int(skip.sum())
        if not skip.any():
            return probabilities
        part = probabilities[skip]
        part[:, self.channels] = 0.0
        total = part.sum(axis=1, keepdims=True)
        empty = total[:, 0] < 1e-6  # everything was lesion: call it background
        part /= np.maximum(total, np.float32(1e-6))
        if empty.any():
            part[:, 0][empty] = 1.0
        probabilities[skip] = part
        return probabilities


def gate_runner(model, settings, device: str, precision: str) -> GateRunner | None:
    """The gate of a loaded model for a predictor, or ``None`` (no gate, no gated class, or switched off)."""
    gate = getattr(model, "gate", None)
    if gate is None or not getattr(settings, "lesion_gate", True):
        return None
    channels = lesion_channels(model.metadata.class_values, gate.record.lesion_values)
    if not channels:
        return None
    return GateRunner(gate, channels, device, precision)
