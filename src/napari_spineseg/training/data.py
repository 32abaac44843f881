"""Training cases: images with schema labels, which classes are annotated, and patient grouping.

A :class:`TrainingCase` carries its labels already mapped to the label schema
(:mod:`napari_spineseg.schema`) on the image's voxel grid.  Voxels without ground truth hold
:data:`~napari_spineseg.augment.IGNORE` (255): for the lumbar datasets, everything outside the
superior–inferior span of the labelled levels (T12, the sacrum or upper discs are in view but
unlabelled, which is *not* background).  ``known_classes`` lists the schema classes annotated in
the case (the losses marginalise the others into background, see :mod:`napari_spineseg.losses`).

Splits never separate a patient: VB1 cases 02/03 are one patient (``VB1-P02``), 06/07/08 another
(``VB1-P06``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..metrics import labelled_span_region
from ..orientation import Plane, plane_array_axis
from ..schema import IGNORE, INTERVERTEBRAL_DISC, LESION, VERTEBRAL_BODY
from ..volume import Volume, check_same_grid

__all__ = [
    "LUMBAR_DATASETS",
    "TrainingCase",
    "kfold_by_patient",
    "load_case",
    "load_lumbar_dataset",
    "lumbar_patient_id",
    "patient_split",
    "phantom_cases",
    "span_region",
]

logger = logging.getLogger(__name__)

ALL_SCHEMA_CLASSES: frozenset[int] = frozenset({1, 2, 3, 4})

#: Lumbar datasets: folder -> (schema class of every label id, annotated classes).
LUMBAR_DATASETS: dict[str, tuple[int, frozenset[int]]] = {
    "VB3": (VERTEBRAL_BODY, frozenset({VERTEBRAL_BODY})),
    "VB1": (VERTEBRAL_BODY, frozenset({VERTEBRAL_BODY})),
    "IVD": (INTERVERTEBRAL_DISC, frozenset({INTERVERTEBRAL_DISC})),
}

_VB1_PATIENTS = {"02": "P02", "03": "P02", "06": "P06", "07": "P06", "08": "P06"}


@dataclass
class TrainingCase:
    """One training/validation study.

    ``labels`` holds schema values on the image's grid, with :data:`IGNORE` (255) where there is
    no ground truth.  ``known_classes`` are the annotated non-background classes (background is
    always known).  ``case_id`` is unique (e.g. ``"VB1-07"``); ``patient`` groups cases of one
    person (e.g. ``"VB1-P06"``).
    """

    image: Volume
    labels: Volume
    known_classes: set[int]
    patient: str
    dataset: str
    case_id: str = ""
    paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_same_grid(self.image, self.labels, what=f"case {self.case_id or self.patient}: image and labels")
        self.known_classes = {int(c) for c in self.known_classes if int(c) != 0}
        if not self.case_id:
            self.case_id = self.patient

    @property
    def region(self) -> np.ndarray:
        """Boolean mask (array order) of the voxels that carry ground truth (not IGNORE)."""
        return self.labels.array != IGNORE

    def evaluation_labels(self) -> np.ndarray:
        """The labels with IGNORE replaced by 0 (use together with :attr:`region`)."""
        array = self.labels.array
        return np.where(array == IGNORE, 0, array).astype(np.uint8)

    def known_mask(self, num_classes: int) -> np.ndarray:
        """Bool ``[num_classes]``: background and the annotated classes."""
        known = np.zeros(num_classes, dtype=bool)
        known[0] = True
        for value in self.known_classes:
            if value < num_classes:
                known[value] = True
        return known


def lumbar_patient_id(dataset: str, case: str) -> str:
    """The patient id of lumbar case ``case`` (e.g. ``"07"``) of ``dataset``."""
    if dataset == "VB1":
        return f"VB1-{_VB1_PATIENTS.get(case, case)}"
    return f"{dataset}-{case}"


def span_region(labels: np.ndarray, geometry, margin: int = 0) -> np.ndarray:
    """Voxels between the most superior and most inferior labelled voxel (along the S–I axis)."""
    axis = plane_array_axis(geometry, Plane.AXIAL)  # axial slices are stacked along S–I
    return labelled_span_region(labels, axis=axis, margin=margin)


def _schema_labels(raw: np.ndarray, value: int, geometry, margin: int) -> np.ndarray:
    """Every non-zero id → ``value``; outside the labelled S–I span → IGNORE."""
    if raw.size and (np.issubdtype(raw.dtype, np.floating) and not np.all(np.isfinite(raw))):
        raise InputError("label map holds non-finite values")
    foreground = raw != 0
    out = np.where(foreground, np.uint8(value), np.uint8(0)).astype(np.uint8)
    out[~span_region(foreground, geometry, margin)] = IGNORE
    return out


def load_case(image_path: Path, label_path: Path, dataset: str, case: str, margin: int = 0) -> TrainingCase:
    """Read one lumbar case and map its labels to the schema (see :data:`LUMBAR_DATASETS`)."""
    from ..io import read_volume

    if dataset not in LUMBAR_DATASETS:
        raise InputError(f"unknown lumbar dataset {dataset!r}; known: {', '.join(LUMBAR_DATASETS)}")
    value, known = LUMBAR_DATASETS[dataset]
    image = read_volume(image_path)
    raw = read_volume(label_path)
    check_same_grid(image, raw, what=f"{image_path.name} and {label_path.name}")
    if not np.any(raw.array):
        raise InputError(f"{label_path}: the label map is empty")
    labels = raw.with_array(_schema_labels(raw.array, value, raw.geometry, margin), name=f"{dataset}-{case} labels")
    return TrainingCase(
        image=image,
        labels=labels,
        known_classes=set(known),
        patient=lumbar_patient_id(dataset, case),
        dataset=dataset,
        case_id=f"{dataset}-{case}",
        paths={"image": str(image_path), "labels": str(label_path)},
    )


def load_lumbar_dataset(
    root: str | Path,
    datasets: Sequence[str] = ("VB3", "VB1", "IVD"),
    cases: Iterable[str] | None = None,
    margin: int = 0,
) -> list[TrainingCase]:
    """All cases of the lumbar-mri folder ``root`` (``<root>/<dataset>/<id>_img|_seg.nii.gz``).

    ``cases`` optionally restricts to case ids (``"VB3-01"``).  Labels outside the labelled S–I
    span (grown by ``margin`` voxels) become IGNORE.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: training data folder not found")
    wanted = None if cases is None else set(cases)
    result: list[TrainingCase] = []
    for dataset in datasets:
        if dataset not in LUMBAR_DATASETS:
            raise InputError(f"unknown lumbar dataset {dataset!r}; known: {', '.join(LUMBAR_DATASETS)}")
        folder = root / dataset
        if not folder.is_dir():
            raise InputError(f"{folder}: dataset folder not found")
        images = sorted(folder.glob("*_img.nii.gz"))
        if not images:
            raise InputError(f"{folder}: no <id>_img.nii.gz files")
        for image_path in images:
            case = image_path.name[: -len("_img.nii.gz")]
            if wanted is not None and f"{dataset}-{case}" not in wanted:
                continue
            label_path = folder / f"{case}_seg.nii.gz"
            if not label_path.is_file():
                raise InputError(f"{image_path}: label file {label_path.name} is missing")
            result.append(load_case(image_path, label_path, dataset, case, margin))
    if wanted is not None:
        missing = wanted - {c.case_id for c in result}
        if missing:
            raise InputError(f"cases not found under {root}: {', '.join(sorted(missing))}")
    return result


def phantom_cases(
    n: int,
    seed: int = 0,
    size: tuple[int, int, int] = (160, 160, 48),
    spacing: tuple[float, float, float] = (1.2, 1.2, 2.0),
    lesions: int = 1,
    max_class: int = LESION,
    **overrides,
) -> list[TrainingCase]:
    """``n`` synthetic phantoms (alternating T1/T2, seeds ``seed..seed+n-1``), every class known.

    ``max_class``: the highest class of the model being trained; with ``max_class < 4`` simulated
    lesions are labelled as vertebral body (they lie inside bodies)."""
    from ..phantom import PhantomConfig, make_phantom

    result = []
    for i in range(int(n)):
        contrast = "T1" if i % 2 == 0 else "T2"
        config = PhantomConfig(size=size, spacing=spacing, contrast=contrast, lesions=lesions, seed=seed + i)
        phantom = make_phantom(config, **overrides)
        array = phantom.labels.array.astype(np.uint8)
        if max_class < LESION:  # a model without a lesion class: a lesion is still vertebral body
            array[array == LESION] = VERTEBRAL_BODY
        labels = phantom.labels.with_array(array)
        case_id = f"phantom-{seed + i}"
        result.append(
            TrainingCase(
                image=phantom.image,
                labels=labels,
                known_classes={c for c in ALL_SCHEMA_CLASSES if c <= max_class},
                patient=case_id,
                dataset="phantom",
                case_id=case_id,
            )
        )
    return result


# ------------------------------------------------------------------------------------------
# Splits by patient
# ------------------------------------------------------------------------------------------
def _patients_by_dataset(cases: Sequence[TrainingCase]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for case in cases:
        patients = groups.setdefault(case.dataset, [])
        if case.patient not in patients:
            patients.append(case.patient)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def _resolve_patients(cases: Sequence[TrainingCase], ids: Iterable[str]) -> set[str]:
    """Patient ids from patient ids or case ids (a case id selects its whole patient)."""
    by_case = {c.case_id: c.patient for c in cases}
    patients = {c.patient for c in cases}
    chosen: set[str] = set()
    for raw in ids:
        text = str(raw).strip()
        if not text:
            continue
        if text in patients:
            chosen.add(text)
        elif text in by_case:
            chosen.add(by_case[text])
        else:
            raise InputError(f"unknown patient or case {text!r}; patients: {', '.join(sorted(patients)) or 'none'}")
    return chosen


def patient_split(
    cases: Sequence[TrainingCase],
    val_fraction: float = 0.2,
    val_patients: Iterable[str] | None = None,
    seed: int = 0,
) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Split ``cases`` into (train, validation) without ever splitting a patient.

    With ``val_patients`` (patient or case ids) those patients form the validation set.
    Otherwise, per dataset, ``round(val_fraction * patients)`` patients (at least one when the
    dataset has two or more) are drawn with ``seed`` (phantoms always stay in training).
    Deterministic: the same cases and seed give the same split.
    """
    if val_patients is not None:
        chosen = _resolve_patients(cases, val_patients)
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
        chosen = set()
        rng = np.random.default_rng(seed)
        for dataset, patients in _patients_by_dataset(cases).items():
            if dataset == "phantom" or val_fraction == 0:
                continue
            count = round(val_fraction * len(patients))
            if len(patients) >= 2:
                count = min(max(count, 1), len(patients) - 1)
            else:
                count = 0
            order = rng.permutation(len(patients))
            chosen.update(patients[i] for i in order[:count])
    train = [c for c in cases if c.patient not in chosen]
    val = [c for c in cases if c.patient in chosen]
    return train, val


def kfold_by_patient(
    cases: Sequence[TrainingCase], k: int, seed: int = 0
) -> list[tuple[list[TrainingCase], list[TrainingCase]]]:
    """``k`` (train, validation) folds; every patient is in exactly one validation fold.

    Patients are shuffled per dataset with ``seed`` and dealt round-robin (continuing across
    datasets) so each fold gets a share of every dataset.  Phantom cases are always training.
    """
    if int(k) < 2:
        raise InputError(f"need at least 2 folds, got {k}")
    k = int(k)
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    position = 0
    for dataset, patients in _patients_by_dataset(cases).items():
        if dataset == "phantom":
            continue
        for i in rng.permutation(len(patients)):
            fold_of[patients[i]] = position % k
            position += 1
    if len(fold_of) < k:
        raise InputError(f"cannot make {k} folds from {len(fold_of)} patients")
    folds = []
    for fold in range(k):
        val = [c for c in cases if fold_of.get(c.patient) == fold]
        train = [c for c in cases if fold_of.get(c.patient) != fold]
        folds.append((train, val))
    return folds
