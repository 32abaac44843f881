"""The levels layer in the Review widget: find it, read its LevelResult, correct it, go to a level.

A levels layer (``_napari_layers.levels_layer_data``) holds the level map as data and the result's
JSON record under ``LEVELS_KEY`` in its metadata; the :class:`~napari_spineseg.levels.LevelResult`
is rebuilt from both each time, so painting on the layer is respected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._napari_layers import LEVELS_KEY, geometry_from_layer, levels_layer_data
from ._layer_data import RESULT_KEY, is_kind


def is_levels_layer(layer: Any) -> bool:
    """A layer made by ``levels_layer_data`` (the Segment widget's "<study> levels")."""
    return is_kind(layer, "labels") and LEVELS_KEY in (getattr(layer, "metadata", None) or {})


def levels_layer_for(viewer: Any, layer: Any) -> Any:
    """The levels layer of a reviewed Labels layer: itself when it is one, else the levels layer of
    the same study (named "<study> levels"), else the last one on the same voxel grid; ``None``."""
    if layer is None:
        return None
    if is_levels_layer(layer):
        return layer
    shape = tuple(layer.data.shape)
    candidates = [la for la in viewer.layers if is_levels_layer(la) and tuple(la.data.shape) == shape]
    image = ((layer.metadata or {}).get(RESULT_KEY) or {}).get("image")
    named = [la for la in candidates if image and la.name == f"{image} levels"]
    return (named or candidates or [None])[-1]


def result_from_layer(layer: Any) -> Any:
    """The layer's :class:`~napari_spineseg.levels.LevelResult` (its data is the level map)."""
    from ..levels import result_from_record

    data = np.asarray(layer.data)
    return result_from_record(layer.metadata[LEVELS_KEY], data, geometry_from_layer(layer, data.shape))


def apply_result(layer: Any, result: Any) -> int:
    """Put a corrected result on its layer as one step of the layer's undo history: the changed
    voxels, the features (names on hover and in the legend), colours and the JSON record; Ctrl+Z
    gives back the voxels and, with them, the names, colours and record of before.

    Returns the number of voxels changed.
    """
    from ..interpolation import LabelChange
    from ._undo import plugin_edit, plugin_step

    old = np.asarray(layer.data)
    new = np.asarray(result.level_map, dtype=old.dtype)
    changed = old != new
    indices = np.nonzero(changed)
    change = LabelChange(indices, new[indices], old[indices].copy())
    _, kwargs, _ = levels_layer_data(result, layer.name)
    with plugin_step(layer, ("colormap", "features"), (LEVELS_KEY,)) as step:
        with plugin_edit(layer):  # one undo step for the whole renumbering
            layer.data_setitem(indices, change.values)
        layer.colormap = kwargs["colormap"]
        layer.features = kwargs["features"]
        layer.metadata = {**layer.metadata, LEVELS_KEY: kwargs["metadata"][LEVELS_KEY]}
        step.change = change
    return int(change.size)


def go_to_level(viewer: Any, layer: Any, result: Any, name: str) -> tuple[int, int, int] | None:
    """Move every slider to the centre of level ``name`` (``"L3"``, ``"L4/L5"``); its array index, or
    ``None`` when the result names no such level."""
    from ..errors import InputError

    try:
        instance = result.instance(name)
    except InputError:
        return None
    if instance is None or not instance.value:
        return None
    index = tuple(round(float(c)) for c in instance.centroid)
    first = viewer.dims.ndim - 3
    for axis, i in enumerate(index):
        i = min(max(i, 0), layer.data.shape[axis] - 1)
        viewer.dims.set_point(first + axis, layer.translate[-3:][axis] + i * layer.scale[-3:][axis])
    return index
