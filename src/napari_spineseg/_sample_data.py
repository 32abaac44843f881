"""napari sample data: the deterministic synthetic lumbar spine phantom with exact labels."""

from __future__ import annotations

from typing import Any


def sample_study_layers() -> list[tuple[Any, dict, str]]:
    """The bundled sample study (T1-like phantom with a hemangioma-like lesion) and its labels."""
    from ._napari_layers import image_layer_data, labels_layer_data
    from .phantom import sample_study

    phantom = sample_study()
    return [image_layer_data(phantom.image), labels_layer_data(phantom.labels, name=f"{phantom.image.name} truth")]


def t2_study_layers() -> list[tuple[Any, dict, str]]:
    """A T2-like phantom without lesions, and its labels."""
    from ._napari_layers import image_layer_data, labels_layer_data
    from .phantom import make_phantom

    phantom = make_phantom(contrast="T2", seed=1)
    return [image_layer_data(phantom.image), labels_layer_data(phantom.labels, name=f"{phantom.image.name} truth")]
