"""Per-class clean-up of a 3-D label map, with sizes in millimetres (anisotropic spacing aware).

For every class listed in the configuration, in the configuration's order:

1. ``min_component_mm3`` / ``keep_largest``: connected components (26-connectivity) smaller
   than the threshold are removed, then only the ``keep_largest`` biggest are kept;
2. ``closing_mm`` > 0: morphological closing with an ellipsoid of that radius in mm per axis
   (axes whose spacing exceeds the radius are not closed across);
3. ``fill_holes``: fill cavities fully enclosed by the class in 3-D (not face-connected to
   the outside).

Filtering comes first so speckles neither survive by being bridged to a large component nor
inflate the working box.

Voxels added by closing or hole filling are taken only from background (0) voxels, and removed
voxels become background, so voxels of other classes never change.  Work is done on the
bounding box of each class for speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from . import schema
from .errors import InputError
from .preprocess import check_spacing, config_from_dict, config_to_dict

__all__ = [
    "ClassPostprocess",
    "PostprocessConfig",
    "default_postprocess",
    "ellipsoid_structure",
    "postprocess_labels",
]


@dataclass
class ClassPostprocess:
    """Clean-up of one class: minimum component volume (mm³), keep-largest-n (0 = all),
    3-D hole filling and closing radius (mm).

    ``near_class``/``near_mm``: an anatomical prior applied before keep-largest: only components
    lying mostly (at least half of their voxels) within ``near_mm`` mm of class ``near_class``
    are kept (e.g. the spinal canal lies behind the vertebral bodies; a large false region that
    merely grazes a body is not); ignored when ``near_class`` is absent from the label map.
    """

    min_component_mm3: float = 0.0
    keep_largest: int = 0
    fill_holes: bool = False
    closing_mm: float = 0.0
    near_class: int = 0
    near_mm: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min_component_mm3) and self.min_component_mm3 >= 0):
            raise InputError(f"ClassPostprocess: min_component_mm3 must be >= 0, got {self.min_component_mm3}")
        if self.keep_largest < 0:
            raise InputError(f"ClassPostprocess: keep_largest must be >= 0, got {self.keep_largest}")
        if not (np.isfinite(self.closing_mm) and 0 <= self.closing_mm <= 100):
            raise InputError(f"ClassPostprocess: closing_mm must be in 0..100 mm, got {self.closing_mm}")
        if self.near_class < 0 or not (np.isfinite(self.near_mm) and 0 <= self.near_mm <= 200):
            raise InputError(
                "ClassPostprocess: near_class must be >= 0 and near_mm in 0..200 mm, "
                f"got {self.near_class}, {self.near_mm}"
            )

    @property
    def is_noop(self) -> bool:
        return (
            self.min_component_mm3 == 0
            and self.keep_largest == 0
            and not self.fill_holes
            and self.closing_mm == 0
            and not self.near_class
        )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassPostprocess:
        return config_from_dict(cls, data)


@dataclass
class PostprocessConfig:
    """Post-processing per class value; classes are processed in the mapping's order."""

    per_class: dict[int, ClassPostprocess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value in self.per_class:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise InputError(f"PostprocessConfig: class values must be positive integers, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """``{"per_class": {"<value>": {...}, ...}}`` (JSON object keys are strings)."""
        return {"per_class": {str(int(k)): v.to_dict() for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessConfig:
        if not isinstance(data, dict):
            raise InputError(f"PostprocessConfig: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"per_class"})
        if unknown:
            raise InputError(f"PostprocessConfig: unknown key(s) {', '.join(map(repr, unknown))}")
        raw = data.get("per_class", {})
        if not isinstance(raw, dict):
            raise InputError("PostprocessConfig.per_class: expected a mapping of class value -> settings")
        per_class: dict[int, ClassPostprocess] = {}
        for key, value in raw.items():
            try:
                class_value = int(key)
            except (TypeError, ValueError):
                raise InputError(f"PostprocessConfig.per_class: key {key!r} is not an integer class value") from None
            if class_value in per_class:
                raise InputError(f"PostprocessConfig.per_class: class {class_value} given twice")
            per_class[class_value] = ClassPostprocess.from_dict(value)
        return cls(per_class)


def default_postprocess() -> PostprocessConfig:
    """Defaults for the standard schema (bodies, discs, canal, lesions)."""
    return PostprocessConfig(
        {
            schema.VERTEBRAL_BODY: ClassPostprocess(min_component_mm3=500.0, fill_holes=True, closing_mm=1.0),
            schema.INTERVERTEBRAL_DISC: ClassPostprocess(min_component_mm3=200.0, fill_holes=True),
            # the canal runs behind the vertebral bodies: parts far from every body are not canal
            schema.SPINAL_CANAL: ClassPostprocess(
                min_component_mm3=500.0, keep_largest=1, near_class=schema.VERTEBRAL_BODY, near_mm=20.0
            ),
            schema.LESION: ClassPostprocess(min_component_mm3=20.0),
        }
    )


def ellipsoid_structure(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Boolean ellipsoid footprint of ``radius_mm`` on a grid with ``spacing`` (one value per axis).

    Axes whose spacing exceeds the radius get extent 1 (no smoothing across thick slices).
    """
    radii = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    if np.prod([2.0 * r + 1 for r in radii]) > 2**24:  # fine spacing and a large radius
        raise InputError(f"closing radius {radius_mm:g} mm is {radii} voxels on this grid: too large a footprint")
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing))
    return np.asarray(dist <= 1.0 + 1e-9)


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        slices.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(slices)


_FULL = np.ones((3, 3, 3), dtype=bool)


def _filter_components(
    mask: np.ndarray, voxel_mm3: float, rule: ClassPostprocess, near: np.ndarray | None = None
) -> np.ndarray:
    """Which voxels of ``mask`` (``mask``'s true voxels in C order, a bool vector) survive: not in
    components below ``min_component_mm3``, outside ``near`` (a bool map of the allowed region, when
    given) or beyond the ``keep_largest``."""
    components, count = ndimage.label(mask, structure=_FULL[(slice(None),) * mask.ndim])
    if count == 0:
        return np.ones(0, dtype=bool)
    # Counted and looked up on the mask's voxels only (a few % of the box): a bincount or a lookup
    # over the whole int32 box cost ~5 s on a 512^3 study, this ~0.1 s.
    labelled = components[mask]
    sizes = np.bincount(labelled, minlength=count + 1)[1:]
    keep = sizes * voxel_mm3 >= rule.min_component_mm3
    if near is not None:
        keep &= 2 * np.bincount(labelled[near[mask]], minlength=count + 1)[1:] >= sizes
    if rule.keep_largest > 0 and keep.sum() > rule.keep_largest:
        order = np.argsort(-sizes, kind="stable")
        kept = order[keep[order]][: rule.keep_largest]
        keep = np.zeros_like(keep)
        keep[kept] = True
    return np.concatenate([[False], keep])[labelled]


def _near_region(reference: np.ndarray, spacing: tuple[float, ...], distance_mm: float) -> np.ndarray:
    """Bool map of voxels within about ``distance_mm`` of ``reference`` (a coarse grid keeps it cheap).

    The distance is measured on a grid of cells of about a quarter of ``distance_mm``; a cell's
    diagonal is added so nothing truly within ``distance_mm`` is ever left out.
    """
    steps = [max(1, int(distance_mm / 4 / s)) for s in spacing]
    shape = [-(-n // k) for n, k in zip(reference.shape, steps)]
    padded = np.zeros([n * k for n, k in zip(shape, steps)], dtype=bool)
    padded[tuple(slice(0, n) for n in reference.shape)] = reference
    cells = padded.reshape(shape[0], steps[0], shape[1], steps[1], shape[2], steps[2]).any(axis=(1, 3, 5))
    cell_mm = [k * s for k, s in zip(steps, spacing)]
    distance = ndimage.distance_transform_edt(~cells, sampling=cell_mm)
    near_cells = distance <= distance_mm + float(np.linalg.norm(cell_mm))
    return near_cells[np.ix_(*(np.arange(n) // k for n, k in zip(reference.shape, steps)))]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Cavities of ``mask`` not face-connected to the array border (as ``binary_fill_holes``, faster)."""
    background, count = ndimage.label(~mask)
    if count == 0:
        return mask
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(mask.ndim):
        for index in (0, -1):
            border[np.take(background, index, axis=axis)] = True
    border[0] = True  # label 0 is the mask itself
    return mask | ~border[background]


def _process_class(
    out: np.ndarray,
    value: int,
    spacing: tuple[float, ...],
    rule: ClassPostprocess,
    timings: dict[str, float] | None = None,
) -> None:
    """Apply ``rule`` to class ``value`` of ``out`` in place (filter → closing → fill); the seconds
    of each step are added to ``timings`` (keys ``bbox``, ``near``, ``components``, ``closing``, ``fill_holes``)."""
    clock = _Clock(timings)
    box = _bbox(out == value)
    clock.tick("bbox")
    if box is None:
        return
    near = None
    if rule.near_class and rule.near_mm >= 0 and rule.near_class != value:
        reference = out == rule.near_class
        if reference.any():  # the distance on the whole map: the reference class may be anywhere
            near = _near_region(reference, spacing, rule.near_mm)[box]  # (the class itself lies in its box)
        clock.tick("near")
    if rule.min_component_mm3 > 0 or rule.keep_largest > 0 or near is not None:
        crop = out[box]  # a view: edits write through to `out`
        mask = crop == value
        kept = _filter_components(mask, float(np.prod(spacing)), rule, near)
        if not kept.all():  # written on the class's voxels only (no full-box temporaries)
            crop[mask] = np.where(kept, value, 0).astype(out.dtype, copy=False)
        clock.tick("components")
        box = _bbox(out == value)  # the kept components' (usually much smaller) box
        clock.tick("bbox")
        if box is None:
            return

    structure = ellipsoid_structure(rule.closing_mm, spacing) if rule.closing_mm > 0 else None
    if structure is not None and structure.size == 1:
        structure = None
    if structure is None and not rule.fill_holes:
        return
    if structure is not None:
        # Grow the crop by the footprint radius: closing can bridge to the box's rim.
        radius = [n // 2 for n in structure.shape]
        box = tuple(slice(max(0, b.start - r), min(n, b.stop + r)) for b, r, n in zip(box, radius, out.shape))
    crop = out[box]
    mask = crop == value

    if structure is not None:
        pad = [(n // 2, n // 2) for n in structure.shape]
        padded = np.pad(mask, pad)  # zero margin so erosion does not eat the volume's border
        closed = ndimage.binary_closing(padded, structure=structure)
        closed = closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, mask.shape))]
        mask = mask | (closed & (crop == 0))
        clock.tick("closing")

    if rule.fill_holes:
        mask = mask | (_fill_holes(mask) & (crop == 0))
        clock.tick("fill_holes")

    crop[mask] = value


class _Clock:
    """Adds the seconds since the previous tick to ``timings[key]`` (nothing when ``timings`` is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter() if timings is not None else 0.0

    def tick(self, key: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[key] = self.timings.get(key, 0.0) + now - self.last
            self.last = now


def postprocess_labels(
    labels: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    config: PostprocessConfig,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Clean a ``(z, y, x)`` label map class by class; returns a new array of the same dtype.

    ``spacing_zyx`` is the voxel spacing of the array axes in mm.  Removed voxels become 0;
    closing and hole filling only claim background voxels; other classes are never changed.
    ``timings``, when given, gets the seconds of each step added (``bbox``, ``near``,
    ``components``, ``closing``, ``fill_holes``: see ``benchmarks/bench_postprocess.py``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"postprocess_labels expects a 3-D (z, y, x) label map, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"postprocess_labels expects an integer label map, got dtype {labels.dtype}")
    spacing = check_spacing(spacing_zyx, 3, "postprocess_labels")
    out = labels.copy()
    for value, rule in config.per_class.items():
        if rule.is_noop:
            continue
        _process_class(out, int(value), spacing, rule, timings)
    return out
