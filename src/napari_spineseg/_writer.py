"""napari writers: Labels layers back to the geometry of the study they came from, or as DICOM-SEG."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError, SpinesegError


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


def dicom_seg_from_layer(path: str, data: Any, metadata: dict, geometry: Any, name: str = "labels") -> str:
    """Write label data as a DICOM Segmentation of the DICOM series it was made on (raises on failure).

    The series is found from the layer's recorded source (the study directory/file the image came
    from; a layer painted without one cannot be exported).  The model named in the layer's result
    record gives the algorithm identification: AUTOMATIC when the labels are the untouched
    prediction, SEMIAUTOMATIC once corrected; MANUAL without a model.
    """
    from ._napari_layers import CLASSES_KEY
    from .dicomseg import NOT_DICOM_MESSAGE, write_dicom_seg
    from .schema import LabelClass
    from .volume import Volume

    array = np.asarray(data)
    files = metadata.get("dicom_files")
    source = metadata.get("source")
    if not files and not source:
        raise InputError(
            f"{name}: {NOT_DICOM_MESSAGE}; this layer records no source study "
            "(open the DICOM series with napari-spineseg and segment or paint on its labels)"
        )
    labels = Volume(array, geometry, name=name, metadata={"dicom_files": files} if files else {})
    try:
        classes = [LabelClass.from_dict(c) for c in metadata.get(CLASSES_KEY) or []] or None
    except (KeyError, TypeError, ValueError):
        classes = None
    model, algorithm_type = _layer_model(metadata, array)
    written = write_dicom_seg(labels, None if files else source, path, classes, model, algorithm_type=algorithm_type)
    return str(written)


def _layer_model(metadata: dict, array: np.ndarray) -> tuple[Any, str | None]:
    """The model that made a labels layer (metadata or a stand-in) and the algorithm type."""
    from .modelfile import ModelMetadata, read_metadata, resolve_model

    result = metadata.get("spineseg_result") or {}  # written by the Segment widget
    model_name = result.get("model") if isinstance(result, dict) else None
    if not model_name:
        return None, None
    try:
        model = read_metadata(resolve_model(model_name))
    except SpinesegError:  # the model is gone: keep its name, version unknown
        model = ModelMetadata(name=str(model_name), architecture="unknown", architecture_kwargs={}, version="unknown")
    prediction = metadata.get("spineseg_prediction")
    edited = bool(result.get("edited")) or (
        prediction is not None and not np.array_equal(np.asarray(prediction), array)
    )
    return model, "SEMIAUTOMATIC" if edited else "AUTOMATIC"


def write_dicom_seg_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer to ``path`` (.dcm) as a DICOM Segmentation of its source series."""
    from napari.utils.notifications import show_error

    from ._napari_layers import geometry_from_layer

    array = np.asarray(data)
    try:
        geometry = geometry_from_layer(meta, array.shape)
        return [dicom_seg_from_layer(path, array, meta.get("metadata") or {}, geometry, meta.get("name") or "labels")]
    except SpinesegError as error:
        show_error(str(error))
        return []
