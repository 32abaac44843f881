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


def follows_schema(array: np.ndarray, classes: Sequence[LabelClass] = DEFAULT_CLASSES) -> bool:
    """True when every value of a label map is a class of ``classes`` (so schema names apply).

    Instance or level maps (e.g. the lumbar datasets' L1..L5 ids 1..5, or 1..N bodies) use values
    beyond the schema and must not be shown as "lesion" and the like.
    """
    known = {c.value for c in classes}
    return bool(set(np.unique(array).tolist()) <= known)


def labels_layer_data(
    volume: Volume, classes: Sequence[LabelClass] | None = DEFAULT_CLASSES, name: str | None = None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """``(data, kwargs, "labels")`` with class names and fixed colours.

    ``classes=None`` marks a map that does not follow the schema (instance/level ids): values
    are named ``label N`` and coloured by napari's default cycle.
    """
    from napari.utils.colormaps import DirectLabelColormap

    values = np.unique(volume.array)
    if classes is None:
        generic = [LabelClass(int(v), "background" if v == 0 else f"label {int(v)}", (0, 0, 0, 0)) for v in values]
        kwargs = {"name": name or volume.name, "features": label_features(generic)}
        kwargs.update(_placement(volume))
        kwargs["metadata"]["spineseg_schema"] = False
        return volume.array, kwargs, "labels"
    classes = extend_classes(classes, [int(v) for v in values])
    kwargs = {
        "name": name or volume.name,
        "colormap": DirectLabelColormap(color_dict=color_dict(classes)),
        "features": label_features(classes),
    }
    kwargs.update(_placement(volume))
    kwargs["metadata"][CLASSES_KEY] = [c.to_dict() for c in classes]
    kwargs["metadata"]["spineseg_schema"] = True
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


LEVELS_KEY = "spineseg_levels"


def levels_layer_data(result: Any, name: str = "levels") -> tuple[np.ndarray, dict[str, Any], str]:
    """``(data, kwargs, "labels")`` of a :class:`~napari_spineseg.levels.LevelResult`: level values
    named in ``features`` (hover and legend show ``"L3"``, ``"L4/L5"``), the result's JSON record
    (status, reason, instances) in ``metadata``."""
    from napari.utils.colormaps import DirectLabelColormap

    from .levels import level_classes, result_record

    if result.geometry is None:
        raise ValueError("a level result without geometry cannot be placed")
    classes = [LabelClass(0, "background", (0.0, 0.0, 0.0, 0.0)), *level_classes(result)]
    colours = {c.value: c.color for c in classes}
    colours[None] = (0.0, 0.0, 0.0, 0.0)
    kwargs = {
        "name": name,
        "colormap": DirectLabelColormap(color_dict=colours),
        "features": label_features(classes),
        "opacity": 0.6,
    }
    kwargs.update(_placement(Volume(result.level_map, result.geometry, name)))
    kwargs["metadata"][LEVELS_KEY] = result_record(result)
    kwargs["metadata"]["spineseg_schema"] = False
    return result.level_map, kwargs, "labels"
