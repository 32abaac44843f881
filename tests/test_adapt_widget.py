"""The Review widget's "Apply my corrections to this study" button: painting kept, one undo step.

Needs a display (xvfb-run).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import requires_display
from napari_spineseg._napari_layers import image_layer_data, labels_layer_data
from napari_spineseg.adaptation import AdaptConfig
from napari_spineseg.phantom import make_phantom
from napari_spineseg.schema import VERTEBRAL_BODY

pytestmark = [pytest.mark.gui, requires_display]

PLUGIN = "napari-spineseg"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_apply_corrections_keeps_painting_and_is_one_undo_step(make_napari_viewer) -> None:
    phantom = make_phantom(size=(96, 96, 20), spacing=(2.0, 2.0, 2.5), lesions=0, seed=11)
    viewer = make_napari_viewer()
    viewer.add_image(image_layer_data(phantom.image)[0], **image_layer_data(phantom.image)[1])
    data, kwargs, _ = labels_layer_data(phantom.labels.with_array(np.zeros_like(phantom.labels.array)))
    layer = viewer.add_labels(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Review segmentation")
    widget.labels_combo.set_layer(layer)
    panel = widget.adapt_panel
    assert panel.button.text() == "Apply my corrections to this study"
    panel.config = AdaptConfig(steps=2, crop_size=64, num_threads=1)

    panel.apply_corrections(sync=True)  # nothing painted yet: refused, nothing changes
    assert not np.asarray(layer.data).any()

    bodies = phantom.labels.array[9] == VERTEBRAL_BODY  # sagittal slices are stacked along axis 0
    where = np.nonzero(bodies)
    layer.data_setitem((np.full(where[0].size, 9), *where), VERTEBRAL_BODY)  # the annotator paints slice 9
    painted = np.asarray(layer.data) != 0
    before = np.array(layer.data, copy=True)

    panel.apply_corrections(sync=True)
    after = np.array(layer.data, copy=True)
    assert panel.result is not None and panel.result.change.size > 0
    assert _digest(after[painted]) == _digest(before[painted])  # painted voxels exactly as painted
    assert (after != before).sum() > 1000  # the rest of the study was re-segmented
    assert "changed" in panel.status.text()

    layer.undo()  # one step restores the exact previous array
    assert _digest(np.asarray(layer.data)) == _digest(before)
