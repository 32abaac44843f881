"""What a new user hit on first use (issue 19): the viewer paths end to end (need a display: xvfb-run).

The fixtures (a tiny untrained U-Net in a temporary model directory, the phantom study, the
notification recorder) are as in ``test_widgets.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gui_fixtures
from conftest import requires_display
from napari_spineseg._napari_layers import image_layer_data
from test_widgets import dock, errors

pytestmark = [pytest.mark.gui, requires_display]


# The shared fixtures (gui_fixtures.py): a small phantom in a viewer, a tiny model, notifications.
phantom, dirs, tiny_model = gui_fixtures.phantom, gui_fixtures.dirs, gui_fixtures.tiny_model
notifications, viewer, save_tiny = gui_fixtures.notifications, gui_fixtures.viewer, gui_fixtures.save_tiny

PLUGIN = "napari-spineseg"


# 1. DICOM-SEG export from the viewer -----------------------------------------------------------
def test_open_dicom_folder_segment_export_dicom_seg_reads_back(
    make_napari_viewer, data_dir: Path, tiny_model, notifications, tmp_path: Path
) -> None:
    from napari_spineseg._writer import write_dicom_seg_layer
    from napari_spineseg.dicomseg import read_dicom_seg

    series = data_dir / "dicom-sagittal-series" / "series"
    viewer = make_napari_viewer()
    segment = dock(viewer, "Segment spine")
    (image,) = viewer.open(str(series), plugin=PLUGIN)
    assert segment.image_combo.current_layer() == image
    assert segment.model_combo.set_model("tiny")
    segment.plane_boxes["coronal"].setChecked(False)  # two planes are enough here
    segment.run(sync=True)
    labels = segment.last_layer
    labels.data_setitem((np.array([30]), np.array([40]), np.array([40])), 1)  # at least one voxel
    assert labels.metadata["source"] == image.metadata["source"]

    review = dock(viewer, "Review segmentation")
    review.labels_combo.set_layer(labels)
    review.export_labels(tmp_path / "seg.dcm", sync=True)
    assert not errors(notifications), errors(notifications)
    np.testing.assert_array_equal(read_dicom_seg(review.exported, series).array, labels.data)

    # File > Save layer as DICOM-SEG (napari's writer) takes the same path.
    data, meta, _ = labels.as_layer_data_tuple()
    (written,) = write_dicom_seg_layer(str(tmp_path / "file-menu.dcm"), data, meta)
    np.testing.assert_array_equal(read_dicom_seg(written, series).array, labels.data)

    # 7. A brain EPI segmented as a spine is flagged, in the status and as a notification.
    assert "Check this result" in segment.status.text() and "not the spine" in segment.status.text()
    assert any("not the spine" in str(n.message) for n in notifications)


# 6. Results named by model; only a result of the same model is replaced ---------------------------
def test_results_are_named_by_model_and_another_model_never_replaces_them(viewer, dirs) -> None:
    save_tiny("base", "3")
    save_tiny("base-ft", "1", seed=1)
    segment = dock(viewer, "Segment spine")
    image = viewer.layers[0]
    segment.segment_with("base", image, sync=True)
    base = segment.last_layer
    assert base.name == f"{image.name} segmentation (base v3)"
    segment.segment_with("base-ft", image, sync=True)
    tuned = segment.last_layer
    assert tuned.name == f"{image.name} segmentation (base-ft v1)"
    assert base in viewer.layers and tuned is not base  # side by side, the untouched base result kept
    assert base.metadata["spineseg_result"]["model"] == "base"
    segment.segment_with("base", image, sync=True)  # the same model again: its own result is updated
    assert segment.last_layer == base and len(viewer.layers) == 3


# 5. One-click plane views, plane names on the sliders ---------------------------------------------
def test_plane_buttons_show_radiological_views_with_named_sliders(viewer) -> None:
    segment = dock(viewer, "Segment spine")
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    # The phantom is stored PIR: array axis 0 stacks sagittal slices, 1 axial, 2 coronal.
    segment.view_buttons["axial"].click()
    assert viewer.dims.order[0] == 1
    # Array index runs towards posterior downwards (anterior up), towards the right leftwards.
    assert tuple(camera.orientation2d) == ("down", "left")
    segment.view_buttons["coronal"].click()
    assert viewer.dims.order == (2, 1, 0)  # rows superior -> inferior: not rotated by 90 degrees
    assert tuple(camera.orientation2d) == ("down", "left")
    segment.view_buttons["sagittal"].click()
    assert viewer.dims.order == (0, 1, 2)
    assert tuple(camera.orientation2d) == ("down", "right")  # superior up, anterior left
    assert tuple(viewer.dims.axis_labels) == ("sagittal", "axial", "coronal")


# 7. The image picker follows a newly opened study --------------------------------------------------
def test_segment_widget_follows_the_study_just_opened(viewer, phantom) -> None:
    segment = dock(viewer, "Segment spine")
    first = viewer.layers[0]
    assert segment.image_combo.current_layer() == first
    data, kwargs, _ = image_layer_data(phantom.image)
    second = viewer.add_image(data[:, :, :8], **{**kwargs, "name": "second", "translate": (500.0, 0.0, 0.0)})
    assert segment.image_combo.current_layer() == second
    for axis in range(3):  # the slice shown lies inside the new study (not a black canvas)
        low, high = second.extent.world[:, axis]
        assert low <= viewer.dims.point[axis] <= high
    assert tuple(viewer.dims.axis_labels) == ("sagittal", "axial", "coronal")


# 10. Overall percentage and time left -------------------------------------------------------------
def test_segmentation_status_shows_overall_percentage_and_time_left(viewer, tiny_model) -> None:
    from napari_spineseg.inference import ProgressEvent
    from napari_spineseg.widgets.segment import overall_progress

    assert overall_progress(0.5, 60.0) == "50 % — about 1 min 00 s left"
    assert overall_progress(0.9, 9.0) == "90 % — about 1 s left"
    segment = dock(viewer, "Segment spine")
    seen: list[str] = []
    original = segment._on_progress

    def record(event: ProgressEvent) -> None:
        original(event)
        seen.append(segment.status.text())

    segment._on_progress = record
    segment.run(sync=True)
    planes = [text for text in seen if "slice" in text]
    assert planes and all("%" in text for text in planes), seen
    assert segment.model_combo.toolTip() == segment.model_combo.currentText()  # the full name, never cut


# 3. Only uncertainty maps are ranked, inside the anatomy --------------------------------------------
def test_next_uncertain_slice_never_ranks_the_mri_and_stays_inside_the_anatomy(viewer, phantom, notifications) -> None:
    from napari_spineseg._napari_layers import GEOMETRY_KEY, labels_layer_data

    review = dock(viewer, "Review segmentation")
    assert review.uncertainty_combo.count() == 0  # the MRI is not an uncertainty map
    assert review.next_uncertain_slice() is None
    assert any("No uncertainty map" in e for e in errors(notifications))

    data, kwargs, _ = labels_layer_data(phantom.labels, name="segmentation")
    labels = viewer.add_labels(data, **kwargs)
    review.labels_combo.set_layer(labels)
    uncertainty = np.zeros(data.shape, np.float32)
    uncertainty[0] = 1.0  # sagittal slice 0: background at the edge of the field of view
    inside = np.flatnonzero((data > 0).any(axis=(1, 2)))
    uncertainty[inside[len(inside) // 2]] = np.where(data[inside[len(inside) // 2]] > 0, 0.6, 0.0)
    meta = {GEOMETRY_KEY: labels.metadata[GEOMETRY_KEY], "spineseg_result": {"kind": "uncertainty"}}
    image = viewer.add_image(uncertainty, name="map", scale=labels.scale, translate=labels.translate, metadata=meta)
    review.uncertainty_combo.set_layer(image)
    review.plane_combo.setCurrentText("sagittal")
    assert review.next_uncertain_slice() == inside[len(inside) // 2]
    assert "inside segmentation" in review.uncertainty_label.text()


# 4. A model with no lesion class ----------------------------------------------------------------
def test_review_says_a_model_without_lesion_class_cannot_detect_lesions(viewer, phantom) -> None:
    from napari_spineseg._napari_layers import labels_layer_data
    from napari_spineseg.schema import DEFAULT_CLASSES

    no_lesion = phantom.labels.with_array(np.where(phantom.labels.array == 4, 1, phantom.labels.array))
    data, kwargs, _ = labels_layer_data(no_lesion, [c for c in DEFAULT_CLASSES if c.value != 4], name="no")
    labels = viewer.add_labels(data, **kwargs)
    review = dock(viewer, "Review segmentation")
    review.labels_combo.set_layer(labels)
    review.refresh(sync=True)
    assert "cannot detect lesions" in review.lesion_label.text()
    assert "No lesion detected" not in review.lesion_label.text()


# 8. Compare keeps the truth's own names ----------------------------------------------------------
def test_compare_names_an_instance_truth_by_its_own_values(viewer, phantom) -> None:
    from napari_spineseg._napari_layers import labels_layer_data
    from napari_spineseg.volume import Volume

    data, kwargs, _ = labels_layer_data(phantom.labels, name="model")
    model = viewer.add_labels(data, **kwargs)
    instances = np.zeros_like(data)
    instances[data == 1] = 3  # an instance map: value 3 is one vertebra, not "spinal canal"
    truth_volume = Volume(instances, phantom.labels.geometry, name="truth")
    tdata, tkwargs, _ = labels_layer_data(truth_volume, None, name="truth")
    truth = viewer.add_labels(tdata, **tkwargs)
    review = dock(viewer, "Review segmentation")
    review.model_combo.set_layer(model)
    review.truth_combo.set_layer(truth)
    review.compare(sync=True)
    names = [m.name for m in review.comparison]
    assert "label 3" in names and "spinal canal" not in names, names
    assert "merge" in review.compare_note.text()
    # Every number column stays in view: the name column gives way (elided, full name as tooltip).
    from qtpy.QtWidgets import QHeaderView

    header = review.compare_table.horizontalHeader()
    assert header.sectionResizeMode(0) == QHeaderView.ResizeMode.Stretch
    assert review.compare_table.item(0, 0).toolTip() == review.compare_table.item(0, 0).text()


# 2. Fine-tuning: progress in every phase, the controls that matter in view, a notification at the end -----
def test_finetune_shows_every_phase_keeps_controls_in_view_and_notifies(viewer, tiny_model, notifications) -> None:
    segment = dock(viewer, "Segment spine")
    segment.run(sync=True)
    labels, image = segment.last_layer, viewer.layers[0]
    labels.data_setitem(np.nonzero(np.pad(np.ones((3, 8, 8), bool), ((6, 7), (28, 28), (28, 28)))), 5)
    finetune = dock(viewer, "Fine-tune model")
    finetune.add_pair(image, labels)
    finetune.steps_box.setValue(3)
    seen: list[str] = []
    original = finetune._on_event

    def record(event) -> None:
        original(event)
        seen.append(finetune.status.text())

    finetune._on_event = record
    finetune.start(sync=True)
    assert not errors(notifications), errors(notifications)
    assert any(text.startswith("training: step") for text in seen), seen
    assert any("measuring" in text and "%" in text for text in seen), seen
    assert any("Fine-tuning finished" in str(n.message) for n in notifications)

    layout = finetune.chart.parentWidget().layout()

    def top(widget) -> int:  # the row of the dock's layout holding ``widget``
        for row in range(layout.count()):
            item = layout.itemAt(row)
            if item.widget() is widget or (item.layout() is not None and item.layout().indexOf(widget) >= 0):
                return row
        raise AssertionError(f"{widget} is not in the dock's layout")

    # Status, name and Save come right after Start, before the chart and the table.
    assert top(finetune.start_button) < top(finetune.status) < top(finetune.save_button) < top(finetune.chart)
    assert top(finetune.save_button) < top(finetune.metrics_table)
    assert finetune.forgetting_box.isChecked()  # and it can be switched off for a faster run


# Issue #20: two bundled models; the default stays the default, the accurate one is suggested on a GPU.
def test_default_model_is_preselected_and_accurate_suggested_with_cuda(viewer) -> None:
    segment = dock(viewer, "Segment spine")
    assert {"spineseg-default", "spineseg-accurate"} <= set(segment.model_combo.models())
    assert segment.model_combo.current_model() == "spineseg-default"
    segment._set_devices(["cpu"])
    assert "spineseg-accurate" not in segment.status.text()
    segment._set_devices(["cuda", "cpu"])
    assert "spineseg-accurate is recommended" in segment.status.text()
    assert segment.model_combo.current_model() == "spineseg-default"  # suggested, not switched
