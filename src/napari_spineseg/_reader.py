"""napari reader: MHA/MHD, NIfTI, NRRD and DICOM series, with labels found next to images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SpinesegError
from .io import VOLUME_SUFFIXES, find_label_file, is_dicom_file, looks_like_label_file, volume_suffix
from .schema import DEFAULT_CLASSES

LayerData = tuple[Any, dict, str]


def _looks_like_dicom_dir(path: Path, probe: int = 16) -> bool:
    try:
        with os.scandir(path) as entries:
            for index, entry in enumerate(entries):
                if index >= probe:
                    break
                if entry.is_file() and is_dicom_file(entry.path):
                    return True
    except OSError:
        return False
    return False


def _readable(path: Any) -> bool:
    try:
        path = Path(path)
        if path.is_dir():
            return _looks_like_dicom_dir(path)
        return volume_suffix(path) in VOLUME_SUFFIXES or is_dicom_file(path)
    except (TypeError, ValueError, OSError):
        return False


def napari_get_reader(path: Any) -> Callable[[Any], list[LayerData]] | None:
    """The reader for ``path`` (a path or list of paths), or ``None``; never raises."""
    paths = path if isinstance(path, list) else [path]
    if paths and all(_readable(p) for p in paths):
        return read_layers
    return None


def _layers_for_path(path: Path) -> list[LayerData]:
    from ._napari_layers import image_layer_data

    if looks_like_label_file(path):
        return [_labels_layer(path)]
    from .io import read_volumes

    layers: list[LayerData] = [image_layer_data(v) for v in read_volumes(path)]
    label_path = find_label_file(path)
    if label_path is not None:
        layers.append(_labels_layer(label_path))
    return layers


def _labels_layer(path: Path) -> LayerData:
    """A label map as a Labels layer: schema names/colours when its values are schema classes."""
    from ._napari_layers import follows_schema, labels_layer_data
    from .io import label_dtype, read_volume

    labels = read_volume(path)
    label_dtype(labels.array)  # clear error for non-integer or negative "labels"
    return labels_layer_data(labels, None if not follows_schema(labels.array) else DEFAULT_CLASSES)


def read_layers(path: Any) -> list[LayerData]:
    """Read studies (and label maps stored beside them); errors become a notification."""
    paths = path if isinstance(path, list) else [path]
    layers: list[LayerData] = []
    for item in paths:
        try:
            layers += _layers_for_path(Path(item))
        except SpinesegError as error:
            _notify_error(str(error))
        except Exception as error:  # a bug must not take the viewer down either
            _notify_error(f"{item}: unexpected error while reading ({type(error).__name__}: {error})")
    return layers or [(None,)]  # type: ignore[list-item]


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)
