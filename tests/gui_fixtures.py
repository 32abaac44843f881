"""Fixtures shared by the widget tests (a small phantom in a viewer, a tiny model, notifications).

Import the fixtures by name in a test module: ``from gui_fixtures import dirs, phantom, ...``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_spineseg._napari_layers import image_layer_data
from napari_spineseg.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(size=(64, 64, 16), spacing=(3.5, 3.5, 8.0), lesions=1, seed=3)


@pytest.fixture
def reviewed(make_napari_viewer):
    """A viewer with the T2 phantom study, its class map ("study labels") and its levels layer
    ("study levels"), and the Review widget on the class map: (viewer, review, labels, levels)."""
    from napari_spineseg._napari_layers import labels_layer_data, levels_layer_data
    from napari_spineseg.levels import identify_levels

    study = make_phantom(seed=0, contrast="T2", lesions=2)
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(study.image)
    viewer.add_image(data, **kwargs)
    data, kwargs, _ = labels_layer_data(study.labels, name="study labels")
    labels = viewer.add_labels(data, **kwargs)
    data, kwargs, _ = levels_layer_data(identify_levels(study.labels), "study levels")
    levels = viewer.add_labels(data, **kwargs)
    _, review = viewer.window.add_plugin_dock_widget("napari-spineseg", "Review segmentation")
    review.labels_combo.set_layer(labels)
    return viewer, review, labels, levels


@pytest.fixture(autouse=True)
def dirs(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SPINESEG_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SPINESEG_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "models"


def save_tiny(name: str, version: str = "1", seed: int = 0) -> str:
    """A tiny untrained U-Net saved as user model ``name`` (fast to run, deterministic per seed)."""
    import torch

    from napari_spineseg.modelfile import ModelMetadata, save_model, user_model_path
    from napari_spineseg.models import build_model

    torch.manual_seed(seed)
    net = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    kwargs = {k: v for k, v in net.arch_kwargs.items() if k not in ("in_channels", "num_classes")}
    metadata = ModelMetadata(name, "unet", kwargs, preprocess={"pixel_spacing_mm": 4.0}, version=version)
    save_model(net, metadata, user_model_path(name))
    return name


@pytest.fixture
def tiny_model(dirs: Path) -> str:
    return save_tiny("tiny")


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    received: list = []
    notification_manager.notification_ready.connect(received.append)
    yield received
    notification_manager.notification_ready.disconnect(received.append)


@pytest.fixture
def viewer(make_napari_viewer, phantom):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(phantom.image)
    viewer.add_image(data, **kwargs)
    return viewer


def interpolation_viewer(make_napari_viewer, study):
    """A viewer with an empty Labels layer on ``study``'s grid and the Interpolate widget on it (sagittal),
    and the study's largest disc to paint: ``(viewer, widget, layer, disc mask, a middle disc slice)``."""
    import numpy as np
    from scipy import ndimage

    from napari_spineseg._napari_layers import labels_layer_data
    from napari_spineseg.schema import INTERVERTEBRAL_DISC

    disc = study.labels.array == INTERVERTEBRAL_DISC
    parts, count = ndimage.label(disc)
    disc = parts == int(np.argmax(ndimage.sum_labels(disc, parts, range(1, count + 1)))) + 1
    extent = np.flatnonzero(disc.any(axis=(1, 2)))  # sagittal slices are stacked along axis 0 (PIR)
    viewer = make_napari_viewer()
    data, kwargs, _ = labels_layer_data(study.labels.with_array(np.zeros_like(study.labels.array)))
    layer = viewer.add_labels(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-spineseg", "Interpolate between painted slices")
    widget.labels_combo.set_layer(layer)
    widget.plane_combo.setCurrentText("sagittal")
    return viewer, widget, layer, disc, int(extent[len(extent) // 2 - 2])
