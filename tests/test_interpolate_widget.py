"""The "Interpolate between painted slices" dock widget: preview, apply through undo, painting kept.

Needs a display (xvfb-run).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import requires_display
from gui_fixtures import interpolation_viewer
from napari_spineseg.phantom import make_phantom
from napari_spineseg.schema import INTERVERTEBRAL_DISC

pytestmark = [pytest.mark.gui, requires_display]

PLUGIN = "napari-spineseg"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(size=(128, 128, 48), spacing=(1.5, 1.5, 1.5), snr=float("inf"), lesions=0)


@pytest.fixture
def setup(make_napari_viewer, phantom):
    """A viewer with an empty Labels layer on the phantom's grid, the widget, and the disc to paint."""
    viewer, widget, layer, disc, a = interpolation_viewer(make_napari_viewer, phantom)
    return viewer, widget, layer, disc, a, a + 5


def _annotate(layer, disc: np.ndarray, slices: tuple[int, int]) -> None:
    """The annotator paints the disc on two slices (as napari edits, one recorded as a brush dab)."""
    for k in slices:
        where = np.nonzero(disc[k])
        layer.data_setitem((np.full(where[0].size, k), *where), INTERVERTEBRAL_DISC)
    layer.selected_label = 3
    layer.brush_size = 3
    layer.paint((slices[0], 5, 5), 3)  # a brush dab far from the disc, on a painted slice


def test_interpolation_preview_apply_keeps_painting_and_undo_restores(setup) -> None:
    viewer, widget, layer, disc, a, b = setup
    _annotate(layer, disc, (a, b))
    painted = layer.data != 0
    assert painted[a, 5, 5]
    before = np.array(layer.data, copy=True)
    painted_digest = _digest(before[painted])

    widget.preview(sync=True)
    assert widget.change is not None and widget.change.size > 0
    assert widget.preview_layer is not None and widget.preview_layer in viewer.layers
    assert _digest(layer.data) == _digest(before)  # a preview changes nothing

    size = widget.change.size
    assert widget.apply() == size
    assert widget.preview_layer is None and all("preview" not in la.name for la in viewer.layers)
    after = np.array(layer.data, copy=True)
    assert _digest(after[painted]) == painted_digest  # painted voxels survive
    for s in range(a + 1, b):
        got = after[s] == INTERVERTEBRAL_DISC
        assert (got ^ disc[s]).sum() <= 0.1 * disc[s].sum()
    outside = np.ones(after.shape, bool)
    outside[a : b + 1] = False
    assert not after[outside].any()

    widget.undo()
    assert _digest(layer.data) == _digest(before)  # one undo: the exact previous array
    layer.redo()
    assert _digest(layer.data) == _digest(after)


def test_interpolation_never_overwrites_painting_and_refuses_a_stale_preview(setup) -> None:
    from napari.utils.notifications import notification_manager

    _, widget, layer, disc, a, b = setup
    _annotate(layer, disc, (a, b))
    received: list = []
    notification_manager.notification_ready.connect(received.append)
    try:
        widget.preview(sync=True)
        layer.data_setitem((np.array([a]), np.array([0]), np.array([0])), 3)  # painted after the preview
        before = np.array(layer.data, copy=True)
        assert widget.apply() == 0
        assert _digest(layer.data) == _digest(before)
        assert any("preview again" in str(n.message) for n in received)
    finally:
        notification_manager.notification_ready.disconnect(received.append)

    # any plugin change through apply_change leaves painted voxels alone (brush dab and data_setitem)
    from napari_spineseg.interpolation import LabelChange
    from napari_spineseg.widgets._undo import apply_change, painted_mask

    mask = painted_mask(layer)
    assert mask[a, 5, 5] and mask[a][disc[a]].all() and not mask[a + 1].any()
    current = np.array(layer.data, copy=True)
    targets = (np.array([a, a, a + 1]), np.array([5, 0, 0]), np.array([5, 0, 0]))
    change = LabelChange(targets, np.array([1, 1, 1], np.uint8), current[targets])
    assert apply_change(layer, change) == 1  # only the unpainted voxel
    assert layer.data[a, 5, 5] == 3 and layer.data[a, 0, 0] == 3 and layer.data[a + 1, 0, 0] == 1
    assert not painted_mask(layer)[a + 1, 0, 0]  # the plugin's own edit is not "painting"
    layer.undo()
    assert _digest(layer.data) == _digest(current)


def test_on_a_segment_result_the_fill_keeps_the_model_far_from_painted_slices(setup) -> None:
    from napari_spineseg.widgets._layer_data import PREDICTION_KEY

    _, widget, layer, disc, _, _ = setup
    extent = np.flatnonzero(disc.any(axis=(1, 2)))
    a, b = int(extent[2]), int(extent[-3])
    middle = (a + b) // 2
    prediction = np.where(disc, INTERVERTEBRAL_DISC, 0).astype(layer.data.dtype)
    layer.data = prediction.copy()
    layer.metadata = {**layer.metadata, PREDICTION_KEY: prediction.copy()}
    where = np.nonzero(disc[a])
    layer.data_setitem((np.full(where[0].size, a), *where), 0)  # the annotator erases the disc on slice a
    layer.data_setitem((np.array([b]), np.array([0]), np.array([0])), 3)  # and touches slice b
    before = np.array(layer.data, copy=True)

    widget.model_check.setChecked(True)
    widget.preview(sync=True)
    assert widget.apply() > 0
    assert (layer.data[middle] == before[middle]).all()  # far from both: the model's disc stays
    assert (layer.data[a + 1] == INTERVERTEBRAL_DISC).sum() < disc[a + 1].sum()  # next to the erased slice: less
    layer.undo()
    assert _digest(layer.data) == _digest(before)

    widget.model_check.setChecked(False)
    widget.preview(sync=True)
    widget.apply()
    assert not (layer.data[middle] == INTERVERTEBRAL_DISC).any()  # pure interpolation: gone half-way


def test_threaded_preview_shows_the_layer_without_taking_the_selection(setup, qtbot) -> None:
    viewer, widget, layer, disc, a, b = setup
    _annotate(layer, disc, (a, b))
    viewer.layers.selection.active = layer
    widget.preview()  # in a worker; the layer is added in event-loop turns
    qtbot.waitUntil(lambda: widget.preview_layer is not None and widget.preview_layer.visible, timeout=30_000)
    assert widget.preview_layer in viewer.layers
    assert viewer.layers.selection.active is layer  # the annotator keeps painting on their layer
    before = np.array(layer.data, copy=True)
    assert widget.apply() > 0 and widget.preview_layer is None
    layer.undo()
    assert _digest(layer.data) == _digest(before)


def test_on_a_study_resampled_from_thick_slices_a_painted_slice_fills_its_twins(setup, phantom) -> None:
    from napari_spineseg._napari_layers import image_layer_data
    from test_resampled import STEP, thick_then_resampled

    viewer, widget, layer, disc, _, _ = setup
    image = phantom.image.with_array(thick_then_resampled(phantom.image.array))
    data, kwargs, _ = image_layer_data(image)
    viewer.add_image(data, **kwargs)
    extent = np.flatnonzero(disc.any(axis=(1, 2)))
    k = int(next(s for s in extent if s % STEP == 2))  # the middle of a run of resampled slices
    where = np.nonzero(disc[k])
    layer.data_setitem((np.full(where[0].size, k), *where), INTERVERTEBRAL_DISC)
    before = np.array(layer.data, copy=True)

    widget.preview(sync=True)
    assert f"copied to slices [{k - 1}, {k + 1}]" in widget.status.text()
    assert widget.apply() == 2 * where[0].size
    for twin in (k - 1, k + 1):
        assert (layer.data[twin] == before[k]).all()
    widget.undo()
    assert _digest(layer.data) == _digest(before)

    widget.twins_check.setChecked(False)  # the annotator can turn the copies off
    widget.preview(sync=True)
    assert widget.change is None and "nothing to fill" in widget.status.text()


def test_review_proposes_one_slice_per_run_of_resampled_slices(setup, phantom) -> None:
    from napari_spineseg._napari_layers import GEOMETRY_KEY, image_layer_data
    from napari_spineseg.widgets._layer_data import RESULT_KEY
    from test_resampled import STEP, thick_then_resampled

    viewer, _, layer, disc, _, _ = setup
    image = phantom.image.with_array(thick_then_resampled(phantom.image.array))
    data, kwargs, _ = image_layer_data(image)
    study = viewer.add_image(data, **kwargs)
    layer.data = np.where(disc, INTERVERTEBRAL_DISC, 0).astype(layer.data.dtype)
    extent = np.flatnonzero(disc.any(axis=(1, 2)))
    acquired = int(next(s for s in extent if s % STEP == 0))
    uncertainty = np.zeros(layer.data.shape, np.float32)
    uncertainty[acquired][disc[acquired]] = 0.9  # the most uncertain slice is an acquired one
    uncertainty[acquired + 2][disc[acquired + 2]] = 0.5  # the middle of the next run
    meta = {GEOMETRY_KEY: layer.metadata[GEOMETRY_KEY], RESULT_KEY: {"kind": "uncertainty", "image": study.name}}
    scale, translate = layer.scale, layer.translate
    uncertainty_layer = viewer.add_image(uncertainty, name="map", scale=scale, translate=translate, metadata=meta)
    _, review = viewer.window.add_plugin_dock_widget(PLUGIN, "Review segmentation")
    review.labels_combo.set_layer(layer)
    review.uncertainty_combo.set_layer(uncertainty_layer)
    review.plane_combo.setCurrentText("sagittal")
    assert review.next_uncertain_slice() == acquired + 2  # a correction there is copied to its run
    assert "one proposal per acquired slice" in review.uncertainty_label.text()
