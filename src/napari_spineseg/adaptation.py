"""Apply an annotator's corrections to the open study: a quick adaptation, then re-segmentation (Qt-free).

    events = adapt_to_study("spineseg-default", image, labels, painted)
    for event in events: ...              # TrainEvent: "status", "step", "done"
    result = StopIteration.value          # AdaptationResult (or use run_adaptation(...))
    result.change.apply(labels)           # the unpainted voxels re-segmented; painted ones untouched

The model is fine-tuned for a few steps on this study alone (the fine-tuning engine,
:mod:`napari_spineseg.training.finetune`): the slices holding painted voxels, in the plane they
were painted in, are the targets (every voxel of such a slice: the annotator looked at it), the
other planes see them as lines; nothing else of the study is trusted.  No replay, no fixed-set
evaluation, nothing saved: the adapted network is thrown away after the re-segmentation.  Then
the study is segmented again with the adapted network and every voxel the annotator did *not*
paint takes the new label; painted voxels keep exactly the value they have.

Defaults (:class:`AdaptConfig`) were measured on held-out studies
(``benchmarks/results/adaptation-ablation.csv``, docs/training.md): 40 steps of batch 4, 192²
crops, encoder at 3e-4 and decoder at 9e-4 — no replay or distillation (the network is thrown
away, forgetting does not matter).  A frozen encoder is cheaper and as good on a study of a known
site, but made a study of an unseen site worse (its features need to move).  About 20 s on one
CPU core for a lumbar MRI study (77 × 224 × 224), re-segmentation included.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .interpolation import LabelChange
from .modelfile import LoadedModel
from .orientation import ALL_PLANES, Plane, plane_array_axis
from .schema import IGNORE
from .volume import Volume

__all__ = ["AdaptConfig", "AdaptationResult", "adapt_to_study", "adaptation_targets", "run_adaptation"]


@dataclass
class AdaptConfig:
    """Settings of a study adaptation (a short fine-tuning run on the painted slices only)."""

    steps: int = 40
    lr: float = 1e-4  # the encoder's rate (3e-4 hurt model v5 on VB3-01: -0.5 points; 1e-4: +0.25, VB3-02 +0.56)
    decoder_lr_scale: float = 3.0  # decoder and output layer learn at lr * this (10 overshoots)
    encoder_lr_scale: float = 1.0  # 0: frozen encoder (faster steps, but no adaptation to an unseen site)
    batch_size: int = 4
    crop_size: int | None = 192  # None: whole slices (padded to one common square when the planes differ)
    planes: list[str] = field(default_factory=lambda: [p.value for p in ALL_PLANES])
    changed_priority: float = 4.0
    min_coverage: float = 0.02
    augment: bool = True  # the fine-tuning engine's light augmentation
    loss: str | None = None  # None: the model's training loss (e.g. "ce+dice"); "ce": cross-entropy only
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise InputError(f"adaptation steps must be at least 1, got {self.steps}")

    def finetune_config(self) -> Any:
        """The :class:`~napari_spineseg.training.finetune.FinetuneConfig` of the short run."""
        from .training.finetune import FinetuneConfig

        config = FinetuneConfig(
            steps=int(self.steps),
            lr=float(self.lr),
            batch_size=int(self.batch_size),
            replay_fraction=0.0,
            planes=list(self.planes),
            seed=int(self.seed),
            device=self.device,
            val_every=int(self.steps),
            changed_priority=float(self.changed_priority),
            min_coverage=float(self.min_coverage),
            crop_size=self.crop_size,
            distill_weight=0.0,
            encoder_lr_scale=float(self.encoder_lr_scale),
            decoder_lr_scale=float(self.decoder_lr_scale),
            select_by_validation=False,
            replace_fixed_validation=True,
            reference_from_base=0,
            num_threads=self.num_threads,
            model_name="study-adaptation",
            loss=self.loss,
        )
        if not self.augment:
            config.augment = None
        return config


@dataclass
class AdaptationResult:
    """Outcome of :func:`adapt_to_study`."""

    labels: np.ndarray  # the study re-segmented, painted voxels exactly as they were
    change: LabelChange  # from the labels given to ``labels`` (empty when cancelled)
    plane: str | None  # the plane the painted slices were taken in
    slices: list[int]  # the painted slices (array indices along that plane's axis)
    steps: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    prediction: np.ndarray | None = None  # the adapted network's own re-segmentation (painted voxels too)


def _detect_plane(painted: np.ndarray, geometry) -> Plane:
    from .training.finetune.targets import detect_edit_plane

    return detect_edit_plane(painted, geometry)


def adaptation_targets(
    labels: np.ndarray, painted: np.ndarray, geometry, plane: str = "auto", model_values: set[int] | None = None
) -> tuple[np.ndarray, Plane, list[int]]:
    """(targets, plane, slices): ``labels`` on every slice holding a painted voxel, IGNORE elsewhere.

    Values the model does not know (``model_values``) are IGNORE too: adaptation learns the
    model's classes only (a new class needs fine-tuning).
    """
    chosen = _detect_plane(painted, geometry) if plane == "auto" else Plane(plane)
    axis = plane_array_axis(geometry, chosen)
    other = tuple(a for a in range(3) if a != axis)
    slices = [int(i) for i in np.flatnonzero(painted.any(axis=other))]
    trusted = np.zeros(labels.shape, dtype=bool)
    key: list[Any] = [slice(None)] * 3
    key[axis] = slices
    trusted[tuple(key)] = True
    if model_values is not None:
        trusted &= np.isin(labels, np.asarray(sorted(model_values), dtype=labels.dtype))
    targets = np.where(trusted, labels, IGNORE).astype(np.uint8)
    return targets, chosen, slices


def _check_inputs(image: Volume, labels: np.ndarray, painted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, painted = np.asarray(labels), np.asarray(painted, dtype=bool)
    if labels.shape != tuple(image.shape) or painted.shape != labels.shape:
        raise InputError(
            f"labels {labels.shape} and painted mask {painted.shape} must have the image's shape {tuple(image.shape)}"
        )
    if labels.dtype.kind not in "iub":
        raise InputError(f"labels must hold whole numbers, got {labels.dtype}")
    if not painted.any():
        raise InputError("nothing painted yet: correct at least one slice, then apply the corrections")
    return labels, painted


def adapt_to_study(
    model: str | Path | LoadedModel,
    image: Volume,
    labels: np.ndarray,
    painted: np.ndarray,
    config: AdaptConfig | None = None,
    *,
    settings: Any = None,
    plane: str = "auto",
    cancel: threading.Event | None = None,
) -> Generator[Any, None, AdaptationResult]:
    """Adapt ``model`` to the painted slices of ``image`` and re-segment the unpainted voxels.

    ``labels``: the annotator's label map now (study array order); ``painted``: boolean mask of
    the voxels the annotator painted (never changed).  ``settings``: the
    :class:`~napari_spineseg.inference.SegmentationSettings` of the re-segmentation (default:
    the model's own, with post-processing).  Yields the fine-tuning engine's
    :class:`~napari_spineseg.training.loop.TrainEvent` ("status", "step", "done"); returns an
    :class:`AdaptationResult`.  ``cancel`` stops at the next step (nothing is changed).
    """
    from .inference import Predictor, SegmentationSettings
    from .training.loop import TrainEvent

    started = time.perf_counter()
    labels, painted = _check_inputs(image, labels, painted)
    config = config or AdaptConfig()
    run = _adapt_run(model, image, labels, painted, config, plane, cancel)
    total = int(config.steps)
    yield TrainEvent("status", 0, total, 0, message="loading the model")
    run.load_base()
    run.prepare_corrections()
    run.fixed, run.references = [], []
    run.setup_evaluation()
    run.before = {}
    yield from run.grow_head([])
    yield from run.build_training()
    outcome = yield from run.train()
    empty = LabelChange(tuple(np.empty(0, np.intp) for _ in range(3)), labels[:0].ravel(), labels[:0].ravel())
    if outcome.cancelled or (cancel is not None and cancel.is_set()):
        return AdaptationResult(labels.copy(), empty, run.plane, run.slices, outcome.steps, 0.0, True)
    yield TrainEvent("status", outcome.steps, total, 0, message="re-segmenting the unpainted voxels")
    network = outcome.network.eval()
    settings = settings or SegmentationSettings(device=run.device)
    predictor = Predictor(settings)
    predictor.load(LoadedModel(network, run.base_meta, None))
    predicted = predictor.predict(image, cancel).labels.array
    merged = np.where(painted, labels, predicted.astype(labels.dtype, copy=False))
    indices = np.nonzero(merged != labels)
    change = LabelChange(indices, merged[indices], labels[indices])
    seconds = time.perf_counter() - started
    yield TrainEvent(
        "done", outcome.steps, total, 0, message=f"adapted in {outcome.steps} steps; {change.size} voxels change"
    )
    return AdaptationResult(merged, change, run.plane, run.slices, outcome.steps, seconds, prediction=predicted)


def run_adaptation(*args: Any, **kwargs: Any) -> AdaptationResult:
    """Drain :func:`adapt_to_study` and return its :class:`AdaptationResult`."""
    from ._generators import drain

    return drain(adapt_to_study(*args, **kwargs))


def _adapt_run_class() -> type:
    from .training.finetune.classes import finetune_classes, index_lut
    from .training.finetune.config import CorrectionPair
    from .training.finetune.run import FinetuneRun
    from .training.finetune.targets import CorrectionTargets

    class AdaptRun(FinetuneRun):
        """A fine-tuning run on one study's painted slices: targets given, no evaluation at all."""

        def __init__(self, model, image, labels, painted, config: AdaptConfig, plane, cancel) -> None:
            self.image, self.study_labels, self.painted, self.plane_choice = image, labels, painted, plane
            pair = CorrectionPair(image, Volume(labels.astype(np.uint8), image.geometry), name="study")
            super().__init__(model, [pair], config.finetune_config(), fixed_validation=[], cancel=cancel)

        def prepare_corrections(self) -> None:
            classes, _ = finetune_classes(self.base_meta.classes, (), {})
            values = {c.value for c in classes}
            geometry = self.image.geometry
            targets, plane, slices = adaptation_targets(
                self.study_labels, self.painted, geometry, self.plane_choice, values
            )
            self.plane, self.slices = plane.value, slices
            changed = self.painted & (targets != IGNORE)
            self.pairs = [dataclasses.replace(self.pairs[0], labels=Volume(targets, geometry))]
            self.names = ["study"]
            self.targets = [CorrectionTargets(targets, changed, plane.value, {plane.value: slices}, False)]
            self.classes, self.new_classes = classes, []
            self.class_names = {c.value: c.name for c in classes}
            self.model_values = values
            self.lut = index_lut(classes)

        def on_validation(self, event):
            """No evaluation during an adaptation: the loop's validation events are dropped."""
            return None
            yield  # a generator, as the phase it replaces

    return AdaptRun


def _adapt_run(*args: Any) -> Any:  # the class is built on first use (lazy torch import)
    return _adapt_run_class()(*args)
