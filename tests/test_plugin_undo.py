"""Nothing the plugin does to a Labels layer is irreversible (issue 16, item 5).

Re-segmentation in place and the levels' renumbering go through napari's undo history: Ctrl+Z
gives back the exact previous array (checksummed), and the colours, names and metadata of then
come back with it (``widgets/_undo.plugin_step``).  Needs a display (xvfb-run) for the widgets.
"""

from __future__ import annotations

import numpy as np
import pytest

import gui_fixtures
from conftest import requires_display
from napari_spineseg.widgets._layer_data import PREDICTION_KEY, RESULT_KEY, checksum

pytestmark = [pytest.mark.gui, requires_display]

phantom, dirs, tiny_model = gui_fixtures.phantom, gui_fixtures.dirs, gui_fixtures.tiny_model
viewer, reviewed = gui_fixtures.viewer, gui_fixtures.reviewed


def _labels(shape=(4, 16, 16)):
    from napari.layers import Labels

    return Labels(np.zeros(shape, np.uint8), metadata={"k": "zero", "other": 1})


def _step(layer, new: np.ndarray, value: str):
    from napari_spineseg.widgets._undo import plugin_step, replace_data

    with plugin_step(layer, metadata_keys=("k",)) as step:
        step.change = replace_data(layer, new)
        layer.metadata = {**layer.metadata, "k": value}
    return step.change


def test_metadata_follows_undo_and_redo_of_a_plugin_step() -> None:
    layer = _labels()
    x = np.array(layer.data, copy=True)
    y = x.copy()
    y[1, 2:9, 3:7] = 2
    _step(layer, y, "y")
    assert np.array_equal(layer.data, y) and layer.metadata["k"] == "y"
    layer.undo()
    assert checksum(layer.data) == checksum(x) and layer.metadata["k"] == "zero"
    assert layer.metadata["other"] == 1  # untouched entries stay
    layer.redo()
    assert checksum(layer.data) == checksum(y) and layer.metadata["k"] == "y"
    # X -> Y -> X again (a re-segmentation undoing the last one's voxels): Ctrl+Z gives Y and its metadata
    _step(layer, x, "x again")
    assert layer.metadata["k"] == "x again"
    layer.undo()
    assert checksum(layer.data) == checksum(y) and layer.metadata["k"] == "y"
    layer.undo()
    assert checksum(layer.data) == checksum(x) and layer.metadata["k"] == "zero"


def test_painting_over_a_plugin_step_leaves_its_metadata() -> None:
    layer = _labels()
    y = np.array(layer.data, copy=True)
    y[2, 4:8, 4:8] = 3
    _step(layer, y, "y")
    layer.data_setitem(np.nonzero(y == 3), 1)  # the annotator paints over every voxel of the step
    layer.refresh()
    assert layer.metadata["k"] == "y"  # neither as before nor as after: nothing is guessed
    layer.undo()  # the painting
    assert layer.metadata["k"] == "y"
    layer.undo()  # the step
    assert not layer.data.any() and layer.metadata["k"] == "zero"


def _segmentation_layers(viewer) -> list:
    """The segmentation results in the viewer (a levels layer may come and go beside them)."""
    return [layer for layer in viewer.layers if RESULT_KEY in layer.metadata]


def test_resegmentation_in_place_is_one_undo_step(viewer, tiny_model) -> None:
    from napari_spineseg.widgets.segment import is_edited

    _, segment = viewer.window.add_plugin_dock_widget("napari-spineseg", "Segment spine")
    segment.postprocess_box.setChecked(False)
    segment.run(sync=True)
    layer = segment.last_layer
    first = np.array(layer.data, copy=True)
    first_prediction = np.array(layer.metadata[PREDICTION_KEY], copy=True)
    for plane in ("axial", "coronal"):  # the same model again, other settings: another result
        segment.plane_boxes[plane].setChecked(False)
    segment.run(sync=True)
    assert segment.last_layer == layer and _segmentation_layers(viewer) == [layer]  # replaced in place
    second = np.array(layer.data, copy=True)
    assert (second != first).sum() > 0
    assert layer.metadata[RESULT_KEY]["checksum"] == checksum(second)
    assert layer.metadata[RESULT_KEY]["planes"] == ["sagittal"]

    layer.undo()  # Ctrl+Z
    assert checksum(np.asarray(layer.data)) == checksum(first)  # the exact previous array
    assert layer.metadata[RESULT_KEY]["checksum"] == checksum(first)
    assert np.array_equal(layer.metadata[PREDICTION_KEY], first_prediction)
    assert not is_edited(layer)  # still an untouched result: the next run may replace it
    layer.redo()
    assert checksum(np.asarray(layer.data)) == checksum(second)
    assert layer.metadata[RESULT_KEY]["checksum"] == checksum(second) and not is_edited(layer)
    layer.undo()
    segment.run(sync=True)  # after the undo, replaced in place again (one layer, one history)
    assert segment.last_layer == layer and _segmentation_layers(viewer) == [layer]
    assert checksum(np.asarray(layer.data)) == checksum(second)
    layer.undo()
    assert checksum(np.asarray(layer.data)) == checksum(first)


def test_levels_renumbering_and_marking_uncertain_undo_with_their_names(reviewed, tmp_path) -> None:
    """Levels up/down and "uncertain" rename the levels: Ctrl+Z restores the voxels *and* the names
    (hover, legend), colours and the levels record the exports use."""
    from napari_spineseg._napari_layers import LEVELS_KEY
    from napari_spineseg.levels import read_levels

    _viewer, review, _labels, levels = reviewed

    def state():
        names = list(levels.features["name"])
        return checksum(np.asarray(levels.data)), names, dict(levels.metadata[LEVELS_KEY]), levels.colormap

    before = state()
    review.renumber_levels(-1)  # "Levels up one"
    renumbered = state()
    assert renumbered[0] != before[0] and "S1" not in renumbered[1]
    levels.undo()
    assert state()[:3] == before[:3] and state()[3] is before[3]
    review.export_labels(tmp_path / "seg.nii.gz", sync=True)  # the exports follow the undo too
    beside = read_levels(tmp_path / "seg_levels.nii.gz")
    assert beside.instance("S1") is not None and "renumbered" not in (beside.reason or "")
    levels.redo()
    assert state()[:3] == renumbered[:3]
    levels.undo()
    review.mark_levels_uncertain()
    assert not np.any(levels.data) and levels.metadata[LEVELS_KEY]["uncertain"]
    levels.undo()
    assert state()[:3] == before[:3] and not levels.metadata[LEVELS_KEY].get("uncertain")
