"""Evaluation through the inference path (per-class Dice on fixed and corrected studies)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
) -> Generator[float, None, tuple[dict[str, float], dict[str, dict[str, float]], list[np.ndarray]]]:
    """(mean Dice per class name, per-case Dice, predictions) of ``network`` on whole ``cases``.

    A generator: yields the number of cases done so far (fractional within a case, for progress)
    and returns the figures.  Dice is computed over each case's truth region for its known
    classes; a class absent from both the truth and the prediction in that region is not scored.
    """
    from ...inference import Predictor
    from ...metrics import dice_score

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


def reporting(
    evaluation: Generator[float, None, Any], status: Callable[[str], Any], what: str, offset: int, count: int
) -> Generator[Any, None, Any]:
    """:func:`evaluate_cases`' progress as ``status`` events ("<what>: 45 % (study 2 of 5)"); returns its result."""
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
            yield status(f"{what}: {percent} % (study {study} of {count})")


# Cache of the base models' fixed-set figures ---------------------------------------------------------
def fixed_cache_path() -> Path:
    """Where the base models' fixed-set figures are cached (keyed by the model's tensor digest)."""
    from ...modelfile import user_model_dir

    return user_model_dir() / "cache" / "fixed-validation.json"


def fixed_cache_key(digest: str, cases: Sequence[EvalCase], names: Mapping[int, str], settings: Any) -> str:
    """The cache key of a base model's figures on ``cases`` with the inference ``settings``."""
    known = {int(v) for c in cases for v in c.known}
    record = {
        "digest": digest,
        "cases": [[c.name, sorted(int(v) for v in c.known), list(c.image.array.shape)] for c in cases],
        "names": {str(k): v for k, v in sorted(names.items()) if int(k) in known},
        "planes": [str(getattr(p, "value", p)) for p in settings.planes],
        "postprocess": bool(settings.postprocess),
        "device": str(settings.device),
        "precision": str(settings.precision),
    }
    return hashlib.sha256(repr(sorted(record.items())).encode()).hexdigest()


def read_fixed_cache(key: str) -> tuple[dict[str, float], dict[str, dict[str, float]]] | None:
    """The cached (means, per-case) figures of ``key``, or None."""
    try:
        entry = json.loads(fixed_cache_path().read_text(encoding="utf-8")).get(key)
        return (dict(entry["means"]), dict(entry["cases"])) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_fixed_cache(key: str, means: Mapping[str, float], cases: Mapping[str, Any]) -> None:
    """Remember a base model's fixed-set figures (atomic write; at most 50 entries; failures only logged)."""
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


# The original model's fixed-set figures (the cumulative forgetting reference) ------------------------
def is_finetuned(metadata: ModelMetadata) -> bool:
    """Whether ``metadata`` is of a fine-tuned model (one with a base it was fine-tuned from)."""
    training = metadata.training or {}
    return training.get("recipe") == "finetune" or bool(training.get("finetuned_from"))


def recorded_origin(metadata: ModelMetadata) -> dict[str, Any] | None:
    """The fixed-set figures of the original model of a fine-tuned model's chain, as recorded in
    ``training["fixed_validation_origin"]`` (``{"model", "cases", "fixed_validation"}``); for a
    first-round model saved before that record existed, rebuilt from its ``before`` figures."""
    training = metadata.training or {}
    record = training.get("fixed_validation_origin")
    if record:
        return dict(record)
    before = (training.get("before") or {}).get("fixed_validation")
    if int(training.get("round", 0) or 0) == 1 and before:
        model = ((training.get("lineage") or [None])[0]) or training.get("finetuned_from") or {}
        return {
            "model": {"name": model.get("name"), "content_sha256": model.get("content_sha256")},
            "cases": sorted(str(r.get("case_id")) for r in training.get("fixed_validation") or []),
            "fixed_validation": dict(before),
        }
    return None


def fixed_origin(
    base: ModelMetadata, base_digest: str, base_figures: Mapping[str, float], case_ids: Sequence[str]
) -> tuple[dict[str, Any] | None, str | None]:
    """(the origin record for the new model, a warning): the base's own figures when the base is
    not a fine-tune; the base's recorded origin when it was measured on the same fixed set
    (``case_ids``); otherwise the base's figures with a warning (only this round's loss is
    guarded).  Without fixed-set figures, the base's recorded origin is carried on (or None)."""
    if not base_figures or not case_ids:
        return (recorded_origin(base) if is_finetuned(base) else None), None
    own = {
        "model": {"name": base.name, "version": base.version, "content_sha256": base_digest},
        "cases": sorted(case_ids),
        "fixed_validation": dict(base_figures),
    }
    if not is_finetuned(base):
        return own, None
    origin = recorded_origin(base)
    if origin is not None and sorted(origin.get("cases") or []) == own["cases"] and origin.get("fixed_validation"):
        return origin, None
    why = "has no record of them" if origin is None else "measured them on a different fixed set"
    return own, (
        f"the base model {base.name!r} {why}: the original model's fixed-set figures are not known, so only "
        "this round's forgetting is guarded (the cumulative loss since the original model is not)"
    )


def cumulative_drops(origin: Mapping[str, float], figures: Mapping[str, Any]) -> dict[str, float]:
    """Per class, the Dice points ``figures`` lost against the original model's ``origin`` figures."""
    return {
        k: round(100 * (float(origin[k]) - float(v)), 2)
        for k, v in figures.items()
        if k in origin and v is not None and origin[k] is not None
    }
