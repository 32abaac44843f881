"""Result layers: built in a worker, added to the viewer in short event-loop turns.

Appending a layer makes napari build everything for it at once: the vispy visual, the polygon and
brush overlays of a Labels layer (vispy lines with a dash atlas), the Qt layer controls, the
selection change and the first draw.  In one callback that stalled the viewer 60-350 ms per
result on a small CPU.  Here the layer object is made by the worker; the GUI thread appends it
hidden, inactive and without those overlays, then shows it, creates each overlay and selects
it in turns of their own (each ``yield`` of :func:`add_in_turns` ends a turn).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Labels overlays napari creates eagerly (they are only drawn in polygon/paint mode).
LAZY_OVERLAYS = ("polygon", "brush_stroke")


def build_layer(data: Any, kwargs: dict[str, Any], kind: str) -> Any:
    """A hidden napari ``Image``/``Labels`` layer (no Qt: safe in a worker thread)."""
    from napari.layers import Image, Labels

    return {"image": Image, "labels": Labels}[kind](data, **{**kwargs, "visible": False})


def add_in_turns(viewer: Any, layer: Any, select: bool = True) -> Iterator[None]:
    """Append ``layer`` (made by :func:`build_layer`) and show it; each ``yield`` ends a turn.

    The end state is what ``viewer.add_*`` gives: the layer is visible, on top and (``select``)
    the only selected one, unless the user removed it meanwhile.
    """
    # napari builds an overlay's visuals when the overlay becomes visible (private API: skipped if absent).
    overlays = getattr(layer, "_overlays", {})
    deferred = [overlays[key] for key in LAZY_OVERLAYS if key in overlays and overlays[key].visible]
    for overlay in deferred:
        overlay.visible = False
    with _not_activated(viewer.layers):
        viewer.layers.append(layer)
    yield
    layer.visible = True  # sliced and drawn now
    yield
    for overlay in deferred:
        overlay.visible = True  # its visuals are built now (if the layer is still in the viewer)
        yield
    if select and layer in viewer.layers:
        viewer.layers.selection.active = layer


def replace_in_turns(layer: Any, data: Any, kwargs: dict[str, Any]) -> Iterator[None]:
    """Give an existing layer new data and ``kwargs``' colours, features, metadata and placement.

    Colours first (a class keeps its colour, so the old voxels still look right), then the voxels
    with their metadata (one turn: a checksum always matches its data); unchanged placement is
    left alone (each change re-slices the layer).  Each ``yield`` ends a turn.
    """
    for key in ("colormap", "features"):
        if key in kwargs:
            setattr(layer, key, kwargs[key])
    yield
    layer.data = data
    layer.metadata = kwargs["metadata"]
    yield
    for key in ("scale", "translate"):
        if key in kwargs and not np.allclose(getattr(layer, key), kwargs[key]):
            setattr(layer, key, kwargs[key])
    layer.visible = True


def replace_labels_in_turns(layer: Any, data: np.ndarray, kwargs: dict[str, Any]) -> Iterator[None]:
    """:func:`replace_in_turns` for a Labels layer as one step of its undo history.

    Only the voxels that differ are written (``Labels.data_setitem``: Ctrl+Z gives back the exact
    previous array); the colours, features and metadata go back and forth with them
    (:func:`~._undo.plugin_step`).  Voxels the annotator painted keep their values.
    """
    from ._undo import plugin_step, replace_data

    metadata = kwargs["metadata"]
    keys = tuple(dict.fromkeys([*(layer.metadata or {}), *metadata]))
    with plugin_step(layer, tuple(k for k in ("colormap", "features") if k in kwargs), keys) as step:
        for key in ("colormap", "features"):
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        yield
        step.change = replace_data(layer, data)
        layer.metadata = metadata
    yield
    for key in ("scale", "translate"):
        if key in kwargs and not np.allclose(getattr(layer, key), kwargs[key]):
            setattr(layer, key, kwargs[key])
    layer.visible = True


@contextlib.contextmanager
def _not_activated(layers: Any) -> Iterator[None]:
    """Append without selecting (selecting switches the layer controls: another turn's work)."""
    layers = getattr(layers, "__wrapped__", layers)  # plugin widgets see the viewer through a proxy
    previous = getattr(layers, "_activate_on_insert", None)
    if previous is not None:
        layers._activate_on_insert = False
    try:
        yield
    finally:
        if previous is not None:
            layers._activate_on_insert = previous


@functools.cache
def prepare_layers() -> None:
    """Pay the first-use costs of a Labels layer in a background thread (no Qt, no viewer).

    Builds a tiny layer (napari's features table, colormap and slicing code paths) and vispy's
    dash patterns, which vispy caches and otherwise computes on the GUI thread for the first
    Labels overlay (~70 ms).
    """
    from napari.utils.colormaps import DirectLabelColormap

    colormap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: (1, 0, 0, 1)})
    build_layer(np.zeros((2, 2, 2), np.uint8), {"colormap": colormap, "features": {"index": [0, 1]}}, "labels")
    with contextlib.suppress(ImportError, AttributeError):  # vispy internals: only a speed-up
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()
