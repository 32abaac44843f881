"""Vertebral level identification: every vertebral body and disc of a class map named by level.

A post-processing step on the class map (1 vertebral body, 2 intervertebral disc): no network
output is needed.  Bodies and discs become instances (connected components in the canonical
``LPI`` orientation; merged bodies split at the disc between them or where they narrow;
fragments dropped) ordered superior → inferior.  The count is anchored on the sacrum: the
lowest body instance is the sacrum (S1) when a disc separates it from the body above, no disc
lies below it, and that disc (L5/S1) leans steeply in the sagittal plane and more than the disc
above it.  The body above is then L5, and the others are counted up from there as long as
bodies and discs alternate (above a gap nothing is named).  Whenever that evidence is missing or
ambiguous (sacrum cropped away or not segmented, body-only or disc-only maps, a rudimentary
lowest disc, a body that looks like two, more bodies than C1..L5 allow) the result is
*uncertain*, says why and names nothing: a wrong level is worse than none.

Numbering (VerSe / SPINEPS): C1..C7 = 1..7, T1..T12 = 8..19, L1..L5 = 20..24, L6 = 25, S1 = 26;
each disc is 100 + the value of the vertebra above it (L4/L5 = 123, L5/S1 = 124); 0 elsewhere.
Only body and disc voxels of the class map carry a level.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError, VolumeReadError, VolumeWriteError
from .orientation import reorientation_to
from .schema import INTERVERTEBRAL_DISC, LESION, VERTEBRAL_BODY
from .volume import Geometry, Volume

__all__ = [
    "LevelInstance",
    "LevelResult",
    "identify_levels",
    "level_name",
    "level_value",
    "mark_uncertain",
    "read_levels",
    "renumber",
    "result_from_record",
    "sidecar_path",
    "write_levels",
]

VERTEBRA_NAMES: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 7)),
    "S1",
)
S1 = 26
L5 = 24
L6 = 25
DISC_OFFSET = 100
NAMED = "named"
UNCERTAIN = "uncertain"
SIDECAR_FORMAT = "spineseg-levels"

# Anchor thresholds, set on the lumbar MRI of ../shared/data (benchmarks/bench_levels.py): in the
# sagittal plane the L5/S1 disc leans at least MIN_SACRAL_SLOPE degrees from axial and more than
# the disc above it (true L5/S1 discs: 20-47 degrees; L4/L5 discs: 3-25 degrees).
MIN_SACRAL_SLOPE = 18.0
MAX_SACRAL_SLOPE = 65.0  # steeper is no disc plane but a segmentation error
FRAGMENT_FRACTION = 0.1  # components smaller than this fraction of the typical one are fragments
MERGED_HEIGHT_RATIO = 1.6  # a body taller than this × the median body height is two bodies
DISC_SPLIT_HEIGHT_RATIO = 1.3  # a body taller than this × the median with a disc inside is split there
EDGE_MM = 2.0  # an instance this close to the field of view's superior/inferior end is cropped


def level_value(name: str) -> int:
    """The level value of a vertebra (``"L3"`` → 22) or a disc (``"L4/L5"`` → 123)."""
    text = name.strip().upper()
    upper = text.split("/", 1)[0]
    if upper not in VERTEBRA_NAMES:
        raise InputError(f"unknown level {name!r}: use C1..C7, T1..T12, L1..L6, S1 or discs like 'L4/L5'")
    value = VERTEBRA_NAMES.index(upper) + 1
    return value + DISC_OFFSET if "/" in text else value


def level_name(value: int, has_l6: bool = False) -> str:
    """The name of a level value: 22 → ``"L3"``, 123 → ``"L4/L5"``, 124 → ``"L5/S1"`` (``"L5/L6"`` with an L6)."""
    value = int(value)
    if 1 <= value <= S1:
        return VERTEBRA_NAMES[value - 1]
    upper = value - DISC_OFFSET
    if 1 <= upper < S1:
        below = upper + 1
        if upper == L5 and not has_l6:
            below = S1
        return f"{VERTEBRA_NAMES[upper - 1]}/{VERTEBRA_NAMES[below - 1]}"
    raise InputError(f"{value} is not a level value (1..26 vertebrae, 101..125 discs)")


@dataclass
class LevelInstance:
    """One vertebral body or disc: its level (0 and ``""`` while uncertain) and measurements."""

    kind: str  # "body" or "disc"
    value: int
    name: str
    voxels: int
    volume_mm3: float
    height_mm: float  # extent along the spine axis
    centroid: tuple[float, float, float]  # array index (z, y, x) of the study
    confidence: float  # 0..1; 0 while uncertain
    cropped: bool = False  # touches the superior/inferior end of the field of view


@dataclass
class LevelResult:
    """Level map (values above, same grid as the class map), instances superior → inferior, status."""

    level_map: np.ndarray
    instances: list[LevelInstance]
    status: str  # "named" | "uncertain"
    reason: str
    geometry: Geometry | None = None
    instance_map: np.ndarray | None = field(default=None, repr=False)  # 1..N: instances[i-1]; 0 elsewhere

    @property
    def named(self) -> bool:
        return self.status == NAMED

    def names(self) -> dict[int, str]:
        """``{value: name}`` of the named instances."""
        return {i.value: i.name for i in self.instances if i.value}

    def instance(self, name: str) -> LevelInstance | None:
        """The instance named ``name`` (``"L3"``, ``"L4/L5"``), if any."""
        value = level_value(name)
        return next((i for i in self.instances if i.value == value), None)

    def level_of(self, mask: np.ndarray) -> str | None:
        """The name of the body or disc that holds most of ``mask`` (or touches it), if named."""
        if not self.named or self.instance_map is None:
            return None
        mask = np.asarray(mask, bool)
        ids = self.instance_map[ndimage.binary_dilation(mask, iterations=2)]
        ids = ids[ids > 0]
        if ids.size == 0:
            return None
        instance = self.instances[int(np.bincount(ids).argmax()) - 1]
        return instance.name or None


# --- instances (canonical LPI arrays: axis 0 superior → inferior, axis 1 anterior → posterior) --
class _Part:
    """A body or disc component: its voxels (canonical indices), centre (mm) and shape."""

    def __init__(self, kind: str, voxels: np.ndarray, spacing: np.ndarray) -> None:
        self.kind = kind
        self.voxels = voxels
        self.spacing = spacing
        self.points = voxels * spacing
        self.centroid = self.points.mean(axis=0)
        self.si = float(self.centroid[0])
        si = voxels[:, 0]
        self.first, self.last = int(si.min()), int(si.max())
        self.extent_mm = float((self.last - self.first + 1) * spacing[0])

    def touches(self, size_i: int) -> bool:
        """Whether it reaches (within ``EDGE_MM``) the superior or inferior end of the field of view."""
        margin = EDGE_MM / self.spacing[0]
        return bool(self.first < margin or self.last > size_i - 1 - margin)

    def sagittal_tilt(self) -> float:
        """Angle (degrees) of the smallest principal axis in the sagittal (I, P) plane from the S-I axis;
        positive when it leans posteriorly going inferior (an inferior-posteriorly facing endplate)."""
        x = self.points[:, :2] - self.centroid[:2]
        _, vectors = np.linalg.eigh(np.cov(x.T))
        normal = vectors[:, 0] if vectors[0, 0] >= 0 else -vectors[:, 0]
        return float(np.degrees(np.arctan2(normal[1], normal[0])))

    def normal(self) -> np.ndarray:
        """Unit normal (3-D, mm) of the part's plane, pointing inferiorly."""
        _, vectors = np.linalg.eigh(np.cov((self.points - self.centroid).T))
        normal = vectors[:, 0]
        return normal if normal[0] >= 0 else -normal


def _parts(mask: np.ndarray, kind: str, spacing: np.ndarray, offset: np.ndarray) -> tuple[list[_Part], list[_Part]]:
    """Connected components of ``mask`` (a crop at ``offset``): (kept parts superior → inferior, fragments)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return [], []
    sizes = np.bincount(labels.ravel())[1:]
    typical = float(np.median(sizes[sizes >= 0.2 * sizes.max()]))
    kept, fragments = [], []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        corner = np.array([s.start for s in box]) + offset
        part = _Part(kind, np.argwhere(labels[box] == k) + corner, spacing)
        (kept if sizes[k - 1] >= FRAGMENT_FRACTION * typical else fragments).append(part)
    kept.sort(key=lambda p: p.si)
    return kept, fragments


def _split_by_discs(body: _Part, discs: list[_Part]) -> list[_Part]:
    """``body`` cut by the planes of the discs whose centre lies inside it (none: ``[body]``)."""
    si = body.voxels[:, 0] * body.spacing[0]
    lo, hi = np.percentile(si, 15), np.percentile(si, 85)
    ap = body.points[:, 1]
    inside = [d for d in discs if lo < d.si < hi and ap.min() <= d.centroid[1] <= ap.max()]
    if not inside:
        return [body]
    side = np.zeros(len(body.voxels), int)
    for disc in inside:
        side += ((body.points - disc.centroid) @ disc.normal() > 0).astype(int)
    return [_Part("body", body.voxels[side == k], body.spacing) for k in range(len(inside) + 1) if np.any(side == k)]


def _split_by_erosion(body: _Part, max_iterations: int = 6) -> list[_Part]:
    """``body`` split where it narrows (erosion until two large cores appear, then regrown), or ``[body]``."""
    lo = body.voxels.min(axis=0)
    shape = tuple(body.voxels.max(axis=0) - lo + 3)
    mask = np.zeros(shape, bool)
    local = body.voxels - lo + 1
    mask[tuple(local.T)] = True
    for iterations in range(1, max_iterations + 1):
        cores, count = ndimage.label(ndimage.binary_erosion(mask, iterations=iterations))
        if count < 2:
            continue
        sizes = np.bincount(cores.ravel())[1:]
        big = np.flatnonzero(sizes >= 0.15 * sizes.sum()) + 1
        if len(big) < 2:
            continue
        seeds = np.where(np.isin(cores, big), cores, 0)
        _, nearest = ndimage.distance_transform_edt(seeds == 0, sampling=body.spacing, return_indices=True)
        owner = seeds[tuple(nearest[:, local[:, 0], local[:, 1], local[:, 2]])]
        return [_Part("body", body.voxels[owner == k], body.spacing) for k in big]
    return [body]


def _split_merged(bodies: list[_Part], discs: list[_Part], size_i: int) -> tuple[list[_Part], str]:
    """Bodies with merged neighbours split (at a disc, else where they narrow); a reason if one stays merged."""
    whole = [b.extent_mm for b in bodies if not b.touches(size_i)]
    if len(whole) < 3:
        return bodies, ""
    median = float(np.median(whole))
    out, problem = [], ""
    for index, body in enumerate(bodies):
        if body.extent_mm <= DISC_SPLIT_HEIGHT_RATIO * median:
            out.append(body)
            continue
        pieces = _split_by_discs(body, discs)
        if len(pieces) == 1 and body.extent_mm <= MERGED_HEIGHT_RATIO * median:
            out.append(body)
            continue
        lowest = index == len(bodies) - 1  # the sacrum is tall: split only at a disc
        if len(pieces) == 1 and not lowest:
            pieces = _split_by_erosion(body)
        if len(pieces) == 1 and not lowest and not body.touches(size_i):
            problem = (
                f"a vertebral body instance is {body.extent_mm:.0f} mm tall ({median:.0f} mm typical): merged bodies?"
            )
        out.extend(p for p in pieces if len(p.voxels) >= FRAGMENT_FRACTION * len(body.voxels) / len(pieces))
    out.sort(key=lambda p: p.si)
    return out, problem


def _spine_chain(bodies: list[_Part], discs: list[_Part]) -> tuple[list[_Part], list[_Part]]:
    """The longest run of bodies that follow each other along the spine, and the discs beside it."""
    if len(bodies) < 3:
        return bodies, discs
    centres = np.array([b.centroid for b in bodies])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    limit = 1.6 * float(np.median(steps))
    best, start = (0, 0), 0
    for i, step in enumerate([*steps, np.inf]):
        if step > limit:
            if i - start >= best[1] - best[0]:  # ties: the inferior run, which holds the anchor
                best = (start, i)
            start = i + 1
    chain = bodies[best[0] : best[1] + 1]
    centres = np.array([b.centroid for b in chain])
    near = [d for d in discs if np.min(np.linalg.norm(centres - d.centroid, axis=1)) <= limit]
    return chain, near


@dataclass
class _Naming:
    """Values for bodies and discs (0: unnamed), the anchor's confidence and the reason if uncertain."""

    body_values: list[int]
    disc_values: list[int]
    confidence: float = 0.0
    reason: str = ""
    evidence: dict[str, float] = field(default_factory=dict)
    note: str = ""  # said with a named result (e.g. bodies above a gap left unnamed)


MIN_LUMBOSACRAL_INCREMENT = 8.0  # the L5/S1 disc leans this much more than L4/L5 at least
MIN_LUMBOSACRAL_SCORE = 36.0  # tilt + increment
RUDIMENTARY_DISC_FRACTION = 0.3


def _name(bodies: list[_Part], discs: list[_Part], stray_discs: list[_Part]) -> _Naming:
    """Anchor on the sacrum and count up; uncertain with a reason when in doubt.

    The sacrum is the lowest body when no disc lies below it.  When exactly one disc lies below the
    lowest body and that disc leans like L5/S1, the lowest body is L5 and the (unsegmented) sacrum
    lies under that disc; the anchor's confidence is lower then.
    """
    naming = _Naming([0] * len(bodies), [0] * len(discs))
    first, between = _alternation(bodies, discs, naming)
    if naming.reason:
        return naming
    typical_disc = float(np.median([len(d.voxels) for d in discs]))
    below = [d for d in discs + stray_discs if d.si > bodies[-1].si and len(d.voxels) >= 0.1 * typical_disc]
    if _sacral_remnant(below, discs[between[-1][0]], typical_disc):
        below = []  # the rudimentary S1/S2 disc inside the sacrum: the lowest body is the sacrum
        naming.note = " ".join(filter(None, [naming.note, "a rudimentary disc inside the sacrum (S1/S2) is not named"]))
    sacrum_segmented = not below
    if sacrum_segmented:
        lowest, above = discs[between[-1][0]], discs[between[-2][0]]
    elif len(below) == 1 and any(d is below[0] for d in discs) and len(bodies) - first >= 3:
        lowest, above = below[0], discs[between[-1][0]]
    else:
        naming.reason = "a disc lies below the lowest vertebral body: the sacrum is not in the segmentation"
        return naming
    margin = _lumbosacral_margin(lowest, above, typical_disc, naming)
    if naming.reason:
        if not sacrum_segmented:
            naming.reason = "the sacrum is not in the segmentation and " + naming.reason
        return naming
    lumbar_and_above = len(bodies) - first - (1 if sacrum_segmented else 0)
    if lumbar_and_above > L5:
        naming.reason = f"{lumbar_and_above} vertebral bodies above the sacrum: more than C1..L5"
        return naming
    naming.confidence = round(0.5 + 0.5 * float(np.clip(margin, 0.0, 1.0)), 3)
    if not sacrum_segmented:
        naming.confidence = round(0.8 * naming.confidence, 3)
        naming.note = " ".join(
            filter(None, [naming.note, "the sacrum is not in the segmentation: L5/S1 recognised by the disc's lean"])
        )
    _assign_values(naming, bodies, discs, between, first, lowest_is_sacrum=sacrum_segmented, l5s1=lowest)
    return naming


def _alternation(bodies: list[_Part], discs: list[_Part], naming: _Naming) -> tuple[int, list[list[int]]]:
    """(first body counted, discs between consecutive bodies); sets ``naming.reason`` when too few."""
    if not bodies:
        naming.reason = "no vertebral body in the segmentation"
        return 0, []
    if not discs:
        naming.reason = "no intervertebral disc in the segmentation: the L5/S1 disc cannot be recognised"
        return 0, []
    if len(bodies) < 3:
        plural = "y" if len(bodies) == 1 else "ies"
        naming.reason = f"only {len(bodies)} vertebral bod{plural} in view: too few to recognise the sacrum"
        return 0, []
    between = [[k for k, d in enumerate(discs) if upper.si < d.si < lower.si] for upper, lower in pairwise(bodies)]
    # Count up from the sacrum only as far as bodies and discs alternate: above a gap nothing is named.
    irregular = [i for i, found in enumerate(between) if len(found) != 1]
    first = irregular[-1] + 1 if irregular else 0
    if irregular:
        gap = irregular[-1]
        what = "no disc" if not between[gap] else f"{len(between[gap])} discs"
        naming.note = (
            f"{what} between vertebral bodies {gap + 1} and {gap + 2} (counted from the top): "
            "a body or disc is missing or merged"
        )
        if len(bodies) - first < 3:
            naming.reason = naming.note
            return first, between
        unnamed = "body 1" if first == 1 else f"bodies 1..{first}"
        naming.note = f"{unnamed} (counted from the top) not named: {naming.note}"
    return first, between


def _leans_like_l5s1(lowest: _Part, above: _Part) -> tuple[float, float, bool]:
    """(tilt, tilt minus the disc above's, whether that is the lean of an L5/S1 disc)."""
    tilt = lowest.sagittal_tilt()
    increment = tilt - above.sagittal_tilt()
    ok = (
        MIN_SACRAL_SLOPE <= tilt <= MAX_SACRAL_SLOPE
        and increment >= MIN_LUMBOSACRAL_INCREMENT
        and tilt + increment >= MIN_LUMBOSACRAL_SCORE
    )
    return tilt, increment, ok


def _sacral_remnant(below: list[_Part], disc_above_lowest_body: _Part, typical_disc: float) -> bool:
    """Is the only disc below the lowest body the S1/S2 remnant (small, not leaning like L5/S1, while
    the disc above the lowest body does)?"""
    if len(below) != 1 or len(below[0].voxels) >= RUDIMENTARY_DISC_FRACTION * typical_disc:
        return False
    return not _leans_like_l5s1(below[0], disc_above_lowest_body)[2]


def _lumbosacral_margin(lowest: _Part, above: _Part, typical_disc: float, naming: _Naming) -> float:
    """How clearly ``lowest`` leans like an L5/S1 disc against ``above`` (≥ 0: it does); else a reason."""
    tilt, increment, leans_like_l5s1 = _leans_like_l5s1(lowest, above)
    naming.evidence = {"the L5/S1 disc leans": tilt, "more than L4/L5 by": increment}
    if not leans_like_l5s1:
        naming.reason = (
            f"the lowest disc leans {tilt:.0f}° ({increment:+.0f}° against the disc above), not like an L5/S1 "
            "disc: the sacrum is not recognised (cropped field of view?)"
        )
        return -1.0
    if len(lowest.voxels) < RUDIMENTARY_DISC_FRACTION * typical_disc:
        naming.reason = (
            "the lowest disc is rudimentary: possible transitional lumbosacral vertebra (L6 / sacralisation)"
        )
        return -1.0
    return min(
        (tilt - MIN_SACRAL_SLOPE) / 10.0,
        (increment - MIN_LUMBOSACRAL_INCREMENT) / 8.0,
        (tilt + increment - MIN_LUMBOSACRAL_SCORE) / 15.0,
    )


def _assign_values(
    naming: _Naming,
    bodies: list[_Part],
    discs: list[_Part],
    between: list[list[int]],
    first: int,
    lowest_is_sacrum: bool,
    l5s1: _Part,
) -> None:
    """VerSe values counted up from the sacrum (the lowest body) or from L5 (sacrum not segmented)."""
    count = len(bodies) - first
    if lowest_is_sacrum:
        naming.body_values = [0] * first + [L5 - (count - 2 - i) for i in range(count - 1)] + [S1]
    else:
        naming.body_values = [0] * first + [L5 - (count - 1 - i) for i in range(count)]
        naming.disc_values[next(k for k, d in enumerate(discs) if d is l5s1)] = DISC_OFFSET + L5
    for i in range(first, len(between)):
        naming.disc_values[between[i][0]] = DISC_OFFSET + naming.body_values[i]
    top = [k for k, d in enumerate(discs) if d.si < bodies[0].si]
    if top and first == 0 and naming.body_values[0] > 1:
        naming.disc_values[top[-1]] = DISC_OFFSET + naming.body_values[0] - 1


# --- the result --------------------------------------------------------------------------------
def _input(labels: Volume | np.ndarray, geometry: Geometry | None) -> tuple[np.ndarray, Geometry]:
    if isinstance(labels, Volume):
        return np.asarray(labels.array), geometry or labels.geometry
    array = np.asarray(labels)
    if array.ndim != 3:
        raise InputError(f"levels need a 3-D label map, got an array of shape {array.shape}")
    if geometry is None:
        raise InputError("levels need the label map's geometry (spacing and orientation): pass a Volume or geometry=")
    if tuple(array.shape) != geometry.shape:
        raise InputError(f"label map shape {array.shape} differs from its geometry {geometry.shape} (z, y, x)")
    return array, geometry


def _to_original_index(point: np.ndarray, reorientation: Any, canonical_shape: tuple[int, ...]) -> tuple:
    """A canonical array index (float) as an index of the original array."""
    original = np.zeros(3)
    for n in range(3):
        value = canonical_shape[n] - 1 - point[n] if reorientation.flips[n] else point[n]
        original[reorientation.axes[n]] = value
    return tuple(round(float(v), 2) for v in original)


def _bounding_box(array: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every non-zero voxel (an empty box when there is none)."""
    box = []
    for axis in range(array.ndim):
        hit = np.flatnonzero(np.any(array, axis=tuple(a for a in range(array.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def _height(part: _Part, axis: np.ndarray) -> float:
    """Extent (mm) of ``part`` along the unit vector ``axis`` (1st to 99th percentile, plus a voxel)."""
    projection = part.points @ axis
    lo, hi = np.percentile(projection, (1, 99))
    return round(float(hi - lo + np.abs(axis) @ part.spacing), 2)


def _spine_axes(bodies: list[_Part]) -> list[np.ndarray]:
    """The local superior → inferior direction of the spine at each body (from its neighbours)."""
    centres = [b.centroid for b in bodies]
    axes = []
    for i in range(len(bodies)):
        a, b = centres[max(i - 1, 0)], centres[min(i + 1, len(bodies) - 1)]
        d = b - a if len(bodies) > 1 else np.array([1.0, 0.0, 0.0])
        axes.append(d / (np.linalg.norm(d) or 1.0))
    return axes


def identify_levels(labels: Volume | np.ndarray, geometry: Geometry | None = None) -> LevelResult:
    """Name every vertebral body (class 1, lesions inside included) and disc (class 2) of a class map.

    ``labels``: a class-map :class:`Volume` (or a ``(z, y, x)`` array with its ``geometry``).
    The result is ``named`` with a level map (same grid) or ``uncertain`` with the reason and an
    all-zero level map; its instances are listed superior → inferior either way.
    """
    array, geometry = _input(labels, geometry)
    reorientation, canonical_geometry = reorientation_to(geometry)
    canonical = reorientation.forward(array)
    spacing = np.asarray(canonical_geometry.spacing_zyx, float)
    size_i = canonical.shape[0]
    box = _bounding_box(canonical)
    crop, offset = canonical[box], np.array([s.start for s in box])
    bodies, _ = _parts(np.isin(crop, (VERTEBRAL_BODY, LESION)), "body", spacing, offset)
    discs, stray = _parts(crop == INTERVERTEBRAL_DISC, "disc", spacing, offset)
    bodies, merged = _split_merged(bodies, discs, size_i)
    chain, kept_discs = _spine_chain(bodies, discs)
    stray = stray + [d for d in discs if not any(d is k for k in kept_discs)]
    naming = _name(chain, kept_discs, stray)
    if merged and not naming.reason:
        naming = _Naming([0] * len(chain), [0] * len(kept_discs), reason=merged)
    if naming.reason:
        naming.body_values = [0] * len(chain)
        naming.disc_values = [0] * len(kept_discs)
    parts = sorted(zip(chain + kept_discs, naming.body_values + naming.disc_values), key=lambda pv: pv[0].si)
    level_map = np.zeros(canonical.shape, np.uint8)
    instance_map = np.zeros(canonical.shape, np.uint16)
    body_axes = dict(zip((id(b) for b in chain), _spine_axes(chain)))
    has_l6 = L6 in naming.body_values
    instances = []
    for number, (part, value) in enumerate(parts, start=1):
        index = tuple(part.voxels.T)
        instance_map[index] = number
        if value:
            own = canonical[index] == (VERTEBRAL_BODY if part.kind == "body" else INTERVERTEBRAL_DISC)
            level_map[tuple(part.voxels[own].T)] = value
        axis = body_axes.get(id(part), part.normal() if part.kind == "disc" else np.array([1.0, 0.0, 0.0]))
        cropped = part.touches(size_i)
        confidence = naming.confidence * (0.8 if cropped else 1.0) if value else 0.0
        instances.append(
            LevelInstance(
                kind=part.kind,
                value=int(value),
                name=level_name(value, has_l6) if value else "",
                voxels=len(part.voxels),
                volume_mm3=round(float(len(part.voxels) * np.prod(spacing)), 1),
                height_mm=_height(part, axis),
                centroid=_to_original_index(part.voxels.mean(axis=0), reorientation, canonical.shape),
                confidence=round(confidence, 3),
                cropped=cropped,
            )
        )
    status = UNCERTAIN if naming.reason else NAMED
    evidence = ", ".join(f"{k} {v:.0f}°" for k, v in naming.evidence.items())
    reason = naming.reason or f"anchored on the sacrum: {evidence}" + (f"; {naming.note}" if naming.note else "")
    return LevelResult(
        level_map=np.ascontiguousarray(reorientation.inverse(level_map)),
        instances=instances,
        status=status,
        reason=reason,
        geometry=geometry,
        instance_map=np.ascontiguousarray(reorientation.inverse(instance_map)),
    )


# --- corrections ---------------------------------------------------------------------------------
def _with_values(
    result: LevelResult, values: list[int], status: str, reason: str, confidence: float | None
) -> LevelResult:
    """``result`` with new instance values (the level map follows through the instance map)."""
    if result.instance_map is None:
        raise InputError("this level result has no instance map: levels cannot be changed")
    lookup = np.zeros(len(result.instances) + 1, np.int32)
    old = np.zeros(len(result.instances) + 1, np.int32)
    has_l6 = L6 in [v for v, i in zip(values, result.instances) if i.kind == "body"]
    instances = []
    for number, (instance, value) in enumerate(zip(result.instances, values), start=1):
        lookup[number], old[number] = value, instance.value
        kept = instance.confidence if confidence is None else confidence
        instances.append(
            replace(
                instance,
                value=value,
                name=level_name(value, has_l6) if value else "",
                confidence=kept if value else 0.0,
            )
        )
    level_map = np.zeros_like(result.level_map)
    ids = result.instance_map
    if status == NAMED:
        carries = (result.level_map > 0) | (old[ids] == 0)  # only voxels that carried (or could carry) a level
        level_map = np.where((ids > 0) & carries, lookup[ids], 0).astype(result.level_map.dtype)
    return replace(result, level_map=level_map, instances=instances, status=status, reason=reason)


def renumber(result: LevelResult, shift: int) -> LevelResult:
    """Every body and disc moved ``shift`` levels down the spine (+1: L3 → L4) or up (-1: L3 → L2).

    Levels follow C1..C7, T1..T12, L1..L5, S1 (L6 only where the result already has one), so -1
    turns S1 into L5 and L5/S1 into L4/L5.  A correction by a person: the result is ``named``
    with confidence 1 and its reason says so.
    """
    shift = int(shift)
    if not result.named:
        raise InputError(f"levels are uncertain ({result.reason}): nothing to renumber")
    has_l6 = any(i.value == L6 for i in result.instances)
    sequence = list(range(1, S1 + 1)) if has_l6 else [*range(1, L5 + 1), S1]
    values = []
    for instance in result.instances:
        if not instance.value:
            values.append(0)
            continue
        disc = instance.kind == "disc"
        position = sequence.index(instance.value - DISC_OFFSET if disc else instance.value) + shift
        if not 0 <= position < len(sequence) - (1 if disc else 0):
            raise InputError(f"renumbering {instance.name} by {shift:+d} leaves C1..S1")
        values.append(sequence[position] + (DISC_OFFSET if disc else 0))
    reason = f"renumbered by {shift:+d} by hand (was: {result.reason})"
    return _with_values(result, values, NAMED, reason, 1.0)


def mark_uncertain(result: LevelResult, reason: str) -> LevelResult:
    """The result with no names and ``reason`` (e.g. "checked by hand: transitional L5")."""
    reason = str(reason).strip() or "marked uncertain by hand"
    return _with_values(result, [0] * len(result.instances), UNCERTAIN, reason, 0.0)


# --- files ---------------------------------------------------------------------------------------
def sidecar_path(level_map_path: str | os.PathLike) -> Path:
    """The JSON sidecar beside a level map: ``levels.nii.gz`` → ``levels.json``."""
    from .io import strip_suffix

    path = Path(level_map_path)
    return path.with_name(strip_suffix(path) + ".json")


def result_record(result: LevelResult) -> dict[str, Any]:
    """The JSON record of a result: status, reason, ``value → name`` and every instance."""
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "status": result.status,
        "uncertain": not result.named,
        "reason": result.reason,
        "labels": {str(i.value): i.name for i in result.instances if i.value},
        "confidence": {str(i.value): i.confidence for i in result.instances if i.value},
        "instances": [asdict(i) for i in result.instances],
    }


def write_levels(result: LevelResult, path: str | os.PathLike, reference: Volume | Geometry | None = None) -> Path:
    """Write the level map (format from the suffix, like ``-o``) and its JSON sidecar; returns the sidecar.

    The level map carries an instance numbering for corrections only through the sidecar: the map
    itself holds level values (0 while uncertain).
    """
    from .io import atomic_path, write_labels

    geometry = reference.geometry if isinstance(reference, Volume) else reference or result.geometry
    if geometry is None:
        raise InputError(f"{path}: a level map needs the study geometry to be written")
    write_labels(result.level_map, path, geometry)
    sidecar = sidecar_path(path)
    record = result_record(result)
    try:
        with atomic_path(sidecar) as temp:
            temp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise VolumeWriteError(f"{sidecar}: cannot write ({error.strerror or error})") from None
    return sidecar


def read_levels(path: str | os.PathLike) -> LevelResult:
    """A level map and its sidecar read back (instances, status and reason as written)."""
    from .io import read_volume

    path = Path(path)
    sidecar = sidecar_path(path)
    volume = read_volume(path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VolumeReadError(f"{sidecar}: the level map's JSON sidecar is missing") from None
    except (OSError, ValueError) as error:
        raise VolumeReadError(f"{sidecar}: not a readable levels sidecar ({error})") from None
    try:
        return result_from_record(record, volume.array, volume.geometry)
    except InputError as error:
        raise VolumeReadError(f"{sidecar}: {error}") from None


def result_from_record(record: Any, level_map: np.ndarray, geometry: Geometry | None = None) -> LevelResult:
    """A :class:`LevelResult` from its JSON record (:func:`result_record`) and level map (the sidecar
    and the map of :func:`write_levels`, or a napari levels layer's metadata and data)."""
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise InputError("not a spineseg levels sidecar")
    try:
        instances = [
            LevelInstance(**{**item, "centroid": tuple(item["centroid"])}) for item in record.get("instances", [])
        ]
        status, reason = str(record["status"]), str(record["reason"])
    except (KeyError, TypeError) as error:
        raise InputError(f"incomplete levels sidecar ({error})") from None
    level_map = np.asarray(level_map)
    return LevelResult(level_map, instances, status, reason, geometry, _instance_map(level_map, instances))


def _instance_map(level_map: np.ndarray, instances: list[LevelInstance]) -> np.ndarray | None:
    """Instance numbers recovered from a named level map (one instance per value); ``None`` if unnamed."""
    if not any(i.value for i in instances):
        return None
    lookup = np.zeros(DISC_OFFSET + S1 + 1, np.uint16)
    for number, instance in enumerate(instances, start=1):
        if instance.value:
            lookup[instance.value] = number
    return lookup[np.clip(level_map, 0, len(lookup) - 1)]


# --- reports -------------------------------------------------------------------------------------
MATCH_MM = 10.0  # a review structure and a level instance are one when their centres are this close (S-I)


def name_review(review: Any, result: LevelResult) -> tuple[Any, str]:
    """A :class:`~napari_spineseg.review.LabelReview` with anatomical names (``"L3"``, ``"L4/L5"``,
    lesions "in L3") where ``result`` is named, and the sentence saying how levels were named."""
    from dataclasses import replace as _replace

    if not result.named or result.geometry is None:
        note = (
            f"Levels uncertain ({result.reason}): counted from the most superior labelled vertebral body "
            "(body 1) downwards, not anatomically identified."
        )
        return review, note
    centres = np.array([i.centroid[::-1] for i in result.instances], float).reshape(-1, 3)
    superior = result.geometry.index_to_lps(centres)[:, 2] if len(centres) else np.zeros(0)
    renamed, used, new_names = [], set(), {}
    for structure in review.levels:
        kind = "body" if structure.value == VERTEBRAL_BODY else "disc"
        candidates = [
            (abs(superior[k] - structure.superior_mm), k)
            for k, instance in enumerate(result.instances)
            if instance.kind == kind and instance.value and k not in used
        ]
        distance, best = min(candidates, default=(np.inf, -1))
        if distance <= MATCH_MM:
            used.add(best)
            new_names[structure.name] = result.instances[best].name
            structure = _replace(structure, name=result.instances[best].name)
        renamed.append(structure)
    lesions = [_replace(x, host=new_names.get(x.host, x.host)) if x.host else x for x in review.lesions]
    confidence = min((i.confidence for i in result.instances if i.value), default=0.0)
    note = f"Levels named anatomically, {result.reason} (lowest confidence {confidence:.2f})."
    return _replace(review, levels=renamed, lesions=lesions), note


# --- DICOM-SEG -----------------------------------------------------------------------------------
def _pydicom_level_code(name: str) -> tuple[str, str, str] | None:
    """pydicom's bundled SNOMED CT concept for a level (``L3Vertebra``, ``L4L5Disc``, ``Sacrum``), if any."""
    from pydicom.sr.codedict import codes

    keyword = "Sacrum" if name == "S1" else name.replace("/", "") + ("Disc" if "/" in name else "Vertebra")
    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        return None
    return (str(code.value), str(code.scheme_designator), str(code.meaning))


def level_classes(result: LevelResult) -> list[Any]:
    """One :class:`~napari_spineseg.schema.LabelClass` per named level (value, ``"L3"``, colour)."""
    from .schema import LabelClass

    colours = ((0.90, 0.75, 0.20, 1.0), (0.95, 0.55, 0.15, 1.0), (0.80, 0.85, 0.25, 1.0))
    return [
        LabelClass(i.value, i.name, (0.20, 0.60, 1.00, 1.0) if i.kind == "disc" else colours[i.value % 3])
        for i in result.instances
        if i.value
    ]


def write_levels_dicom_seg(
    result: LevelResult, source: Any, path: str | os.PathLike, model_metadata: Any = None
) -> Path:
    """The level map as a DICOM Segmentation: one segment per named level, labelled ``"L3"``,
    ``"L4/L5"``, coded with pydicom's SNOMED CT concept of that level where it has one (else the
    generic vertebral body / intervertebral disc concept; the level stays in the segment label).
    ``source`` is the study's DICOM series (see :func:`~napari_spineseg.dicomseg.write_dicom_seg`)."""
    from .dicomseg import SEGMENT_CODES, SegmentCoding, write_dicom_seg

    if not result.named:
        raise InputError(f"levels are uncertain ({result.reason}): no level to export")
    if result.geometry is None:
        raise InputError("the level result has no geometry")
    codings = {}
    for instance in result.instances:
        if instance.value:
            generic = SEGMENT_CODES["vertebral body" if instance.kind == "body" else "intervertebral disc"]
            code = _pydicom_level_code(instance.name)
            codings[instance.value] = SegmentCoding(generic.category, code) if code else generic
    levels = Volume(result.level_map, result.geometry, name="levels")
    return write_dicom_seg(
        levels, source, path, classes=level_classes(result), model_metadata=model_metadata, codings=codings
    )
