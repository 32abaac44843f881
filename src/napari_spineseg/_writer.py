"""napari writer: Labels layers back to the geometry of the study they came from."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import SpinesegError


def write_labels_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer to ``path`` (.nii.gz/.mha/.nrrd...) in its recorded geometry."""
    from napari.utils.notifications import show_error

    from ._napari_layers import geometry_from_layer
    from .io import write_labels

    array = np.asarray(data)
    try:
        geometry = geometry_from_layer(meta, array.shape)
        return [str(write_labels(array, path, geometry))]
    except SpinesegError as error:
        show_error(str(error))
        return []
