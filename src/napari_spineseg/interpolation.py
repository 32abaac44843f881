"""Shape-based interpolation between corrected slices (Qt-free).

A structure (a label value) the annotator corrected on slices ``k`` and ``k + n`` of one array
axis fills the slices between: on each in-between slice the two slices' signed distance maps are
blended linearly (``scipy.ndimage.distance_transform_edt``) and the structure is where the blend
is positive.

    painted = painted_slices(painted_mask, axis=0)          # slices holding annotator paint
    change = interpolate_between_slices(labels, axis=0, slices=painted, painted=painted_mask)
    change.apply(labels)                                     # or preview it first / apply via undo

Rules (one pair of consecutive corrected slices ``a < b`` at a time, per label value):

- the values interpolated are the non-zero values on slice ``a`` or ``b`` (or ``values``);
- on each slice strictly between, an interpolated value takes the voxels inside its blended shape
  (where two overlap, the one deepest inside wins) and loses its other voxels there (→ 0);
- a value on one of the two slices only *shrinks to nothing* towards the other: it is taken to end
  half-way (the empty side's distance map is minus the present side's deepest inside distance, so
  the blend is ≤ 0 everywhere from the middle slice on);
- a value on neither slice is left alone (a structure may lie wholly between them);
- voxels of other values are kept unless ``overwrite_other``;
- corrected slices and ``painted`` voxels are never changed;
- optional ``prior`` (the model's own label map): its shapes are blended in with distance from the
  corrected slices, so far from them the model's slice stands (``reach`` slices, Gaussian weight);
- optional ``max_gap``: corrected slices further apart are not interpolated between.

Measured by ``benchmarks/bench_annotator.py``: a pure blend between far-apart slices is worse
than the model's own slices (Dice fell from 0.88 to 0.50 after two slices at the two ends of the
bodies); with the model as prior it never falls below the model.

Distances are in voxels of the slice plane (assumes square in-plane voxels).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage

from .errors import InputError

__all__ = ["LabelChange", "interpolate_between_slices", "next_slice_to_paint", "painted_slices", "signed_distance"]

#: Signed distance of a value absent from a slice: "just outside" everywhere (shrink to nothing).
_ABSENT = -0.5


@dataclass(frozen=True)
class LabelChange:
    """A proposed edit of a label array: ``array[indices] = values`` (``previous`` is what is there now)."""

    indices: tuple[np.ndarray, ...]
    values: np.ndarray
    previous: np.ndarray

    @classmethod
    def between(cls, before: np.ndarray, after: np.ndarray) -> LabelChange:
        """The change that turns ``before`` into ``after`` (same shape)."""
        if before.shape != after.shape:
            raise InputError(f"cannot compare label arrays of shapes {before.shape} and {after.shape}")
        where = np.nonzero(before != after)
        return cls(where, after[where], before[where])

    @property
    def size(self) -> int:
        """Number of voxels changed."""
        return int(self.values.size)

    def apply(self, array: np.ndarray) -> None:
        """Write the change into ``array`` in place."""
        array[self.indices] = self.values

    def revert(self, array: np.ndarray) -> None:
        """Undo :meth:`apply` on ``array`` in place."""
        array[self.indices] = self.previous

    def without(self, keep: np.ndarray) -> LabelChange:
        """The same change minus the voxels where boolean ``keep`` (array-shaped) is True."""
        drop = np.asarray(keep)[self.indices]
        if not drop.any():
            return self
        take = ~drop
        return LabelChange(tuple(i[take] for i in self.indices), self.values[take], self.previous[take])


def _check_axis(shape: tuple[int, ...], axis: int) -> int:
    if len(shape) < 2:
        raise InputError(f"need a label array of at least 2 dimensions, got shape {shape}")
    if not -len(shape) <= axis < len(shape):
        raise InputError(f"axis {axis} out of range for an array of shape {shape}")
    return axis % len(shape)


def painted_slices(painted: np.ndarray, axis: int) -> np.ndarray:
    """Sorted indices of the slices along ``axis`` holding any True voxel of ``painted``."""
    painted = np.asarray(painted, dtype=bool)
    axis = _check_axis(painted.shape, axis)
    other = tuple(a for a in range(painted.ndim) if a != axis)
    return np.flatnonzero(np.any(painted, axis=other))


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (voxels) to the mask's edge: > 0 inside, < 0 outside, ±0.5 at the border voxels."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, _ABSENT, dtype=np.float32)
    padded = np.pad(mask, 1)  # the array edge is outside, not "more inside"
    inside = ndimage.distance_transform_edt(padded)[(slice(1, -1),) * mask.ndim]
    outside = ndimage.distance_transform_edt(~mask)
    return np.where(mask, inside - 0.5, 0.5 - outside).astype(np.float32)


def _box(masks: Iterable[np.ndarray], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Bounding box of the union of ``masks`` grown by one voxel (None when all are empty)."""
    union = np.zeros(shape, dtype=bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return None
    box = []
    for dim in range(union.ndim):
        hits = np.flatnonzero(np.any(union, axis=tuple(a for a in range(union.ndim) if a != dim)))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, shape[dim])))
    return tuple(box)


def _pair_distances(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Signed distances of one value on both corrected slices; an empty side makes it end half-way."""
    d0, d1 = signed_distance(first), signed_distance(last)
    if not first.any():
        d0[:] = -float(d1.max())
    elif not last.any():
        d1[:] = -float(d0.max())
    return np.stack([d0, d1])


def _fill_between(
    labels: np.ndarray,
    axis: int,
    a: int,
    b: int,
    values: Sequence[int] | None,
    overwrite_other: bool,
    prior: np.ndarray | None = None,
    reach: float = np.inf,
) -> Iterable[tuple[int, np.ndarray]]:
    """(slice index, new slice) for every slice strictly between corrected slices ``a`` and ``b``."""
    first, last = np.take(labels, a, axis=axis), np.take(labels, b, axis=axis)
    present = np.union1d(np.unique(first), np.unique(last))
    chosen = [int(v) for v in present if v != 0 and (values is None or int(v) in values)]
    if not chosen:
        return
    chosen_array = np.asarray(chosen, dtype=labels.dtype)
    masks = [(first == v, last == v) for v in chosen]
    extra = []
    if prior is not None:  # the prior's shapes between the two slices may reach further
        between = np.take(prior, np.arange(a + 1, b), axis=axis)
        extra = [np.any(np.isin(between, chosen_array), axis=axis)]
    box = _box([m for pair in masks for m in pair] + extra, first.shape)
    distances = np.stack([_pair_distances(m0[box], m1[box]) for m0, m1 in masks])
    for s in range(a + 1, b):
        t = (s - a) / (b - a)
        blend = (1.0 - t) * distances[:, 0] + t * distances[:, 1]  # (values, *box shape)
        if prior is not None:  # trust the corrections near them, the prior far from them
            weight = float(np.exp(-((min(s - a, b - s) / reach) ** 2))) if reach > 0 else 0.0
            own = np.take(prior, s, axis=axis)[box]
            blend = weight * blend + (1.0 - weight) * np.stack([signed_distance(own == v) for v in chosen])
        best = np.argmax(blend, axis=0)
        inside = np.take_along_axis(blend, best[None], axis=0)[0] > 0
        old = np.take(labels, s, axis=axis)
        new = old.copy()
        new[np.isin(old, chosen_array)] = 0  # interpolated values are redrawn from scratch
        region = new[box]
        claim = inside if overwrite_other else inside & (region == 0)  # other structures are kept
        region[claim] = chosen_array[best[claim]]
        yield s, new


def interpolate_between_slices(
    labels: np.ndarray,
    axis: int,
    slices: Sequence[int] | np.ndarray | None = None,
    painted: np.ndarray | None = None,
    values: Iterable[int] | None = None,
    overwrite_other: bool = False,
    max_gap: int | None = None,
    prior: np.ndarray | None = None,
    reach: float = 3.0,
) -> LabelChange:
    """The change that fills the slices between consecutive corrected slices along ``axis``.

    ``slices``: the corrected slice indices; default: the slices holding any ``painted`` voxel.
    ``painted``: boolean mask (``labels``' shape) of voxels the annotator painted; never changed.
    ``values``: restrict to these label values (default: every value on the corrected slices).
    ``max_gap``: leave consecutive corrected slices further apart than this alone (the model's
    slices between far-apart corrections are usually better than a blend of the two).
    ``prior``: a label map to fall back on far from the corrections (e.g. the model's own result):
    its signed distances are blended in with weight ``1 - exp(-(d / reach)²)``, ``d`` the distance
    in slices to the nearer corrected slice.  Without it, the slices between are pure interpolation.
    ``labels`` itself is not modified.
    """
    labels = np.asarray(labels)
    axis = _check_axis(labels.shape, axis)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise InputError(f"labels must hold integers, got dtype {labels.dtype}")
    if prior is not None and np.shape(prior) != labels.shape:
        raise InputError(f"prior shape {np.shape(prior)} differs from the labels' {labels.shape}")
    if painted is not None:
        painted = np.asarray(painted, dtype=bool)
        if painted.shape != labels.shape:
            raise InputError(f"painted mask shape {painted.shape} differs from the labels' {labels.shape}")
    if slices is None:
        if painted is None:
            raise InputError("give the corrected slices or a mask of the painted voxels")
        slices = painted_slices(painted, axis)
    keys = np.unique(np.asarray(slices, dtype=np.int64))
    if keys.size and (keys[0] < 0 or keys[-1] >= labels.shape[axis]):
        raise InputError(f"slice indices must lie in 0..{labels.shape[axis] - 1} along axis {axis}")
    wanted = None if values is None else {int(v) for v in values}
    parts: list[tuple[np.ndarray, ...]] = []
    new_values: list[np.ndarray] = []
    old_values: list[np.ndarray] = []
    for a, b in pairwise(keys):
        if b - a < 2 or (max_gap is not None and b - a > max_gap):
            continue
        for s, new in _fill_between(labels, axis, int(a), int(b), wanted, overwrite_other, prior, reach):
            old = np.take(labels, s, axis=axis)
            changed = new != old
            if painted is not None:
                changed &= ~np.take(painted, s, axis=axis)
            where = np.nonzero(changed)
            if not where[0].size:
                continue
            full = [*where]
            full.insert(axis, np.full(where[0].size, s, dtype=np.intp))
            parts.append(tuple(full))
            new_values.append(new[where])
            old_values.append(old[where])
    if not parts:
        empty = tuple(np.zeros(0, dtype=np.intp) for _ in range(labels.ndim))
        return LabelChange(empty, np.zeros(0, labels.dtype), np.zeros(0, labels.dtype))
    indices = tuple(np.concatenate([p[d] for p in parts]) for d in range(labels.ndim))
    return LabelChange(indices, np.concatenate(new_values), np.concatenate(old_values))


def next_slice_to_paint(
    uncertainty: np.ndarray,
    axis: int,
    painted: Iterable[int] = (),
    spread: float = 4.0,
    runs: Sequence[range] = (),
) -> int | None:
    """The slice along ``axis`` to correct next: most summed uncertainty, damped near painted slices.

    Slice ``s`` scores ``sum(uncertainty[s]) * prod(1 - exp(-((s - p) / spread)²))`` over the
    painted slices ``p`` (whose neighbours interpolation fills), so proposals spread out instead of
    running through one cluster of adjacent uncertain slices.  ``runs``: slices resampled from the
    same acquired slices (:func:`napari_spineseg.resampled.resampled_runs`); when given, only
    slices inside a run are proposed (a correction there is copied to the whole run) and a run
    holding a painted slice is done.  None when nothing is left to propose.
    """
    uncertainty = np.asarray(uncertainty)
    axis = _check_axis(uncertainty.shape, axis)
    other = tuple(a for a in range(uncertainty.ndim) if a != axis)
    score = uncertainty.sum(axis=other, dtype=np.float64)
    done = sorted({int(p) for p in painted})
    if any(not 0 <= p < score.size for p in done):
        raise InputError(f"painted slice indices must lie in 0..{score.size - 1}")
    index = np.arange(score.size)
    for p in done if spread > 0 else ():
        score *= 1.0 - np.exp(-(((index - p) / spread) ** 2))
    score[done] = -1.0
    if runs:
        inside = np.zeros(score.size, dtype=bool)
        for run in runs:
            members = [i for i in run if 0 <= i < score.size]
            inside[members] = not any(p in run for p in done)
        score[~inside] = -1.0
    best = int(np.argmax(score)) if score.size else 0
    return best if score.size and score[best] >= 0 else None
