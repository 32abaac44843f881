"""Fine-tuning configuration and records: the correction pairs, the settings, the result."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...augment import AugmentConfig
from ...errors import InputError
from ...modelfile import ModelMetadata
from ...orientation import ALL_PLANES, Plane
from ...schema import LabelClass
from ...volume import Volume
from ..common import SCHEDULES
from ..loop import PRECISIONS

logger = logging.getLogger(__name__)


MAX_LABEL_VALUE = 254  # 255 is IGNORE ("not annotated")
MIN_CROP = 16  # smallest training crop (pixels): the U-Nets halve it four times


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
    replay_painted: bool = True  # train again on the painted studies of earlier rounds (the base's replay set)
    replay_max_studies: int = 8  # the replay set saved with the model keeps the most recent N painted studies
    replay_max_mb: float = 256.0  # ... and at most this many MB of crops

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise InputError(f"steps must be at least 1, got {self.steps}")
        if int(self.seed) < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")
        if self.crop_size is not None and int(self.crop_size) < MIN_CROP:
            raise InputError(f"crop size must be at least {MIN_CROP} pixels (or none), got {self.crop_size}")
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
        if int(self.replay_max_studies) < 0 or not float(self.replay_max_mb) >= 0:
            raise InputError("replay_max_studies and replay_max_mb must be >= 0 (0: no replay set is saved)")
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
    gate: Any = None  # the base model's lesion gate (napari_spineseg.lesion_gate.LesionGate), carried over unchanged
    replay: Any = None  # the painted studies to save beside the model (replay.ReplaySet), None: none
