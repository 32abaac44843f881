"""Evaluation through the inference path (per-class Dice on fixed and corrected studies)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import Cancelled
from ...modelfile import LoadedModel, ModelMetadata
from ...schema import IGNORE
from ...volume import Volume

logger = logging.getLogger(__name__)


@dataclass
class EvalCase:
    name: str
    image: Volume
    truth: np.ndarray  # schema values, IGNORE where there is no (trusted) truth
    known: set[int]  # schema values scored


def evaluate_cases(
    network,
    metadata: ModelMetadata,
    cases: Sequence[EvalCase],
    names: Mapping[int, str],
    settings,
    cancel: threading.Event | None = None,
    keep_predictions: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, float]], list[np.ndarray]]:
    """(mean Dice per class name, per-case Dice, predictions) of ``network`` on whole ``cases``.

    Dice is computed over each case's truth region for its known classes; a class absent from
    both the truth and the prediction in that region is not scored.
    """
    from ...inference import Predictor
    from ...metrics import dice_score

    was_training = network.training
    predictor = Predictor(settings)
    per_case: dict[str, dict[str, float]] = {}
    predictions: list[np.ndarray] = []
    try:
        predictor.load(LoadedModel(network, metadata, None))
        for case in cases:
            if cancel is not None and cancel.is_set():
                raise Cancelled("fine-tuning cancelled")
            pred = predictor.predict(case.image, cancel).labels.array
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
