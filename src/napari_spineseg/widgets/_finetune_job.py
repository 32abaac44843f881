"""The fine-tuning job behind the "Fine-tune model" widget (Qt-free adapter to the training engine).

    job = start_finetune("spineseg-default", [(image, corrected, prediction)], steps=100, lr=1e-4,
                         class_names={5: "hemangioma"}, cancel=threading.Event())
    for event in job: ...          # FinetuneEvent: step/total_steps/loss; val_dice on validations
    result = StopIteration.value   # napari_spineseg.training.finetune.FinetuneResult

The widget only talks to this module; the work is :func:`napari_spineseg.training.finetune.finetune`.
When the model's original prediction of a pair is known, only the slices the annotator changed
are trusted (everything else is "not annotated"); without it the whole corrected map is trusted.
Dice is reported on the corrected studies ("corrected/<class>") and, when the base model records
one, on a fixed validation set ("fixed/<class>") that shows forgetting.  Nothing is written to
disk: :func:`save_result` does that when the user asks.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, InputError
from ..schema import LabelClass
from ..volume import Volume
from ._threads import gui_friendly_torch


def label_values(array: np.ndarray) -> list[int]:
    """Distinct non-zero values of a label array (fast path for small integer labels)."""
    array = np.asarray(array)
    if array.size == 0:
        return []
    if array.dtype.kind in "ub" or (array.dtype.kind == "i" and array.min() >= 0):
        top = int(array.max())
        if top < 1 << 16:
            counts = np.bincount(array.ravel(), minlength=top + 1)
            return [int(v) for v in np.flatnonzero(counts) if v != 0]
    return [int(v) for v in np.unique(array) if v != 0]


def preview_classes(
    base: Sequence[LabelClass], values: Sequence[int], names: Mapping[int, str] | None = None
) -> list[LabelClass]:
    """The classes a fine-tuned model will have (what fine-tuning itself computes:
    :func:`~napari_spineseg.training.finetune.classes.finetune_classes`); blank names are ignored."""
    from ..training.finetune.classes import finetune_classes

    names = {int(k): str(v).strip() for k, v in (names or {}).items() if str(v).strip()}
    classes, _ = finetune_classes(base, values, names)
    return classes


@dataclass
class FinetuneEvent:
    step: int
    total_steps: int
    loss: float | None = None
    val_dice: dict[str, float] | None = None  # "corrected/<class>" / "fixed/<class>" -> Dice
    message: str = ""


def start_finetune(
    base_model: str,
    pairs: Sequence[tuple[Volume, Volume, Volume | None]],
    steps: int,
    lr: float,
    class_names: Mapping[int, str] | None,
    cancel: threading.Event,
    device: str = "auto",
    validations: int = 4,
    measure_forgetting: bool = True,
) -> Generator[FinetuneEvent, None, Any]:
    """Fine-tune ``base_model`` on ``(image, corrected labels, original prediction or None)`` pairs.

    Short runs (at most 50 steps) are measured once, at the end; longer ones ``validations``
    times.  ``measure_forgetting=False`` skips the fixed validation set (faster; forgetting is
    then not measured).  The base model's fixed-set figures are cached between runs.
    """
    from ..training.finetune import CorrectionPair, FinetuneConfig, finetune

    if not pairs:
        raise InputError("add at least one (image, corrected labels) pair")
    correction_pairs = [
        CorrectionPair(image, labels, prediction=prediction, name=labels.name) for image, labels, prediction in pairs
    ]
    config = FinetuneConfig(
        steps=int(steps),
        lr=float(lr),
        class_names={int(k): v for k, v in (class_names or {}).items()},
        device=device,
        val_every=int(steps) if int(steps) <= 50 else max(int(steps) // max(1, validations), 25),
        measure_forgetting=bool(measure_forgetting),
    )
    events = finetune(base_model, correction_pairs, config, cancel=cancel)
    with gui_friendly_torch():
        try:
            result = yield from _translated(events)
        finally:
            events.close()
    if result is None or result.cancelled or cancel.is_set():
        raise Cancelled("fine-tuning cancelled")
    return result


def _translated(events: Generator[Any, None, Any]) -> Generator[FinetuneEvent, None, Any]:
    """The training engine's events as :class:`FinetuneEvent`; returns the engine's result."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        if event.kind == "step":
            yield FinetuneEvent(event.step, event.total_steps, loss=event.loss)
        elif event.kind == "validation":
            dice = {str(k): float(v) for k, v in (event.val_dice or {}).items() if v is not None}
            yield FinetuneEvent(event.step, event.total_steps, event.loss, dice, event.message)
        elif event.message:
            yield FinetuneEvent(event.step, event.total_steps, message=event.message)


def save_result(result: Any, name: str) -> Path:
    """Save a fine-tuned model as user model ``name`` (never over the base or an existing model)."""
    from ..modelfile import safe_model_name, user_model_path
    from ..training.finetune import save_finetuned

    name = safe_model_name(name)
    path = user_model_path(name)
    if path.exists():
        raise InputError(f"a model named {name!r} already exists ({path}); choose another name")
    return save_finetuned(result, name)


def dice_table(result: Any) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the before/after Dice table of a fine-tuning result.

    Groups: the corrected studies ("corrected before" of a class painted in earlier rounds is the
    base model's Dice on this study before it was painted: how the class transferred), the
    replayed painted studies of earlier rounds ("earlier painted"), the fixed validation set, and
    after several rounds the fixed set against the original model of the chain ("vs original":
    before = that model's figures, after = this result's)."""
    groups = [
        ("corrections", "corrected"),
        ("replay", "earlier painted"),
        ("fixed_validation", "fixed set"),
        ("fixed_validation_origin", "fixed set vs original"),
    ]
    groups = [(key, label) for key, label in groups if result.before.get(key) or result.after.get(key)]
    headers = ["class"] + [f"{label} {when}" for _, label in groups for when in ("before", "after")]
    rows = []
    for label_class in result.metadata.classes:
        if label_class.value == 0:
            continue
        row: list[Any] = [label_class.name]
        for key, _ in groups:
            for record, record_key in ((result.before, key), (result.after, key.removesuffix("_origin"))):
                value = (record.get(record_key) or {}).get(label_class.name)
                row.append(float("nan") if value is None else float(value))
        rows.append(row)
    return headers, rows
