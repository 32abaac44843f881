"""Layers <-> volumes: the plugin's layer metadata keys, a layer's data as a :class:`Volume`, layer names."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume import Volume

#: Layer metadata key of the results the Segment widget created (image name, checksum, edited).
RESULT_KEY = "spineseg_result"
#: Layer metadata key holding a result's original prediction (fine-tuning learns from what changed).
PREDICTION_KEY = "spineseg_prediction"


def layer_volume(layer: Any, like: Volume | None = None) -> Volume:
    """A :class:`Volume` viewing a 3-D Image/Labels layer's data, with the layer's geometry.

    A layer without recorded geometry (e.g. napari's "new labels") that has ``like``'s shape
    takes ``like``'s geometry: it was painted on that study.
    """
    from .._napari_layers import GEOMETRY_KEY, geometry_from_layer

    if getattr(layer, "multiscale", False):
        raise InputError(f"{layer.name}: multiscale layers are not supported; open the full-resolution study")
    if getattr(layer, "rgb", False):
        raise InputError(f"{layer.name}: an RGB image is not an MRI study")
    data = layer.data
    if getattr(data, "ndim", 0) != 3:
        raise InputError(f"{layer.name}: need a 3-D layer, got shape {tuple(getattr(data, 'shape', ()))}")
    array = data if isinstance(data, np.ndarray) else np.asarray(data)
    if like is not None and GEOMETRY_KEY not in (layer.metadata or {}) and array.shape == like.shape:
        return Volume(array, like.geometry, name=layer.name)
    return Volume(array, geometry_from_layer(layer, array.shape), name=layer.name)


def checksum(array: np.ndarray) -> str:
    """A content hash of a label array (edits change it)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def is_kind(layer: Any, kind: str) -> bool:
    """Whether ``layer`` is an ``"image"`` or ``"labels"`` layer (works through napari's plugin proxies)."""
    from napari.layers import Image, Labels

    return isinstance(layer, {"image": Image, "labels": Labels}[kind])


def unique_layer_name(viewer: Any, base: str) -> str:
    """``base``, or ``base [2]``, ``base [3]``... whichever no layer of ``viewer`` uses."""
    names = {layer.name for layer in viewer.layers}
    if base not in names:
        return base
    number = 2
    while f"{base} [{number}]" in names:
        number += 1
    return f"{base} [{number}]"


def study_image(viewer: Any, layer: Any) -> Any:
    """The image ``layer`` was segmented from (by the Segment widget's record), else the only Image
    layer of the same shape; None when there is none or several candidates."""
    shape = tuple(layer.data.shape)
    images = [
        la
        for la in viewer.layers
        if is_kind(la, "image")
        and tuple(getattr(la.data, "shape", ())) == shape
        and not (la.metadata or {}).get(RESULT_KEY)  # the plugin's own maps (uncertainty) are not studies
    ]
    source = ((layer.metadata or {}).get(RESULT_KEY) or {}).get("image")
    named = [la for la in images if la.name == source]
    chosen = named or images
    return chosen[0].data if len(chosen) == 1 else None  # array-like: read where it is used (e.g. in a worker)
