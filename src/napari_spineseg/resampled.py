"""Studies resampled from thick slices: a correction on one slice also holds on its resampled twins (Qt-free).

Many studies reach the annotator already resampled: e.g. 4 mm sagittal slices interpolated to
1 mm voxels (all of ``../shared/data/lumbar-mri``).  Between two acquired slices the image is a
linear blend of them, so its second difference across slices is only rounding noise there and
jumps at the acquired slices.  The slices of such a run were made from the same two acquired
slices; their reference labels are usually one shape, drawn once on the thick slice.  A structure
the annotator paints on one slice of a run is therefore copied to the run's other slices before
interpolating between the corrected slices:

    runs = resampled_runs(image, axis)                 # [] for a study at its acquired resolution
    change, corrected = fill_from_corrections(labels, axis, painted, image=image, prior=model)
    change.apply(labels)                               # one LabelChange: copies and interpolation

Measured by ``benchmarks/bench_annotator.py`` (strategy ``same-source+interpolation+model``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .errors import InputError
from .interpolation import LabelChange, interpolate_between_slices, painted_slices

__all__ = ["copy_within_runs", "fill_from_corrections", "resampled_runs"]

#: A slice is a blend of its neighbours when its mean |second difference| is within this factor of the
#: study's noise floor (the 20th percentile over slices), ...
_BLEND_FACTOR = 1.6
#: ... and the study counts as resampled only when the other slices stand this far above the floor.
_ACQUIRED_FACTOR = 3.0
#: Resampling by up to 10x: longer runs of flat slices are flat anatomy or air, not interpolation.
_LONGEST_RUN = 12
#: Pixels of each slice that enter its mean second difference (a regular subsample of larger slices).
_PIXELS_PER_SLICE = 65536


def _second_differences(image: np.ndarray, axis: int) -> np.ndarray:
    """Mean |I[s-1] - 2 I[s] + I[s+1]| of every inner slice ``s`` along ``axis`` (float32 sums)."""
    stack = np.moveaxis(np.asarray(image), axis, 0)
    stride = max(1, int(np.sqrt(stack.shape[1] * stack.shape[2] / _PIXELS_PER_SLICE)))
    stack = stack[:, ::stride, ::stride]  # a mean over ~64 k pixels per slice is plenty (and fast in the GUI)
    out = np.empty(max(stack.shape[0] - 2, 0), dtype=np.float64)
    for s in range(1, stack.shape[0] - 1):  # one slice at a time: no whole-volume float copies
        blend = stack[s - 1].astype(np.float32) - 2 * stack[s].astype(np.float32) + stack[s + 1].astype(np.float32)
        out[s - 1] = float(np.abs(blend).mean())
    return out


def resampled_runs(image: np.ndarray, axis: int, min_slices: int = 8) -> list[range]:
    """Runs of two or more adjacent slices along ``axis`` interpolated between the same acquired slices.

    Empty when the study does not look resampled along ``axis`` (acquired at this resolution, too
    few slices, or no clear gap between blended and acquired slices).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(f"need a 3-D image, got shape {image.shape}")
    if not -3 <= axis < 3:
        raise InputError(f"axis {axis} out of range for a 3-D image")
    if image.shape[axis] < min_slices:
        return []
    second = _second_differences(image, axis % 3)
    if not second.max() > 0:  # a constant (or linear) study: nothing tells acquired slices apart
        return []
    floor = max(float(np.percentile(second, 20)), 1e-6 * float(second.max()))  # exact floats: no rounding noise
    blended = second <= _BLEND_FACTOR * floor
    acquired = second[~blended]
    if acquired.size == 0 or np.median(acquired) < _ACQUIRED_FACTOR * floor:
        return []
    if not 0.4 <= blended.mean() <= 0.9:  # resampling by 1.5x-10x leaves this share of blended slices
        return []
    flags = np.concatenate([[False], blended, [False]])  # the edge slices have no second difference
    edges = np.flatnonzero(np.diff(flags.astype(np.int8)))
    runs = [range(int(a) + 1, int(b) + 1) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 2]
    if sum(len(run) for run in runs) < 0.3 * image.shape[axis]:  # scattered flat slices, not a resampling
        return []
    if max(len(run) for run in runs) > _LONGEST_RUN:  # a flat stretch of the image (e.g. air), not a blend
        return []
    return runs


def _run_of(runs: Iterable[range], index: int) -> range | None:
    return next((run for run in runs if index in run), None)


def copy_within_runs(
    labels: np.ndarray,
    axis: int,
    slices: Iterable[int],
    runs: list[range],
    painted: np.ndarray | None = None,
    values: Iterable[int] | None = None,
) -> tuple[LabelChange, list[int]]:
    """Copy each corrected slice's structures to the other slices of its run (nearest corrected slice wins).

    A copied value takes the source slice's shape exactly (its voxels elsewhere on the target slice
    become 0); other values are kept; ``painted`` voxels are never changed.  Returns the change and
    the slices it filled.
    """
    labels = np.asarray(labels)
    corrected = sorted({int(s) for s in slices})
    wanted = None if values is None else {int(v) for v in values}
    after = labels.copy()
    filled: list[int] = []
    for run in runs:
        sources = [s for s in corrected if s in run]
        if not sources:
            continue
        for target in run:
            if target in corrected:
                continue
            source = min(sources, key=lambda s: (abs(s - target), s))
            filled.append(target)
            _copy_slice(after, labels, axis, source, target, painted, wanted)
    return LabelChange.between(labels, after), filled


def _copy_slice(after, labels, axis, source, target, painted, wanted) -> None:
    shape = np.take(labels, source, axis=axis)
    old = np.take(labels, target, axis=axis)
    present = [int(v) for v in np.unique(shape) if v != 0 and (wanted is None or int(v) in wanted)]
    new = old.copy()
    new[np.isin(old, present)] = 0
    for value in present:
        new[shape == value] = value
    if painted is not None:
        keep = np.take(painted, target, axis=axis)
        new[keep] = old[keep]
    index = [slice(None)] * labels.ndim
    index[axis] = target
    after[tuple(index)] = new


def fill_from_corrections(
    labels: np.ndarray,
    axis: int,
    painted: np.ndarray,
    image: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    values: Iterable[int] | None = None,
    reach: float = 3.0,
    slices: Iterable[int] | None = None,
) -> tuple[LabelChange, dict[str, list[int]]]:
    """The corrected slices copied within their resampled runs (with ``image``), then interpolated between.

    ``slices``: the corrected slices (default: those holding ``painted`` voxels).  One
    :class:`LabelChange` for both steps; ``{"painted": [...], "copied": [...]}`` says which slices
    the annotator corrected and which were filled as their resampled twins.
    """
    labels = np.asarray(labels)
    painted = np.asarray(painted, dtype=bool)
    if image is not None and np.shape(image) != labels.shape:
        raise InputError(f"image shape {np.shape(image)} differs from the labels' {labels.shape}")
    corrected = sorted({int(s) for s in (painted_slices(painted, axis) if slices is None else slices)})
    wanted = None if values is None else [int(v) for v in values]
    runs = resampled_runs(image, axis) if image is not None else []
    copies, copied = copy_within_runs(labels, axis, corrected, runs, painted, wanted)
    working = labels.copy()
    copies.apply(working)
    keys = sorted(set(corrected) | set(copied))
    between = interpolate_between_slices(
        working, axis, slices=keys, painted=painted, values=wanted, prior=prior, reach=reach
    )
    between.apply(working)
    return LabelChange.between(labels, working), {"painted": corrected, "copied": sorted(copied)}
