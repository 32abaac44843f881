"""Review of a label map (Qt-free): class volumes, vertebral levels superior → inferior, lesions.

    review = review_labels(labels_array, geometry)       # array[z, y, x] on the geometry's grid
    review.classes     # per class: volume (mL), voxel count, connected components
    review.levels      # vertebral bodies and discs, most superior first
    review.lesions     # each lesion with its volume and the body that holds it

Superior/inferior comes from the direction cosines (LPS: +S is superior), never from the array
axis order, so sagittal, axial and oblique acquisitions all order levels the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .errors import GeometryMismatchError, InputError
from .orientation import Plane, plane_array_axis
from .schema import DEFAULT_CLASSES, INTERVERTEBRAL_DISC, LESION, VERTEBRAL_BODY, LabelClass, class_for_value
from .volume import Geometry

__all__ = [
    "ClassSummary",
    "LabelReview",
    "Lesion",
    "Structure",
    "rank_uncertain_slices",
    "review_labels",
    "slice_means",
    "uncertain_slices",
]

#: A body taller than this many times the median body height is probably two vertebrae as one.
MERGED_HEIGHT_RATIO = 1.6
#: Bodies/discs below these fractions of their class's median volume / height are fragments.
MIN_LEVEL_VOLUME_OF_MEDIAN = 0.25
MIN_LEVEL_HEIGHT_OF_MEDIAN = 0.4
MAYBE_MERGED = "possibly merged"

_FACES = ndimage.generate_binary_structure(3, 1)
_FULL = ndimage.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class ClassSummary:
    value: int
    name: str
    voxels: int
    volume_ml: float
    components: int


@dataclass(frozen=True)
class Structure:
    """One vertebral body or disc (a connected component), placed along the spine."""

    value: int
    name: str  # "body 2", "disc 2-3"
    volume_ml: float
    height_mm: float  # extent along the superior-inferior array axis
    superior_mm: float  # LPS S coordinate of the centroid (larger = more superior)
    note: str = ""  # "possibly merged" when far taller than the other bodies


@dataclass(frozen=True)
class Lesion:
    number: int
    volume_ml: float
    host: str | None  # the body holding it ("body 3"), if any touches it
    superior_mm: float


@dataclass
class LabelReview:
    classes: list[ClassSummary]
    levels: list[Structure]  # superior -> inferior
    lesions: list[Lesion]
    fragments: dict[int, int] = field(default_factory=dict)  # value -> components too small to be a level
    detects_lesions: bool = True  # False when the labels' classes have no lesion class

    def lesion_message(self) -> str:
        if not self.lesions:
            if not self.detects_lesions:
                return "This model cannot detect lesions (it has no lesion class)."
            return "No lesion detected."
        parts = [f"{x.volume_ml:.2f} mL" + (f" in {x.host}" if x.host else "") for x in self.lesions]
        return f"{len(self.lesions)} lesion{'s' if len(self.lesions) > 1 else ''}: " + "; ".join(parts)


def _components(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    labelled, count = ndimage.label(mask, structure=structure)
    return labelled, int(count)


def _superior_mm(centres_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """LPS S coordinate (mm) of array-index centroids."""
    if len(centres_zyx) == 0:
        return np.zeros(0)
    return geometry.index_to_lps(np.asarray(centres_zyx, dtype=float)[:, ::-1])[:, 2]


def review_labels(
    labels: np.ndarray,
    geometry: Geometry,
    classes: Sequence[LabelClass] = DEFAULT_CLASSES,
    min_level_ml: float = 0.2,
    min_level_fraction: float = 0.05,
) -> LabelReview:
    """Summarise ``labels`` (``array[z, y, x]`` on ``geometry``).

    Bodies and discs smaller than ``min_level_ml`` or ``min_level_fraction`` of their class's
    largest component, or far smaller or flatter than their class's median component, are counted
    as fragments, not levels; a body much taller than the median one is noted "possibly merged".
    ``detects_lesions`` of the result is whether ``classes`` has a lesion class.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"need a 3-D label map, got shape {labels.shape}")
    if tuple(labels.shape) != geometry.shape:
        raise GeometryMismatchError(f"label shape {labels.shape} differs from the geometry's {geometry.shape}")
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    si_axis = plane_array_axis(geometry, Plane.AXIAL)
    si_spacing = geometry.spacing_zyx[si_axis]
    values = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel().astype(np.int64, copy=False))) if v]
    summaries, levels, fragments = [], [], {}
    labelled_bodies = None
    body_names: dict[int, str] = {}
    for value in values:
        name = class_for_value(value, classes).name
        mask = labels == value
        labelled, count = _components(mask, _FULL if value == LESION else _FACES)
        summaries.append(ClassSummary(value, name, int(mask.sum()), float(mask.sum()) * voxel_ml, count))
        if value not in (VERTEBRAL_BODY, INTERVERTEBRAL_DISC) or count == 0:
            continue
        ids = np.arange(1, count + 1)
        sizes = ndimage.sum_labels(mask, labelled, ids) * voxel_ml
        boxes = ndimage.find_objects(labelled)
        heights = np.array([(b[si_axis].stop - b[si_axis].start) * si_spacing for b in boxes], dtype=float)
        keep = _plausible_levels(sizes, heights, min_level_ml, min_level_fraction)
        fragments[value] = int(count - len(keep))
        centres = np.array(ndimage.center_of_mass(mask, labelled, keep)).reshape(-1, 3)
        superior = _superior_mm(centres, geometry)
        median_height = float(np.median(heights[keep - 1])) if len(keep) else 0.0
        for component, size, s_mm in zip(keep, sizes[keep - 1], superior):
            height = float(heights[component - 1])
            merged = value == VERTEBRAL_BODY and len(keep) >= 3 and height > MERGED_HEIGHT_RATIO * median_height
            levels.append((value, int(component), float(size), height, float(s_mm), MAYBE_MERGED if merged else ""))
        if value == VERTEBRAL_BODY:
            labelled_bodies = labelled
    levels.sort(key=lambda item: -item[4])
    named: list[Structure] = []
    bodies_above = 0
    for value, component, size, height, s_mm, note in levels:
        if value == VERTEBRAL_BODY:
            bodies_above += 1
            name = f"body {bodies_above}"
            body_names[component] = name
        else:
            name = f"disc {bodies_above}-{bodies_above + 1}" if bodies_above else "disc above body 1"
        named.append(Structure(value, name, size, height, s_mm, note))
    lesions = _lesions(labels, geometry, voxel_ml, labelled_bodies, body_names)
    detects = any(c.value == LESION for c in classes)
    return LabelReview(summaries, named, lesions, fragments, detects_lesions=detects)


def _plausible_levels(sizes: np.ndarray, heights: np.ndarray, min_ml: float, min_fraction: float) -> np.ndarray:
    """Component ids (1-based) big and tall enough to be a level, not a fragment.

    A fragment (a few painted slices, a sliver at the edge of the field of view) is small against
    the class's largest part and against its median part, or flat against the median height.
    """
    ids = np.arange(1, len(sizes) + 1)
    if not len(sizes):
        return ids
    candidate = (sizes >= min_ml) & (sizes >= min_fraction * sizes.max())
    if candidate.sum() >= 3:  # enough parts for a median to mean "a typical level"
        median_ml, median_height = np.median(sizes[candidate]), np.median(heights[candidate])
        candidate &= sizes >= MIN_LEVEL_VOLUME_OF_MEDIAN * median_ml
        candidate &= heights >= MIN_LEVEL_HEIGHT_OF_MEDIAN * median_height
    return ids[candidate]


def _lesions(
    labels: np.ndarray, geometry: Geometry, voxel_ml: float, bodies: np.ndarray | None, body_names: dict[int, str]
) -> list[Lesion]:
    mask = labels == LESION
    labelled, count = _components(mask, _FULL)
    if count == 0:
        return []
    ids = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(mask, labelled, ids) * voxel_ml
    centres = np.array(ndimage.center_of_mass(mask, labelled, ids)).reshape(-1, 3)
    superior = _superior_mm(centres, geometry)
    result = []
    for number, (box, size, s_mm) in enumerate(zip(ndimage.find_objects(labelled), sizes, superior), start=1):
        host = None
        if bodies is not None:
            grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            near = ndimage.binary_dilation(labelled[grown] == number, _FULL)
            hits = np.bincount(bodies[grown][near].ravel())
            hits[0] = 0
            if hits.any():
                host = body_names.get(int(hits.argmax()))
        result.append(Lesion(number, float(size), host, float(s_mm)))
    result.sort(key=lambda lesion: -lesion.superior_mm)
    return result


def slice_means(array: np.ndarray, axis: int) -> np.ndarray:
    """Mean of ``array`` over each slice along ``axis`` (float64)."""
    array = np.asarray(array)
    if not -array.ndim <= axis < array.ndim:
        raise InputError(f"axis {axis} out of range for an array of shape {array.shape}")
    other = tuple(a for a in range(array.ndim) if a != axis % array.ndim)
    return np.asarray(array, dtype=np.float64).mean(axis=other) if array.size else np.zeros(0)


def uncertain_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """Slice indices along ``axis``, most uncertain (highest mean) first; ties by index."""
    means = slice_means(array, axis)
    return np.lexsort((np.arange(len(means)), -means))


def rank_uncertain_slices(
    uncertainty: np.ndarray,
    axis: int,
    anatomy: np.ndarray | None = None,
    margin_voxels: int = 3,
    min_gap: int = 3,
    runs: Sequence[range] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Slices along ``axis`` worth reviewing first, and each slice's score (mean uncertainty).

    Only voxels inside ``anatomy`` (a label map or mask: non-zero is segmented) grown by
    ``margin_voxels`` count, so background at the edge of the field of view never wins; slices
    with none of them are left out.  Proposals are spread: greedily the best slice at least
    ``min_gap`` slices from every one already proposed, then the rest by score.  ``runs``: slices
    resampled from the same acquired slices (:func:`napari_spineseg.resampled.resampled_runs`);
    the best slice of each run comes first (a correction there is copied to its whole run).
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float32)
    if not -uncertainty.ndim <= axis < uncertainty.ndim:
        raise InputError(f"axis {axis} out of range for an array of shape {uncertainty.shape}")
    axis %= uncertainty.ndim
    if anatomy is None:
        region = np.ones(uncertainty.shape, bool)
    else:
        if np.shape(anatomy) != uncertainty.shape:
            raise GeometryMismatchError(f"anatomy shape {np.shape(anatomy)} differs from {uncertainty.shape}")
        region = np.asarray(anatomy) != 0
        if margin_voxels > 0 and region.any():
            region = ndimage.binary_dilation(region, _FULL, iterations=int(margin_voxels))
    other = tuple(a for a in range(uncertainty.ndim) if a != axis)
    counts = region.sum(axis=other)
    sums = np.where(region, uncertainty, 0.0).sum(axis=other, dtype=np.float64)
    scores = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    valid = np.flatnonzero(counts > 0)
    by_score = valid[np.lexsort((valid, -scores[valid]))]
    if runs:  # one slice per run first: the best of each run, by score
        run_of = {i: n for n, run in enumerate(runs) for i in run}
        firsts: dict[int, int] = {}
        for index in by_score:
            firsts.setdefault(run_of.get(int(index), -1), int(index))
        firsts.pop(-1, None)
        chosen = set(firsts.values())
        by_score = np.asarray([*firsts.values(), *(int(i) for i in by_score if int(i) not in chosen)], np.int64)
    spread: list[int] = []
    for index in by_score:
        if all(abs(int(index) - chosen) >= min_gap for chosen in spread):
            spread.append(int(index))
    proposed = set(spread)
    rest = [int(i) for i in by_score if int(i) not in proposed]
    return np.asarray(spread + rest, dtype=np.int64), scores
