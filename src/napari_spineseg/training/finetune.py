"""Fine-tuning a model from an annotator's corrections (Qt-free).

    pairs = [CorrectionPair(image, corrected, prediction=original)]     # or reviewed_slices=...
    events = finetune("spineseg-default", pairs, FinetuneConfig(steps=200),
                      reference_cases=a_few_training_cases)
    for event in events: ...        # TrainEvent: "status", "step", "validation", "done"
    result = StopIteration.value    # FinetuneResult (or use run_finetune(...))
    save_finetuned(result, "my-model")                 # a new file; the base is never overwritten

What is trusted
    An annotator looks at a few slices, not at the whole study.  When the model's original
    ``prediction`` or the ``reviewed_slices`` are known, only the slices the annotator changed
    (corrected ≠ prediction; the plane they were edited in is detected, see
    :func:`correction_targets`) and the slices they reviewed are targets; everything else becomes
    IGNORE (255).  A plane other than the one a slice was reviewed in sees only the voxels lying
    on that slice (a line per slice).  Without either, the whole corrected label map is trusted.
    ``CorrectionPair.known_classes`` narrows what the annotator vouches for (e.g. only the
    vertebral bodies).  Sampling: slices holding changed voxels (or voxels of a new class) weigh
    ``changed_priority`` times more, and every correction slice is weighted by its share of
    trusted pixels, so the reviewed slices are not crowded out by the many other-plane slices
    that cross them in a single line.

New classes
    A label value the base model does not know becomes a new class: the output layer is grown
    (:func:`~napari_spineseg.models.extend_output_classes`, old classes kept exactly) and the new
    row starts as a copy of the class the base model predicted there (e.g. "vertebral body" for a
    lesion painted inside a body) with its bias lowered by ``new_class_margin``, so the grown
    model still segments exactly like the base model until it has learned the new class.  The
    new rows train ``new_class_lr_scale`` times faster (Adam moves every weight by about ``lr``
    per step, far too little for a fresh row at fine-tuning rates); ``new_class_weight`` > 1
    weighs the new class up in the loss (faster, but it also lowers the decision threshold and
    lets the new class spread over its parent).  Names come
    from ``class_names``, else from the schema (4 → "lesion"), else "class N".

Forgetting
    A few ``reference_cases`` (cases the base model was trained on; by default two recorded in the
    base model's metadata) are replayed at ``replay_fraction`` (0.5) of the samples, and on those
    samples the fine-tuned model is kept close to the base model's predictions
    (``distill_weight`` 10, "learning without forgetting"; probability given to a new class there
    counts as disagreement, weighed by ``new_class_distill_weight``).  Batch-norm statistics stay
    frozen.  The encoder learns at ``lr`` and the decoder at ``decoder_lr_scale`` (10) times it:
    the decoder adapts the boundaries to the annotator while the features the other studies rely
    on move little; the U-Net's full-resolution input stage is frozen (``frozen_input_stages``,
    13 % cheaper steps) and ``encoder_lr_scale`` 0 freezes the encoder; ``l2sp_weight`` pulls every weight
    toward the base, ``distill_unreviewed_weight`` distils on the corrected studies' unreviewed
    pixels too; both off by default).  Per-class Dice is measured before and at every
    evaluation (``val_every``) on a *fixed* validation set whose identities are stored in the
    new model (``training["fixed_validation"]``) and reused from the base model when present, so
    every round is judged on the same cases; the first round takes the base model's own
    validation cases (at most ``fixed_validation_limit``) unless given.  Before/after Dice is
    also reported on the corrected studies (restricted to the trusted voxels).  With
    ``select_by_validation`` the kept weights are those of the evaluated step whose fixed-set
    Dice fell by at most ``max_forgetting`` (1 point) for every class and that scored best on the
    corrections (the step that forgot least, with a warning, if none did); the held-out parts of
    a study are never used to choose.

The result is a new model (metadata with full provenance: base name and checksums, pairs,
steps, lr, new classes, before/after); :func:`save_finetuned` writes it atomically and refuses
to overwrite the base model's file.  A base model's lesion-presence gate (:mod:`napari_spineseg.gate`)
is carried over unchanged while it still fits (same context slices, gated class values still
classes); otherwise it is dropped with a warning in the result.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import logging
import math
import threading
import time
import types
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..augment import IGNORE, AugmentConfig
from ..errors import Cancelled, InputError
from ..modelfile import LoadedModel, ModelMetadata
from ..orientation import ALL_PLANES, Plane, plane_array_axis
from ..preprocess import PreprocessConfig
from ..schema import DEFAULT_CLASSES, LabelClass, class_for_value
from ..volume import Volume, check_same_grid
from .data import LUMBAR_DATASETS, TrainingCase
from .loop import PRECISIONS, SCHEDULES, TrainConfig, TrainEvent

__all__ = [
    "CorrectionPair",
    "CorrectionTargets",
    "FinetuneConfig",
    "FinetuneDataset",
    "FinetuneResult",
    "build_finetune_dataset",
    "case_record",
    "cases_from_base_metadata",
    "correction_targets",
    "finetune",
    "fixed_validation_ids",
    "load_case_record",
    "run_finetune",
    "save_finetuned",
]

logger = logging.getLogger(__name__)

MAX_LABEL_VALUE = 254  # 255 is IGNORE ("not annotated")


# ------------------------------------------------------------------------------------------------
# Public records
# ------------------------------------------------------------------------------------------------
@dataclass
class CorrectionPair:
    """A study and its corrected labels.

    ``labels`` hold schema values on the image's grid (new values such as 4 or 5 add classes;
    255 means "not annotated").  ``prediction`` is the model's original prediction, if known.
    ``reviewed_slices`` maps a plane to the slices the annotator reviewed in that plane, as
    indices along the study's own array axis of that plane
    (:func:`~napari_spineseg.orientation.plane_array_axis`), e.g. ``{"sagittal": [12, 30, 41]}``.
    ``known_classes`` optionally limits the classes the corrections vouch for (default: every
    class of the new model): with ``{1}`` a trusted voxel labelled 2 or 0 only means "not a
    vertebral body" (the partial-label losses then leave the other classes alone there).
    ``name`` identifies the pair in the model's provenance.
    """

    image: Volume
    labels: Volume
    prediction: Volume | None = None
    reviewed_slices: dict[str, list[int]] | None = None
    known_classes: set[int] | None = None
    name: str = ""


def _light_augment() -> AugmentConfig:
    # No flips (studies are sliced in canonical orientation), mild intensity and geometry changes.
    return AugmentConfig(
        flip_prob=0.0,
        rotate_deg=10.0,
        rotate_prob=0.3,
        scale_range=(0.9, 1.1),
        elastic_prob=0.0,
        brightness=0.05,
        contrast=0.1,
        gamma_range=(0.8, 1.25),
        gamma_prob=0.3,
        noise_std=0.02,
        noise_prob=0.2,
        bias_field=0.1,
    )


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (recorded in the new model's metadata)."""

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    replay_fraction: float = 0.5  # share of samples drawn from the reference cases
    planes: list[str] = field(default_factory=lambda: [p.value for p in ALL_PLANES])
    class_names: dict[int, str] = field(default_factory=dict)  # names of (new) label values
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"  # auto | off | bf16 | fp16
    val_every: int = 50  # steps between evaluations on the fixed set and the corrected studies
    changed_priority: float = 4.0  # sampling weight of slices with changed voxels (others: 1)
    min_coverage: float = 0.02  # ... times the slice's trusted share of the fullest slice, at least this
    edit_plane: str = "auto"  # plane the corrections were drawn in ("auto": detected)
    crop_size: int | None = 256
    augment: AugmentConfig | None = field(default_factory=_light_augment)
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    loss: str | None = None  # None: the base model's training loss (else "ce+dice")
    loss_kwargs: dict[str, Any] | None = None
    freeze_batchnorm: bool = True  # keep the base model's normalisation statistics
    new_class_margin: float = 1.0  # new class row = parent row, bias lowered by this
    new_class_lr_scale: float = 10.0  # the new classes' output rows learn this much faster
    distill_weight: float = 10.0  # on replay samples, stay close to the base model's predictions (0: off)
    new_class_distill_weight: float = 3.0  # ... and give the new classes no probability there
    distill_unreviewed_weight: float = 0.0  # also on the untrusted pixels of the corrected studies (0: off)
    l2sp_weight: float = 0.0  # pull toward the base weights: weight * sum (w - w_base)² (L2-SP; 0: off)
    encoder_lr_scale: float = 1.0  # the encoder's learning rate relative to ``lr`` (0: frozen, faster steps)
    decoder_lr_scale: float = 10.0  # decoder and output layer (the new classes' rows: new_class_lr_scale)
    frozen_input_stages: int = 1  # U-Nets: freeze the first N encoder stages (inc, downs.0, ...): faster steps
    select_by_validation: bool = True  # keep the evaluated step that forgot least (see max_forgetting)
    max_forgetting: float = 0.01  # per-class fixed-set Dice loss tolerated when selecting (0.01 = 1 point)
    new_class_weight: float = 1.0  # loss weight of new classes (> 1 learns faster but lets them spread)
    probe_new_classes: bool = True  # start new rows from a linear probe of the base features (else parent copy)
    reference_from_base: int = 2  # without reference_cases: replay up to N recorded base cases
    fixed_validation_limit: int = 4  # cases taken from the base's validation set (first round)
    replace_fixed_validation: bool = False  # allow a different fixed set than the base's
    measure_forgetting: bool = True  # measure the fixed set (False: faster, forgetting is not measured)
    eval_batch_size: int = 16
    num_workers: int = 0
    num_threads: int | None = None  # torch CPU threads (None: torch's default; 1 is best on a busy CPU)
    model_name: str | None = None  # default "<base name>-ft"

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise InputError(f"steps must be at least 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if int(self.batch_size) < 1 or int(self.val_every) < 1:
            raise InputError("batch_size and val_every must be at least 1")
        if not 0.0 <= float(self.replay_fraction) < 1.0:
            raise InputError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.mixed_precision not in PRECISIONS:
            raise InputError(f"unknown mixed precision {self.mixed_precision!r}: choose {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        if not float(self.changed_priority) >= 1.0:
            raise InputError(f"changed_priority must be at least 1, got {self.changed_priority}")
        if not 0.0 < float(self.min_coverage) <= 1.0:
            raise InputError(f"min_coverage must be in (0, 1], got {self.min_coverage}")
        for name in (
            "distill_weight",
            "new_class_distill_weight",
            "distill_unreviewed_weight",
            "l2sp_weight",
            "max_forgetting",
        ):
            if not (math.isfinite(float(getattr(self, name))) and float(getattr(self, name)) >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if int(self.frozen_input_stages) < 0:
            raise InputError(f"frozen_input_stages must be >= 0, got {self.frozen_input_stages}")
        if not (math.isfinite(float(self.decoder_lr_scale)) and float(self.decoder_lr_scale) > 0):
            raise InputError(f"decoder_lr_scale must be positive, got {self.decoder_lr_scale}")
        if not (math.isfinite(float(self.encoder_lr_scale)) and float(self.encoder_lr_scale) >= 0):
            raise InputError(f"encoder_lr_scale must be >= 0 (0: frozen encoder), got {self.encoder_lr_scale}")
        self.planes = [Plane(p).value for p in self.planes]
        if not self.planes:
            raise InputError("choose at least one plane")
        if self.edit_plane != "auto":
            self.edit_plane = Plane(self.edit_plane).value
        self.class_names = {int(k): str(v).strip() for k, v in self.class_names.items() if str(v).strip()}

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, AugmentConfig):
                value = value.to_dict()
            elif f.name == "class_names":
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        return out


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune` (nothing is written until :func:`save_finetuned`)."""

    network: Any  # torch.nn.Module (CPU, eval mode); the base network when cancelled
    metadata: ModelMetadata  # of the new model
    before: dict[str, Any]  # {"fixed_validation": {class: Dice}, "corrections": {class: Dice}, per-case...}
    after: dict[str, Any]
    new_classes: list[LabelClass]
    cancelled: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    base_path: Path | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    selected_step: int | None = None  # the evaluated step whose weights were kept (None: the last)
    gate: Any = None  # the base model's lesion gate (napari_spineseg.gate.LesionGate), carried over unchanged


# ------------------------------------------------------------------------------------------------
# Trusted targets of one correction pair
# ------------------------------------------------------------------------------------------------
@dataclass
class CorrectionTargets:
    """Training targets of a pair (schema values on the study's grid, IGNORE where untrusted)."""

    labels: np.ndarray  # uint8, study array order
    changed: np.ndarray  # bool: voxels the annotator changed (or of new classes) among the trusted
    edit_plane: str | None  # plane the changes were detected in (None: no prediction/changes)
    trusted_slices: dict[str, list[int]]  # plane -> slices (study array axis) that are fully trusted
    whole_map: bool  # True when everything was trusted (no prediction and no reviewed slices)

    @property
    def trusted(self) -> np.ndarray:
        return self.labels != IGNORE


def _pair_name(pair: CorrectionPair, index: int) -> str:
    if pair.name:
        return pair.name
    if pair.labels.path is not None:
        return str(pair.labels.path)
    if pair.image.path is not None:
        return str(pair.image.path)
    return pair.image.name or f"pair {index}"


def _label_array(volume: Volume, what: str) -> np.ndarray:
    """Integer labels 0..254 (255 = not annotated) as uint8; clear error otherwise."""
    array = np.asarray(volume.array)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{what}: label maps must hold whole numbers")
    elif array.dtype.kind not in "iub":
        raise InputError(f"{what}: unsupported label type {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > IGNORE):
        raise InputError(
            f"{what}: label values must be in 0..{MAX_LABEL_VALUE} ({IGNORE} = not annotated), "
            f"found {array.min()}..{array.max()}"
        )
    return array.astype(np.uint8, copy=False)


def _take(mask: np.ndarray, axis: int, index: int) -> tuple:
    sl: list[Any] = [slice(None)] * mask.ndim
    sl[axis] = index
    return tuple(sl)


def _detect_edit_plane(changed: np.ndarray, geometry) -> Plane:
    """The plane whose slices hold the changes most compactly (ties: the thickest slices)."""
    spacing = geometry.spacing_zyx
    best, best_key = Plane.SAGITTAL, None
    for plane in (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL):
        axis = plane_array_axis(geometry, plane)
        other = tuple(a for a in range(3) if a != axis)
        count = int(np.count_nonzero(changed.any(axis=other)))
        key = (count, -float(spacing[axis]))
        if best_key is None or key < best_key:
            best, best_key = plane, key
    return best


def correction_targets(
    pair: CorrectionPair,
    new_values: Iterable[int] = (),
    edit_plane: str = "auto",
    name: str = "corrections",
) -> CorrectionTargets:
    """The trusted targets of ``pair`` (see the module docstring).

    Raises :class:`~napari_spineseg.errors.GeometryMismatchError` when image, labels and
    prediction do not share one grid and :class:`InputError` when nothing is trusted.
    """
    labels_name = str(pair.labels.path) if pair.labels.path else pair.labels.name
    image_name = str(pair.image.path) if pair.image.path else pair.image.name
    check_same_grid(pair.image, pair.labels, what=f"{image_name} and {labels_name}")
    labels = _label_array(pair.labels, labels_name)
    geometry = pair.labels.geometry
    trusted_slices: dict[str, list[int]] = {}
    if pair.prediction is None and not pair.reviewed_slices:
        if not np.any((labels != 0) & (labels != IGNORE)):
            raise InputError(f"{name}: the corrected label map {labels_name} is empty (no labelled voxel)")
        new = np.isin(labels, np.asarray(sorted(set(new_values)), dtype=np.uint8))
        return CorrectionTargets(labels.copy(), new, None, {}, True)

    trusted = np.zeros(labels.shape, dtype=bool)
    for plane_name, indices in (pair.reviewed_slices or {}).items():
        plane = Plane(plane_name) if isinstance(plane_name, Plane) else Plane.parse(str(plane_name))[0]
        axis = plane_array_axis(geometry, plane)
        count = labels.shape[axis]
        chosen = sorted({int(i) for i in indices})
        bad = [i for i in chosen if not 0 <= i < count]
        if bad:
            raise InputError(f"{name}: {plane.value} slices {bad} outside 0..{count - 1}")
        for index in chosen:
            trusted[_take(trusted, axis, index)] = True
        trusted_slices.setdefault(plane.value, []).extend(chosen)

    changed = np.zeros(labels.shape, dtype=bool)
    detected: Plane | None = None
    if pair.prediction is not None:
        prediction_name = str(pair.prediction.path) if pair.prediction.path else pair.prediction.name
        check_same_grid(pair.labels, pair.prediction, what=f"{labels_name} and {prediction_name}")
        original = np.asarray(pair.prediction.array)
        changed = (labels != original) & (labels != IGNORE)
        if changed.any():
            detected = Plane(edit_plane) if edit_plane != "auto" else _detect_edit_plane(changed, geometry)
            axis = plane_array_axis(geometry, detected)
            other = tuple(a for a in range(3) if a != axis)
            for index in np.flatnonzero(changed.any(axis=other)):
                trusted[_take(trusted, axis, int(index))] = True
                trusted_slices.setdefault(detected.value, []).append(int(index))
    trusted &= labels != IGNORE
    if not trusted.any():
        what = "no voxel differs from the prediction" if pair.prediction is not None else "nothing was reviewed"
        raise InputError(
            f"{name}: empty corrections ({what}, no reviewed slices): no trusted labelled voxel to learn from"
        )
    new = np.isin(labels, np.asarray(sorted(set(new_values)), dtype=np.uint8)) & trusted
    target = np.where(trusted, labels, np.uint8(IGNORE)).astype(np.uint8)
    trusted_slices = {k: sorted(set(v)) for k, v in trusted_slices.items()}
    return CorrectionTargets(
        target, (changed & trusted) | new, detected.value if detected else None, trusted_slices, False
    )


# ------------------------------------------------------------------------------------------------
# Case records (fixed validation and replay sets that can be reloaded in the next round)
# ------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_json_safe(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def case_record(case: TrainingCase) -> dict[str, Any]:
    """A JSON record identifying ``case`` and, where possible, how to reload it."""
    record: dict[str, Any] = {
        "case_id": case.case_id,
        "dataset": case.dataset,
        "patient": case.patient,
        "known_classes": sorted(int(c) for c in case.known_classes),
    }
    phantom = (case.image.metadata or {}).get("phantom_config")
    if case.dataset in LUMBAR_DATASETS and case.paths.get("image") and case.paths.get("labels"):
        record.update(source="lumbar", paths=dict(case.paths))
    elif phantom is not None:
        record.update(source="phantom", phantom=_json_safe(phantom))
    elif case.paths.get("image") and case.paths.get("labels"):
        record.update(source="files", paths=dict(case.paths))
    else:
        record["source"] = "memory"
    return record


def load_case_record(record: Mapping[str, Any]) -> TrainingCase:
    """Rebuild the case of a :func:`case_record` (InputError when it cannot be found)."""
    from ..phantom import PhantomConfig, make_phantom
    from .data import load_case

    case_id = str(record.get("case_id", "?"))
    source = record.get("source")
    known = {int(c) for c in record.get("known_classes", [])}
    if source == "lumbar":
        paths = record["paths"]
        image, labels = Path(paths["image"]), Path(paths["labels"])
        if not image.is_file() or not labels.is_file():
            raise InputError(f"case {case_id}: {image if not image.is_file() else labels} not found")
        dataset = str(record["dataset"])
        return load_case(image, labels, dataset, case_id.split("-", 1)[1] if "-" in case_id else case_id)
    if source == "phantom":
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(record["phantom"]).items()}
        phantom = make_phantom(PhantomConfig(**options))
        labels = phantom.labels.with_array(phantom.labels.array.astype(np.uint8))
        return TrainingCase(phantom.image, labels, known, str(record.get("patient", case_id)), "phantom", case_id)
    if source == "files":
        from ..io import read_volume

        paths = record["paths"]
        for key in ("image", "labels"):
            if not Path(paths[key]).is_file():
                raise InputError(f"case {case_id}: {paths[key]} not found")
        image, labels = read_volume(paths["image"]), read_volume(paths["labels"])
        labels = labels.with_array(_label_array(labels, str(paths["labels"])))
        return TrainingCase(
            image,
            labels,
            known,
            str(record.get("patient", case_id)),
            str(record.get("dataset", "files")),
            case_id,
            paths=dict(paths),
        )
    raise InputError(f"case {case_id} was held in memory only and cannot be reloaded: pass it again")


def fixed_validation_ids(metadata: ModelMetadata) -> list[str]:
    """The fixed validation case ids recorded in a (fine-tuned) model's metadata."""
    return [str(r.get("case_id")) for r in metadata.training.get("fixed_validation") or []]


def cases_from_base_metadata(
    metadata: ModelMetadata, kind: str = "val", limit: int | None = None
) -> list[TrainingCase]:
    """Lumbar cases a base model was validated (``kind="val"``) or trained (``"train"``) on.

    Reads ``training["val_cases"|"train_cases"]`` and ``training["data_paths"]`` of a model made
    by :func:`~napari_spineseg.training.train` (and ``training["reference_cases"]`` of a
    fine-tuned one for ``"train"``); cases whose files are missing are skipped.  Deterministic:
    sorted ids, dealt round-robin over datasets, at most ``limit``.
    """
    training = metadata.training or {}
    if kind == "train" and training.get("reference_cases"):
        records = list(training["reference_cases"])
    else:
        ids = sorted(str(c) for c in training.get("val_cases" if kind == "val" else "train_cases") or [])
        paths = [str(p) for p in training.get("data_paths") or []]
        records = []
        for case_id in ids:
            dataset, _, case = case_id.partition("-")
            if dataset not in LUMBAR_DATASETS or not case:
                continue
            image = next((p for p in paths if p.replace("\\", "/").endswith(f"/{dataset}/{case}_img.nii.gz")), None)
            label = next((p for p in paths if p.replace("\\", "/").endswith(f"/{dataset}/{case}_seg.nii.gz")), None)
            if image and label:
                records.append(
                    {
                        "case_id": case_id,
                        "dataset": dataset,
                        "source": "lumbar",
                        "paths": {"image": image, "labels": label},
                    }
                )
    by_dataset: dict[str, list[dict]] = {}
    for record in records:
        by_dataset.setdefault(str(record.get("dataset")), []).append(record)
    dealt: list[dict] = []
    queues = [list(v) for _, v in sorted(by_dataset.items())]
    while any(queues):
        for queue in queues:
            if queue:
                dealt.append(queue.pop(0))
    cases = []
    for record in dealt:
        if limit is not None and len(cases) >= limit:
            break
        try:
            cases.append(load_case_record(record))
        except (InputError, OSError) as error:
            logger.warning("skipping base %s case %s: %s", kind, record.get("case_id"), error)
    return cases


# ------------------------------------------------------------------------------------------------
# Classes
# ------------------------------------------------------------------------------------------------
def _new_class(value: int, names: Mapping[int, str], existing: Sequence[LabelClass]) -> LabelClass:
    schema = next((c for c in DEFAULT_CLASSES if c.value == value), None)
    generated = schema if schema is not None else class_for_value(value, existing)
    return LabelClass(int(value), names.get(value, generated.name), generated.color)


def _finetune_classes(
    base: Sequence[LabelClass], values: Iterable[int], names: Mapping[int, str]
) -> tuple[list[LabelClass], list[LabelClass]]:
    """(all classes of the new model, the new ones): base classes (renamed per ``names``) + new values."""
    classes = [dataclasses.replace(c, name=names.get(c.value, c.name)) for c in base]
    known = {c.value for c in classes}
    new = []
    for value in sorted({int(v) for v in values} - known - {0, IGNORE}):
        label_class = _new_class(value, names, classes)
        classes.append(label_class)
        new.append(label_class)
    if len(classes) > MAX_LABEL_VALUE:
        raise InputError(f"too many classes ({len(classes)})")
    return classes, new


def _index_lut(classes: Sequence[LabelClass]) -> np.ndarray:
    """Schema value -> class index (IGNORE for values the model does not have)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for index, label_class in enumerate(classes):
        if label_class.value <= MAX_LABEL_VALUE:
            lut[label_class.value] = index
    return lut


def _index_case(case: TrainingCase, lut: np.ndarray, known_values: Iterable[int], case_id: str | None = None):
    """``case`` with its labels mapped to class indices (values the model lacks become IGNORE)."""
    array = np.asarray(case.labels.array)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, IGNORE).astype(np.uint8)
    dropped = sorted(int(v) for v in np.unique(array) if v != IGNORE and lut[v] == IGNORE)
    if dropped:
        logger.info("case %s: label values %s are not classes of the model; ignored", case.case_id, dropped)
    known = {int(lut[v]) for v in known_values if 0 <= int(v) <= MAX_LABEL_VALUE and lut[int(v)] != IGNORE}
    return TrainingCase(
        image=case.image,
        labels=case.labels.with_array(lut[array]),
        known_classes=known,
        patient=case.patient,
        dataset=case.dataset,
        case_id=case_id or case.case_id,
        paths=dict(case.paths),
    )


# ------------------------------------------------------------------------------------------------
# Dataset with changed-slice priority and replay
# ------------------------------------------------------------------------------------------------
class FinetuneDataset:
    """Correction slices followed by replay slices, with sampling weights for the training loop.

    ``sample_weights()`` gives the correction samples ``1 - replay_fraction`` of the total weight
    and the replay samples ``replay_fraction`` (class-balanced among themselves); the loop draws
    with these weights (``sampling="balanced"``).  Among the corrections a slice weighs
    ``changed_priority`` when it holds changed voxels (else 1), times its number of trusted
    pixels relative to the fullest slice (at least ``min_coverage``): a slice
    of another plane crossing three reviewed slices holds only three lines of targets and should
    not crowd out the reviewed slices themselves.  A slice holding voxels of a new class
    (``new_class`` flags) weighs ``changed_priority`` whatever its coverage: a lesion painted on
    sagittal slices is seen in the axial and coronal planes only through such thinly covered
    slices, and a class the model meets in one plane only is outvoted when the planes are fused.
    Samples carry ``"replay"`` (bool) for the forgetting guard.
    """

    def __init__(
        self,
        corrections,
        changed: np.ndarray,
        replay=None,
        replay_fraction: float = 0.3,
        changed_priority: float = 4.0,
        coverage: np.ndarray | None = None,
        min_coverage: float = 0.02,
        new_class: np.ndarray | None = None,
    ) -> None:
        self.corrections = corrections
        self.replay = replay
        self.changed = np.asarray(changed, dtype=bool)
        if len(self.changed) != len(corrections):
            raise ValueError("one changed flag per correction sample")
        self.coverage = np.ones(len(self.changed)) if coverage is None else np.asarray(coverage, dtype=float)
        self.min_coverage = float(min_coverage)
        self.new_class = np.zeros(len(self.changed), bool) if new_class is None else np.asarray(new_class, bool)
        self.replay_fraction = float(replay_fraction) if replay is not None and len(replay) else 0.0
        self.changed_priority = float(changed_priority)

    def __len__(self) -> int:
        return len(self.corrections) + (len(self.replay) if self.replay is not None else 0)

    def __getitem__(self, i: int):
        import torch

        n = len(self.corrections)
        sample = dict(self.corrections[i] if i < n else self.replay[i - n])
        sample["replay"] = torch.tensor(i >= n)
        return sample

    def set_epoch(self, epoch: int) -> None:
        self.corrections.set_epoch(epoch)
        if self.replay is not None:
            self.replay.set_epoch(epoch)

    def sample_weights(self) -> np.ndarray:
        relative = self.coverage / max(float(self.coverage.max()), 1e-12)
        relative = np.where(self.new_class, 1.0, np.maximum(relative, self.min_coverage))
        weights = np.where(self.changed | self.new_class, self.changed_priority, 1.0) * relative
        weights = weights / weights.sum() * (1.0 - self.replay_fraction)
        if self.replay is not None and len(self.replay):
            replay = np.asarray(self.replay.sample_weights(), dtype=float)
            replay = replay / replay.sum() * self.replay_fraction if self.replay_fraction > 0 else replay * 0.0
            weights = np.concatenate([weights, replay])
        return weights * (len(weights) / weights.sum())


def _coverage(dataset) -> np.ndarray:
    """Per sample of a SliceDataset: the number of trusted (not IGNORE) pixels of its slice."""
    counts = {}
    for ci, prepared in enumerate(dataset.cases):
        for pi, plane in enumerate(dataset.planes):
            labels = prepared.planes[plane].labels
            counts[ci, pi] = (labels.reshape(labels.shape[0], -1) != IGNORE).sum(axis=1)
    return np.asarray([counts[ci, pi][si] for ci, pi, si in dataset.index], dtype=float)


def _changed_flags(dataset, changed_masks: Sequence[np.ndarray], geometries: Sequence[Any]) -> np.ndarray:
    """Per sample of a SliceDataset: does its slice hold a changed voxel?"""
    from ..slicing import canonical_labels, plane_view

    per_case = []
    for mask, geometry in zip(changed_masks, geometries):
        canonical = canonical_labels(Volume(mask.astype(np.uint8), geometry))
        per_plane = []
        for plane in dataset.planes:
            stack = plane_view(canonical, plane)
            per_plane.append(stack.reshape(stack.shape[0], -1).any(axis=1))
        per_case.append(per_plane)
    return np.asarray([per_case[ci][pi][si] for ci, pi, si in dataset.index], dtype=bool)


def build_finetune_dataset(
    corrections: Sequence[TrainingCase],
    changed: Sequence[np.ndarray],
    replay: Sequence[TrainingCase] = (),
    *,
    planes: Sequence[str],
    context_slices: int,
    num_classes: int,
    preprocess: PreprocessConfig,
    config: FinetuneConfig,
    new_class_indices: Sequence[int] = (),
) -> FinetuneDataset:
    """The training samples of a fine-tuning run.

    ``corrections`` and ``replay`` hold class *indices* (IGNORE where untrusted); ``changed``
    is one boolean mask per correction case (study array order) marking the changed voxels;
    slices holding ``new_class_indices`` are sampled at full priority in every plane.
    """
    from .datasets import SliceDataset

    slices = SliceDataset(
        corrections,
        planes=planes,
        context_slices=context_slices,
        num_classes=num_classes,
        preprocess=preprocess,
        augment=config.augment,
        crop_size=config.crop_size,
        seed=config.seed,
    )
    geometries = [c.labels.geometry for c in corrections]
    flags = _changed_flags(slices, changed, geometries)
    new_flags = None
    if len(new_class_indices):
        new_masks = [np.isin(c.labels.array, list(new_class_indices)) for c in corrections]
        new_flags = _changed_flags(slices, new_masks, geometries)
    replay_slices = None
    if replay and config.replay_fraction > 0:
        replay_slices = SliceDataset(
            replay,
            planes=planes,
            context_slices=context_slices,
            num_classes=num_classes,
            preprocess=preprocess,
            augment=config.augment,
            crop_size=config.crop_size,
            foreground_only=True,
            keep_empty_fraction=0.15,
            seed=config.seed + 1,
        )
    return FinetuneDataset(
        slices,
        flags,
        replay_slices,
        config.replay_fraction,
        config.changed_priority,
        coverage=_coverage(slices),
        min_coverage=config.min_coverage,
        new_class=new_flags,
    )


# ------------------------------------------------------------------------------------------------
# Evaluation through the inference path
# ------------------------------------------------------------------------------------------------
@dataclass
class _EvalCase:
    name: str
    image: Volume
    truth: np.ndarray  # schema values, IGNORE where there is no (trusted) truth
    known: set[int]  # schema values scored


def _evaluate(
    network,
    metadata: ModelMetadata,
    cases: Sequence[_EvalCase],
    names: Mapping[int, str],
    settings,
    cancel: threading.Event | None = None,
    keep_predictions: bool = False,
) -> Generator[float, None, tuple[dict[str, float], dict[str, dict[str, float]], list[np.ndarray]]]:
    """(mean Dice per class name, per-case Dice, predictions) of ``network`` on whole ``cases``.

    A generator: yields the number of cases done so far (fractional within a case, for progress)
    and returns the figures.  Dice is computed over each case's truth region for its known
    classes; a class absent from both the truth and the prediction in that region is not scored.
    """
    from ..inference import Predictor
    from ..metrics import dice_score

    was_training = network.training
    predictor = Predictor(settings)
    per_case: dict[str, dict[str, float]] = {}
    predictions: list[np.ndarray] = []
    try:
        predictor.load(LoadedModel(network, metadata, None))
        for number, case in enumerate(cases):
            if cancel is not None and cancel.is_set():
                raise Cancelled("fine-tuning cancelled")
            run = predictor.run(case.image, cancel)
            while True:
                try:
                    event = next(run)
                except StopIteration as stop:
                    pred = stop.value.labels.array
                    break
                yield number + float(getattr(event, "fraction", 0.0) or 0.0)
            yield float(number + 1)
            if keep_predictions:
                predictions.append(pred)
            region = case.truth != IGNORE
            scores: dict[str, float] = {}
            for value in sorted(case.known):
                p, t = (pred == value) & region, (case.truth == value) & region
                if not p.any() and not t.any():
                    continue
                scores[names.get(value, f"class {value}")] = round(dice_score(p, t), 5)
            per_case[case.name] = scores
    finally:
        network.train(was_training)
    means: dict[str, float] = {}
    for label in dict.fromkeys(n for s in per_case.values() for n in s):
        values = [s[label] for s in per_case.values() if label in s]
        means[label] = round(float(np.mean(values)), 5)
    return means, per_case, predictions


def _reporting(
    evaluation: Generator[float, None, Any], what: str, offset: int, count: int, total: int, step: int
) -> Generator[TrainEvent, None, Any]:
    """:func:`_evaluate`'s progress as status events ("<what>: 45 %, study 2 of 5"); returns its result."""
    shown = -1
    while True:
        try:
            done = next(evaluation)
        except StopIteration as stop:
            return stop.value
        percent = int(100 * (offset + done) / max(count, 1))
        if percent >= shown + 5 or (percent == 100 and shown != 100):
            shown = percent
            study = min(offset + int(done) + 1, count)
            yield _status(f"{what}: {percent} % (study {study} of {count})", total, step)


def fixed_cache_path() -> Path:
    """Where the base models' fixed-set figures are cached (keyed by the model's tensor digest)."""
    from ..modelfile import user_model_dir

    return user_model_dir() / "cache" / "fixed-validation.json"


def _fixed_cache_key(digest: str, cases: Sequence[_EvalCase], names: Mapping[int, str], settings: Any) -> str:
    known = {int(v) for c in cases for v in c.known}
    record = {
        "digest": digest,
        "cases": [[c.name, sorted(int(v) for v in c.known), list(c.image.shape)] for c in cases],
        "names": {str(k): v for k, v in sorted(names.items()) if int(k) in known},
        "planes": [str(getattr(p, "value", p)) for p in settings.planes],
        "postprocess": bool(settings.postprocess),
        "device": str(settings.device),
        "precision": str(settings.precision),
    }
    return hashlib.sha256(repr(sorted(record.items())).encode()).hexdigest()


def _read_fixed_cache(key: str) -> tuple[dict[str, float], dict[str, dict[str, float]]] | None:
    import json

    try:
        entry = json.loads(fixed_cache_path().read_text(encoding="utf-8")).get(key)
        return (dict(entry["means"]), dict(entry["cases"])) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_fixed_cache(key: str, means: Mapping[str, float], cases: Mapping[str, Any]) -> None:
    """Remember a base model's fixed-set figures (atomic write; at most 50 entries; failures only logged)."""
    import json
    import os

    path = fixed_cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"means": dict(means), "cases": dict(cases), "saved": _dt.datetime.now().isoformat()}
    data = dict(list(data.items())[-50:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".json.part")
        temp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temp, path)
    except OSError as error:
        logger.warning("cannot cache the fixed-set figures in %s: %s", path, error)


# ------------------------------------------------------------------------------------------------
# Network surgery
# ------------------------------------------------------------------------------------------------
def _stay_in_eval(self, mode: bool = True):
    return self


def _freeze_batchnorm(network) -> int:
    """Keep batch-norm layers in eval mode (running statistics of the base model) while training."""
    from torch import nn

    count = 0
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = types.MethodType(_stay_in_eval, module)
            count += 1
    return count


def _unfreeze_batchnorm(network) -> None:
    for module in network.modules():
        module.__dict__.pop("train", None)


def _output_layer(network):
    name = getattr(network, "output_layer_name", None)
    return network.get_submodule(name) if name else None


def _grow_head(network, new_k: int, parents: Mapping[int, int], margin: float) -> None:
    """Grow the output to ``new_k`` classes; new rows copy their parent's row, bias − margin."""
    import torch
    from torch import nn

    from ..models import extend_output_classes

    extend_output_classes(network, new_k)
    layer = _output_layer(network)
    if isinstance(layer, nn.Conv2d):
        with torch.no_grad():
            for new_index, parent in parents.items():
                layer.weight[new_index].copy_(layer.weight[parent])
                if layer.bias is not None:
                    layer.bias[new_index] = layer.bias[parent] - float(margin)


def _probe_new_rows(
    network, base_meta: ModelMetadata, pairs, targets, lut: np.ndarray, parents: Mapping[int, int], config
) -> dict[int, float]:
    """Fit each new class's output row to the painted voxels: a class-balanced logistic regression
    on the base network's last features (new class vs everything else trusted on the same slices).

    A copy of the parent row cannot tell a lesion from the body around it, and a few hundred
    painted voxels among tens of thousands pull a fresh row down faster than they teach it (the
    painted hemangioma of the sample study stayed at Dice 0 after 200 steps).  The probe finds
    the direction in feature space that separates what was painted, so fine-tuning starts from a
    row that already predicts it.  Returns ``{new index: balanced training accuracy}``.
    """
    import torch
    from torch import nn

    from ..preprocess import resample_back, resample_slices
    from ..slicing import plane_pixel_spacing, plane_view, prepare_study, slice_batch

    layer = _output_layer(network)
    if not isinstance(layer, nn.Conv2d) or not parents:
        return {}
    preprocess = PreprocessConfig.from_dict(base_meta.preprocess) if base_meta.preprocess else PreprocessConfig()
    captured: list = []
    hook = layer.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach().float()))
    features_by_class: dict[int, list] = {}
    negatives: list = []
    try:
        # Every plane the model runs in: the planes' predictions are averaged at inference, so a
        # row fitted to one plane's features alone is outvoted by the other two.
        for pair, target in zip(pairs, targets):
            study = prepare_study(pair.image, preprocess)
            canonical = study.reorientation.forward(target.labels)
            for plane in [Plane(p) for p in config.planes]:
                labels = plane_view(canonical, plane)
                stack = plane_view(study.image, plane)
                index = lut[labels]  # class index per voxel (IGNORE: not trusted)
                wanted = [i for i in parents if (index == i).any()]
                if not wanted:
                    continue
                slices = np.flatnonzero(np.isin(index, wanted).any(axis=(1, 2)))[:16]
                batch = slice_batch(stack, slices, base_meta.context_slices)
                spacing = plane_pixel_spacing(study.spacing_zyx, plane)
                height, width = batch.shape[-2:]
                if preprocess.pixel_spacing_mm is not None:
                    model_spacing = (preprocess.pixel_spacing_mm, preprocess.pixel_spacing_mm)
                    batch = resample_slices(batch, spacing, model_spacing, order=1)
                captured.clear()
                with torch.inference_mode():
                    network.eval()(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
                features = captured[0].numpy()
                if features.shape[-2:] != (height, width):
                    features = resample_back(features, (height, width), order=1)
                features = np.moveaxis(features, 1, -1)  # [B, H, W, F]
                sliced = index[slices]
                for i in wanted:
                    features_by_class.setdefault(i, []).append(features[sliced == i])
                others = (sliced != IGNORE) & ~np.isin(sliced, wanted)
                rows = np.flatnonzero(others.ravel())
                rng = np.random.default_rng(0)
                take = rng.choice(rows, size=min(len(rows), 20_000), replace=False) if len(rows) else rows
                negatives.append(features.reshape(-1, features.shape[-1])[take])
    finally:
        hook.remove()
    if not negatives or not features_by_class:
        return {}
    rest = torch.from_numpy(np.concatenate(negatives)).float()
    fitted: dict[int, float] = {}
    weight, bias = layer.weight.data, layer.bias.data if layer.bias is not None else None
    for new_index, parent in parents.items():
        chunks = features_by_class.get(new_index)
        if not chunks:
            continue
        positive = torch.from_numpy(np.concatenate(chunks)).float()
        direction, offset, accuracy = _balanced_logistic(positive, rest)
        with torch.no_grad():  # new logit = parent logit + probe: wins over the parent where the probe says so
            weight[new_index] = weight[parent] + direction.to(weight.dtype).view(-1, *([1] * (weight.ndim - 2)))
            if bias is not None:
                bias[new_index] = bias[parent] + float(offset)
        fitted[int(new_index)] = round(accuracy, 4)
    return fitted


def _balanced_logistic(positive, negative, max_false_positive: float = 0.005) -> tuple[Any, float, float]:
    """Class-balanced, lightly L2-regularised logistic regression (L-BFGS) of ``positive`` vs
    ``negative`` feature rows: ``(weights, bias, balanced accuracy)`` on the raw features."""
    import torch
    from torch.nn import functional as F

    x = torch.cat([positive, negative])
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    sample_weight = torch.where(y > 0, 0.5 / len(positive), 0.5 / len(negative))
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * sample_weight).sum()
        loss = loss + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        # Balanced weights put the threshold where both classes are equally likely; a direction
        # that does not separate them would then claim half the parent.  Shift it so that at
        # most ``max_false_positive`` of the negatives score above zero.
        scores = z @ w + b
        shift = max(0.0, float(torch.quantile(scores[y == 0], 1.0 - max_false_positive)))
        scores = scores - shift
        accuracy = 0.5 * float((scores[y > 0] > 0).float().mean() + (scores[y == 0] <= 0).float().mean())
        return (w / std).detach(), float(b - shift - (w * mean / std).sum()), accuracy


class _FastNewRows:
    """Marker base; see :func:`_speed_up_new_rows`."""


def _speed_up_new_rows(network, old_k: int, scale: float) -> bool:
    """Train the new classes' output rows ``scale`` times faster.

    Adam moves every weight by about ``lr`` per step whatever its gradient's size, so a new row
    cannot travel far at fine-tuning learning rates.  The rows are reparametrised as
    ``scale * u`` (``u`` is what Adam updates) until :func:`_fuse_new_rows` folds them back into a
    plain convolution with the architecture's own parameter names.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    name = getattr(network, "output_layer_name", None)
    layer = _output_layer(network)
    if not isinstance(layer, nn.Conv2d) or scale == 1.0 or layer.out_channels <= old_k:
        return False

    class FastNewRows(nn.Module, _FastNewRows):
        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            self.conv = conv
            self.scale = float(scale)
            with torch.no_grad():
                self.new_weight = nn.Parameter(conv.weight[old_k:].clone() / self.scale)
                self.new_bias = None if conv.bias is None else nn.Parameter(conv.bias[old_k:].clone() / self.scale)
            self.old_weight = nn.Parameter(conv.weight[:old_k].detach().clone())
            self.old_bias = None if conv.bias is None else nn.Parameter(conv.bias[:old_k].detach().clone())

        def weights(self):
            weight = torch.cat([self.old_weight, self.scale * self.new_weight])
            bias = None if self.old_bias is None else torch.cat([self.old_bias, self.scale * self.new_bias])
            return weight, bias

        def forward(self, x):
            weight, bias = self.weights()
            c = self.conv
            return F.conv2d(
                x,
                weight.to(x.dtype),
                None if bias is None else bias.to(x.dtype),
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
            )

    wrapper = FastNewRows(layer)
    del wrapper._modules["conv"]  # keep the settings, not a second copy of the parameters
    wrapper.__dict__["conv"] = layer
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    setattr(parent, child, wrapper)
    return True


def _fuse_new_rows(network) -> None:
    """Undo :func:`_speed_up_new_rows`: a plain convolution with the trained weights."""
    import torch

    name = getattr(network, "output_layer_name", None)
    if not name:
        return
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    wrapper = getattr(parent, child)
    if not isinstance(wrapper, _FastNewRows):
        return
    conv = wrapper.__dict__["conv"]
    with torch.no_grad():
        weight, bias = wrapper.weights()
        conv.weight.data = weight.detach().clone().to(conv.weight.dtype)
        if bias is not None:
            conv.bias.data = bias.detach().clone().to(conv.bias.dtype)
    setattr(parent, child, conv)


class _ReplayDistillation:
    """Forgetting guard: on replay samples, keep the fine-tuned model's class probabilities close to
    the base model's (Li & Hoiem's "learning without forgetting").

    ``sum_c q_c (log q_c - log p_c)`` over the base model's classes, with ``p`` the fine-tuned
    model's softmax over *all* its classes: probability given to a new class on a reference case
    counts as disagreement (the reference cases hold no painted lesion, so a lesion class must not
    spread over their vertebral bodies).  Correction samples are left alone, so the model is free
    to change where the annotator corrected it, unless ``unreviewed_weight`` > 0: then their
    untrusted pixels (target IGNORE) are distilled too, with that weight.

    The divergence splits exactly into ``KL(q ‖ p̂) − log(1 − p_new)`` (``p̂``: the fine-tuned
    model's probabilities renormalised over the base classes, ``p_new``: its new-class mass);
    ``new_weight`` (default ``weight``) weighs the second term: a strong pull toward the base
    classes' predictions need not be an equally strong veto on a new class.
    """

    def __init__(
        self,
        base_network,
        old_k: int,
        weight: float,
        device,
        precision,
        unreviewed_weight: float = 0.0,
        new_weight: float | None = None,
    ):
        self.base = copy.deepcopy(base_network).to(device).eval()
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.old_k = int(old_k)
        self.weight = float(weight)
        self.new_weight = self.weight if new_weight is None else float(new_weight)
        self.unreviewed_weight = float(unreviewed_weight)
        self.device = device
        self.precision = precision

    def __call__(self, network, batch, logits):
        import torch
        from torch.nn import functional as F

        from .loop import _autocast

        replay = batch.get("replay")
        if replay is None:
            replay = torch.zeros(len(batch["image"]), dtype=torch.bool)
        replay = replay.bool()
        unreviewed = None
        if self.unreviewed_weight > 0 and "target" in batch:
            unreviewed = (batch["target"] == IGNORE) & ~replay.view(-1, *([1] * (batch["target"].ndim - 1)))
            if not bool(unreviewed.any()):
                unreviewed = None
        use_replay = self.weight > 0 and bool(replay.any())
        if not use_replay and unreviewed is None:
            return None
        wanted = replay.clone() if use_replay else torch.zeros_like(replay)
        if unreviewed is not None:
            wanted |= unreviewed.flatten(1).any(dim=1)
        rows = wanted.nonzero().squeeze(1)
        image = batch["image"][rows].to(self.device)
        if self.precision in ("bf16", "fp16") or self.device.startswith("cuda"):
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(self.device, self.precision):
            teacher = self.base(image)
        target = F.softmax(teacher.float(), dim=1)
        student = logits[rows.to(logits.device)].float()
        log_p = F.log_softmax(student, dim=1)[:, : self.old_k]
        kl = (target * (torch.log(target.clamp_min(1e-8)) - log_p)).sum(dim=1)  # [rows, H, W]
        total = None
        if use_replay:
            on_replay = replay[rows].to(kl.device)
            replay_kl = kl[on_replay]
            if student.shape[1] > self.old_k and self.new_weight != self.weight:
                # −log(1 − p_new) = logsumexp(all) − logsumexp(base classes): the new classes' share
                veto = (torch.logsumexp(student, dim=1) - torch.logsumexp(student[:, : self.old_k], dim=1))[on_replay]
                replay_kl = (replay_kl - veto) + (self.new_weight / max(self.weight, 1e-12)) * veto
            term = self.weight * replay_kl.mean() * (int(on_replay.sum()) / len(replay))
            total = term
        if unreviewed is not None:
            mask = unreviewed[rows].to(kl.device)
            term = self.unreviewed_weight * (kl * mask).sum() / mask[~replay[rows].to(kl.device)].numel()
            term = term * (int((~replay).sum()) / len(replay))
            total = term if total is None else total + term
        return total


class _WeightAnchor:
    """L2-SP (Li et al. 2018): ``weight * sum (w - w_base)²`` over the parameters the fine-tuned
    network shares (by name and shape) with its base; pulls every weight toward where it started."""

    def __init__(self, network, base_network, weight: float):
        base = dict(base_network.named_parameters())
        self.pairs = []
        for name, parameter in network.named_parameters():
            start = base.get(name)
            if start is not None and start.shape == parameter.shape and parameter.requires_grad:
                self.pairs.append((parameter, start.detach().clone().to(parameter.device)))
        self.weight = float(weight)

    def __call__(self, network, batch, logits):
        if not self.pairs or self.weight <= 0:
            return None
        if self.pairs[0][1].device != self.pairs[0][0].device:  # the network moved to its device
            self.pairs = [(p, p0.to(p.device)) for p, p0 in self.pairs]
        return self.weight * sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in self.pairs)


def _combine_hooks(*hooks):
    active = [h for h in hooks if h is not None]
    if not active:
        return None

    def hook(network, batch, logits):
        total = None
        for h in active:
            term = h(network, batch, logits)
            if term is not None:
                total = term if total is None else total + term
        return total

    return hook


ENCODER_PREFIXES = ("inc.", "downs.", "encoder.", "backbone.", "convs.", "bns.")


def _input_stage(name: str) -> int | None:
    """Encoder stage of a U-Net parameter (``inc.`` 0, ``downs.K.`` K + 1), else None."""
    if name.startswith("inc."):
        return 0
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    return int(index) + 1 if head == "downs" and index.isdigit() else None


def _freeze_input_stages(network, stages: int) -> int:
    """Freeze the first ``stages`` encoder stages (no gradient is computed for them); returns the
    number of frozen parameters.  Undone by :func:`_thaw`."""
    frozen = 0
    for name, parameter in network.named_parameters():
        stage = _input_stage(name)
        if stage is not None and stage < stages:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def _param_groups(network, encoder_lr_scale: float, decoder_lr_scale: float = 1.0) -> list[dict[str, Any]] | None:
    """Optimizer groups: the encoder (by the architectures' module names) at ``encoder_lr_scale``,
    the rest (decoder, output layer) at ``decoder_lr_scale``, the new classes' rows at 1 (they have
    their own speed-up, :func:`_speed_up_new_rows`).

    Scale 0 freezes the encoder (``requires_grad`` off: no gradient is computed for it at all,
    which also makes a step cheaper); :func:`_thaw` undoes that on the result.
    """
    if encoder_lr_scale == 1.0 and decoder_lr_scale == 1.0:
        return None
    encoder, rest, new_rows = [], [], []
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith(ENCODER_PREFIXES):
            encoder.append(parameter)
        elif name.rpartition(".")[2] in ("new_weight", "new_bias"):
            new_rows.append(parameter)
        else:
            rest.append(parameter)
    if not encoder:
        logger.info("no encoder parameters recognised: one learning rate for the whole network")
        return None
    groups = [{"params": rest, "lr_scale": float(decoder_lr_scale)}]
    if new_rows:
        groups.append({"params": new_rows, "lr_scale": 1.0})
    if encoder_lr_scale == 0:
        for parameter in encoder:
            parameter.requires_grad_(False)
    else:
        groups.append({"params": encoder, "lr_scale": float(encoder_lr_scale)})
    return groups


def _thaw(network) -> None:
    for parameter in network.parameters():
        parameter.requires_grad_(True)


def _select_step(history: Sequence[Mapping[str, Any]], before: Mapping[str, float], tolerance: float) -> int | None:
    """Index into ``history`` of the evaluated step to keep.

    Candidates: steps whose fixed-set Dice dropped by at most ``tolerance`` for every class; among
    them the one with the best mean Dice on the corrected studies (later steps win ties).  When none
    qualifies, the step whose worst per-class drop is smallest.  None without any history.
    """
    if not history:
        return None

    def worst_drop(record) -> float:
        fixed = record.get("fixed_validation") or {}
        drops = [float(before[k]) - float(v) for k, v in fixed.items() if k in before and v is not None]
        return max(drops, default=0.0)

    def corrected(record) -> float:
        values = [float(v) for v in (record.get("corrections") or {}).values() if v is not None]
        return float(np.mean(values)) if values else 0.0

    within = [i for i, r in enumerate(history) if worst_drop(r) <= tolerance + 1e-9]
    if within:
        return max(within, key=lambda i: (round(corrected(history[i]), 5), i))
    return min(range(len(history)), key=lambda i: (worst_drop(history[i]), -i))


def _file_sha256(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# The fine-tuning run
# ------------------------------------------------------------------------------------------------
def _status(message: str, total: int, step: int = 0, seconds: float = 0.0) -> TrainEvent:
    return TrainEvent("status", step, total, 0, message=message, seconds=seconds)


def _resolve_fixed(
    base: ModelMetadata,
    fixed_validation: Sequence[TrainingCase] | None,
    config: FinetuneConfig,
) -> list[TrainingCase]:
    recorded = base.training.get("fixed_validation") or []
    if recorded and not config.replace_fixed_validation:
        ids = [str(r.get("case_id")) for r in recorded]
        if fixed_validation is not None:
            given = [c.case_id for c in fixed_validation]
            if sorted(given) != sorted(ids):
                raise InputError(
                    f"the base model {base.name!r} was validated on the fixed set {ids}; pass those cases, "
                    f"none (they are reloaded), or set replace_fixed_validation (got {given})"
                )
            return list(fixed_validation)
        return [load_case_record(r) for r in recorded]
    if fixed_validation is not None:
        return list(fixed_validation)
    return cases_from_base_metadata(base, "val", config.fixed_validation_limit)


def finetune(
    base: str | Path | LoadedModel,
    pairs: Sequence[CorrectionPair],
    config: FinetuneConfig | None = None,
    *,
    reference_cases: Sequence[TrainingCase] = (),
    fixed_validation: Sequence[TrainingCase] | None = None,
    cancel: threading.Event | None = None,
) -> Generator[TrainEvent, None, FinetuneResult]:
    """Fine-tune ``base`` on corrected ``pairs``; yields :class:`TrainEvent`, returns a :class:`FinetuneResult`.

    Events: ``"status"`` (loading, measuring before/after), ``"step"`` and ``"validation"``
    (``val_dice`` keys ``"fixed/<class>"`` and ``"corrected/<class>"``) from the training loop,
    and a final ``"done"``.  ``cancel`` stops at the next step (the result has
    ``cancelled=True`` and cannot be saved); closing the generator stops it too.  Nothing is
    written to disk.
    """
    import torch

    from ..inference import SegmentationSettings, resolve_device, resolve_precision
    from ..modelfile import _tensor_digest, load_model
    from .loop import train

    config = config or FinetuneConfig()
    started = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(max(1, int(config.num_threads)))
    total = int(config.steps)
    warnings: list[str] = []
    if not pairs:
        raise InputError("no correction pairs: give at least one (image, corrected labels) pair")

    # Base model ------------------------------------------------------------------------------
    yield _status("loading the base model", total)
    loaded = base if isinstance(base, LoadedModel) else load_model(base)
    base_meta = loaded.metadata
    if base_meta.architecture == "penn":
        raise InputError("fine-tuning supports the slice networks; patch (penn) models are not supported")
    base_network = copy.deepcopy(loaded.network).cpu().eval()
    base_digest = _tensor_digest(dict(base_network.state_dict()))
    base_path = Path(loaded.path) if loaded.path is not None else None
    planes = [p for p in config.planes if p in base_meta.planes]
    if not planes:
        raise InputError(f"none of the planes {config.planes} is one of the base model's {base_meta.planes}")
    if any(c.value == IGNORE for c in base_meta.classes):
        raise InputError(f"the base model uses {IGNORE} as a class value; it is reserved for 'not annotated'")

    # Corrections, classes, trusted targets ----------------------------------------------------
    names = [_pair_name(p, i) for i, p in enumerate(pairs, start=1)]
    if len(set(names)) != len(names):
        names = [f"{n} [{i}]" for i, n in enumerate(names, start=1)]
    targets = [correction_targets(p, (), config.edit_plane, n) for p, n in zip(pairs, names)]
    values: set[int] = set()
    for target in targets:  # only values on trusted voxels can become classes
        present = np.flatnonzero(np.bincount(target.labels.ravel(), minlength=256))
        values.update(int(v) for v in present if v not in (0, IGNORE))
    classes, new_classes = _finetune_classes(base_meta.classes, values, config.class_names)
    class_names = {c.value: c.name for c in classes}
    new_values = np.asarray([c.value for c in new_classes], dtype=np.uint8)
    for target in targets:  # voxels of a new class count as changed (the base cannot predict them)
        target.changed |= np.isin(target.labels, new_values)
    lut = _index_lut(classes)

    # Fixed validation and reference (replay) cases ---------------------------------------------
    fixed = _resolve_fixed(base_meta, fixed_validation, config)
    fixed_ids = {c.case_id for c in fixed}
    references = list(reference_cases)
    if not references and config.reference_from_base > 0 and config.replay_fraction > 0:
        references = [
            c
            for c in cases_from_base_metadata(base_meta, "train", config.reference_from_base + len(fixed_ids))
            if c.case_id not in fixed_ids
        ][: config.reference_from_base]
    overlap = [c.case_id for c in references if c.case_id in fixed_ids]
    if overlap:
        warnings.append(f"reference cases {overlap} are in the fixed validation set; not replayed")
        references = [c for c in references if c.case_id not in fixed_ids]
    if not references and config.replay_fraction > 0:
        warnings.append("no reference cases: forgetting is measured but not guarded by replay")
    if not fixed:
        warnings.append("no fixed validation set: forgetting is not measured")
    for message in warnings:
        logger.warning(message)

    # Runtime and evaluation settings -----------------------------------------------------------
    device = resolve_device(config.device)
    precision = config.mixed_precision
    precision = "fp32" if precision in ("off", "fp32") else resolve_precision(precision, device)
    settings = SegmentationSettings(
        planes=planes,
        device=device,
        precision=precision if precision != "fp16" else "auto",
        batch_size=config.eval_batch_size,
        postprocess=False,
    )

    def eval_metadata(network, model_classes: list[LabelClass]) -> ModelMetadata:
        kwargs = dict(getattr(network, "arch_kwargs", None) or base_meta.architecture_kwargs)
        kwargs.pop("in_channels", None)
        kwargs.pop("num_classes", None)
        return dataclasses.replace(
            base_meta, classes=list(model_classes), architecture_kwargs=kwargs, postprocess={}, planes=list(planes)
        )

    model_values = {c.value for c in classes}
    fixed_eval = [
        _EvalCase(c.case_id, c.image, np.asarray(c.labels.array), {int(v) for v in c.known_classes} & model_values)
        for c in fixed
    ]
    correction_eval = []
    for pair, name, target in zip(pairs, names, targets):
        known = pair.known_classes if pair.known_classes is not None else model_values - {0}
        correction_eval.append(_EvalCase(name, pair.image, target.labels, {int(v) for v in known} - {0}))

    if not config.measure_forgetting and fixed_eval:
        warnings.append("forgetting is not measured: the fixed validation set was skipped")
        fixed_eval = []

    def evaluate(network, model_classes, what: str, step: int = 0, keep: bool = False, cache: str | None = None):
        """Generator: status events with the progress, then returns (record, predictions)."""
        meta = eval_metadata(network, model_classes)
        count = len(fixed_eval) + len(correction_eval)
        cached = _read_fixed_cache(cache) if cache and fixed_eval else None
        if cached is not None:
            fixed_means, fixed_cases = cached
            yield _status(f"{what}: fixed-set figures of this model reused (cached)", total, step)
        else:
            fixed_means, fixed_cases, _ = yield from _reporting(
                _evaluate(network, meta, fixed_eval, class_names, settings, cancel), what, 0, count, total, step
            )
            if cache and fixed_eval:
                _write_fixed_cache(cache, fixed_means, fixed_cases)
        corr_means, corr_cases, preds = yield from _reporting(
            _evaluate(network, meta, correction_eval, class_names, settings, cancel, keep),
            what,
            len(fixed_eval),
            count,
            total,
            step,
        )
        record = {
            "fixed_validation": fixed_means,
            "corrections": corr_means,
            "fixed_validation_cases": fixed_cases,
            "correction_cases": corr_cases,
        }
        return record, preds

    def cancelled_result(network, steps: int, history: list) -> FinetuneResult:
        metadata = eval_metadata(network, list(base_meta.classes))
        return FinetuneResult(
            network,
            metadata,
            before,
            {},
            new_classes,
            True,
            history,
            steps,
            base_path,
            time.perf_counter() - started,
            warnings,
        )

    # Before ------------------------------------------------------------------------------------
    before: dict[str, Any] = {}
    yield _status(f"measuring the base model on {len(fixed_eval)} fixed and {len(pairs)} corrected studies", total)
    cache_key = _fixed_cache_key(base_digest, fixed_eval, class_names, settings)
    try:
        before, base_predictions = yield from evaluate(
            base_network, list(base_meta.classes), "measuring the base model", keep=True, cache=cache_key
        )
    except Cancelled:
        return cancelled_result(base_network, 0, [])
    if cancel is not None and cancel.is_set():
        return cancelled_result(base_network, 0, [])

    # Grow the head: each new class starts from the class the base predicted under it ---------
    network = copy.deepcopy(base_network)
    base_lut = _index_lut(base_meta.classes)
    parents: dict[int, int] = {}
    for label_class in new_classes:
        counts = np.zeros(256, dtype=np.int64)
        for target, predicted in zip(targets, base_predictions):
            under = predicted[target.labels == label_class.value]
            counts += np.bincount(np.clip(under, 0, 255).astype(np.int64).ravel(), minlength=256)[:256]
        counts[IGNORE] = 0
        counts[base_lut == IGNORE] = 0
        parent_value = int(counts.argmax()) if counts.any() else 0
        parents[int(lut[label_class.value])] = int(base_lut[parent_value])
    if new_classes:
        _grow_head(network, len(classes), parents, config.new_class_margin)
        if config.probe_new_classes:
            yield _status("fitting the new classes' output rows to the painted voxels", total)
            fitted = _probe_new_rows(network, base_meta, pairs, targets, lut, parents, config)
            if fitted:
                logger.info("new class rows initialised by a linear probe: %s", fitted)
        _speed_up_new_rows(network, len(base_meta.classes), config.new_class_lr_scale)
    frozen = _freeze_batchnorm(network) if config.freeze_batchnorm else 0

    # Data --------------------------------------------------------------------------------------
    index_classes = [LabelClass(i, c.name, c.color) for i, c in enumerate(classes)]
    preprocess = PreprocessConfig.from_dict(base_meta.preprocess) if base_meta.preprocess else PreprocessConfig()
    base_config = dict(base_meta.training.get("config") or {})
    loss = config.loss or str(base_config.get("loss") or "ce+dice")
    if config.loss_kwargs is not None:
        loss_kwargs = dict(config.loss_kwargs)
    else:
        loss_kwargs = dict(base_config.get("loss_kwargs") or {}) if config.loss is None else {}
    new_weight = float(config.new_class_weight)
    if new_classes and new_weight != 1.0 and "class_weights" not in loss_kwargs:
        # A class weight also moves the decision threshold (to p > 1 / (1 + w)): with w = 10 a
        # lesion painted on three slices took over every vertebral body in the benchmark.
        loss_kwargs["class_weights"] = [1.0] * len(base_meta.classes) + [new_weight] * len(new_classes)
    train_config = TrainConfig(
        architecture=base_meta.architecture,
        architecture_kwargs=eval_metadata(network, classes).architecture_kwargs,
        context_slices=base_meta.context_slices,
        classes=index_classes,
        loss=loss,
        loss_kwargs=loss_kwargs,
        lr=float(config.lr),
        weight_decay=float(config.weight_decay),
        schedule=config.schedule,
        warmup_steps=int(config.warmup_steps),
        steps=total,
        batch_size=int(config.batch_size),
        val_every=int(config.val_every),
        mixed_precision=config.mixed_precision,
        grad_clip=config.grad_clip,
        seed=int(config.seed),
        device=config.device,
        num_workers=int(config.num_workers),
        num_threads=config.num_threads,
        planes=list(planes),
        crop_size=config.crop_size,
        preprocess=preprocess,
        augment=config.augment,
        sampling="balanced",
        postprocess=dict(base_meta.postprocess),
        model_name=config.model_name or f"{base_meta.name}-ft",
        recipe="finetune",
    )
    yield _status("preparing the training slices", total)
    correction_cases = []
    for pair, name, target in zip(pairs, names, targets):
        known = pair.known_classes if pair.known_classes is not None else model_values - {0}
        labels = target.labels
        if pair.known_classes is not None:  # other classes' voxels only say "none of the known classes"
            vouched = np.asarray(sorted({0, IGNORE, *(int(v) for v in known)}), dtype=np.uint8)
            labels = np.where(np.isin(labels, vouched), labels, np.uint8(0)).astype(np.uint8)
        case = TrainingCase(pair.image, pair.labels.with_array(labels), set(), name, "corrections", name)
        correction_cases.append(_index_case(case, lut, known, name))
    replay_cases = [_index_case(c, lut, c.known_classes) for c in references]
    dataset = build_finetune_dataset(
        correction_cases,
        [t.changed for t in targets],
        replay_cases,
        planes=planes,
        context_slices=base_meta.context_slices,
        num_classes=len(classes),
        preprocess=preprocess,
        config=config,
        new_class_indices=range(len(base_meta.classes), len(classes)),
    )

    # Train ---------------------------------------------------------------------------------------
    distill = None
    replay_distill = float(config.distill_weight) if dataset.replay_fraction > 0 else 0.0
    if replay_distill > 0 or config.distill_unreviewed_weight > 0:
        distill = _ReplayDistillation(
            base_network,
            len(base_meta.classes),
            replay_distill,
            device,
            precision,
            config.distill_unreviewed_weight,
            float(config.new_class_distill_weight),
        )
    if config.frozen_input_stages > 0:
        count = _freeze_input_stages(network, int(config.frozen_input_stages))
        if not count:
            warnings.append("frozen_input_stages: no U-Net encoder stage found; nothing frozen")
    anchor = _WeightAnchor(network, base_network, config.l2sp_weight) if config.l2sp_weight > 0 else None
    events = train(
        train_config,
        correction_cases,
        network=network,
        dataset=dataset,
        loss_hook=_combine_hooks(distill, anchor),
        cancel=cancel,
        param_groups=_param_groups(network, float(config.encoder_lr_scale), float(config.decoder_lr_scale)),
    )
    history: list[dict[str, Any]] = []
    records: dict[int, dict[str, Any]] = {}
    snapshots: dict[int, dict[str, Any]] = {}  # weights at each evaluated step (for the selection)
    last_eval: tuple[int, dict[str, Any]] | None = None
    outcome = None
    try:
        for event in events:
            if event.kind == "validation":
                measuring = time.perf_counter()
                try:
                    record, _ = yield from evaluate(network, classes, f"measuring step {event.step}", event.step)
                except Cancelled:
                    continue  # the loop stops at its next step
                last_eval = (event.step, record)
                records[event.step] = record
                if config.select_by_validation:
                    snapshots[event.step] = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
                flat = {f"fixed/{k}": v for k, v in record["fixed_validation"].items()}
                flat.update({f"corrected/{k}": v for k, v in record["corrections"].items()})
                history.append(
                    {
                        "step": event.step,
                        "train_loss": event.loss,
                        "lr": event.lr,
                        "fixed_validation": record["fixed_validation"],
                        "corrections": record["corrections"],
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                yield dataclasses.replace(
                    event,
                    val_dice=flat,
                    val_mean=float(np.mean(list(flat.values()))) if flat else None,
                    message=f"step {event.step}: measured in {time.perf_counter() - measuring:.1f} s",
                )
            elif event.kind == "done":
                outcome = event.result
            else:
                yield event
    finally:
        events.close()
        _unfreeze_batchnorm(network)
        _thaw(network)
        _fuse_new_rows(network)
    assert outcome is not None
    result_network = outcome.network
    selected_step: int | None = None
    selection: dict[str, Any] = {"by_validation": bool(config.select_by_validation)}
    if config.select_by_validation:
        selection["max_forgetting"] = float(config.max_forgetting)
    if config.select_by_validation and not outcome.cancelled and history and before.get("fixed_validation"):
        chosen = _select_step(history, before["fixed_validation"], float(config.max_forgetting))
        if chosen is not None and history[chosen]["step"] in snapshots:
            selected_step = int(history[chosen]["step"])
            if selected_step != outcome.steps:
                result_network.load_state_dict(snapshots[selected_step])
            drops = {
                k: round(100 * (before["fixed_validation"][k] - v), 2)
                for k, v in history[chosen]["fixed_validation"].items()
                if k in before["fixed_validation"]
            }
            selection.update(step=selected_step, fixed_drop_points=drops)
            if max(drops.values(), default=0.0) > 100 * float(config.max_forgetting) + 1e-6:
                warnings.append(
                    f"the fixed-set Dice dropped by more than {100 * config.max_forgetting:g} point(s) at every "
                    f"evaluated step; kept step {selected_step}, the one that forgot least ({drops})"
                )
                logger.warning(warnings[-1])
            if selected_step != outcome.steps:
                yield _status(
                    f"keeping the weights of step {selected_step} (fixed-set loss within tolerance, best on the "
                    "corrections)",
                    total,
                    outcome.steps,
                )
    snapshots.clear()
    _unfreeze_batchnorm(result_network)
    _fuse_new_rows(result_network)
    _thaw(result_network)
    result_network.eval()
    if outcome.cancelled:
        return cancelled_result(base_network, outcome.steps, history)

    # After ---------------------------------------------------------------------------------------
    if selected_step is not None and selected_step in records:
        after = records[selected_step]
    elif last_eval is not None and last_eval[0] == outcome.steps:
        after = last_eval[1]
    else:
        yield _status("measuring the fine-tuned model", total, outcome.steps)
        try:
            after, _ = yield from evaluate(result_network, classes, "measuring the fine-tuned model", outcome.steps)
        except Cancelled:
            return cancelled_result(base_network, outcome.steps, history)

    # Metadata --------------------------------------------------------------------------------------
    try:
        from .. import __version__ as package_version
    except ImportError:  # pragma: no cover
        package_version = None
    base_training = base_meta.training or {}
    lineage = [
        *list(base_training.get("lineage") or []),
        {"name": base_meta.name, "content_sha256": base_digest, "recipe": base_training.get("recipe")},
    ]
    pair_records = []
    for pair, name, target in zip(pairs, names, targets):
        pair_records.append(
            {
                "name": name,
                "image": str(pair.image.path) if pair.image.path else pair.image.name,
                "whole_map_trusted": target.whole_map,
                "edit_plane": target.edit_plane,
                "trusted_slices": target.trusted_slices,
                "trusted_voxels": int(np.count_nonzero(target.trusted)),
                "changed_voxels": int(np.count_nonzero(target.changed)),
                "values": sorted(int(v) for v in np.unique(target.labels) if v != IGNORE),
            }
        )
    gate = None
    if loaded.gate is not None:
        gate, gate_warning = carried_gate(loaded.gate, eval_metadata(result_network, classes), base_meta.name)
        if gate_warning is not None:
            warnings.append(gate_warning)
            logger.warning(gate_warning)
        else:
            gate = copy.deepcopy(gate)
    training = _json_safe(
        {
            "recipe": "finetune",
            "finetuned_from": {
                "name": base_meta.name,
                "path": str(base_path) if base_path else None,
                "file_sha256": _file_sha256(base_path),
                "content_sha256": base_digest,
            },
            "round": int(base_training.get("round", 0) or 0) + 1,
            "lineage": lineage,
            "pairs": names,
            "pair_details": pair_records,
            "steps": outcome.steps,
            "selected_step": selected_step if selected_step is not None else outcome.steps,
            "selection": selection,
            "lr": float(config.lr),
            "batch_size": int(config.batch_size),
            "replay_fraction": dataset.replay_fraction,
            "new_classes": [c.to_dict() for c in new_classes],
            "new_class_weight": new_weight,
            "new_class_parents": {str(classes[i].value): classes[p].value for i, p in parents.items()},
            "fixed_validation": [case_record(c) for c in fixed],
            "reference_cases": [case_record(c) for c in references],
            "before": before,
            "after": after,
            "history": history,
            "config": config.to_dict(),
            "train_config": train_config.to_dict(),
            "frozen_batchnorm_layers": frozen,
            "lesion_gate": (
                None
                if loaded.gate is None
                else ("carried over unchanged from the base model" if gate is not None else "dropped (see warnings)")
            ),
            "device": device,
            "precision": precision,
            "torch_version": torch.__version__,
            "package_version": package_version,
            "warnings": warnings,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    description = (base_meta.description + " " if base_meta.description else "") + (
        f"Fine-tuned ({outcome.steps} steps) on {len(pairs)} corrected stud{'y' if len(pairs) == 1 else 'ies'}"
        + (f", new classes: {', '.join(c.name for c in new_classes)}" if new_classes else "")
        + "."
    )
    metadata = dataclasses.replace(
        eval_metadata(result_network, classes),
        name=train_config.model_name,
        postprocess=dict(base_meta.postprocess),
        planes=list(base_meta.planes),
        training=training,
        metrics=_json_safe(
            {
                "val_dice": after.get("fixed_validation", {}),
                "finetune_before": {k: before.get(k) for k in ("fixed_validation", "corrections")},
                "finetune_after": {k: after.get(k) for k in ("fixed_validation", "corrections")},
            }
        ),
        description=description,
    )
    result = FinetuneResult(
        result_network,
        metadata,
        before,
        after,
        new_classes,
        False,
        history,
        outcome.steps,
        base_path,
        time.perf_counter() - started,
        warnings,
        selected_step,
        gate,
    )
    yield TrainEvent(
        "done",
        outcome.steps,
        total,
        0,
        message=f"fine-tuned for {outcome.steps} steps",
        seconds=time.perf_counter() - started,
    )
    return result


def run_finetune(base, pairs, config: FinetuneConfig | None = None, **kwargs) -> FinetuneResult:
    """Drain :func:`finetune` and return its :class:`FinetuneResult`."""
    from .._generators import drain

    return drain(finetune(base, pairs, config, **kwargs))


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def carried_gate(gate: Any, metadata: ModelMetadata, base_name: str | None = None) -> tuple[Any, str | None]:
    """(the gate to store with a fine-tuned model, a warning): the base model's lesion gate is
    kept unchanged when it still fits (same context slices, every gated class value still a
    class); otherwise it is dropped and the warning says why (never silently)."""
    if gate is None:
        return None, None
    from ..gate import _check_compatible

    try:
        _check_compatible(gate.record, metadata, InputError, "fine-tuned model")
    except InputError as error:
        base = "the base model" + (f" {base_name!r}" if base_name else "")
        return None, f"the lesion gate of {base} is not carried over ({error}); the fine-tuned model has no gate"
    return gate, None


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


def finetuned_output_path(path_or_name: str | Path) -> Path:
    """A ``.safetensors`` path as given, or the user-model file of a plain model name."""
    from ..modelfile import MODEL_SUFFIX, user_model_path

    text = str(path_or_name)
    if text.endswith(MODEL_SUFFIX) or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if path.suffix != MODEL_SUFFIX:
            raise InputError(f"{path}: model files must end in {MODEL_SUFFIX}")
        return path
    return user_model_path(text)


def check_output_path(path: Path, base_path: Path | None) -> None:
    """Refuse to write over the base model or into the bundled models."""
    from ..modelfile import bundled_model_dir

    if base_path is not None and _same_file(path, base_path):
        raise InputError(f"{path}: refusing to overwrite the base model; choose a new name or path")
    if _same_file(path.parent, bundled_model_dir()):
        raise InputError(f"{path}: refusing to write into the bundled models; save as a user model")


def save_finetuned(result: FinetuneResult, path_or_name: str | Path) -> Path:
    """Write the fine-tuned model atomically to a ``.safetensors`` path or as a user model name.

    Never overwrites the base model's file; a cancelled run cannot be saved.  A plain name also
    becomes the model's stored name.
    """
    from ..gate import attach_gate
    from ..modelfile import MODEL_SUFFIX

    if result.cancelled:
        raise Cancelled("fine-tuning was cancelled: there is no fine-tuned model to save")
    path = finetuned_output_path(path_or_name)
    base_record = (result.metadata.training or {}).get("finetuned_from") or {}
    base_path = result.base_path or (Path(base_record["path"]) if base_record.get("path") else None)
    check_output_path(path, base_path)
    metadata = result.metadata
    name = None
    if path.name[: -len(MODEL_SUFFIX)] == str(path_or_name).strip():  # saved under a plain model name
        name = str(path_or_name).strip()
    gate, warning = carried_gate(result.gate, metadata, base_record.get("name"))
    if warning is not None:  # the result's classes were changed after fine-tuning
        result.warnings.append(warning)
        logger.warning(warning)
    return attach_gate(result, gate, path, name=name)
