"""The replay phases of a fine-tuning run (a mixin of :class:`~.run.FinetuneRun`; see :mod:`.replay`).

:meth:`ReplayPhases.load_replay` finds the base model's replay set (or the one given),
:meth:`~ReplayPhases.setup_replay_evaluation` prepares Dice on its painted slices,
:meth:`~ReplayPhases.painted_training_cases` turns its crops into correction samples,
:meth:`~ReplayPhases.replay_to_save` builds the union saved with the new model and
:meth:`~ReplayPhases.replay_record` the provenance stored in the model's metadata.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from ...orientation import Plane
from ...preprocess import PreprocessConfig
from ...schema import IGNORE
from ..data import TrainingCase
from .classes import index_case
from .evaluation import EvalCase, evaluate_cases
from .replay import (
    ReplaySet,
    check_replay,
    merge_replay,
    normalisation_of,
    read_replay,
    replay_path,
    study_crops,
)

logger = logging.getLogger(__name__)


class ReplayPhases:
    """Replay of earlier painted studies; expects the attributes :class:`~.run.FinetuneRun` sets."""

    # Set by FinetuneRun's other phases (load_base, prepare_corrections, setup_evaluation, build_training).
    config: Any
    base_meta: Any
    base_path: Path | None
    planes: list[str]
    pairs: Sequence[Any]
    names: list[str]
    targets: list[Any]
    new_classes: list[Any]
    class_names: dict[int, str]
    model_values: set[int]
    lut: np.ndarray
    settings: Any
    cancel: Any
    warnings: list[str]
    train_config_: Any

    def eval_metadata(self, network: Any, model_classes: list[Any]) -> Any:  # FinetuneRun's
        raise NotImplementedError

    replay_source: Any = None  # a path or ReplaySet given by the caller (None: the base model's own)
    replay_in: ReplaySet | None = None
    replay_file: str | None = None
    replay_eval: Sequence[tuple[str, str, EvalCase]] = ()  # (study, plane, case); set by load_replay

    def base_preprocess(self) -> PreprocessConfig:
        meta = self.base_meta
        return PreprocessConfig.from_dict(meta.preprocess) if meta.preprocess else PreprocessConfig()

    def load_replay(self) -> None:
        """The replay set to train on: the given one, else ``<base>.replay.npz`` beside the base model
        (checked against the checksum recorded in the base); InputError when it does not fit."""
        config, base_meta = self.config, self.base_meta
        self.replay_in, self.replay_file, self.replay_eval = None, None, []
        if not config.replay_painted:
            return
        recorded = (base_meta.training or {}).get("replay") or {}
        if isinstance(self.replay_source, ReplaySet):
            replay, source = self.replay_source, "(given)"
        elif self.replay_source is not None:
            path = Path(self.replay_source).expanduser()
            replay, source = read_replay(path), str(path)
        else:
            base_path = self.base_path
            path = replay_path(base_path) if base_path is not None else None
            if path is None or not path.is_file():
                if recorded:
                    self.warnings.append(
                        f"the replay set of {base_meta.name!r} ({recorded.get('file')}) was not found: its "
                        f"{len(recorded.get('studies') or [])} earlier painted studies are not replayed"
                    )
                return
            from ...provenance import file_sha256

            if recorded.get("sha256") and file_sha256(path) != recorded["sha256"]:
                raise InputError(
                    f"replay set {path} does not belong to model {base_meta.name!r} (checksum differs); "
                    "fine-tune with --no-replay or give the right one with --replay FILE"
                )
            replay, source = read_replay(path), str(path)
        names = {int(k): v for k, v in self.class_names.items()}
        warnings = check_replay(replay, base_meta.context_slices, self.base_preprocess(), names, source)
        planes = set(self.planes)
        dropped = sum(1 for s in replay.studies for c in s.crops if c.plane not in planes)
        if dropped:
            warnings.append(f"replay set {source}: {dropped} crop(s) of planes the model does not use are skipped")
        self.warnings.extend(warnings)
        self.replay_in, self.replay_file = replay, source

    def replayed_crops(self):
        """(study, crop index, crop) of the replay set in the model's planes."""
        if self.replay_in is None:
            return
        planes = set(self.planes)
        for study in self.replay_in.studies:
            for index, crop in enumerate(study.crops):
                if crop.plane in planes:
                    yield study, index, crop

    def setup_replay_evaluation(self) -> None:
        """One evaluation case per replayed crop (scored on its painted slices, in its own plane)."""
        model_values = self.model_values
        cases = []
        for study, index, crop in self.replayed_crops():
            image, labels = crop.volumes(f"{study.name} #{index + 1}")
            known = {int(v) for v in study.known} & model_values - {0}
            cases.append((study.name, crop.plane, EvalCase(image.name, image, labels.array, known)))
        self.replay_eval = cases

    def evaluate_replay(self, network, model_classes) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(mean Dice per class over the replayed studies, per study) — Dice pooled over a study's crops."""
        if not self.replay_eval:
            return {}, {}
        meta = self.eval_metadata(network, model_classes)
        preprocess = dataclasses.replace(self.base_preprocess(), normalise=False).to_dict()
        names = self.class_names
        sums: dict[str, dict[str, np.ndarray]] = {}
        for plane in dict.fromkeys(p for _, p, _ in self.replay_eval):
            chosen = [(s, c) for s, p, c in self.replay_eval if p == plane]
            settings = dataclasses.replace(self.settings, planes=[Plane(plane)])
            plane_meta = dataclasses.replace(meta, preprocess=preprocess, planes=[plane])
            evaluation = evaluate_cases(
                network,
                plane_meta,
                [c for _, c in chosen],
                names,
                settings,
                self.cancel,
                True,
            )
            while True:
                try:
                    next(evaluation)
                except StopIteration as stop:
                    predictions = stop.value[2]
                    break
            for (study, case), pred in zip(chosen, predictions):
                region = case.truth != IGNORE
                for value in case.known:
                    p, t = (pred == value) & region, (case.truth == value) & region
                    counts = np.asarray([np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)])
                    label = names.get(value, f"class {value}")
                    sums.setdefault(study, {}).setdefault(label, np.zeros(3, np.int64))
                    sums[study][label] += counts
        per_study = {
            study: {k: round(2 * float(v[0]) / float(v[1] + v[2]), 5) for k, v in scores.items() if v[1] + v[2] > 0}
            for study, scores in sums.items()
        }
        means = {}
        for label in dict.fromkeys(k for s in per_study.values() for k in s):
            means[label] = round(float(np.mean([s[label] for s in per_study.values() if label in s])), 5)
        return means, per_study

    def painted_training_cases(self) -> list[tuple[TrainingCase, np.ndarray, str]]:
        """The replayed crops as correction samples: (case with class indices, changed mask, plane)."""
        lut = self.lut
        painted = self.painted_values()
        out = []
        for study, index, crop in self.replayed_crops():
            name = f"replay: {study.name} #{index + 1}"
            image, labels = crop.volumes(name)
            case = TrainingCase(image, labels, set(), study.name, "replay", name)
            changed = np.isin(labels.array, np.asarray(sorted(painted), dtype=np.uint8))
            out.append((index_case(case, lut, set(study.known) - {0}, name), changed, crop.plane))
        return out

    def painted_values(self) -> set[int]:
        """Values of the classes learned from painting: this round's new classes and the replay set's."""
        values = {int(c.value) for c in self.new_classes}
        base_painted = (self.base_meta.training or {}).get("painted_classes") or []
        values |= {int(r["value"]) for r in base_painted if isinstance(r, dict) and "value" in r}
        if self.replay_in is not None:
            values |= set(self.replay_in.painted_classes)
        return values & self.model_values

    def replay_to_save(self, training_labels: list[np.ndarray]) -> ReplaySet | None:
        """This round's painted studies (most recent first) and the replay set it trained on, capped."""
        config, base_meta = self.config, self.base_meta
        if int(config.replay_max_studies) == 0 or float(config.replay_max_mb) == 0:
            return None
        preprocess = self.base_preprocess()
        model_name = self.train_config_.model_name
        studies = []
        pairs, names, targets = self.pairs, self.names, self.targets
        for pair, name, target, labels in zip(pairs, names, targets, training_labels):
            known = pair.known_classes if pair.known_classes is not None else self.model_values
            try:
                study = study_crops(
                    pair.image, target, labels, name, preprocess, base_meta.context_slices, known, model_name
                )
            except (InputError, ValueError) as error:
                self.warnings.append(f"{name}: not kept for replay ({error})")
                continue
            if study is not None:
                studies.append(study)
        classes = {int(k): str(v) for k, v in self.class_names.items()}
        current = ReplaySet(
            studies, base_meta.context_slices, normalisation_of(preprocess), classes, sorted(self.painted_values())
        )
        merged, dropped = merge_replay(
            current, self.replay_in, int(config.replay_max_studies), float(config.replay_max_mb)
        )
        if dropped:
            self.warnings.append(
                f"the replay set keeps {len(merged.studies)} painted studies (at most {config.replay_max_studies}, "
                f"{config.replay_max_mb:g} MB); dropped: {', '.join(dropped)}"
            )
        return merged if merged.studies else None

    def replay_record(self, saved: ReplaySet | None) -> dict[str, Any]:
        """Entries of the new model's ``training`` record about painted classes and replay."""
        names = self.class_names
        painted = sorted(self.painted_values())
        return {
            "painted_classes": [{"value": v, "name": names.get(v, f"class {v}")} for v in painted],
            "replayed": None
            if self.replay_in is None
            else {"file": self.replay_file, "studies": self.replay_in.study_names},
            "replay_studies": saved.study_names if saved is not None else [],
        }
