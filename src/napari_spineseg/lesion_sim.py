"""Simulated hemangioma-like lesions inside the vertebral bodies of real studies.

No labelled tumour/hemangioma MRI could be obtained, so lesion work here is honest about it:
this module plants *simulated* lesions in real anatomy (for tests and benchmarks of adding a
lesion class by fine-tuning); every result derived from it must be labelled "simulated".

A vertebral hemangioma is fatty and vascular: bright on T1 and on T2, with thickened vertical
trabeculae that look like dark dots on axial slices ("polka-dot") and dark stripes on sagittal
and coronal slices ("corduroy").  The simulator reproduces that: an ellipsoid inside one body
(at least its radius away from the body surface), intensity raised relative to the body's own
marrow, crossed by dark columns running superior–inferior, blended with a partial-volume edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError
from .orientation import Plane, plane_array_axis
from .schema import LESION, VERTEBRAL_BODY
from .volume import Volume


@dataclass(frozen=True)
class SimulatedLesion:
    """Where a lesion was planted: centre (array index z, y, x), radii (mm), body component, voxels."""

    centre_index: tuple[int, int, int]
    radii_mm: tuple[float, float, float]
    body_component: int
    voxels: int
    gain: float


def simulate_hemangioma(
    image: Volume,
    labels: Volume,
    rng: np.random.Generator,
    diameter_mm: tuple[float, float] = (8.0, 16.0),
    gain: tuple[float, float] = (1.5, 1.9),
    body_value: int = VERTEBRAL_BODY,
    lesion_value: int = LESION,
    component: int | None = None,
) -> tuple[Volume, Volume, SimulatedLesion]:
    """Plant one hemangioma-like lesion in a vertebral body; returns new image, labels and a record.

    ``labels`` marks vertebral bodies with ``body_value``; the lesion is labelled
    ``lesion_value`` (it replaces body voxels only).  ``component`` picks a body (1-based, in
    label order), otherwise one large enough is drawn at random.
    """
    if image.shape != labels.shape:
        raise InputError(f"image {image.shape} and labels {labels.shape} differ in shape")
    spacing = np.asarray(image.geometry.spacing_zyx)
    bodies, count = ndimage.label(labels.array == body_value)
    if count == 0:
        raise InputError(f"{labels.name}: no vertebral body (label {body_value}) to place a lesion in")
    radius = rng.uniform(*diameter_mm) / 2.0
    radii = radius * rng.uniform(0.8, 1.2, size=3)
    # Distance (mm) from every body voxel to the body surface: the centre must be deeper than the lesion.
    sizes = ndimage.sum_labels(np.ones_like(bodies), bodies, index=np.arange(1, count + 1))
    candidates = [component] if component is not None else [i + 1 for i in np.flatnonzero(sizes > 0.2 * sizes.max())]
    order = rng.permutation(len(candidates))
    boxes = ndimage.find_objects(bodies)
    for pick in (candidates[i] for i in order):
        region = boxes[pick - 1]
        margin = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in region)
        body = bodies[margin] == pick
        depth = ndimage.distance_transform_edt(body, sampling=spacing)
        inner = np.argwhere(depth >= 0.9 * radii.min())
        if len(inner):
            break
    else:
        raise InputError(f"{labels.name}: no vertebral body is deep enough for a {2 * radius:.0f} mm lesion")
    centre_local = inner[rng.integers(len(inner))]
    centre = tuple(int(c + m.start) for c, m in zip(centre_local, margin))

    # Ellipsoid with a one-voxel partial-volume edge, evaluated in a box around the centre.
    half = np.ceil(radii / spacing).astype(int) + 2
    box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, half, image.shape))
    grids = np.meshgrid(
        *[(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(box, centre, spacing)], indexing="ij"
    )
    rho = np.sqrt(sum((g / r) ** 2 for g, r in zip(grids, radii)))
    soft = np.clip((1.0 - rho) * radius / spacing.min() + 0.5, 0.0, 1.0)
    inside_body = bodies[box] == pick
    soft *= inside_body

    # Trabecular columns along S–I: dark dots in the axial plane, stripes in the others.
    axial_axis = plane_array_axis(image.geometry, Plane.AXIAL)
    in_plane = [a for a in range(3) if a != axial_axis]
    shape2 = [soft.shape[a] for a in in_plane]
    dots = np.zeros(shape2, np.float32)
    n_dots = max(3, int(rng.poisson(np.prod(np.asarray(shape2) * spacing[in_plane]) / 12.0)))
    dots[tuple(rng.integers(0, s, size=n_dots) for s in shape2)] = 1.0
    sigma = 0.8 / spacing[in_plane]
    dots = ndimage.gaussian_filter(dots, sigma) * (2 * np.pi * np.prod(sigma))
    columns = np.expand_dims(np.clip(dots, 0, 1), axis=axial_axis)

    array = image.array.astype(np.float32, copy=True)
    marrow = float(np.median(image.array[bodies == pick]))
    lesion_gain = float(rng.uniform(*gain))
    texture = marrow * lesion_gain * (1.0 - 0.55 * columns)
    texture = texture * (1.0 + 0.05 * rng.standard_normal(soft.shape))
    array[box] = array[box] * (1.0 - soft) + texture * soft
    if np.issubdtype(image.array.dtype, np.integer):
        info = np.iinfo(image.array.dtype)
        array = np.clip(np.rint(array), info.min, info.max).astype(image.array.dtype)
    new_labels = labels.array.copy()
    hard = (soft >= 0.5) & inside_body
    new_labels[box][hard] = lesion_value
    record = SimulatedLesion(centre, tuple(float(r) for r in radii), int(pick), int(hard.sum()), lesion_gain)
    return (
        image.with_array(array, name=f"{image.name} (simulated lesion)"),
        labels.with_array(new_labels, name=f"{labels.name} (simulated lesion)"),
        record,
    )
