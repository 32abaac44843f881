"""Case records: fixed validation and replay sets stored in a model and reloaded in the next round."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from ...modelfile import ModelMetadata
from ...provenance import json_safe
from ..data import LUMBAR_DATASETS, TrainingCase
from .targets import label_array

logger = logging.getLogger(__name__)


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
        record.update(source="phantom", phantom=json_safe(phantom))
    elif case.paths.get("image") and case.paths.get("labels"):
        record.update(source="files", paths=dict(case.paths))
    else:
        record["source"] = "memory"
    return record


def load_case_record(record: Mapping[str, Any]) -> TrainingCase:
    """Rebuild the case of a :func:`case_record` (InputError when it cannot be found)."""
    from ...phantom import PhantomConfig, make_phantom
    from ..data import load_case

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
        from ...io import read_volume

        paths = record["paths"]
        for key in ("image", "labels"):
            if not Path(paths[key]).is_file():
                raise InputError(f"case {case_id}: {paths[key]} not found")
        image, labels = read_volume(paths["image"]), read_volume(paths["labels"])
        labels = labels.with_array(label_array(labels, str(paths["labels"])))
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
