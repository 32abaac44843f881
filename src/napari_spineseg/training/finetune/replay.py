"""Replay of earlier painted studies: rounds of fine-tuning accumulate what was painted.

A fine-tuned model ``X.safetensors`` is saved with a *replay set* ``X.replay.npz`` beside it:
compact crops of the slices the annotator painted or reviewed (the trusted slices) of every
study the model learned from, so the next fine-tune from ``X`` trains on them again and a class
painted in study 1 keeps its examples when study 2 is painted.  One crop is a slab of
``2k+1`` slices (``k`` = the model's context slices) around a run of trusted slices, in
canonical orientation, the image already normalised exactly as the whole study was (float16)
and the labels (schema values) IGNORE everywhere but on the trusted slices.  Crops are
replayed in the plane their slices were trusted in (a slab is too thin for the other planes).

The file holds patient image data: it is never embedded in the model file (the model stays
shareable); the model's metadata records its checksum and the studies it holds
(``training["replay"]``).  The union of the base's replay set and the current studies is
capped at :data:`MAX_STUDIES` studies (the most recent) and :data:`MAX_MEGABYTES` MB of
arrays.  A replay file that is corrupt, belongs to another model (checksum), or does not fit
the model (context slices, intensity normalisation, class values) stops fine-tuning with a
one-line :class:`~napari_spineseg.errors.InputError` (use ``--no-replay`` to go on without it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from ...orientation import Plane, plane_array_axis
from ...preprocess import PreprocessConfig
from ...schema import IGNORE
from ...volume import Volume
from .targets import CorrectionTargets, detect_edit_plane

logger = logging.getLogger(__name__)

REPLAY_SUFFIX = ".replay.npz"
REPLAY_FORMAT = 1
MAX_STUDIES = 8  # the most recent painted studies kept in a replay set
MAX_MEGABYTES = 256.0  # ... and at most this many MB of (uncompressed) crop arrays
MAX_SLICES_PER_STUDY = 32  # trusted slices stored per study (evenly chosen beyond)
_NORMALISATION_KEYS = ("normalise", "lower_percentile", "upper_percentile")


@dataclass
class ReplayCrop:
    """A slab of a painted study: canonical image (normalised, float16) and labels (IGNORE but on trusted slices)."""

    plane: str  # the plane the slab's trusted slices were painted/reviewed in (the slab's thin axis)
    image: np.ndarray  # float16, canonical array order
    labels: np.ndarray  # uint8 schema values
    spacing_zyx: tuple[float, float, float]
    direction: tuple[float, ...]  # the canonical geometry's direction cosines

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.labels.nbytes)

    def volumes(self, name: str) -> tuple[Volume, Volume]:
        """(image, labels) as volumes on a canonical grid (their reorientation is the identity)."""
        image = Volume.from_array(
            self.image.astype(np.float32), tuple(self.spacing_zyx[::-1]), direction=self.direction, name=name
        )
        return image, image.with_array(self.labels, name=f"{name} labels")


@dataclass
class ReplayStudy:
    """The crops of one painted study and what it taught."""

    name: str
    crops: list[ReplayCrop]
    known: list[int]  # class values the study's trusted voxels vouch for (0 included)
    values: list[int]  # class values present on its trusted voxels
    model: str = ""  # the model first fine-tuned on it
    digest: str = ""  # SHA-256 of the study's image voxels: the same study painted again replaces its crops

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.crops)


@dataclass
class ReplaySet:
    """Painted studies to replay in the next fine-tuning round (see the module docstring)."""

    studies: list[ReplayStudy]
    context_slices: int
    normalisation: dict[str, Any]  # the pre-processing keys the images were normalised with
    classes: dict[int, str] = field(default_factory=dict)  # value -> name of the classes involved
    painted_classes: list[int] = field(default_factory=list)  # values of classes learned from painting

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.studies)

    @property
    def study_names(self) -> list[str]:
        return [s.name for s in self.studies]

    def values(self) -> set[int]:
        return {int(v) for s in self.studies for v in s.values}


def replay_path(model_path: str | os.PathLike) -> Path:
    """``X.replay.npz`` beside the model file ``X.safetensors``."""
    path = Path(model_path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + REPLAY_SUFFIX)


def normalisation_of(preprocess: PreprocessConfig) -> dict[str, Any]:
    record = preprocess.to_dict()
    return {k: record[k] for k in _NORMALISATION_KEYS}


# Building ------------------------------------------------------------------------------------------
def _trusted_canonical_slices(target: CorrectionTargets, geometry) -> dict[str, np.ndarray]:
    """Plane -> canonical slice indices fully trusted (painted/reviewed) in that plane."""
    from ...slicing import canonical_labels, plane_view

    planes: dict[str, list[int]] = {k: list(v) for k, v in target.trusted_slices.items()}
    if not planes:  # the whole map was trusted: the slices holding changed (new-class) voxels
        if not target.changed.any():
            return {}
        plane = detect_edit_plane(target.changed, geometry)
        axis = plane_array_axis(geometry, plane)
        other = tuple(a for a in range(3) if a != axis)
        planes = {plane.value: [int(i) for i in np.flatnonzero(target.changed.any(axis=other))]}
    out = {}
    for plane_name, indices in planes.items():
        plane = Plane(plane_name)
        axis = plane_array_axis(geometry, plane)
        mark = np.zeros(target.labels.shape, dtype=np.uint8)
        index: list[Any] = [slice(None)] * 3
        for i in indices:
            index[axis] = int(i)
            mark[tuple(index)] = 1
        stack = plane_view(canonical_labels(Volume(mark, geometry)), plane)
        chosen = np.flatnonzero(stack.reshape(stack.shape[0], -1).any(axis=1))
        if len(chosen) > MAX_SLICES_PER_STUDY:
            chosen = chosen[np.linspace(0, len(chosen) - 1, MAX_SLICES_PER_STUDY).round().astype(int)]
        out[plane.value] = chosen
    return out


def _runs(indices: np.ndarray, context: int, count: int) -> list[tuple[int, int]]:
    """Slabs [start, stop) covering each index with its context, overlapping ones merged."""
    runs: list[list[int]] = []
    for i in sorted(int(v) for v in indices):
        start, stop = max(0, i - context), min(count, i + context + 1)
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], stop)
        else:
            runs.append([start, stop])
    return [(a, b) for a, b in runs]


def study_crops(
    image: Volume,
    target: CorrectionTargets,
    labels: np.ndarray,
    name: str,
    preprocess: PreprocessConfig,
    context_slices: int,
    known: Sequence[int],
    model: str = "",
) -> ReplayStudy | None:
    """The replay crops of one corrected study (``labels``: its training targets, schema values,
    IGNORE where untrusted); None when it has no trusted slice to replay."""
    from ...slicing import canonical_labels, plane_view, prepare_study

    chosen = _trusted_canonical_slices(target, image.geometry)
    if not any(len(v) for v in chosen.values()):
        return None
    prepared = prepare_study(image, preprocess, dtype=np.float16)
    canonical = np.ascontiguousarray(canonical_labels(Volume(labels, image.geometry)))
    direction = tuple(prepared.canonical_geometry.direction)
    crops = []
    for plane_name, slices in chosen.items():
        plane = Plane(plane_name)
        axis = plane.canonical_array_axis
        image_stack, label_stack = plane_view(prepared.image, plane), plane_view(canonical, plane)
        for start, stop in _runs(slices, int(context_slices), image_stack.shape[0]):
            keep = np.zeros(stop - start, dtype=bool)
            keep[[i - start for i in slices if start <= i < stop]] = True
            slab_labels = np.where(keep[:, None, None], label_stack[start:stop], np.uint8(IGNORE)).astype(np.uint8)
            crops.append(
                ReplayCrop(
                    plane.value,
                    np.ascontiguousarray(np.moveaxis(image_stack[start:stop], 0, axis), dtype=np.float16),
                    np.ascontiguousarray(np.moveaxis(slab_labels, 0, axis)),
                    tuple(float(s) for s in prepared.spacing_zyx),
                    direction,
                )
            )
    values = sorted(int(v) for v in np.unique(labels) if v != IGNORE)
    digest = hashlib.sha256(np.ascontiguousarray(image.array).tobytes()).hexdigest()
    return ReplayStudy(name, crops, sorted({0, *(int(v) for v in known)}), values, model, digest)


def merge_replay(
    current: ReplaySet, earlier: ReplaySet | None, max_studies: int = MAX_STUDIES, max_megabytes: float = MAX_MEGABYTES
) -> tuple[ReplaySet, list[str]]:
    """The union of ``current`` (most recent first) and ``earlier`` studies within the caps;
    returns it and the names of the studies dropped.  A study painted again (same image voxels)
    replaces its older crops; different studies of the same name are kept under distinct names."""
    studies = list(current.studies)
    if earlier is not None:
        digests = {s.digest for s in studies if s.digest}
        for study in earlier.studies:
            if study.digest and study.digest in digests:
                continue
            names = {s.name for s in studies}
            name, number = study.name, 2
            while name in names:
                name, number = f"{study.name} [{number}]", number + 1
            studies.append(dataclasses.replace(study, name=name))
    kept, dropped, total = [], [], 0
    for study in studies:
        if len(kept) < max_studies and total + study.nbytes <= max_megabytes * 1e6:
            kept.append(study)
            total += study.nbytes
        else:
            dropped.append(study.name)
    classes = {**(earlier.classes if earlier else {}), **current.classes}
    painted = sorted({*current.painted_classes, *(earlier.painted_classes if earlier else [])})
    return ReplaySet(kept, current.context_slices, current.normalisation, classes, painted), dropped


# Reading and writing ------------------------------------------------------------------------------
def write_replay(replay: ReplaySet, path: str | os.PathLike) -> Path:
    """Write ``replay`` to ``path`` atomically (a ``.part`` file renamed); returns the path."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    studies = []
    for s_index, study in enumerate(replay.studies):
        crops = []
        for c_index, crop in enumerate(study.crops):
            key = f"{s_index}_{c_index}"
            arrays[f"image_{key}"], arrays[f"labels_{key}"] = crop.image, crop.labels
            crops.append(
                {
                    "key": key,
                    "plane": crop.plane,
                    "spacing_zyx": list(crop.spacing_zyx),
                    "direction": list(crop.direction),
                }
            )
        studies.append(
            {
                "name": study.name,
                "known": study.known,
                "values": study.values,
                "model": study.model,
                "digest": study.digest,
                "crops": crops,
            }
        )
    meta = {
        "format": REPLAY_FORMAT,
        "context_slices": int(replay.context_slices),
        "normalisation": replay.normalisation,
        "classes": {str(k): v for k, v in replay.classes.items()},
        "painted_classes": [int(v) for v in replay.painted_classes],
        "studies": studies,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    try:
        with temp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def read_replay(path: str | os.PathLike) -> ReplaySet:
    """Read a replay set (InputError, one line, when it is missing, corrupt or of another format)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"replay set {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != REPLAY_FORMAT:
                raise InputError(
                    f"replay set {path}: unknown format {meta.get('format') if isinstance(meta, dict) else '?'}"
                )
            studies = []
            for record in meta["studies"]:
                crops = []
                for crop in record["crops"]:
                    image, labels = data[f"image_{crop['key']}"], data[f"labels_{crop['key']}"]
                    if image.shape != labels.shape or image.ndim != 3 or labels.dtype != np.uint8:
                        raise ValueError("crop arrays do not match")
                    crops.append(
                        ReplayCrop(
                            Plane(crop["plane"]).value,
                            image,
                            labels,
                            tuple(float(v) for v in crop["spacing_zyx"]),
                            tuple(float(v) for v in crop["direction"]),
                        )
                    )
                studies.append(
                    ReplayStudy(
                        str(record["name"]),
                        crops,
                        [int(v) for v in record["known"]],
                        [int(v) for v in record["values"]],
                        str(record.get("model", "")),
                        str(record.get("digest", "")),
                    )
                )
            return ReplaySet(
                studies,
                int(meta["context_slices"]),
                dict(meta["normalisation"]),
                {int(k): str(v) for k, v in dict(meta.get("classes") or {}).items()},
                [int(v) for v in meta.get("painted_classes") or []],
            )
    except InputError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(
            f"replay set {path} is corrupt or unreadable ({type(error).__name__}); fine-tune with --no-replay "
            "or give another one with --replay FILE"
        ) from None


def check_replay(
    replay: ReplaySet, context_slices: int, preprocess: PreprocessConfig, model_classes: Mapping[int, str], source: str
) -> list[str]:
    """InputError when ``replay`` cannot train the model (context, normalisation, class values);
    returns warnings (class names that differ)."""
    hint = "; fine-tune with --no-replay to go on without it"
    if replay.context_slices < int(context_slices):
        raise InputError(
            f"replay set {source} holds {replay.context_slices} context slice(s), "
            f"the model needs {context_slices}{hint}"
        )
    wanted = normalisation_of(preprocess)
    if any(replay.normalisation.get(k) != wanted[k] for k in _NORMALISATION_KEYS):
        raise InputError(
            f"replay set {source} was normalised with {replay.normalisation}, the model uses {wanted}{hint}"
        )
    missing = sorted(replay.values() - set(model_classes))
    if missing:
        raise InputError(
            f"replay set {source} holds class value(s) {missing} that are not classes of the model "
            f"({sorted(model_classes)}){hint}"
        )
    warnings = []
    for value, name in sorted(replay.classes.items()):
        if value in model_classes and value in replay.values() and model_classes[value] != name:
            warnings.append(
                f"replay set {source}: class {value} was {name!r}, the model calls it {model_classes[value]!r}"
            )
    return warnings


# Report ---------------------------------------------------------------------------------------------
def painted_class_report(before: Mapping[str, Any], after: Mapping[str, Any], painted: Sequence[str]) -> list[dict]:
    """Per class learned from painting (names in ``painted``): Dice on this round's painted slices and
    on the replayed earlier studies' painted slices, before this round (the base model) and after.

    "this study, before" is the honest transfer figure from the earlier rounds (the base model has
    not seen this study); "earlier studies, after" shows the class is kept where it was learned."""
    rows = []
    for name in painted:
        row: dict[str, Any] = {"class": name}
        for key, label in (("corrections", "this_study"), ("replay", "earlier_studies")):
            for when, record in (("before", before), ("after", after)):
                value = (record.get(key) or {}).get(name)
                row[f"{label}_{when}"] = None if value is None else float(value)
        row["earlier_study_count"] = len(after.get("replay_cases") or before.get("replay_cases") or {})
        rows.append(row)
    return rows


def format_painted_class_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """The painted-class table printed by ``spineseg finetune``."""
    if not rows:
        return ""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"{'painted class':24s} {'this study':>21s} {'earlier studies':>21s}",
        f"{'':24s} {'before':>10s} {'after':>10s} {'before':>10s} {'after':>10s}",
    ]
    for row in rows:
        values = [row.get(k) for k in ("this_study_before", "this_study_after", "earlier_studies_before")]
        values.append(row.get("earlier_studies_after"))
        lines.append(f"{str(row['class'])[:24]:24s} " + " ".join(f"{fmt(v):>10s}" for v in values))
    count = max(int(r.get("earlier_study_count") or 0) for r in rows)
    lines.append(
        "(Dice on painted slices only; 'this study, before' = the base model on this study before it was "
        f"painted: the transfer from earlier rounds; earlier studies: {count} replayed)"
    )
    return "\n".join(lines)


def painted_report(result: Any) -> list[dict]:
    """:func:`painted_class_report` of a :class:`~.config.FinetuneResult` (its painted classes)."""
    painted = [str(r["name"]) for r in (result.metadata.training or {}).get("painted_classes") or []]
    return painted_class_report(result.before or {}, result.after or {}, painted)
