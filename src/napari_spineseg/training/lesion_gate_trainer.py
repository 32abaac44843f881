"""Training the slice-level lesion-presence gate (Qt-free), on SIMULATED lesions in real anatomy.

    events = train_gate(config, train_cases, val_cases, base=load_model("my-lesion-model"))
    for event in events:          # GateEvent(kind="prepare" | "step" | "validation" | "checkpoint" | "done")
        ...                       # stop any time: events.close() (or set the ``cancel`` event)

No labelled lesion MRI exists for this project, so the gate learns from hemangioma-like lesions
planted by :mod:`napari_spineseg.lesion_sim` in the vertebral bodies of real lumbar studies
(VB3, VB1).  Every training case gets ``lesion_copies`` copies with one or more simulated
lesions; a slice (of any plane) is *positive* when its centre slice holds at least
``min_lesion_pixels`` lesion pixels at the model's pixel spacing, *negative* when neither it nor
its context slices hold any, and is left out otherwise (a lesion rim, or a lesion only in the
neighbouring slices).  Cases whose labels already hold lesions (phantoms) are used as they are.

Training samples are 2.5-D crops (``crop_size``) cut exactly as the segmenter's inputs (same
pre-processing, pixel spacing and context, :func:`~.datasets.prepare_plane_stack`), half
positive (around a lesion) and half negative (mostly centred on a vertebral body: the hard
negatives), augmented with :func:`~napari_spineseg.augment.augment_pair`; the loss is BCE.

Validation is slice-level on whole slices of held-out patients, as inference sees them: every
slice of every plane of the clean study (negatives: what the gate should skip) and the slices
through the simulated lesions of ``val_lesion_copies`` lesion copies (positives).  It reports
the AUC, the threshold reaching ``target_sensitivity`` on the positive slices, the sensitivity
and specificity at that threshold, the fraction of lesion-free slices skipped (all, and those
showing a vertebral body) and the fraction of lesion pixels lying on skipped slices.  The best
gate (by AUC) is kept; with ``base`` (a segmentation model with a lesion class) and
``config.output`` it is written, atomically, into a copy of the base model file after every
improvement.  All metrics are recorded as measured on simulated lesions.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import threading
import time
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..augment import AugmentConfig, augment_pair
from ..errors import InputError
from ..lesion_gate import SIMULATED_NOTE, GateRecord, LesionGate
from ..orientation import Plane
from ..preprocess import PreprocessConfig
from ..runtime import autocast, resolve_device, seed_everything, training_precision
from ..schema import LESION, VERTEBRAL_BODY
from ..slicing import canonical_labels, prepare_study, slice_batch
from .common import CsvLog, scheduled_lr
from .data import TrainingCase
from .datasets import pad_to_size, prepare_plane_stack, window_origin

__all__ = [
    "GateConfig",
    "GateEvent",
    "GateResult",
    "GateTrainingRun",
    "evaluate_gate",
    "gate_config_for_model",
    "gate_metrics",
    "run_gate_training",
    "simulate_lesion_case",
    "train_gate",
]

logger = logging.getLogger(__name__)


def gate_augment() -> AugmentConfig:
    """Geometric and strong intensity augmentation (T1↔T2 inversion, bias field, gamma, noise)."""
    return AugmentConfig(
        flip_prob=0.0,
        rotate_deg=15.0,
        rotate_prob=0.5,
        scale_range=(0.85, 1.2),
        elastic_prob=0.1,
        brightness=0.1,
        contrast=0.25,
        gamma_range=(0.6, 1.6),
        gamma_prob=0.5,
        noise_std=0.04,
        noise_prob=0.3,
        invert_prob=0.2,
        bias_field=0.3,
    )


@dataclass
class GateConfig:
    """Everything that defines a gate training run (recorded in the gate's record)."""

    architecture_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"width": 0.125, "dropout": 0.0, "pool": "avgmax"}
    )
    context_slices: int = 1  # must be the segmenter's: the gate sees the segmenter's input
    planes: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(pixel_spacing_mm=1.0))
    lesion_values: list[int] = field(default_factory=lambda: [LESION])
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_fraction: float = 0.02
    grad_clip: float | None = 5.0
    crop_size: int = 96
    augment: AugmentConfig | None = field(default_factory=gate_augment)
    lesion_copies: int = 2  # simulated-lesion copies of every training case
    lesions_per_copy: int = 2  # 1..this many lesions per copy
    diameter_mm: tuple[float, float] = (8.0, 16.0)
    gain: tuple[float, float] = (1.5, 1.9)  # lesion intensity relative to the body's marrow (lesion_sim)
    min_lesion_pixels: int = 20  # a positive slice shows at least this many lesion pixels
    hard_negative_fraction: float = 0.7  # negative crops centred on a vertebral body
    aux_weight: float = 0.5  # dense lesion-map loss on the stride-16 features (training only, not stored)
    target_sensitivity: float = 0.98  # of positive validation slices, sets the threshold
    val_every: int = 250
    val_lesion_copies: int = 2
    val_batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "auto"  # auto | off | bf16
    num_threads: int | None = None
    output: Path | None = None  # model file written with the gate (needs ``base``)
    log_csv: Path | None = None
    model_name: str | None = None  # name stored in the output model (default: the base's)

    def __post_init__(self) -> None:
        self.planes = [Plane(p).value for p in self.planes]
        if not self.planes:
            raise InputError("choose at least one plane")
        if int(self.steps) < 1 or int(self.batch_size) < 2 or int(self.val_every) < 1:
            raise InputError("steps and val_every must be >= 1 and batch_size >= 2")
        if not 0 <= int(self.context_slices) <= 8:
            raise InputError(f"context_slices must be in 0..8, got {self.context_slices}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise InputError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if int(self.crop_size) < 32 or int(self.min_lesion_pixels) < 1:
            raise InputError("crop_size must be >= 32 and min_lesion_pixels >= 1")
        if int(self.lesion_copies) < 1 or int(self.lesions_per_copy) < 1:
            raise InputError("lesion_copies and lesions_per_copy must be >= 1")
        if self.mixed_precision not in ("auto", "off", "fp32", "bf16"):
            raise InputError(f"unknown mixed precision {self.mixed_precision!r}: auto, off or bf16")
        for name in ("output", "log_csv"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, (PreprocessConfig, AugmentConfig)):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


def gate_config_for_model(config: GateConfig, metadata) -> GateConfig:
    """``config`` made to see what the segmenter of ``metadata`` sees (context, pre-processing,
    planes) and to gate its lesion class(es)."""
    values = [c.value for c in metadata.classes if c.value == LESION or c.name.strip().lower() == "lesion"]
    if not values:
        names = ", ".join(f"{c.value} {c.name}" for c in metadata.classes)
        raise InputError(
            f"model {metadata.name!r} has no lesion class ({names}): a lesion gate would never be used; "
            "add a lesion class first (e.g. spineseg finetune ... --class-name 4=lesion)"
        )
    preprocess = PreprocessConfig.from_dict(metadata.preprocess) if metadata.preprocess else PreprocessConfig()
    return replace(
        config,
        context_slices=int(metadata.context_slices),
        preprocess=preprocess,
        planes=list(metadata.planes),
        lesion_values=values,
    )


@dataclass
class GateEvent:
    """Progress of a gate training run (the loop's conventions: ``step`` ... ``done``)."""

    kind: str  # "prepare" | "step" | "validation" | "checkpoint" | "done"
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    metrics: dict[str, Any] | None = None
    message: str = ""
    seconds: float = 0.0
    result: GateResult | None = None


@dataclass
class GateResult:
    """Outcome of :func:`train_gate`: the best gate (CPU, eval mode) and how it was found."""

    gate: LesionGate | None
    best_score: float | None
    best_step: int | None
    history: list[dict[str, Any]]
    steps: int
    total_steps: int
    cancelled: bool = False
    model_path: Path | None = None


class _Cancelled(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Data: simulated-lesion copies, prepared like the segmenter's inputs
# ------------------------------------------------------------------------------------------------
def _case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode()) & 0x7FFFFFFF


def simulate_lesion_case(
    case: TrainingCase,
    rng: np.random.Generator,
    lesions: int,
    diameter_mm: tuple[float, float] = (8.0, 16.0),
    gain: tuple[float, float] = (1.5, 1.9),
) -> tuple[TrainingCase, int]:
    """A copy of ``case`` with up to ``lesions`` SIMULATED hemangioma-like lesions (label 4) in its
    vertebral bodies; returns the copy and how many lesions were planted."""
    from ..lesion_sim import simulate_hemangioma

    image, labels, planted = case.image, case.labels, 0
    for _ in range(int(lesions)):
        try:
            image, labels, _record = simulate_hemangioma(image, labels, rng, diameter_mm=diameter_mm, gain=gain)
            planted += 1
        except InputError as error:  # no body deep enough for this size: fewer lesions
            logger.debug("%s: %s", case.case_id, error)
    copy_case = TrainingCase(
        image=image,
        labels=labels,
        known_classes=set(case.known_classes) | {LESION},
        patient=case.patient,
        dataset=case.dataset,
        case_id=f"{case.case_id}+simlesion",
        paths=dict(case.paths),
    )
    return copy_case, planted


@dataclass
class _Stack:
    image: np.ndarray  # [N, H, W] at the model spacing
    lesion: np.ndarray  # int [N] lesion pixels of each slice
    near: np.ndarray  # bool [N]: lesion within the context slices
    body: np.ndarray  # bool [N]: a vertebral body in the slice
    labels: np.ndarray  # uint8 [N, H, W]: 1 body, 4 lesion (any gated value), 255 ignore


@dataclass
class _Study:
    case_id: str
    patient: str
    clean: bool
    stacks: dict[str, _Stack]


def _prepare(case: TrainingCase, config: GateConfig, clean: bool) -> _Study:
    prepared = prepare_study(case.image, config.preprocess, dtype=np.float16)
    labels = np.ascontiguousarray(canonical_labels(case.labels)).astype(np.uint8, copy=False)
    gated = np.isin(labels, config.lesion_values)
    labels = np.where(gated, np.uint8(LESION), labels).astype(np.uint8)
    stacks: dict[str, _Stack] = {}
    k = int(config.context_slices)
    for plane in config.planes:
        stack = prepare_plane_stack(prepared, Plane(plane), config.preprocess, labels)
        lab = stack.labels
        flat = lab.reshape(lab.shape[0], -1)
        lesion = (flat == LESION).sum(1)
        near = np.zeros(len(lesion), dtype=bool)
        for offset in range(-k, k + 1):
            shifted = np.roll(lesion > 0, offset)
            if offset > 0:
                shifted[:offset] = False
            elif offset < 0:
                shifted[offset:] = False
            near |= shifted
        body = (flat == VERTEBRAL_BODY).any(1) | (lesion > 0)
        stacks[plane] = _Stack(np.asarray(stack.image), lesion, near, body, lab)
    return _Study(case.case_id, case.patient, clean, stacks)


def _usable(case: TrainingCase) -> bool:
    return VERTEBRAL_BODY in case.known_classes or LESION in case.known_classes


def _lesion_studies(
    cases: Sequence[TrainingCase], config: GateConfig, copies: int, tag: str, cancel: threading.Event | None
) -> Generator[tuple[str, _Study | None], None, None]:
    """Prepared simulated-lesion copies (or the case itself when it already has lesions)."""
    for case in cases:
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        if not _usable(case):
            continue
        has_lesion = bool(np.isin(case.labels.array, config.lesion_values).any())
        if has_lesion:
            yield case.case_id, _prepare(case, config, clean=False)
            continue
        for index in range(int(copies)):
            rng = np.random.default_rng([int(config.seed), _case_seed(case.case_id), index, _case_seed(tag)])
            n = int(rng.integers(1, int(config.lesions_per_copy) + 1))
            copy_case, planted = simulate_lesion_case(case, rng, n, config.diameter_mm, config.gain)
            if planted == 0:
                yield case.case_id, None
                continue
            yield case.case_id, _prepare(copy_case, config, clean=False)


# ------------------------------------------------------------------------------------------------
# Training samples
# ------------------------------------------------------------------------------------------------
def _crop(
    image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, centre: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size``² window (padding 0 / IGNORE), with ``centre`` inside its middle half when given."""
    image, labels, (top, left) = pad_to_size(image, labels, size, rng)
    if centre is not None:
        centre = (centre[0] + top, centre[1] + left)
    r0, c0 = window_origin(labels.shape, size, rng, centre)
    return image[:, r0 : r0 + size, c0 : c0 + size], labels[r0 : r0 + size, c0 : c0 + size]


class _Sampler:
    """Class-balanced batches of augmented crops: half positive, half negative slices."""

    def __init__(self, studies: list[_Study], config: GateConfig) -> None:
        self.studies = studies
        self.config = config
        positives, negatives, hard = [], [], []
        for si, study in enumerate(studies):
            for plane, stack in study.stacks.items():
                for index in range(len(stack.lesion)):
                    if stack.lesion[index] >= config.min_lesion_pixels:
                        positives.append((si, plane, index))
                    elif not stack.near[index]:
                        negatives.append((si, plane, index))
                        if stack.body[index]:
                            hard.append((si, plane, index))
        if not positives:
            raise InputError("no slice shows a simulated lesion: no positive training samples for the gate")
        if not negatives:
            raise InputError("no lesion-free slice: no negative training samples for the gate")
        self.positives, self.negatives, self.hard = positives, negatives, hard or negatives

    def sample(self, entry: tuple[int, str, int], positive: bool, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        config = self.config
        si, plane, index = entry
        stack = self.studies[si].stacks[plane]
        image = slice_batch(stack.image, [index], config.context_slices)[0]
        labels = np.array(stack.labels[index], dtype=np.uint8)
        target_value = LESION if positive else VERTEBRAL_BODY
        centre = None
        if positive or rng.random() < config.hard_negative_fraction:
            rows, cols = np.nonzero(labels == target_value)
            if rows.size:
                pick = int(rng.integers(rows.size))
                centre = (int(rows[pick]), int(cols[pick]))
        image, labels = _crop(image, labels, int(config.crop_size), rng, centre)
        if config.augment is not None:
            image, labels = augment_pair(image, labels, rng, config.augment)
        mask = (labels == LESION).astype(np.float32)
        if not positive:
            return np.ascontiguousarray(image, np.float32), 0.0, mask
        area = int(mask.sum())
        # A crop that lost most of its lesion (edge of the window, augmentation) is left out.
        weight = 1.0 if area >= config.min_lesion_pixels else 0.0
        return np.ascontiguousarray(image, np.float32), weight, mask

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        config = self.config
        rng = np.random.default_rng([int(config.seed), 4242, int(step)])
        n = int(config.batch_size)
        n_pos = n // 2
        images, targets, weights, masks = [], [], [], []
        for i in range(n):
            positive = i < n_pos
            if positive:
                entry = self.positives[int(rng.integers(len(self.positives)))]
            elif rng.random() < config.hard_negative_fraction:
                entry = self.hard[int(rng.integers(len(self.hard)))]
            else:
                entry = self.negatives[int(rng.integers(len(self.negatives)))]
            image, weight, mask = self.sample(entry, positive, rng)
            images.append(image)
            masks.append(mask)
            targets.append(1.0 if positive else 0.0)
            weights.append(weight if positive else 1.0)
        return np.stack(images), np.asarray(targets, np.float32), np.asarray(weights, np.float32), np.stack(masks)


# ------------------------------------------------------------------------------------------------
# Slice-level evaluation
# ------------------------------------------------------------------------------------------------
def _auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann–Whitney, ties count one half)."""
    from scipy.stats import rankdata

    if len(positive) == 0 or len(negative) == 0:
        return None
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gate_metrics(
    scores: dict[str, np.ndarray], target_sensitivity: float = 0.98, threshold: float | None = None
) -> dict[str, Any]:
    """Slice-level metrics of gate ``scores`` (see :func:`evaluate_gate` for the keys of ``scores``).

    ``threshold`` None: the largest threshold keeping ``target_sensitivity`` of the positive
    slices (the gate never skips more lesions than that on these slices).
    """
    pos, neg = np.asarray(scores["positive"], float), np.asarray(scores["negative"], float)
    if threshold is None:
        if len(pos):
            ordered = np.sort(pos)
            k = math.floor((1.0 - target_sensitivity) * len(ordered) + 1e-9)
            threshold = float(ordered[min(k, len(ordered) - 1)])
        else:
            threshold = 0.5
    t = float(threshold)
    lesion_scores = np.asarray(scores["lesion_scores"], float)
    lesion_pixels = np.asarray(scores["lesion_pixels"], float)
    neg_body = np.asarray(scores["negative_body"], bool)
    total_lesion = float(lesion_pixels.sum())
    return {
        "simulated_lesions": True,
        "auc": _auc(pos, neg),
        "threshold": t,
        "target_sensitivity": float(target_sensitivity),
        "sensitivity": float(np.mean(pos >= t)) if len(pos) else None,
        "specificity": float(np.mean(neg < t)) if len(neg) else None,
        "skipped_lesion_free_fraction": float(np.mean(neg < t)) if len(neg) else None,
        "skipped_lesion_free_body_fraction": float(np.mean(neg[neg_body] < t)) if neg_body.any() else None,
        "lesion_pixels_on_skipped_slices": (
            float(lesion_pixels[lesion_scores < t].sum() / total_lesion) if total_lesion > 0 else None
        ),
        "positive_slices": len(pos),
        "negative_slices": len(neg),
        "negative_body_slices": int(neg_body.sum()),
    }


def _score_stack(network, stack: _Stack, indices, context: int, batch_size: int, device, precision, cancel):
    import torch

    out = []
    for start in range(0, len(indices), batch_size):
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        part = indices[start : start + batch_size]
        batch = torch.from_numpy(slice_batch(stack.image, part, context)).to(device)
        with torch.inference_mode(), autocast(device, precision):
            logits = network(batch)
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate_gate(
    network,
    clean: Sequence[_Study],
    lesioned: Sequence[_Study],
    config: GateConfig,
    device: str = "cpu",
    precision: str = "fp32",
    cancel: threading.Event | None = None,
) -> dict[str, np.ndarray]:
    """Scores of whole slices, as inference cuts them: every slice of the ``clean`` studies
    (negatives) and the slices through lesions of the ``lesioned`` ones (positives / rims)."""
    was_training = network.training
    network.eval()
    k = int(config.context_slices)
    neg, neg_body, pos, lesion_scores, lesion_pixels = [], [], [], [], []
    try:
        for study in clean:
            for stack in study.stacks.values():
                indices = np.arange(len(stack.lesion))
                s = _score_stack(network, stack, indices, k, config.val_batch_size, device, precision, cancel)
                neg.append(s)
                neg_body.append(stack.body)
        for study in lesioned:
            for stack in study.stacks.values():
                indices = np.flatnonzero(stack.lesion > 0)
                s = _score_stack(network, stack, indices, k, config.val_batch_size, device, precision, cancel)
                lesion_scores.append(s)
                lesion_pixels.append(stack.lesion[indices])
                pos.append(s[stack.lesion[indices] >= config.min_lesion_pixels])
    finally:
        network.train(was_training)

    def cat(parts, dtype=float):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return {
        "positive": cat(pos),
        "negative": cat(neg),
        "negative_body": cat(neg_body, bool),
        "lesion_scores": cat(lesion_scores),
        "lesion_pixels": cat(lesion_pixels),
    }


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
LOG_COLUMNS = [
    "step",
    "train_loss",
    "lr",
    "auc",
    "threshold",
    "sensitivity",
    "specificity",
    "skipped_lesion_free_body_fraction",
    "lesion_pixels_on_skipped_slices",
    "seconds",
    "best",
]


def _lr_at(config: GateConfig, step: int) -> float:
    return scheduled_lr(
        config.lr,
        step,
        int(config.steps),
        schedule="cosine",
        warmup_steps=config.warmup_steps,
        min_lr_fraction=config.min_lr_fraction,
    )


def train_gate(
    config: GateConfig,
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase] = (),
    *,
    base=None,
    cancel: threading.Event | None = None,
    provenance: dict[str, Any] | None = None,
) -> Generator[GateEvent, None, GateResult]:
    """Train a lesion-presence gate; yields :class:`GateEvent`; returns a :class:`GateResult`.

    ``base``: a :class:`~napari_spineseg.modelfile.LoadedModel` with a lesion class; its
    context and pre-processing must be those of ``config`` (see :func:`gate_config_for_model`)
    and, with ``config.output``, the best gate is written into a copy of it (atomically).
    ``cancel`` stops the run between steps (and between validation batches); the files written
    so far stay intact.  Cases without vertebral-body labels (IVD) are not used.
    The phases are the methods of :class:`GateTrainingRun`.
    """
    run = GateTrainingRun(config, train_cases, val_cases, base=base, cancel=cancel, provenance=provenance)
    return (yield from run.events())


class GateTrainingRun:
    """One gate training run: state on the object, phases as methods (the segmenter loop's shape):
    :meth:`setup`, :meth:`prepare` (simulated-lesion studies), :meth:`build`, :meth:`step`,
    :meth:`validate`, :meth:`keep_best`, :meth:`checkpoint` (the model file with the gate),
    :meth:`result`, driven by :meth:`events`."""

    def __init__(
        self,
        config: GateConfig,
        train_cases: Sequence[TrainingCase],
        val_cases: Sequence[TrainingCase] = (),
        *,
        base=None,
        cancel: threading.Event | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.train_cases = train_cases
        self.val_cases = val_cases
        self.base = base
        self.cancel = cancel
        self.provenance = provenance
        self.started = time.perf_counter()
        self.total = int(config.steps)
        self.step_count = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.best_metrics: dict[str, Any] = {}
        self.saved: Path | None = None

    def seconds(self) -> float:
        return _since(self.started)

    def setup(self) -> None:
        """Threads, device, precision, seeds; checks the base model and the output."""
        import torch

        config = self.config
        self.started = time.perf_counter()
        if config.num_threads is not None:
            torch.set_num_threads(max(1, int(config.num_threads)))
        self.device = resolve_device(config.device)
        precision = training_precision(config.mixed_precision, self.device, fp16_needs_cuda=False)
        self.precision = "fp32" if precision == "fp16" else precision  # no loss scaling here: bf16 or fp32 only
        seed_everything(config.seed)
        base = self.base
        if base is not None and int(base.metadata.context_slices) != int(config.context_slices):
            raise InputError("the gate must see the segmenter's input: use gate_config_for_model(config, metadata)")
        self.output = config.output
        if self.output is not None and base is None:
            raise InputError("writing a model file with the gate needs the base segmentation model (base=...)")

    def prepare(self) -> Generator[GateEvent, None, None]:
        """Simulated-lesion training studies and clean/lesioned validation studies (raises ``_Cancelled``)."""
        config, cancel, total = self.config, self.cancel, self.total
        self.training_ids = [c.case_id for c in self.train_cases if _usable(c)]
        self.validation_ids = [c.case_id for c in self.val_cases if _usable(c)]
        if not self.training_ids:
            raise InputError("no training case with vertebral-body (or lesion) labels for the gate")
        self.studies: list[_Study] = []
        self.planted = 0
        for done, (case_id, study) in enumerate(
            _lesion_studies(self.train_cases, config, config.lesion_copies, "train", cancel), start=1
        ):
            if study is not None:
                self.studies.append(study)
                self.planted += 1
            yield GateEvent(
                "prepare", 0, total, message=f"simulated lesions in {case_id} ({done})", seconds=self.seconds()
            )
        self.val_clean: list[_Study] = []
        self.val_lesioned: list[_Study] = []
        for case in self.val_cases:
            if not _usable(case):
                continue
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            if not np.isin(case.labels.array, config.lesion_values).any():
                self.val_clean.append(_prepare(case, config, clean=True))
            yield GateEvent("prepare", 0, total, message=f"validation study {case.case_id}", seconds=self.seconds())
        for case_id, study in _lesion_studies(self.val_cases, config, config.val_lesion_copies, "val", cancel):
            if study is not None:
                self.val_lesioned.append(study)
            yield GateEvent("prepare", 0, total, message=f"validation lesions in {case_id}", seconds=self.seconds())

    def build(self) -> None:
        """Sampler, network (with the training-only dense head), optimizer, losses, log, record."""
        import torch

        from ..models import build_model

        config, device = self.config, self.device
        self.sampler = _Sampler(self.studies, config)
        self.kwargs = {k: v for k, v in config.architecture_kwargs.items() if k not in ("in_channels", "num_classes")}
        self.in_channels = 2 * int(config.context_slices) + 1
        net = build_model("lesion-classifier", in_channels=self.in_channels, num_classes=1, **self.kwargs).to(device)
        self.arch_kwargs = {k: v for k, v in net.arch_kwargs.items() if k not in ("in_channels", "num_classes")}
        # Training-only dense head on the stride-16 features: where in the crop is a lesion?  It gives
        # every step a gradient at the lesion's location (the presence logit alone gives one number per
        # crop), which makes the classifier learn far faster from scratch; it is not stored.
        self.captured: dict[str, Any] = {}
        self.hook = net.backbone.layer3.register_forward_hook(
            lambda _m, _i, out: self.captured.__setitem__("features", out)
        )
        self.aux_head = torch.nn.Conv2d(net.backbone.layer3[-1].conv3.out_channels, 1, 1).to(device)
        if config.aux_weight > 0:
            parameters = [*net.parameters(), *self.aux_head.parameters()]
        else:
            parameters = list(net.parameters())
        self.net = net
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        self.aux_loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(5.0, device=device))
        self.log = CsvLog(config.log_csv, LOG_COLUMNS)
        self.training_record = self._training_record()
        self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})

    def _training_record(self) -> dict[str, Any]:
        import torch

        from .. import __version__

        config, base = self.config, self.base
        return {
            "kind": "lesion-presence gate",
            "simulated_lesions": True,
            "note": SIMULATED_NOTE,
            "config": config.to_dict(),
            "lesion_simulator": "napari_spineseg.lesion_sim.simulate_hemangioma",
            "train_cases": self.training_ids,
            "val_cases": self.validation_ids,
            "train_patients": sorted({c.patient for c in self.train_cases if _usable(c)}),
            "val_patients": sorted({c.patient for c in self.val_cases if _usable(c)}),
            "lesion_copies": self.planted,
            "positive_training_slices": len(self.sampler.positives),
            "negative_training_slices": len(self.sampler.negatives),
            "base_model": None if base is None else base.metadata.name,
            "base_model_path": None if base is None or base.path is None else str(base.path),
            "device": self.device,
            "precision": self.precision,
            "torch_version": torch.__version__,
            "package_version": __version__,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            **(self.provenance or {}),
        }

    def make_gate(self, state: dict[str, Any], metrics: dict[str, Any]) -> LesionGate:
        """A gate (CPU, eval mode) from weights ``state`` and validation ``metrics``."""
        from ..models import build_model

        config = self.config
        network = build_model("lesion-classifier", in_channels=self.in_channels, num_classes=1, **self.kwargs)
        network.load_state_dict(state)
        network.eval()
        record = GateRecord(
            architecture="lesion-classifier",
            architecture_kwargs=self.arch_kwargs,
            context_slices=int(config.context_slices),
            threshold=float(metrics.get("threshold", 0.5)),
            lesion_values=[int(v) for v in config.lesion_values],
            training={
                **self.training_record,
                "steps": self.step_count,
                "best_step": self.best_step,
                "seconds": round(self.seconds(), 1),
            },
            metrics=metrics,
        )
        return LesionGate(network, record)

    def step(self) -> tuple[float, float]:
        """One optimizer step on the next sampled batch; returns ``(loss, learning rate)``."""
        import torch
        import torch.nn.functional as F

        config, device, optimizer = self.config, self.device, self.optimizer
        lr = _lr_at(config, self.step_count)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets, weights, masks = self.sampler.batch(self.step_count)
        x = torch.from_numpy(images).to(device)
        y = torch.from_numpy(targets).to(device)
        w = torch.from_numpy(weights).to(device)
        with autocast(device, self.precision):
            logits = self.net(x)
            dense = self.aux_head(self.captured["features"]) if config.aux_weight > 0 else None
        loss = (self.loss_fn(logits.float(), y) * w).sum() / w.sum().clamp_min(1.0)
        if dense is not None:
            cells = F.adaptive_max_pool2d(torch.from_numpy(masks).to(device)[:, None], dense.shape[-2:])
            loss = loss + config.aux_weight * self.aux_loss_fn(dense.float(), cells)
        if not torch.isfinite(loss):
            raise InputError(f"gate training diverged at step {self.step_count} (loss {float(loss)})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), config.grad_clip)
        optimizer.step()
        self.step_count += 1
        return float(loss.detach()), lr

    def keep_best(self, score: float | None, metrics: dict[str, Any]) -> bool:
        """Whether ``score`` (AUC) improves on the best; if so the weights and metrics are kept."""
        improved = self.best_score is None or (score is not None and score > self.best_score + 1e-6)
        if score is None and self.best_score is None:
            improved = True  # no validation: the latest weights are the best we know
        if improved:
            self.best_score, self.best_step = score, self.step_count
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            self.best_metrics = {**metrics, "step": self.step_count}
        return improved

    def validate(self, loss_value: float | None, lr: float) -> tuple[GateEvent, bool]:
        """Slice-level metrics on the validation studies, best kept, CSV row; returns ``(event, improved)``."""
        metrics: dict[str, Any] = {}
        if self.val_clean or self.val_lesioned:
            scores = evaluate_gate(
                self.net, self.val_clean, self.val_lesioned, self.config, self.device, self.precision, self.cancel
            )
            metrics = gate_metrics(scores, self.config.target_sensitivity)
            metrics["validation"] = "whole slices of held-out patients; SIMULATED lesions"
        improved = self.keep_best(metrics.get("auc"), metrics)
        row = {
            "step": self.step_count,
            "train_loss": None if loss_value is None else round(loss_value, 6),
            "lr": lr,
            **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()},
            "seconds": round(self.seconds(), 1),
            "best": int(improved),
        }
        self.history.append(row)
        self.log.write(row)
        event = GateEvent("validation", self.step_count, self.total, loss_value, lr, metrics, seconds=self.seconds())
        return event, improved

    def checkpoint(self) -> GateEvent:
        """Write the best gate into a copy of the base model file (atomically)."""
        from ..lesion_gate import gate_record_for_file
        from ..modelfile import attach_gate

        gate = self.make_gate(self.best_state, self.best_metrics)
        gate_record_for_file(gate, self.base.metadata)  # fits the base (raises otherwise)
        self.saved = attach_gate(self.base, gate, self.output, name=self.config.model_name)
        return GateEvent(
            "checkpoint",
            self.step_count,
            self.total,
            metrics=self.best_metrics,
            message=f"saved model with lesion gate to {self.saved}",
            seconds=self.seconds(),
        )

    def result(self, cancelled: bool) -> GateResult:
        gate = self.make_gate(self.best_state, self.best_metrics) if self.best_step is not None else None
        return GateResult(
            gate, self.best_score, self.best_step, self.history, self.step_count, self.total, cancelled, self.saved
        )

    def events(self) -> Generator[GateEvent, None, GateResult]:
        """Set up, prepare the studies, build, then step/validate/keep best/checkpoint; yields every event."""
        self.setup()
        total = self.total
        try:
            yield from self.prepare()
        except _Cancelled:
            outcome = GateResult(None, None, None, [], 0, total, cancelled=True)
            yield GateEvent("done", 0, total, message="cancelled while preparing", result=outcome)
            return outcome
        self.build()
        self.net.train()
        since, since_n, cancelled = 0.0, 0, False
        try:
            while self.step_count < total:
                if self.cancel is not None and self.cancel.is_set():
                    cancelled = True
                    break
                value, lr = self.step()
                since += value
                since_n += 1
                yield GateEvent("step", self.step_count, total, value, lr, seconds=self.seconds())
                if self.step_count % int(self.config.val_every) == 0 or self.step_count >= total:
                    event, improved = self.validate(since / max(since_n, 1), lr)
                    since, since_n = 0.0, 0
                    yield event
                    if improved and self.output is not None:
                        yield self.checkpoint()
        except _Cancelled:
            cancelled = True
        finally:
            self.hook.remove()
        outcome = self.result(cancelled)
        auc = "n/a" if self.best_score is None else f"{self.best_score:.4f}"
        message = "cancelled" if cancelled else "finished"
        yield GateEvent(
            "done",
            self.step_count,
            total,
            metrics=self.best_metrics,
            message=f"{message} after {self.step_count} steps; best validation AUC {auc} "
            f"(simulated lesions) at step {self.best_step}",
            seconds=self.seconds(),
            result=outcome,
        )
        return outcome


def _since(started: float) -> float:
    return time.perf_counter() - started


def run_gate_training(
    config: GateConfig, train_cases: Sequence[TrainingCase], val_cases: Sequence[TrainingCase] = (), **kwargs
) -> GateResult:
    """Drain :func:`train_gate` and return its :class:`GateResult`."""
    from .._generators import drain

    return drain(train_gate(config, train_cases, val_cases, **kwargs))
