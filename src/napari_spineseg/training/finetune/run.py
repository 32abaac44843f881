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
from .evaluation import EvalCase, evaluate_cases
from .regularisers import ReplayDistillation, WeightAnchor, combine_hooks, freeze_input_stages, lr_param_groups, thaw
from .saving import carried_gate
from .surgery import freeze_batchnorm, fuse_new_rows, grow_head, probe_new_rows, speed_up_new_rows, unfreeze_batchnorm
from .targets import correction_targets, pair_name

logger = logging.getLogger(__name__)


def select_step(history: Sequence[Mapping[str, Any]], before: Mapping[str, float], tolerance: float) -> int | None:
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

    from ..inference import SegmentationSettings
    from ..modelfile import load_model
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
    base_digest = tensor_digest(dict(base_network.state_dict()))
    base_path = Path(loaded.path) if loaded.path is not None else None
    planes = [p for p in config.planes if p in base_meta.planes]
    if not planes:
        raise InputError(f"none of the planes {config.planes} is one of the base model's {base_meta.planes}")
    if any(c.value == IGNORE for c in base_meta.classes):
        raise InputError(f"the base model uses {IGNORE} as a class value; it is reserved for 'not annotated'")

    # Corrections, classes, trusted targets ----------------------------------------------------
    names = [pair_name(p, i) for i, p in enumerate(pairs, start=1)]
    if len(set(names)) != len(names):
        names = [f"{n} [{i}]" for i, n in enumerate(names, start=1)]
    targets = [correction_targets(p, (), config.edit_plane, n) for p, n in zip(pairs, names)]
    values: set[int] = set()
    for target in targets:  # only values on trusted voxels can become classes
        present = np.flatnonzero(np.bincount(target.labels.ravel(), minlength=256))
        values.update(int(v) for v in present if v not in (0, IGNORE))
    classes, new_classes = finetune_classes(base_meta.classes, values, config.class_names)
    class_names = {c.value: c.name for c in classes}
    new_values = np.asarray([c.value for c in new_classes], dtype=np.uint8)
    for target in targets:  # voxels of a new class count as changed (the base cannot predict them)
        target.changed |= np.isin(target.labels, new_values)
    lut = index_lut(classes)

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
    precision = training_precision(config.mixed_precision, device, fp16_needs_cuda=False)
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
        EvalCase(c.case_id, c.image, np.asarray(c.labels.array), {int(v) for v in c.known_classes} & model_values)
        for c in fixed
    ]
    correction_eval = []
    for pair, name, target in zip(pairs, names, targets):
        known = pair.known_classes if pair.known_classes is not None else model_values - {0}
        correction_eval.append(EvalCase(name, pair.image, target.labels, {int(v) for v in known} - {0}))

    def evaluate(network, model_classes, keep: bool = False):
        meta = eval_metadata(network, model_classes)
        fixed_means, fixed_cases, _ = evaluate_cases(network, meta, fixed_eval, class_names, settings, cancel)
        corr_means, corr_cases, preds = evaluate_cases(
            network, meta, correction_eval, class_names, settings, cancel, keep
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
    try:
        before, base_predictions = evaluate(base_network, list(base_meta.classes), keep=True)
    except Cancelled:
        return cancelled_result(base_network, 0, [])
    if cancel is not None and cancel.is_set():
        return cancelled_result(base_network, 0, [])

    # Grow the head: each new class starts from the class the base predicted under it ---------
    network = copy.deepcopy(base_network)
    base_lut = index_lut(base_meta.classes)
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
        grow_head(network, len(classes), parents, config.new_class_margin)
        if config.probe_new_classes:
            yield _status("fitting the new classes' output rows to the painted voxels", total)
            fitted = probe_new_rows(network, base_meta, pairs, targets, lut, parents, config)
            if fitted:
                logger.info("new class rows initialised by a linear probe: %s", fitted)
        speed_up_new_rows(network, len(base_meta.classes), config.new_class_lr_scale)
    frozen = freeze_batchnorm(network) if config.freeze_batchnorm else 0

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
        correction_cases.append(index_case(case, lut, known, name))
    replay_cases = [index_case(c, lut, c.known_classes) for c in references]
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
        distill = ReplayDistillation(
            base_network,
            len(base_meta.classes),
            replay_distill,
            device,
            precision,
            config.distill_unreviewed_weight,
            float(config.new_class_distill_weight),
        )
    if config.frozen_input_stages > 0:
        count = freeze_input_stages(network, int(config.frozen_input_stages))
        if not count:
            warnings.append("frozen_input_stages: no U-Net encoder stage found; nothing frozen")
    anchor = WeightAnchor(network, base_network, config.l2sp_weight) if config.l2sp_weight > 0 else None
    events = train(
        train_config,
        correction_cases,
        network=network,
        dataset=dataset,
        loss_hook=combine_hooks(distill, anchor),
        cancel=cancel,
        param_groups=lr_param_groups(network, float(config.encoder_lr_scale), float(config.decoder_lr_scale)),
    )
    history: list[dict[str, Any]] = []
    records: dict[int, dict[str, Any]] = {}
    snapshots: dict[int, dict[str, Any]] = {}  # weights at each evaluated step (for the selection)
    last_eval: tuple[int, dict[str, Any]] | None = None
    outcome = None
    try:
        for event in events:
            if event.kind == "validation":
                try:
                    record, _ = evaluate(network, classes)
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
                    event, val_dice=flat, val_mean=float(np.mean(list(flat.values()))) if flat else None
                )
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
    result_network = outcome.network
    selected_step: int | None = None
    selection: dict[str, Any] = {"by_validation": bool(config.select_by_validation)}
    if config.select_by_validation:
        selection["max_forgetting"] = float(config.max_forgetting)
    if config.select_by_validation and not outcome.cancelled and history and before.get("fixed_validation"):
        chosen = select_step(history, before["fixed_validation"], float(config.max_forgetting))
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
    unfreeze_batchnorm(result_network)
    fuse_new_rows(result_network)
    thaw(result_network)
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
            after, _ = evaluate(result_network, classes)
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
    training = json_safe(
        {
            "recipe": "finetune",
            "finetuned_from": {
                "name": base_meta.name,
                "path": str(base_path) if base_path else None,
                "file_sha256": file_sha256(base_path) if base_path is not None and Path(base_path).is_file() else None,
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
        metrics=json_safe(
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
