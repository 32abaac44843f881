"""Layer data for napari from core objects: one place that maps geometry to scale/translate.

A layer's ``scale`` is the voxel spacing and its ``translate`` the origin, both in the layer's
(z, y, x) axis order; the full geometry (incl. direction cosines) rides in ``metadata`` so a
writer can put labels back on the exact voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .schema import DEFAULT_CLASSES, LabelClass, color_dict, extend_classes
from .volume import Geometry, Volume

GEOMETRY_KEY = "spineseg_geometry"
CLASSES_KEY = "spineseg_classes"


def _placement(volume: Volume) -> dict[str, Any]:
    geometry = volume.geometry
    from .orientation import orientation_code

    return {
        "scale": geometry.spacing_zyx,
        "translate": geometry.origin_zyx,
        "metadata": {
            GEOMETRY_KEY: geometry.to_dict(),
            "orientation": orientation_code(geometry.direction),
            "source": str(volume.path) if volume.path else None,
            **{k: v for k, v in volume.metadata.items() if k in ("format", "dicom", "warnings", "series_id")},
        },
    }


def image_layer_data(volume: Volume) -> tuple[np.ndarray, dict[str, Any], str]:
    """``(data, kwargs, "image")`` for a study."""
    array = volume.array
    low, high = np.percentile(array, [0.5, 99.5]) if array.size else (0, 1)
    kwargs = {"name": volume.name, "colormap": "gray", "contrast_limits": (float(low), float(max(high, low + 1e-6)))}
    kwargs.update(_placement(volume))
    return array, kwargs, "image"


def label_features(classes: Sequence[LabelClass]) -> dict[str, list]:
    """A features table (``index`` = label value) naming each class, as napari Labels expect."""
    return {"index": [c.value for c in classes], "name": [c.name for c in classes]}


def labels_layer_data(
    volume: Volume, classes: Sequence[LabelClass] = DEFAULT_CLASSES, name: str | None = None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """``(data, kwargs, "labels")`` with the schema's names and fixed colours."""
    from napari.utils.colormaps import DirectLabelColormap

    values = np.unique(volume.array)
    classes = extend_classes(classes, [int(v) for v in values])
    kwargs = {
        "name": name or volume.name,
        "colormap": DirectLabelColormap(color_dict=color_dict(classes)),
        "features": label_features(classes),
    }
    kwargs.update(_placement(volume))
    kwargs["metadata"][CLASSES_KEY] = [c.to_dict() for c in classes]
    return volume.array, kwargs, "labels"


def geometry_from_layer(layer_or_meta: Any, shape: Sequence[int]) -> Geometry:
    """The voxel geometry of a layer: the recorded one when present, else from scale/translate."""
    meta = (
        layer_or_meta
        if isinstance(layer_or_meta, dict)
        else {
            "metadata": layer_or_meta.metadata,
            "scale": layer_or_meta.scale,
            "translate": layer_or_meta.translate,
        }
    )
    recorded = (meta.get("metadata") or {}).get(GEOMETRY_KEY)
    if recorded:
        return Geometry.from_dict(recorded)
    scale = meta.get("scale")
    translate = meta.get("translate")
    scale = tuple(scale)[-3:] if scale is not None else (1.0, 1.0, 1.0)
    translate = tuple(translate)[-3:] if translate is not None else (0.0, 0.0, 0.0)
    return Geometry(tuple(shape)[::-1], scale[::-1], translate[::-1])


def classes_from_layer(layer: Any) -> list[LabelClass]:
    """The label classes recorded on a Labels layer (schema defaults when none)."""
    recorded = (getattr(layer, "metadata", None) or {}).get(CLASSES_KEY)
    if recorded:
        return [LabelClass.from_dict(c) for c in recorded]
    return list(DEFAULT_CLASSES)
