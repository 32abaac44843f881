"""Training cases as one compact NumPy archive: train where SimpleITK and the NIfTI folders are not.

A GPU machine may lack SimpleITK and take little data along (tens of MiB).  :func:`pack_cases`
writes the lumbar training cases to one ``.npz``: per case the image and schema labels cropped to
the labelled voxels plus a margin (``IGNORE`` outside the labelled superior–inferior span, as
:func:`~napari_spineseg.training.data.load_case` makes them), the intensities in their own integer
type when they are integral, and the geometry of the crop (origin moved to the crop's first voxel,
spacing and direction kept), so slicing in canonical orientation is exactly as from the files.
:func:`load_packed_cases` reads it back with NumPy alone; ``spineseg train --data cases.npz``
accepts it in place of the ``lumbar-mri`` folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..schema import IGNORE
from ..volume import Geometry, Volume
from .data import TrainingCase

__all__ = ["PACK_FORMAT", "crop_to_labels", "load_packed_cases", "pack_cases"]

PACK_FORMAT = "napari-spineseg-packed-cases"


def crop_to_labels(case: TrainingCase, margin_mm: float = 40.0) -> TrainingCase:
    """``case`` cropped to the bounding box of its ground-truth voxels grown by ``margin_mm``."""
    truth = (case.labels.array != IGNORE) & (case.labels.array != 0)
    if not truth.any():
        return case
    spacing = case.labels.geometry.spacing_zyx
    bounds = []
    for axis, coords in enumerate(np.nonzero(truth)):
        grow = int(np.ceil(margin_mm / spacing[axis]))
        bounds.append((max(0, int(coords.min()) - grow), min(truth.shape[axis], int(coords.max()) + grow + 1)))
    window = tuple(slice(lo, hi) for lo, hi in bounds)
    geometry = _cropped_geometry(case.image.geometry, [lo for lo, _ in bounds], truth[window].shape)
    image = Volume(np.ascontiguousarray(case.image.array[window]), geometry, case.image.name, case.image.path)
    labels = Volume(np.ascontiguousarray(case.labels.array[window]), geometry, case.labels.name, case.labels.path)
    return TrainingCase(image, labels, set(case.known_classes), case.patient, case.dataset, case.case_id, case.paths)


def _cropped_geometry(geometry: Geometry, start_zyx: Sequence[int], shape_zyx: tuple[int, ...]) -> Geometry:
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    start_xyz = np.array(start_zyx[::-1], dtype=float) * np.asarray(geometry.spacing, dtype=float)
    origin = np.asarray(geometry.origin, dtype=float) + direction @ start_xyz
    return Geometry(tuple(int(n) for n in shape_zyx[::-1]), geometry.spacing, tuple(origin), geometry.direction)


def _compact_image(array: np.ndarray) -> np.ndarray:
    """The image in the smallest integer type that holds it exactly, else float32."""
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
        low, high = float(array.min()), float(array.max())
        for dtype in (np.uint8, np.uint16, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return array.astype(dtype)
    return array.astype(np.float32)


def pack_cases(cases: Iterable[TrainingCase], path: str | os.PathLike, margin_mm: float = 40.0) -> Path:
    """Write ``cases`` (cropped with :func:`crop_to_labels`) to one compressed ``.npz``; returns its path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"{path}: a packed dataset is a .npz file")
    arrays: dict[str, np.ndarray] = {}
    records = []
    for index, case in enumerate(cases):
        cropped = crop_to_labels(case, margin_mm)
        arrays[f"image_{index}"] = _compact_image(cropped.image.array)
        arrays[f"labels_{index}"] = cropped.labels.array.astype(np.uint8)
        records.append(
            {
                "case_id": case.case_id,
                "patient": case.patient,
                "dataset": case.dataset,
                "known_classes": sorted(case.known_classes),
                "geometry": cropped.image.geometry.to_dict(),
            }
        )
    if not records:
        raise InputError("no cases to pack")
    arrays["index"] = np.frombuffer(json.dumps({"format": PACK_FORMAT, "cases": records}).encode(), dtype=np.uint8)
    temporary = path.with_name(f".{path.name}.partial.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(temporary, **arrays)
    os.replace(temporary, path)
    return path


def load_packed_cases(
    path: str | os.PathLike, datasets: Sequence[str] | None = None, cases: Iterable[str] | None = None
) -> list[TrainingCase]:
    """The cases of a packed ``.npz`` (optionally only ``datasets`` / case ids ``cases``)."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        index = json.loads(bytes(archive["index"]).decode())
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path}: not a readable packed dataset ({error})") from None
    if index.get("format") != PACK_FORMAT:
        raise InputError(f"{path}: not a napari-spineseg packed dataset")
    wanted = None if cases is None else set(cases)
    result = []
    for number, record in enumerate(index["cases"]):
        if datasets is not None and record["dataset"] not in datasets:
            continue
        if wanted is not None and record["case_id"] not in wanted:
            continue
        geometry = Geometry.from_dict(record["geometry"])
        name = record["case_id"]
        image = Volume(archive[f"image_{number}"].astype(np.float32), geometry, name, path)
        labels = Volume(archive[f"labels_{number}"], geometry, f"{name} labels", path)
        result.append(
            TrainingCase(image, labels, set(record["known_classes"]), record["patient"], record["dataset"], name)
        )
    if wanted is not None and wanted - {c.case_id for c in result}:
        raise InputError(f"cases not found in {path}: {', '.join(sorted(wanted - {c.case_id for c in result}))}")
    return result
