"""The fine-tuning run."""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import Cancelled, InputError
from ...modelfile import LoadedModel, ModelMetadata
from ...preprocess import PreprocessConfig
from ...provenance import file_sha256, json_safe, tensor_digest
from ...runtime import resolve_device, training_precision
from ...schema import IGNORE, LabelClass
from ..data import TrainingCase
from ..loop import TrainConfig, TrainEvent
from .cases import case_record, cases_from_base_metadata, load_case_record
from .classes import finetune_classes, index_case, index_lut
from .config import CorrectionPair, FinetuneConfig, FinetuneResult
from .dataset import build_finetune_dataset
from .evaluation import (
    EvalCase,
    cumulative_drops,
    evaluate_cases,
    fixed_cache_key,
    fixed_origin,
    read_fixed_cache,
    reporting,
    write_fixed_cache,
)
from .regularisers import ReplayDistillation, WeightAnchor, combine_hooks, freeze_input_stages, lr_param_groups, thaw
from .replay_run import ReplayPhases
from .saving import carried_gate
from .surgery import freeze_batchnorm, fuse_new_rows, grow_head, probe_new_rows, speed_up_new_rows, unfreeze_batchnorm
from .targets import correction_targets, pair_name

logger = logging.getLogger(__name__)


def select_step(
    history: Sequence[Mapping[str, Any]],
    before: Mapping[str, float],
    tolerance: float,
    origin: Mapping[str, float] | None = None,
) -> int | None:
    """Index into ``history`` of the evaluated step to keep.

    Candidates: steps whose fixed-set Dice dropped by at most ``tolerance`` for every class, both
    against ``before`` (this round's base) and against ``origin`` (the original model of the chain
    of rounds, when given); among them the one with the best mean Dice on the corrected studies
    (later steps win ties).  When none qualifies, the step whose worst per-class drop is smallest.
    None without any history.
    """
    if not history:
        return None
    references = [before, *([origin] if origin else [])]

    def worst_drop(record) -> float:
        fixed = record.get("fixed_validation") or {}
        drops = [float(r[k]) - float(v) for r in references for k, v in fixed.items() if k in r and v is not None]
        return max(drops, default=0.0)

    def corrected(record) -> float:
        values = [float(v) for v in (record.get("corrections") or {}).values() if v is not None]
        return float(np.mean(values)) if values else 0.0

    within = [i for i, r in enumerate(history) if worst_drop(r) <= tolerance + 1e-9]
    if within:
        return max(within, key=lambda i: (round(corrected(history[i]), 5), i))
    return min(range(len(history)), key=lambda i: (worst_drop(history[i]), -i))


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
    replay: str | Path | Any = None,
) -> Generator[TrainEvent, None, FinetuneResult]:
    """Fine-tune ``base`` on corrected ``pairs``; yields :class:`TrainEvent`, returns a :class:`FinetuneResult`.

    Events: ``"status"`` (loading, measuring before/after), ``"step"`` and ``"validation"``
    (``val_dice`` keys ``"fixed/<class>"`` and ``"corrected/<class>"``) from the training loop,
    and a final ``"done"``.  ``cancel`` stops at the next step (the result has
    ``cancelled=True`` and cannot be saved); closing the generator stops it too.  Nothing is
    written to disk.  The phases are the methods of :class:`FinetuneRun`.  ``replay`` is a replay set
    (:class:`~.replay.ReplaySet` or a ``.replay.npz`` path) of earlier painted studies; by default the
    base model's own (``<base>.replay.npz``), unless ``config.replay_painted`` is False.
    """
    run = FinetuneRun(
        base,
        pairs,
        config,
        reference_cases=reference_cases,
        fixed_validation=fixed_validation,
        cancel=cancel,
        replay=replay,
    )
    return (yield from run.events())


class FinetuneRun(ReplayPhases):
    """One fine-tuning run: its state on the object, its phases as methods, driven by :meth:`events`.

    :meth:`load_base`, :meth:`prepare_corrections` (trusted targets, classes), :meth:`choose_cases`
    (fixed validation, replay), :meth:`setup_evaluation`, :meth:`measure_before`,
    :meth:`grow_head` (new classes), :meth:`build_training` (train config, dataset),
    :meth:`train` (the one training loop, evaluated at every validation), :meth:`select`
    (the evaluated step that forgot least), :meth:`measure_after`, :meth:`result`.  The replay of
    earlier painted studies is in :class:`~.replay_run.ReplayPhases`.
    """

    def __init__(
        self,
        base: str | Path | LoadedModel,
        pairs: Sequence[CorrectionPair],
        config: FinetuneConfig | None = None,
        *,
        reference_cases: Sequence[TrainingCase] = (),
        fixed_validation: Sequence[TrainingCase] | None = None,
        cancel: threading.Event | None = None,
        replay: str | Path | Any = None,
    ) -> None:
        self.base = base
        self.replay_source = replay
        self.pairs = pairs
        self.config = config or FinetuneConfig()
        self.reference_cases = reference_cases
        self.fixed_validation = fixed_validation
        self.cancel = cancel
        self.started = time.perf_counter()
        self.total = int(self.config.steps)
        self.warnings: list[str] = []
        self.before: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.records: dict[int, dict[str, Any]] = {}
        self.snapshots: dict[int, dict[str, Any]] = {}  # weights at each evaluated step (for the selection)
        self.last_eval: tuple[int, dict[str, Any]] | None = None
        self.selected_step: int | None = None
        self.selection: dict[str, Any] = {}
        self.origin: dict[str, Any] | None = None  # the original model's fixed-set figures (see fixed_origin)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def status(self, message: str, step: int = 0) -> TrainEvent:
        return _status(message, self.total, step)

    # Phases before training ------------------------------------------------------------------------
    def load_base(self) -> None:
        """The base model (a deep copy of its network on the CPU), checked for what fine-tuning needs."""
        from ...modelfile import load_model

        config = self.config
        loaded = self.base if isinstance(self.base, LoadedModel) else load_model(self.base)
        base_meta = loaded.metadata
        if base_meta.architecture == "penn":
            raise InputError("fine-tuning supports the slice networks; patch (penn) models are not supported")
        self.loaded, self.base_meta = loaded, base_meta
        self.base_network = copy.deepcopy(loaded.network).cpu().eval()
        self.base_digest = tensor_digest(dict(self.base_network.state_dict()))
        self.base_path = Path(loaded.path) if loaded.path is not None else None
        self.planes = [p for p in config.planes if p in base_meta.planes]
        if not self.planes:
            raise InputError(f"none of the planes {config.planes} is one of the base model's {base_meta.planes}")
        if any(c.value == IGNORE for c in base_meta.classes):
            raise InputError(f"the base model uses {IGNORE} as a class value; it is reserved for 'not annotated'")

    def prepare_corrections(self) -> None:
        """Trusted targets of every pair, the new model's classes and the label -> class-index table."""
        config, pairs = self.config, self.pairs
        names = [pair_name(p, i) for i, p in enumerate(pairs, start=1)]
        if len(set(names)) != len(names):
            names = [f"{n} [{i}]" for i, n in enumerate(names, start=1)]
        base_values = {c.value for c in self.base_meta.classes}
        unknown = [v for v in range(1, IGNORE) if v not in base_values]  # values that would be new classes
        targets = [correction_targets(p, unknown, config.edit_plane, n) for p, n in zip(pairs, names)]
        values: set[int] = set()
        for target in targets:  # only values on trusted voxels can become classes
            present = np.flatnonzero(np.bincount(target.labels.ravel(), minlength=256))
            values.update(int(v) for v in present if v not in (0, IGNORE))
        classes, new_classes = finetune_classes(self.base_meta.classes, values, config.class_names)
        new_values = np.asarray([c.value for c in new_classes], dtype=np.uint8)
        if new_classes:
            _check_new_classes_have_counterexamples(targets, new_values)
        for target in targets:  # voxels of a new class count as changed (the base cannot predict them)
            target.changed |= np.isin(target.labels, new_values)
        self.names, self.targets = names, targets
        self.classes, self.new_classes = classes, new_classes
        self.class_names = {c.value: c.name for c in classes}
        self.model_values = {c.value for c in classes}
        self.lut = index_lut(classes)

    def choose_cases(self) -> None:
        """The fixed validation set and the reference (replay) cases, with warnings on what is missing."""
        config, warnings = self.config, self.warnings
        fixed = _resolve_fixed(self.base_meta, self.fixed_validation, config)
        fixed_ids = {c.case_id for c in fixed}
        references = list(self.reference_cases)
        if not references and config.reference_from_base > 0 and config.replay_fraction > 0:
            references = [
                c
                for c in cases_from_base_metadata(self.base_meta, "train", config.reference_from_base + len(fixed_ids))
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
        self.fixed, self.references = fixed, references

    def setup_evaluation(self) -> None:
        """Device, precision, the inference settings and the evaluation cases (fixed and corrected)."""
        from ...inference import SegmentationSettings

        config = self.config
        self.device = resolve_device(config.device)
        self.precision = training_precision(config.mixed_precision, self.device, fp16_needs_cuda=False)
        self.settings = SegmentationSettings(
            planes=self.planes,
            device=self.device,
            precision=self.precision if self.precision != "fp16" else "auto",
            batch_size=config.eval_batch_size,
            postprocess=False,
        )
        model_values = self.model_values
        self.fixed_eval = [
            EvalCase(c.case_id, c.image, np.asarray(c.labels.array), {int(v) for v in c.known_classes} & model_values)
            for c in self.fixed
        ]
        self.correction_eval = []
        for pair, name, target in zip(self.pairs, self.names, self.targets):
            known = pair.known_classes if pair.known_classes is not None else model_values - {0}
            self.correction_eval.append(EvalCase(name, pair.image, target.labels, {int(v) for v in known} - {0}))
        if not config.measure_forgetting and self.fixed_eval:
            self.warnings.append("forgetting is not measured: the fixed validation set was skipped")
            self.fixed_eval = []

    def eval_metadata(self, network, model_classes: list[LabelClass]) -> ModelMetadata:
        """The base model's metadata for ``network`` with ``model_classes`` (no post-processing)."""
        base_meta = self.base_meta
        kwargs = dict(getattr(network, "arch_kwargs", None) or base_meta.architecture_kwargs)
        kwargs.pop("in_channels", None)
        kwargs.pop("num_classes", None)
        return dataclasses.replace(
            base_meta, classes=list(model_classes), architecture_kwargs=kwargs, postprocess={}, planes=list(self.planes)
        )

    def evaluate(
        self, network, model_classes, what: str, step: int = 0, keep: bool = False, cache: str | None = None
    ) -> Generator[TrainEvent, None, tuple[dict[str, Any], list]]:
        """Dice on the fixed set and on the corrected studies (and, with ``keep``, the predictions).

        A generator of status events with the progress ("<what>: 45 % (study 2 of 5)"); with
        ``cache`` (a key), the fixed-set figures are reused from or stored in the cache."""
        meta = self.eval_metadata(network, model_classes)
        names, settings, cancel = self.class_names, self.settings, self.cancel
        count = len(self.fixed_eval) + len(self.correction_eval)

        def status(message: str) -> TrainEvent:
            return self.status(message, step)

        cached = read_fixed_cache(cache) if cache and self.fixed_eval else None
        if cached is not None:
            fixed_means, fixed_cases = cached
            yield status(f"{what}: fixed-set figures of this model reused (cached)")
        else:
            fixed = evaluate_cases(network, meta, self.fixed_eval, names, settings, cancel)
            fixed_means, fixed_cases, _ = yield from reporting(fixed, status, what, 0, count)
            if cache and self.fixed_eval:
                write_fixed_cache(cache, fixed_means, fixed_cases)
        corrected = evaluate_cases(network, meta, self.correction_eval, names, settings, cancel, keep)
        corr_means, corr_cases, preds = yield from reporting(corrected, status, what, len(self.fixed_eval), count)
        record = {
            "fixed_validation": fixed_means,
            "corrections": corr_means,
            "fixed_validation_cases": fixed_cases,
            "correction_cases": corr_cases,
        }
        if self.replay_eval:
            record["replay"], record["replay_cases"] = self.evaluate_replay(network, model_classes)
        return record, preds

    def cancelled_result(self, network, steps: int, history: list) -> FinetuneResult:
        metadata = self.eval_metadata(network, list(self.base_meta.classes))
        return FinetuneResult(
            network,
            metadata,
            self.before,
            {},
            self.new_classes,
            True,
            history,
            steps,
            self.base_path,
            self.seconds(),
            self.warnings,
        )

    def measure_before(self) -> Generator[TrainEvent, None, list | None]:
        """Dice of the base model (its predictions on the corrected studies), None when cancelled."""
        key = fixed_cache_key(self.base_digest, self.fixed_eval, self.class_names, self.settings)
        classes = list(self.base_meta.classes)
        try:
            self.before, base_predictions = yield from self.evaluate(
                self.base_network, classes, "measuring the base model", keep=True, cache=key
            )
        except Cancelled:
            return None
        if self.cancel is not None and self.cancel.is_set():
            return None
        self.reference_origin()
        return base_predictions

    def reference_origin(self) -> None:
        """The original model's fixed-set figures (the cumulative forgetting reference); shown in
        ``before["fixed_validation_origin"]`` when the original model is not this round's base."""
        ids = [c.name for c in self.fixed_eval]
        figures = self.before.get("fixed_validation") or {}
        self.origin, warning = fixed_origin(self.base_meta, self.base_digest, figures, ids)
        if warning is not None:
            self.warnings.append(warning)
            logger.warning(warning)
        if self.origin is not None and self.origin["model"].get("content_sha256") != self.base_digest:
            self.before["fixed_validation_origin"] = dict(self.origin["fixed_validation"])

    def grow_head(self, base_predictions: list) -> Generator[TrainEvent, None, None]:
        """The network to train: the base grown by the new classes, each starting from the class the
        base predicted under it (and a linear probe of the painted voxels); batch norm frozen."""
        config, classes, new_classes, lut = self.config, self.classes, self.new_classes, self.lut
        network = copy.deepcopy(self.base_network)
        base_lut = index_lut(self.base_meta.classes)
        parents: dict[int, int] = {}
        for label_class in new_classes:
            counts = np.zeros(256, dtype=np.int64)
            for target, predicted in zip(self.targets, base_predictions):
                under = predicted[target.labels == label_class.value]
                counts += np.bincount(np.clip(under, 0, 255).astype(np.int64).ravel(), minlength=256)[:256]
            counts[IGNORE] = 0
            counts[base_lut == IGNORE] = 0
            parent_value = int(counts.argmax()) if counts.any() else 0
            parents[int(lut[label_class.value])] = int(base_lut[parent_value])
        if new_classes:
            grow_head(network, len(classes), parents, config.new_class_margin)
            if config.probe_new_classes:
                yield self.status("fitting the new classes' output rows to the painted voxels")
                fitted = probe_new_rows(network, self.base_meta, self.pairs, self.targets, lut, parents, config)
                if fitted:
                    logger.info("new class rows initialised by a linear probe: %s", fitted)
            speed_up_new_rows(network, len(self.base_meta.classes), config.new_class_lr_scale)
        self.frozen = freeze_batchnorm(network) if config.freeze_batchnorm else 0
        self.network, self.parents = network, parents

    def train_config(self) -> TrainConfig:
        """The training loop's configuration: the base model's architecture, loss and pre-processing."""
        config, base_meta, classes, new_classes = self.config, self.base_meta, self.classes, self.new_classes
        index_classes = [LabelClass(i, c.name, c.color) for i, c in enumerate(classes)]
        base_config = dict(base_meta.training.get("config") or {})
        loss = config.loss or str(base_config.get("loss") or "ce+dice")
        if config.loss_kwargs is not None:
            loss_kwargs = dict(config.loss_kwargs)
        else:
            loss_kwargs = dict(base_config.get("loss_kwargs") or {}) if config.loss is None else {}
        self.new_weight = float(config.new_class_weight)
        if new_classes and self.new_weight != 1.0 and "class_weights" not in loss_kwargs:
            # A class weight also moves the decision threshold (to p > 1 / (1 + w)): with w = 10 a
            # lesion painted on three slices took over every vertebral body in the benchmark.
            loss_kwargs["class_weights"] = [1.0] * len(base_meta.classes) + [self.new_weight] * len(new_classes)
        return TrainConfig(
            architecture=base_meta.architecture,
            architecture_kwargs=self.eval_metadata(self.network, classes).architecture_kwargs,
            context_slices=base_meta.context_slices,
            classes=index_classes,
            loss=loss,
            loss_kwargs=loss_kwargs,
            lr=float(config.lr),
            weight_decay=float(config.weight_decay),
            schedule=config.schedule,
            warmup_steps=int(config.warmup_steps),
            steps=self.total,
            batch_size=int(config.batch_size),
            val_every=int(config.val_every),
            mixed_precision=config.mixed_precision,
            grad_clip=config.grad_clip,
            seed=int(config.seed),
            device=config.device,
            num_workers=int(config.num_workers),
            num_threads=config.num_threads,
            planes=list(self.planes),
            crop_size=config.crop_size,
            preprocess=self.preprocess,
            augment=config.augment,
            sampling="balanced",
            postprocess=dict(base_meta.postprocess),
            model_name=config.model_name or f"{base_meta.name}-ft",
            recipe="finetune",
        )

    def build_training(self) -> Generator[TrainEvent, None, None]:
        """The training configuration, the correction and replay cases (as class indices) and the dataset."""
        base_meta, lut = self.base_meta, self.lut
        self.preprocess = (
            PreprocessConfig.from_dict(base_meta.preprocess) if base_meta.preprocess else PreprocessConfig()
        )
        self.train_config_ = self.train_config()
        yield self.status("preparing the training slices")
        correction_cases, self.training_labels = [], []
        for pair, name, target in zip(self.pairs, self.names, self.targets):
            known = pair.known_classes if pair.known_classes is not None else self.model_values - {0}
            labels = target.labels
            if pair.known_classes is not None:  # other classes' voxels only say "none of the known classes"
                vouched = np.asarray(sorted({0, IGNORE, *(int(v) for v in known)}), dtype=np.uint8)
                labels = np.where(np.isin(labels, vouched), labels, np.uint8(0)).astype(np.uint8)
            self.training_labels.append(labels)
            case = TrainingCase(pair.image, pair.labels.with_array(labels), set(), name, "corrections", name)
            correction_cases.append(index_case(case, lut, known, name))
        replay_cases = [index_case(c, lut, c.known_classes) for c in self.references]
        self.correction_cases = correction_cases
        self.dataset = build_finetune_dataset(
            correction_cases,
            [t.changed for t in self.targets],
            replay_cases,
            planes=self.planes,
            context_slices=base_meta.context_slices,
            num_classes=len(self.classes),
            preprocess=self.preprocess,
            config=self.config,
            new_class_indices=range(len(base_meta.classes), len(self.classes)),
            painted=self.painted_training_cases(),
        )

    # Training -----------------------------------------------------------------------------------------
    def regularisers(self) -> tuple[Any, list[dict[str, Any]] | None]:
        """The loss hook (replay distillation, L2-SP) and the parameter groups; freezes input stages."""
        config, network = self.config, self.network
        distill = None
        replay_distill = float(config.distill_weight) if self.dataset.replay_fraction > 0 else 0.0
        if replay_distill > 0 or config.distill_unreviewed_weight > 0:
            distill = ReplayDistillation(
                self.base_network,
                len(self.base_meta.classes),
                replay_distill,
                self.device,
                self.precision,
                config.distill_unreviewed_weight,
                float(config.new_class_distill_weight),
            )
        if config.frozen_input_stages > 0:
            count = freeze_input_stages(network, int(config.frozen_input_stages))
            if not count:
                self.warnings.append("frozen_input_stages: no U-Net encoder stage found; nothing frozen")
        anchor = WeightAnchor(network, self.base_network, config.l2sp_weight) if config.l2sp_weight > 0 else None
        groups = lr_param_groups(network, float(config.encoder_lr_scale), float(config.decoder_lr_scale))
        return combine_hooks(distill, anchor), groups

    def on_validation(self, event: TrainEvent) -> Generator[TrainEvent, None, TrainEvent | None]:
        """Evaluate at a validation of the loop (fixed set and corrections), yielding progress;
        returns the event to pass on."""
        network = self.network
        measuring = time.perf_counter()
        try:
            record, _ = yield from self.evaluate(network, self.classes, f"measuring step {event.step}", event.step)
        except Cancelled:
            return None  # the loop stops at its next step
        self.last_eval = (event.step, record)
        self.records[event.step] = record
        if self.config.select_by_validation:
            self.snapshots[event.step] = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        flat = {f"fixed/{k}": v for k, v in record["fixed_validation"].items()}
        flat.update({f"corrected/{k}": v for k, v in record["corrections"].items()})
        self.history.append(
            {
                "step": event.step,
                "train_loss": event.loss,
                "lr": event.lr,
                "fixed_validation": record["fixed_validation"],
                "corrections": record["corrections"],
                "seconds": round(self.seconds(), 1),
            }
        )
        return dataclasses.replace(
            event,
            val_dice=flat,
            val_mean=float(np.mean(list(flat.values()))) if flat else None,
            message=f"step {event.step}: measured in {time.perf_counter() - measuring:.1f} s",
        )

    def train(self) -> Generator[TrainEvent, None, Any]:
        """Run the one training loop (:func:`~napari_spineseg.training.loop.train`); returns its result."""
        from ..loop import train

        network = self.network
        loss_hook, groups = self.regularisers()
        events = train(
            self.train_config_,
            self.correction_cases,
            network=network,
            dataset=self.dataset,
            loss_hook=loss_hook,
            cancel=self.cancel,
            param_groups=groups,
        )
        outcome = None
        try:
            for event in events:
                if event.kind == "validation":
                    passed = yield from self.on_validation(event)
                    if passed is not None:
                        yield passed
                elif event.kind == "done":
                    outcome = event.result
                else:
                    yield event
        finally:
            events.close()
            unfreeze_batchnorm(network)
            thaw(network)
            fuse_new_rows(network)
        assert outcome is not None
        return outcome

    # Phases after training ----------------------------------------------------------------------------
    def select(self, outcome) -> Generator[TrainEvent, None, None]:
        """Keep the evaluated step that forgot at most ``max_forgetting`` and did best on the corrections."""
        config, history, before = self.config, self.history, self.before
        result_network = outcome.network
        self.selection = {"by_validation": bool(config.select_by_validation)}
        if config.select_by_validation:
            self.selection["max_forgetting"] = float(config.max_forgetting)
        if config.select_by_validation and not outcome.cancelled and history and before.get("fixed_validation"):
            origin = before.get("fixed_validation_origin")
            chosen = select_step(history, before["fixed_validation"], float(config.max_forgetting), origin)
            if chosen is not None and history[chosen]["step"] in self.snapshots:
                selected_step = self.selected_step = int(history[chosen]["step"])
                if selected_step != outcome.steps:
                    result_network.load_state_dict(self.snapshots[selected_step])
                drops = {
                    k: round(100 * (before["fixed_validation"][k] - v), 2)
                    for k, v in history[chosen]["fixed_validation"].items()
                    if k in before["fixed_validation"]
                }
                self.selection.update(step=selected_step, fixed_drop_points=drops)
                worst, since = max(drops.values(), default=0.0), ""
                if origin:
                    cumulative = cumulative_drops(origin, history[chosen]["fixed_validation"])
                    self.selection["fixed_drop_points_origin"] = cumulative
                    worst, since = max([worst, *cumulative.values()]), f" (since the original model: {cumulative})"
                if worst > 100 * float(config.max_forgetting) + 1e-6:
                    self.warnings.append(
                        f"the fixed-set Dice dropped by more than {100 * config.max_forgetting:g} point(s) at every "
                        f"evaluated step; kept step {selected_step}, the one that forgot least ({drops}){since}"
                    )
                    logger.warning(self.warnings[-1])
                if selected_step != outcome.steps:
                    yield self.status(
                        f"keeping the weights of step {selected_step} (fixed-set loss within tolerance, best on the "
                        "corrections)",
                        outcome.steps,
                    )
        self.snapshots.clear()
        unfreeze_batchnorm(result_network)
        fuse_new_rows(result_network)
        thaw(result_network)
        result_network.eval()

    def measure_after(self, outcome) -> Generator[TrainEvent, None, dict[str, Any] | None]:
        """Dice of the kept weights (reused from the selected evaluation when there is one); None when cancelled."""
        if self.selected_step is not None and self.selected_step in self.records:
            return self.records[self.selected_step]
        if self.last_eval is not None and self.last_eval[0] == outcome.steps:
            return self.last_eval[1]
        yield self.status("measuring the fine-tuned model", outcome.steps)
        try:
            after, _ = yield from self.evaluate(
                outcome.network, self.classes, "measuring the fine-tuned model", outcome.steps
            )
        except Cancelled:
            return None
        return after

    def training_record(self, outcome, after: dict[str, Any], gate: Any) -> dict[str, Any]:
        """The new model's ``training`` record: provenance, pairs, selection, before/after, settings."""
        import torch

        try:
            from ... import __version__ as package_version
        except ImportError:  # pragma: no cover
            package_version = None
        config, base_meta, classes = self.config, self.base_meta, self.classes
        base_training = base_meta.training or {}
        lineage = [
            *list(base_training.get("lineage") or []),
            {"name": base_meta.name, "content_sha256": self.base_digest, "recipe": base_training.get("recipe")},
        ]
        pair_records = []
        for pair, name, target in zip(self.pairs, self.names, self.targets):
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
        base_path = self.base_path
        return json_safe(
            {
                "recipe": "finetune",
                "finetuned_from": {
                    "name": base_meta.name,
                    "path": str(base_path) if base_path else None,
                    "file_sha256": file_sha256(base_path) if base_path is not None and base_path.is_file() else None,
                    "content_sha256": self.base_digest,
                },
                "round": int(base_training.get("round", 0) or 0) + 1,
                "lineage": lineage,
                "pairs": self.names,
                "pair_details": pair_records,
                "steps": outcome.steps,
                "selected_step": self.selected_step if self.selected_step is not None else outcome.steps,
                "selection": self.selection,
                "lr": float(config.lr),
                "batch_size": int(config.batch_size),
                "replay_fraction": self.dataset.replay_fraction,
                "new_classes": [c.to_dict() for c in self.new_classes],
                "new_class_weight": self.new_weight,
                "new_class_parents": {str(classes[i].value): classes[p].value for i, p in self.parents.items()},
                "fixed_validation": [case_record(c) for c in self.fixed],
                "fixed_validation_origin": self.origin,
                "reference_cases": [case_record(c) for c in self.references],
                "before": self.before,
                "after": after,
                "history": self.history,
                "config": config.to_dict(),
                "train_config": self.train_config_.to_dict(),
                "frozen_batchnorm_layers": self.frozen,
                "lesion_gate": (
                    None
                    if self.loaded.gate is None
                    else (
                        "carried over unchanged from the base model" if gate is not None else "dropped (see warnings)"
                    )
                ),
                "device": self.device,
                "precision": self.precision,
                "torch_version": torch.__version__,
                "package_version": package_version,
                "warnings": self.warnings,
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "seconds": round(self.seconds(), 1),
            }
        )

    def result(self, outcome, after: dict[str, Any]) -> FinetuneResult:
        """The fine-tuned model (network, metadata with full provenance, carried gate) and its figures."""
        base_meta, classes, new_classes, pairs = self.base_meta, self.classes, self.new_classes, self.pairs
        result_network = outcome.network
        gate = None
        if self.loaded.gate is not None:
            gate, gate_warning = carried_gate(
                self.loaded.gate, self.eval_metadata(result_network, classes), base_meta.name
            )
            if gate_warning is not None:
                self.warnings.append(gate_warning)
                logger.warning(gate_warning)
            else:
                gate = copy.deepcopy(gate)
        replay = self.replay_to_save(self.training_labels)
        training = {**self.training_record(outcome, after, gate), **json_safe(self.replay_record(replay))}
        description = (base_meta.description + " " if base_meta.description else "") + (
            f"Fine-tuned ({outcome.steps} steps) on {len(pairs)} corrected stud{'y' if len(pairs) == 1 else 'ies'}"
            + (f", new classes: {', '.join(c.name for c in new_classes)}" if new_classes else "")
            + "."
        )
        before = self.before
        metadata = dataclasses.replace(
            self.eval_metadata(result_network, classes),
            name=self.train_config_.model_name,
            postprocess=dict(base_meta.postprocess),
            planes=list(base_meta.planes),
            training=training,
            metrics=json_safe(
                {
                    "val_dice": after.get("fixed_validation", {}),
                    "finetune_before": {k: before.get(k) for k in ("fixed_validation", "corrections")},
                    "finetune_after": {k: after.get(k) for k in ("fixed_validation", "corrections")},
                }
            ),
            description=description,
        )
        return FinetuneResult(
            result_network,
            metadata,
            before,
            after,
            new_classes,
            False,
            self.history,
            outcome.steps,
            self.base_path,
            self.seconds(),
            self.warnings,
            self.selected_step,
            gate,
            replay,
        )

    # Driver --------------------------------------------------------------------------------------------
    def events(self) -> Generator[TrainEvent, None, FinetuneResult]:
        """Every phase in order; yields the status, step, validation and done events."""
        import torch

        config = self.config
        self.started = time.perf_counter()
        if config.num_threads is not None:
            torch.set_num_threads(max(1, int(config.num_threads)))
        if not self.pairs:
            raise InputError("no correction pairs: give at least one (image, corrected labels) pair")
        yield self.status("loading the base model")
        self.load_base()
        self.prepare_corrections()
        self.load_replay()
        self.choose_cases()
        self.setup_evaluation()
        self.setup_replay_evaluation()
        yield self.status(
            f"measuring the base model on {len(self.fixed_eval)} fixed and {len(self.pairs)} corrected studies"
        )
        base_predictions = yield from self.measure_before()
        if base_predictions is None:
            return self.cancelled_result(self.base_network, 0, [])
        yield from self.grow_head(base_predictions)
        yield from self.build_training()
        outcome = yield from self.train()
        yield from self.select(outcome)
        if outcome.cancelled:
            return self.cancelled_result(self.base_network, outcome.steps, self.history)
        after = yield from self.measure_after(outcome)
        if after is None:
            return self.cancelled_result(self.base_network, outcome.steps, self.history)
        result = self.result(outcome, after)
        yield TrainEvent(
            "done",
            outcome.steps,
            self.total,
            0,
            message=f"fine-tuned for {outcome.steps} steps",
            seconds=self.seconds(),
        )
        return result


def _check_new_classes_have_counterexamples(targets: Sequence[Any], new_values: np.ndarray) -> None:
    """A new class needs trusted voxels of other classes (what it is not): refuse corrections whose
    trusted voxels are all new classes (e.g. an image given as the labels)."""
    trusted = sum(int(np.count_nonzero(t.trusted)) for t in targets)
    new = sum(int(np.count_nonzero(np.isin(t.labels, new_values))) for t in targets)
    if trusted and new == trusted:
        shown = ", ".join(str(int(v)) for v in new_values[:5]) + (", ..." if len(new_values) > 5 else "")
        raise InputError(
            f"every trusted voxel of the corrections is a new class (value(s) {shown}; {len(new_values)} new): "
            "a new class must be shown beside voxels of the model's classes (background 0 included); "
            "are the labels an image?"
        )


def run_finetune(base, pairs, config: FinetuneConfig | None = None, **kwargs) -> FinetuneResult:
    """Drain :func:`finetune` and return its :class:`FinetuneResult`."""
    from ..._generators import drain

    return drain(finetune(base, pairs, config, **kwargs))
