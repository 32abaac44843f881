"""The Segment widget shows a levels layer beside the segmentation when the levels are named."""

from __future__ import annotations

import threading

import pytest

from conftest import requires_display
from napari_spineseg._napari_layers import LEVELS_KEY, image_layer_data, levels_layer_data
from napari_spineseg.levels import identify_levels, mark_uncertain
from napari_spineseg.phantom import make_phantom

pytestmark = [pytest.mark.gui, requires_display]


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
