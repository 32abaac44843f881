"""The Segment widget shows a levels layer beside the segmentation when the levels are named."""

from __future__ import annotations

import threading

import pytest

import gui_fixtures
from conftest import requires_display
from napari_spineseg._napari_layers import LEVELS_KEY, image_layer_data, levels_layer_data
from napari_spineseg.levels import identify_levels, mark_uncertain
from napari_spineseg.phantom import make_phantom

pytestmark = [pytest.mark.gui, requires_display]

reviewed = gui_fixtures.reviewed  # the shared viewer-with-levels fixture


def test_segment_widget_adds_a_levels_layer_or_says_why_not(make_napari_viewer) -> None:
    from napari_spineseg.widgets._layers import build_layer
    from napari_spineseg.widgets.segment import _Output, _Run

    phantom = make_phantom(seed=0, contrast="T2", lesions=2)
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(phantom.image)
    viewer.add_image(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-spineseg", "Segment spine")
    levels = identify_levels(phantom.labels)
    layers = {"levels": build_layer(*levels_layer_data(levels, "x"))}
    run = _Run("study", threading.Event(), None)
    for _ in widget._show_levels(run, _Output(None, [], (), None, layers, levels=levels)):
        pass
    layer = viewer.layers["study levels"]
    assert layer.visible and LEVELS_KEY in layer.metadata
    assert "L3" in list(layer.features["name"])
    assert "levels T10–S1" in widget.status.text()
    # A second, uncertain result removes the stale layer and says why.
    uncertain = mark_uncertain(levels, "checked by hand")
    for _ in widget._show_levels(run, _Output(None, [], (), None, {}, levels=uncertain)):
        pass
    assert "study levels" not in [lay.name for lay in viewer.layers]
    assert "levels uncertain: checked by hand" in widget.status.text()


# --- Review widget: table by level, go to level, renumbering that carries to the exports -----------
def _names(layer) -> list[str]:
    return [n for n in layer.features["name"] if n != "background"]


def test_review_renumbers_levels_up_and_down_round_trip_and_exports_follow(reviewed, tmp_path) -> None:
    import numpy as np

    from napari_spineseg.levels import read_levels

    _viewer, review, labels, levels = reviewed
    before, names = np.array(levels.data, copy=True), _names(levels)
    assert "L3" in names and "S1" in names
    review.renumber_levels(-1)  # "Levels up one": L3 -> L2, S1 -> L5
    assert np.all(levels.data[before == 22] == 21) and np.all(levels.data[before == 124] == 123)
    assert "S1" not in _names(levels) and "T9" in _names(levels)
    assert "levels moved up: T9–L5" in review.status.text()
    assert levels.metadata[LEVELS_KEY]["labels"]["21"] == "L2"
    # The corrected levels go with the exports: the levels layer itself and beside the class map.
    review.labels_combo.set_layer(levels)
    review.export_labels(tmp_path / "levels.nii.gz", sync=True)
    assert read_levels(tmp_path / "levels.nii.gz").instance("L2") is not None
    review.labels_combo.set_layer(labels)
    review.export_labels(tmp_path / "seg.nii.gz", sync=True)
    beside = read_levels(tmp_path / "seg_levels.nii.gz")
    assert beside.named and beside.instance("S1") is None and "renumbered by -1" in beside.reason
    # The layer's undo history holds the renumbering as one step.
    levels.undo()
    assert np.array_equal(levels.data, before)
    levels.redo()
    review.renumber_levels(+1)  # "Levels down one" back
    assert np.array_equal(levels.data, before) and _names(levels) == names


def test_review_marks_levels_uncertain_and_says_why(reviewed, tmp_path) -> None:
    import numpy as np

    from napari_spineseg.levels import read_levels

    _viewer, review, _labels, levels = reviewed
    review.uncertain_button.click()
    assert not np.any(levels.data) and _names(levels) == []
    assert levels.metadata[LEVELS_KEY]["uncertain"]
    assert "levels uncertain: marked uncertain by hand in Review" in review.status.text()
    review.refresh(sync=True)
    assert review.level_table.item(0, 0).text() in ("body 1", "disc above body 1")
    assert "Levels uncertain (marked uncertain by hand" in review.level_note.text()
    review.renumber_levels(+1)
    assert "Levels not changed: levels are uncertain" in review.status.text()
    review.export_labels(tmp_path / "seg.nii.gz", sync=True)
    assert read_levels(tmp_path / "seg_levels.nii.gz").reason == "marked uncertain by hand in Review"


def test_review_table_lists_levels_and_goes_to_a_level(reviewed) -> None:
    viewer, review, labels, _levels = reviewed
    review.refresh(sync=True)
    table = review.level_table
    names = [table.item(row, 0).text() for row in range(table.rowCount())]
    assert "L3" in names and "L4/L5" in names
    assert "Levels named anatomically" in review.level_note.text()
    target = [round(c) for c in identify_levels(layer_volume_of(labels)).instance("L3").centroid]
    assert list(viewer.dims.current_step[-3:]) != target
    table.cellClicked.emit(names.index("L3"), 0)  # a click on the row
    assert list(viewer.dims.current_step[-3:]) == target
    table.setCurrentCell(names.index("L4/L5"), 0)
    review.goto_button.click()
    assert list(viewer.dims.current_step[-3:]) != target


def layer_volume_of(layer):
    from napari_spineseg.widgets._layer_data import layer_volume

    return layer_volume(layer)
