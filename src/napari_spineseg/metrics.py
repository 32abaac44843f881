"""Segmentation metrics per class, with distances in millimetres.

All functions take label maps (integer arrays, 2-D or 3-D) and the voxel spacing **per array
axis, in array-axis order** (for a :class:`~napari_spineseg.volume.Volume` that is
``geometry.spacing_zyx``, not the ITK ``spacing``).

Overlap metrics (Dice, IoU, precision, recall, accuracy, F1) are computed from voxel counts.
Surface metrics use MONAI's edge extraction (inner boundary voxels, ``scipy`` binary erosion)
and exact Euclidean distances in mm between boundary voxels, computed once per class:

* ``asd_mm``   average symmetric surface distance: the mean of all pred→truth and truth→pred
  boundary distances (== ``monai.metrics.compute_average_surface_distance(symmetric=True)``);
* ``hd95_mm``  the larger of the two directed 95th percentiles
  (== ``monai.metrics.compute_hausdorff_distance(percentile=95)``);
* ``nsd``      normalised surface distance / surface Dice at ``nsd_tolerance_mm``: the fraction of
  boundary voxels of both masks lying within the tolerance of the other boundary
  (== ``monai.metrics.compute_surface_dice`` without sub-voxels).

Surface computations work on the bounding box of ``pred ∪ truth`` (plus a one-voxel margin),
so a small structure in a big volume stays cheap.

Empty masks (explicit conventions, no NaN warnings)
---------------------------------------------------
* both empty (``empty_both``): Dice = IoU = precision = recall = F1 = NSD = 1, ASD = HD95 = 0.
* exactly one empty: Dice = IoU = precision = recall = F1 = NSD = 0, ASD = HD95 = ``inf``
  (serialised as JSON ``null`` by :meth:`ClassMetrics.to_dict`).
* with ``surface=False`` the surface metrics are ``nan`` (also ``null`` in JSON).

``region`` restricts everything (counts, accuracy denominator, volumes, surfaces) to a boolean
mask, e.g. :func:`labelled_span_region` for partially labelled studies.  Surfaces are those of the
masks *cut* by the region; where pred and truth are cut by the same plane, the cut faces coincide
and contribute distance 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .errors import GeometryMismatchError, InputError
from .schema import class_for_value
from .volume import Volume, check_same_grid

__all__ = [
    "ClassMetrics",
    "dice_score",
    "evaluate_labels",
    "evaluate_volumes",
    "format_table",
    "labelled_span_region",
    "per_plane_dice",
    "ssim",
    "summarise",
]

_DISTANCE_FIELDS = ("asd_mm", "hd95_mm")
_SUMMARY_FIELDS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "accuracy",
    "f1",
    "asd_mm",
    "nsd",
    "hd95_mm",
    "volume_pred_ml",
    "volume_truth_ml",
)


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class ClassMetrics:
    """Metrics of one label value.  Volumes in mL (1 mL = 1000 mm³), distances in mm."""

    value: int
    name: str
    dice: float
    iou: float
    precision: float
    recall: float
    accuracy: float
    f1: float
    asd_mm: float
    nsd: float
    hd95_mm: float
    volume_pred_ml: float
    volume_truth_ml: float
    empty_pred: bool
    empty_truth: bool
    nsd_tolerance_mm: float = 2.0

    @property
    def empty_both(self) -> bool:
        """Neither prediction nor truth contains the class (scores are 1 / 0 mm by convention)."""
        return self.empty_pred and self.empty_truth

    def to_dict(self) -> dict:
        """A JSON-safe dict: non-finite floats (``inf`` distances, ``nan``) become ``None``."""
        data = asdict(self)
        for key, item in data.items():
            if isinstance(item, float):
                data[key] = _json_float(item)
        data["empty_both"] = self.empty_both
        return data


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def _as_labels(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        raise InputError(f"{what}: expected an integer label map, got dtype {array.dtype}")
    if not np.array_equal(array, np.round(array)):
        raise InputError(f"{what}: label map has non-integer values")
    return array.astype(np.int64)


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_labels(pred, "prediction")
    truth = _as_labels(truth, "truth")
    if pred.shape != truth.shape:
        raise GeometryMismatchError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return pred, truth


def _bbox_slices(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` (clipped to the array)."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def dice_score(pred_mask: np.ndarray, truth_mask: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred_mask = np.asarray(pred_mask, dtype=bool)
    truth_mask = np.asarray(truth_mask, dtype=bool)
    if pred_mask.shape != truth_mask.shape:
        raise GeometryMismatchError(f"mask shapes differ: {pred_mask.shape} vs {truth_mask.shape}")
    total = int(np.count_nonzero(pred_mask)) + int(np.count_nonzero(truth_mask))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred_mask & truth_mask)) / total


def ssim(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity (``skimage.metrics.structural_similarity``) of two equal-shape images.

    Boolean inputs (e.g. prediction vs truth masks) are compared as 0/1 floats.  ``data_range``
    defaults to ``max - min`` over both images (1 for masks).  skimage's default 7-voxel window is
    used unless an axis is shorter, then the largest odd window that fits (at least 3).
    """
    from skimage.metrics import structural_similarity

    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise GeometryMismatchError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    if a.ndim < 2:
        raise InputError(f"SSIM needs 2-D or 3-D images, got shape {a.shape}")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if data_range is None:
        low = min(float(a.min()), float(b.min()))
        high = max(float(a.max()), float(b.max()))
        data_range = high - low if high > low else 1.0
    smallest = min(a.shape)
    if smallest < 3:
        raise InputError(f"SSIM needs every axis at least 3 voxels long, got shape {a.shape}")
    win_size = None if smallest >= 7 else (smallest if smallest % 2 else smallest - 1)
    return float(structural_similarity(a, b, data_range=float(data_range), win_size=win_size))


# ------------------------------------------------------------------------------------------------
# Surface distances (MONAI)
# ------------------------------------------------------------------------------------------------
def _surface_metrics(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float, float]:
    """(ASD, HD95, NSD) of two non-empty boolean masks, via one MONAI edge/distance computation."""
    import warnings

    import torch
    from monai.metrics.utils import get_edge_surface_distance

    box = _bbox_slices(pred_mask | truth_mask, margin=1)
    pred_t = torch.from_numpy(np.ascontiguousarray(pred_mask[box]))
    truth_t = torch.from_numpy(np.ascontiguousarray(truth_mask[box]))
    with warnings.catch_warnings():  # MONAI's own internal deprecation notice (always_return_as_numpy)
        warnings.simplefilter("ignore", FutureWarning)
        _, (d_pred_truth, d_truth_pred), _ = get_edge_surface_distance(
            pred_t,
            truth_t,
            distance_metric="euclidean",
            spacing=[float(s) for s in spacing],
            symmetric=True,
            warn_empty=False,
        )
    d_pt = np.asarray(d_pred_truth, dtype=np.float64).ravel()
    d_tp = np.asarray(d_truth_pred, dtype=np.float64).ravel()
    asd = float(np.concatenate([d_pt, d_tp]).mean())
    hd95 = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
    nsd = float(
        (np.count_nonzero(d_pt <= tolerance_mm) + np.count_nonzero(d_tp <= tolerance_mm)) / (d_pt.size + d_tp.size)
    )
    return asd, hd95, nsd


# ------------------------------------------------------------------------------------------------
# Per-class evaluation
# ------------------------------------------------------------------------------------------------
def _class_metrics(
    value: int,
    name: str,
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    n_voxels: int,
    spacing: Sequence[float],
    tolerance_mm: float,
    surface: bool,
) -> ClassMetrics:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred = int(np.count_nonzero(pred_mask))
    n_truth = int(np.count_nonzero(truth_mask))
    tp = int(np.count_nonzero(pred_mask & truth_mask))
    fp, fn = n_pred - tp, n_truth - tp
    tn = n_voxels - tp - fp - fn
    accuracy = (tp + tn) / n_voxels
    empty_pred, empty_truth = n_pred == 0, n_truth == 0
    nan = float("nan")
    if empty_pred and empty_truth:
        dice = iou = precision = recall = 1.0
        asd, hd95, nsd = (0.0, 0.0, 1.0) if surface else (nan, nan, nan)
    elif empty_pred or empty_truth:
        dice = iou = precision = recall = 0.0
        asd, hd95, nsd = (math.inf, math.inf, 0.0) if surface else (nan, nan, nan)
    else:
        dice = 2.0 * tp / (n_pred + n_truth)
        iou = tp / (tp + fp + fn)
        precision = tp / n_pred
        recall = tp / n_truth
        if surface:
            asd, hd95, nsd = _surface_metrics(pred_mask, truth_mask, spacing, tolerance_mm)
        else:
            asd = hd95 = nsd = nan
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return ClassMetrics(
        value=int(value),
        name=name,
        dice=dice,
        iou=iou,
        precision=precision,
        recall=recall,
        accuracy=accuracy,
        f1=f1,
        asd_mm=asd,
        nsd=nsd,
        hd95_mm=hd95,
        volume_pred_ml=n_pred * voxel_ml,
        volume_truth_ml=n_truth * voxel_ml,
        empty_pred=empty_pred,
        empty_truth=empty_truth,
        nsd_tolerance_mm=float(tolerance_mm),
    )


def evaluate_labels(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, ...],
    classes: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float = 2.0,
    surface: bool = True,
    region: np.ndarray | None = None,
) -> list[ClassMetrics]:
    """Per-class metrics of label map ``pred`` against ``truth`` (same shape, 2-D or 3-D).

    ``spacing`` is in mm per *array axis*.  ``classes`` defaults to the non-zero values present in
    either map (inside ``region``); names come from ``class_names`` or the default schema.
    ``region`` (bool, same shape) restricts the evaluation.  ``surface=False`` skips the distance
    metrics (they become ``nan``).  See the module docstring for empty-mask conventions.
    """
    pred, truth = _check_pair(pred, truth)
    if pred.ndim not in (2, 3):
        raise InputError(f"label maps must be 2-D or 3-D, got shape {pred.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise InputError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}-D label map")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"voxel spacing must be positive and finite, got {spacing}")
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise InputError(f"NSD tolerance must be a finite number >= 0 mm, got {nsd_tolerance_mm}")

    n_voxels = pred.size
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != pred.shape:
            raise GeometryMismatchError(f"region shape {region.shape} differs from label shape {pred.shape}")
        n_voxels = int(np.count_nonzero(region))
        if n_voxels == 0:
            raise InputError("the evaluation region is empty (no labelled span?)")
        pred = np.where(region, pred, 0)
        truth = np.where(region, truth, 0)

    if classes is None:
        classes = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(truth)) if v != 0)
    names = dict(class_names or {})
    results = []
    for value in classes:
        value = int(value)
        name = names.get(value, class_for_value(value).name)
        results.append(
            _class_metrics(value, name, pred == value, truth == value, n_voxels, spacing, nsd_tolerance_mm, surface)
        )
    return results


def evaluate_volumes(
    pred: Volume,
    truth: Volume,
    classes: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float = 2.0,
    region: np.ndarray | None = None,
    surface: bool = True,
) -> list[ClassMetrics]:
    """:func:`evaluate_labels` for two volumes that must share one voxel grid."""
    check_same_grid(pred, truth, what=f"prediction {pred.name!r} and truth {truth.name!r}")
    return evaluate_labels(
        pred.array,
        truth.array,
        pred.geometry.spacing_zyx,
        classes=classes,
        class_names=class_names,
        nsd_tolerance_mm=nsd_tolerance_mm,
        surface=surface,
        region=region,
    )


def labelled_span_region(truth: np.ndarray, axis: int, margin: int = 0) -> np.ndarray:
    """Boolean mask of the slab between the first and last index along ``axis`` holding any label.

    For partially labelled studies (only some levels annotated) this keeps the evaluation to the
    labelled span.  ``margin`` grows the slab by that many slices each side (clipped).  An
    all-background ``truth`` gives an all-False mask.
    """
    truth = np.asarray(truth)
    if not -truth.ndim <= axis < truth.ndim:
        raise InputError(f"axis {axis} out of range for an array of shape {truth.shape}")
    axis %= truth.ndim
    other = tuple(a for a in range(truth.ndim) if a != axis)
    hits = np.flatnonzero(np.any(truth != 0, axis=other))
    region = np.zeros(truth.shape, dtype=bool)
    if hits.size:
        index = [slice(None)] * truth.ndim
        index[axis] = slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + 1 + margin)
        region[tuple(index)] = True
    return region


def per_plane_dice(pred: np.ndarray, truth: np.ndarray, axis: int, classes: Sequence[int]) -> dict[int, float]:
    """Mean 2-D Dice per class over slices along ``axis``.

    Only slices where pred or truth contains the class count; a class absent from every slice of
    both maps scores 1.0.
    """
    pred, truth = _check_pair(pred, truth)
    if not -pred.ndim <= axis < pred.ndim:
        raise InputError(f"axis {axis} out of range for an array of shape {pred.shape}")
    axis %= pred.ndim
    other = tuple(a for a in range(pred.ndim) if a != axis)
    result: dict[int, float] = {}
    for value in classes:
        p, t = pred == value, truth == value
        inter = np.count_nonzero(p & t, axis=other)
        total = np.count_nonzero(p, axis=other) + np.count_nonzero(t, axis=other)
        used = total > 0
        result[int(value)] = float(np.mean(2.0 * inter[used] / total[used])) if used.any() else 1.0
    return result


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def _fmt(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def format_table(metrics: Sequence[ClassMetrics]) -> str:
    """An aligned plain-text table (one row per class) for the CLI."""
    header = (
        "value",
        "class",
        "Dice",
        "IoU",
        "Prec",
        "Recall",
        "Acc",
        "F1",
        "ASD mm",
        "NSD",
        "HD95 mm",
        "Vpred mL",
        "Vtrue mL",
        "note",
    )
    rows = [header]
    for m in metrics:
        note = (
            "empty both" if m.empty_both else "empty pred" if m.empty_pred else "empty truth" if m.empty_truth else ""
        )
        rows.append(
            (
                str(m.value),
                m.name,
                _fmt(m.dice),
                _fmt(m.iou),
                _fmt(m.precision),
                _fmt(m.recall),
                _fmt(m.accuracy, 4),
                _fmt(m.f1),
                _fmt(m.asd_mm, 2),
                _fmt(m.nsd),
                _fmt(m.hd95_mm, 2),
                _fmt(m.volume_pred_ml, 3),
                _fmt(m.volume_truth_ml, 3),
                note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i in (1, len(header) - 1) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarise(metrics: Sequence[ClassMetrics]) -> dict:
    """Means over the non-background classes, JSON-safe.

    Every metric is averaged over the classes where it is finite; ``n_infinite_distance`` counts
    classes whose distances are infinite (present in only one of pred / truth) and were therefore
    left out of the ASD / HD95 means.  A mean with no finite value is ``None``.
    """
    used = [m for m in metrics if m.value != 0]
    means: dict[str, float | None] = {}
    for name in _SUMMARY_FIELDS:
        values = [float(getattr(m, name)) for m in used]
        finite = [v for v in values if math.isfinite(v)]
        means[name] = float(np.mean(finite)) if finite else None
    return {
        "n_classes": len(used),
        "classes": [m.value for m in used],
        "mean": means,
        "n_infinite_distance": sum(1 for m in used if any(math.isinf(getattr(m, f)) for f in _DISTANCE_FIELDS)),
        "n_empty_both": sum(1 for m in used if m.empty_both),
    }


def parse_merge(specs: str | Sequence[str]) -> dict[int, int]:
    """``"1-7=1"`` (or ``"1,3,5=1"``; several separated by ``;`` or given as a list) → value map.

    For instance label maps (one value per vertebra): ``--merge 1-7=1`` makes them one class.
    """
    mapping: dict[int, int] = {}
    for spec in [specs] if isinstance(specs, str) else list(specs):
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            sources, sep, target = part.partition("=")
            try:
                if not sep:
                    raise ValueError(part)
                values: list[int] = []
                for item in filter(None, (s.strip() for s in sources.split(","))):
                    low, dash, high = item.partition("-")
                    values += list(range(int(low), int(high) + 1)) if dash else [int(low)]
                new = int(target)
                if not values or new < 0 or min(values) < 0:
                    raise ValueError(part)
            except ValueError:
                raise InputError(
                    f"--merge wants FROM=TO with FROM like 1-7 or 1,3,5 (e.g. 1-7=1), got {part!r}"
                ) from None
            mapping.update(dict.fromkeys(values, new))
    return mapping


def merge_labels(array: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """A copy of a label map with each value of ``mapping`` replaced by its target."""
    array = np.asarray(array)
    merged = array.copy()
    for source, target in mapping.items():
        merged[array == source] = target
    return merged


def region_description(region: np.ndarray | None, axis: int | None, voxel_ml: float) -> str:
    """One line saying what ``evaluate`` measured over (the labelled span or the whole volume)."""
    if region is None or axis is None:
        return "whole volume"
    other = tuple(a for a in range(region.ndim) if a != axis)
    slices = np.flatnonzero(region.any(axis=other))
    kept, total = float(np.count_nonzero(region)) * voxel_ml, float(region.size) * voxel_ml
    return (
        f"labelled span of the truth only: slices {int(slices[0])}-{int(slices[-1])} of {region.shape[axis]} "
        f"along array axis {axis} ({kept:.0f} of {total:.0f} mL; --span-axis none evaluates everywhere)"
    )
