"""Classes of a fine-tuned model: new label values become new classes; label maps to class indices."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ...errors import InputError
from ...schema import DEFAULT_CLASSES, IGNORE, LabelClass, class_for_value
from ..data import TrainingCase
from .config import MAX_LABEL_VALUE

logger = logging.getLogger(__name__)


def _new_class(value: int, names: Mapping[int, str], existing: Sequence[LabelClass]) -> LabelClass:
    schema = next((c for c in DEFAULT_CLASSES if c.value == value), None)
    generated = schema if schema is not None else class_for_value(value, existing)
    return LabelClass(int(value), names.get(value, generated.name), generated.color)


def finetune_classes(
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


def index_lut(classes: Sequence[LabelClass]) -> np.ndarray:
    """Schema value -> class index (IGNORE for values the model does not have)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for index, label_class in enumerate(classes):
        if label_class.value <= MAX_LABEL_VALUE:
            lut[label_class.value] = index
    return lut


def index_case(case: TrainingCase, lut: np.ndarray, known_values: Iterable[int], case_id: str | None = None):
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
