"""Dock widgets: Segment spine, Review segmentation, Fine-tune model (need a display: xvfb-run).

A tiny untrained U-Net (saved into a temporary ``SPINESEG_MODEL_DIR``) is enough for the
plumbing: layers, geometry, edits, cancellation, error notifications, the fine-tune round trip
and the event-loop stall probe.
"""

from __future__ import annotations

import gc
import os
import time
from functools import partial

import numpy as np
import pytest

import gui_fixtures
from conftest import requires_display
from napari_spineseg._napari_layers import GEOMETRY_KEY, image_layer_data, labels_layer_data
from napari_spineseg.phantom import make_phantom

pytestmark = [pytest.mark.gui, requires_display]


# The shared fixtures (gui_fixtures.py): a small phantom in a viewer, a tiny model, notifications.
phantom, dirs, tiny_model = gui_fixtures.phantom, gui_fixtures.dirs, gui_fixtures.tiny_model
notifications, viewer, save_tiny = gui_fixtures.notifications, gui_fixtures.viewer, gui_fixtures.save_tiny

PLUGIN = "napari-spineseg"
# A freeze guard: a worker that blocked the event loop would stall it for the whole run.  The
# responsiveness goal itself (< 100 ms per turn) is a benchmark, measured on a quiet machine by
# ``benchmarks/bench_responsiveness.py`` (which runs these tests with SPINESEG_STALL_LIMIT_S=0.1).
STALL_LIMIT_S = float(os.environ.get("SPINESEG_STALL_LIMIT_S", "0.5"))


def errors(received: list) -> list[str]:
    return [str(n.message) for n in received if str(n.severity).lower().endswith("error")]


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def cpu_wait() -> float:
    """Seconds the calling thread has waited for a free CPU core (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class StallProbe:
    """A 10 ms QTimer recording the longest gap between its ticks (an event-loop stall).

    ``max_gap`` is the wall-clock gap.  ``max_stall`` leaves out the time the GUI thread waited
    for a free core (on this shared 2-core machine, other people's jobs: at a load of 7 every gap
    is 2-3x longer whatever runs in it); the GUI thread's work, GIL waits and garbage collection
    all count.
    """

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.max_gap = self.max_stall = 0.0
        self.ticks = 0

    def current(self) -> tuple[float, float]:
        """The gap since the last tick: (wall clock, without the wait for a core)."""
        gap = time.perf_counter() - self.last
        return gap, gap - (cpu_wait() - self.last_wait)

    def _tick(self) -> None:
        gap, stall = self.current()
        self.max_gap, self.max_stall = max(self.max_gap, gap), max(self.max_stall, stall)
        self.last, self.last_wait = time.perf_counter(), cpu_wait()
        self.ticks += 1

    def __enter__(self) -> StallProbe:
        # A full garbage collection of this process (napari + torch, ~0.1-0.3 s) can start at any
        # allocation, whoever makes it: start the measurement from a collected heap.
        gc.collect()
        self.last, self.last_wait = time.perf_counter(), cpu_wait()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.stop()

    def __str__(self) -> str:
        return f"{1000 * self.max_stall:.0f} ms ({1000 * self.max_gap:.0f} ms wall clock)"


def test_widgets_load_through_the_manifest(viewer) -> None:
    from napari_spineseg.widgets import FinetuneWidget, ReviewWidget, SegmentWidget

    assert isinstance(dock(viewer, "Segment spine"), SegmentWidget)
    assert isinstance(dock(viewer, "Review segmentation"), ReviewWidget)
    assert isinstance(dock(viewer, "Fine-tune model"), FinetuneWidget)


def test_manifest_offers_the_widgets_in_the_plugins_and_layers_menus() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN)
    names = [w.display_name for w in manifest.contributions.widgets]
    assert names == ["Segment spine", "Review segmentation", "Fine-tune model", "Interpolate between painted slices"]
    menus = {key: [item.command for item in items] for key, items in manifest.contributions.menus.items()}
    assert "napari-spineseg.segment_widget" in menus["napari/layers/segment"]
    assert "napari-spineseg.review_widget" in menus["napari/layers/measure"]


def test_full_workflow_segment_correct_finetune_resegment(viewer, tiny_model, dirs, notifications) -> None:
    segment = dock(viewer, "Segment spine")
    image = viewer.layers[0]
    assert segment.model_combo.set_model("tiny")  # the bundled default model is listed too
    assert segment.model_combo.current_model() == "tiny"
    assert all(box.isChecked() for box in segment.plane_boxes.values())
    segment.run(sync=True)
    assert not errors(notifications)
    labels = viewer.layers[f"{image.name} segmentation (tiny v1)"]  # named by the model that made it
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert labels.metadata[GEOMETRY_KEY] == image.metadata[GEOMETRY_KEY]
    assert list(labels.features["name"][:5]) == [
        "background",
        "vertebral body",
        "intervertebral disc",
        "spinal canal",
        "lesion",
    ]
    assert "vertebral body" in segment.legend.text()

    # Correct: a new structure (value 5) painted on three sagittal slices.
    painted = np.zeros(labels.data.shape, bool)
    painted[6:9, 28:36, 28:36] = True
    labels.data_setitem(np.nonzero(painted), 5)
    before_edit = np.array(labels.data, copy=True)

    finetune = dock(viewer, "Fine-tune model")
    finetune.add_pair(image, labels)
    assert finetune.model_combo.current_model() == "tiny"  # the model that made the labels
    names = finetune.class_names()
    assert names[5] == "class 5"
    row = [finetune.class_table.item(r, 0).text() for r in range(finetune.class_table.rowCount())].index("5")
    finetune.class_table.item(row, 1).setText("hemangioma")
    finetune.steps_box.setValue(4)
    finetune.lr_box.setValue(1e-3)
    finetune.start(sync=True)
    assert not errors(notifications), errors(notifications)
    result = finetune.result
    assert [c.name for c in result.metadata.classes][-1] == "hemangioma"
    assert "hemangioma" in result.before["corrections"] and "hemangioma" in result.after["corrections"]
    # Only the three edited sagittal slices were trusted (the rest of the prediction is unreviewed).
    assert result.metadata.training["pair_details"][0]["trusted_slices"] == {"sagittal": [6, 7, 8]}
    assert finetune.chart.loss and finetune.chart.dice["corrected/hemangioma"]
    rows = [finetune.metrics_table.item(r, 0).text() for r in range(finetune.metrics_table.rowCount())]
    assert any("hemangioma" in row for row in rows), rows  # before/after shown for the new class

    assert finetune.save_model("tiny-ft") == "tiny-ft"
    assert (dirs / "tiny-ft.safetensors").is_file()
    assert (dirs / "tiny-ft.replay.npz").is_file()  # the painted slices, replayed by the next fine-tune
    assert "tiny-ft.replay.npz" in finetune.status.text() and "private" in finetune.status.text()
    listed = [segment.model_combo.itemData(i) for i in range(segment.model_combo.count())]
    assert "tiny-ft" in listed  # the Segment widget knows the new model at once

    widget = finetune.resegment(sync=True)
    assert widget is segment
    new = segment.last_layer  # the corrected layer is never overwritten
    assert new is not labels and new.name.startswith(f"{image.name} segmentation (tiny-ft")
    np.testing.assert_array_equal(labels.data, before_edit)
    assert new.metadata["spineseg_result"]["model"] == "tiny-ft"
    assert [c["name"] for c in new.metadata["spineseg_classes"]][5] == "hemangioma"
    assert "hemangioma" in segment.legend.text()
    assert not errors(notifications)


def watch_result(widget, probe: StallProbe) -> dict[str, float]:
    """Record the stall while the worker ran, and how long showing its result took."""
    phases: dict[str, float] = {}
    original = partial(type(widget)._on_done, widget)

    def on_done(outcome) -> None:
        phases["worker"] = max(probe.max_stall, probe.current()[1])
        phases["ticks"] = probe.ticks
        started = time.perf_counter()
        original(outcome)
        phases["display"] = time.perf_counter() - started

    widget._on_done = on_done  # start_job picks up the instance attribute
    return phases


def segment_watched(segment, qtbot) -> tuple[StallProbe, dict[str, float]]:
    """Run ``segment`` in its thread and probe the event loop until its result is on screen."""
    with StallProbe() as probe:
        phases = watch_result(segment, probe)
        segment.run()
        assert segment.running
        qtbot.waitUntil(lambda: not segment.running, timeout=30_000)
        qtbot.wait(100)  # the last draw
    return probe, phases


def napari_append_stall(viewer, data, kwargs, qtbot) -> float:
    """The stall of napari's own, irreducible part of adding a layer: appending a hidden, prebuilt
    Image layer in one callback (vispy visual, layer controls; 50-150 ms depending on napari's
    version and the CPU).  The widget cannot do less than this for a new layer."""
    from napari.layers import Image
    from qtpy.QtCore import QTimer

    layer = Image(data, **{**kwargs, "name": "baseline", "visible": False})
    with StallProbe() as probe:
        QTimer.singleShot(20, lambda: viewer.layers.append(layer))
        qtbot.wait(200)
    viewer.layers.remove(layer)
    return probe.max_stall


def test_threaded_segmentation_keeps_the_viewer_responsive(make_napari_viewer, tiny_model, qtbot) -> None:
    viewer = make_napari_viewer()
    study = make_phantom(size=(96, 96, 24), spacing=(2.5, 2.5, 5.0), seed=5)
    data, kwargs, _ = image_layer_data(study.image)
    viewer.add_image(data, **kwargs)
    napari_append_stall(viewer, data, kwargs, qtbot)  # first append of an image layer: one-time costs
    baseline = napari_append_stall(viewer, data, kwargs, qtbot)
    segment = dock(viewer, "Segment spine")
    segment.uncertainty_box.setChecked(True)
    qtbot.waitUntil(segment.ready.is_set, timeout=60_000)  # one-time imports (torch, pandas) are done
    probes = {}
    for case in ("adding the layers", "replacing them"):  # the second run's result replaces the first
        probe, phases = probes[case] = segment_watched(segment, qtbot)
        print(
            f"\nsegmentation, {case}: longest event-loop stall {probe}; "
            f"while the worker ran {1000 * phases['worker']:.0f} ms ({phases['ticks']} ticks)"
        )
        # image, uncertainty, labels (and the levels layer when the model's result names the levels)
        assert len([lay for lay in viewer.layers if not lay.name.endswith(" levels")]) == 3
        assert phases["ticks"] > 10
        assert phases["worker"] < STALL_LIMIT_S
    assert viewer.layers.selection.active == segment.last_layer
    # Each new layer is built in the worker and shown in short steps (adding each in one callback,
    # as viewer.add_image/add_labels do, stalled 180-200 ms here): no turn is longer than the limit
    # or than napari's own append of a prebuilt hidden layer (with a margin).
    print(f"napari's own append of a hidden image layer: {1000 * baseline:.0f} ms")
    assert probes["adding the layers"][0].max_stall < max(STALL_LIMIT_S, 1.3 * baseline)
    assert probes["replacing them"][0].max_stall < STALL_LIMIT_S


def test_cancel_segmentation_adds_nothing(viewer, tiny_model, qtbot, notifications) -> None:
    segment = dock(viewer, "Segment spine")
    names = [layer.name for layer in viewer.layers]
    segment.run()
    segment.cancel()
    qtbot.waitUntil(lambda: not segment.running, timeout=30_000)
    assert [layer.name for layer in viewer.layers] == names
    assert any("cancelled" in str(n.message) for n in notifications)
    assert not errors(notifications)
    segment.run(sync=True)  # still usable
    assert len(viewer.layers) == len(names) + 1


def test_edited_layer_survives_a_second_run(viewer, tiny_model) -> None:
    segment = dock(viewer, "Segment spine")
    segment.run(sync=True)
    first = segment.last_layer
    segment.run(sync=True)  # unedited: replaced in place
    assert segment.last_layer == first and len(viewer.layers) == 2  # (plugin widgets see layer proxies)
    first.data_setitem((np.array([3]), np.array([30]), np.array([30])), 2)
    edited = np.array(first.data, copy=True)
    segment.run(sync=True)
    assert segment.last_layer != first and segment.last_layer.name.endswith("[2]")
    np.testing.assert_array_equal(first.data, edited)
    first.data[3, 31, 31] = 3  # edits without paint events are caught by the checksum
    second = segment.last_layer
    segment.run(sync=True)
    assert segment.last_layer == second and len(viewer.layers) == 3


def test_finetune_is_responsive_and_cancel_keeps_no_model(viewer, phantom, tiny_model, dirs, qtbot) -> None:
    data, kwargs, _ = labels_layer_data(phantom.labels, name="truth")
    truth = viewer.add_labels(data, **kwargs)
    finetune = dock(viewer, "Fine-tune model")
    finetune.add_pair(viewer.layers[0], truth)
    assert finetune.model_combo.set_model("tiny")
    finetune.steps_box.setValue(6)
    qtbot.waitUntil(finetune.ready.is_set, timeout=60_000)  # torch._dynamo etc. imported in the background
    with StallProbe() as probe:
        phases = watch_result(finetune, probe)
        started = time.perf_counter()
        finetune.start()  # the click handler: copies the labels, adds napari's progress bar
        click = time.perf_counter() - started
        qtbot.waitUntil(lambda: finetune._run is None, timeout=60_000)
        qtbot.wait(100)  # the last draw
    print(
        f"\nfine-tuning: longest event-loop stall {probe}; while the worker ran {1000 * phases['worker']:.0f} ms "
        f"({phases['ticks']} ticks, {finetune.chart.draws} chart updates); Start took {1000 * click:.0f} ms, "
        f"showing the result {1000 * phases['display']:.0f} ms"
    )
    assert finetune.result is not None and finetune.save_button.isEnabled()
    assert phases["ticks"] > 10
    assert probe.max_stall < STALL_LIMIT_S  # from the click to the result

    finetune.steps_box.setValue(10_000)
    finetune.start()
    qtbot.waitUntil(lambda: len(finetune.chart.loss) >= 1, timeout=30_000)
    finetune.cancel()
    qtbot.waitUntil(lambda: finetune._run is None, timeout=30_000)
    assert finetune.result is None and not finetune.save_button.isEnabled()
    assert sorted(p.name for p in dirs.iterdir()) == ["tiny.safetensors"]
    assert "Cancelled" in finetune.status.text()


def test_errors_become_notifications(viewer, tiny_model, dirs, notifications) -> None:
    (dirs / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    segment = dock(viewer, "Segment spine")
    assert segment.model_combo.set_model("broken")
    segment.run(sync=True)
    assert any("broken.safetensors" in e for e in errors(notifications))
    assert len(viewer.layers) == 1

    assert not segment.model_combo.add_file(dirs / "broken.safetensors")
    segment.model_combo.set_model("tiny")
    nan_image = np.array(viewer.layers[0].data, dtype=np.float32)
    nan_image[2, 5, 5] = np.nan
    viewer.add_image(nan_image, name="nan study")
    segment.image_combo.set_layer(viewer.layers["nan study"])
    segment.run(sync=True)
    assert any("NaN" in e for e in errors(notifications))
    assert [layer.name for layer in viewer.layers] == [viewer.layers[0].name, "nan study"]
    assert segment.run_button.isEnabled()

    viewer.add_labels(np.zeros(nan_image.shape, np.uint8), name="empty labels")
    review = dock(viewer, "Review segmentation")
    review.export_labels(dirs / "labels.txt", sync=True)
    assert any("labels.txt" in e for e in errors(notifications))
    assert review.export_button.isEnabled()


def test_review_levels_lesions_comparison_navigation_export(viewer, phantom, tmp_path, notifications) -> None:
    from napari_spineseg.io import read_volume

    data, kwargs, _ = labels_layer_data(phantom.labels, name="truth")
    truth = viewer.add_labels(data, **kwargs)
    review = dock(viewer, "Review segmentation")
    review.labels_combo.set_layer(truth)
    review.refresh(sync=True)
    report = review.review
    bodies = [s for s in report.levels if s.value == 1]
    # T11 shows as a 7 mm sliver (3 mL) at the edge of the field of view: a fragment, never a level.
    assert len(bodies) == len(phantom.levels) - 1 and report.fragments[1] == 1
    superior = [s.superior_mm for s in report.levels]
    assert superior == sorted(superior, reverse=True)
    assert report.levels[0].name in ("body 1", "disc above body 1")
    assert review.level_table.rowCount() == len(report.levels)
    assert "1 lesion" in review.lesion_label.text()

    no_lesion = viewer.add_labels(np.where(data == 4, 1, data), **{**kwargs, "name": "no lesion"})
    review.labels_combo.set_layer(no_lesion)
    review.refresh(sync=True)
    assert "No lesion detected" in review.lesion_label.text()

    review.model_combo.set_layer(no_lesion)
    review.truth_combo.set_layer(truth)
    review.compare(sync=True)
    dice = {m.name: m.dice for m in review.comparison}
    assert dice["spinal canal"] == 1.0 and dice["lesion"] == 0.0
    assert review.compare_table.rowCount() == len(review.comparison)

    uncertainty = np.zeros(data.shape, np.float32)
    uncertainty[:, 40, :] = 1.0  # the most uncertain axial slice (y is S-I in this PIR study)
    uncertainty[:, 12, :] = 0.5
    viewer.add_image(uncertainty, name="study uncertainty", scale=truth.scale, translate=truth.translate)
    viewer.layers["study uncertainty"].metadata[GEOMETRY_KEY] = truth.metadata[GEOMETRY_KEY]
    review.plane_combo.setCurrentText("axial")
    assert review.next_uncertain_slice() == 40
    assert viewer.dims.order[0] == 1 and viewer.dims.current_step[1] == 40
    assert review.next_uncertain_slice() == 12
    review.plane_combo.setCurrentText("sagittal")
    review.next_uncertain_slice()
    assert viewer.dims.order == (0, 1, 2)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    assert tuple(camera.orientation2d) == ("down", "right")  # superior up, anterior left

    truth.data[5, 30, 30] = 7  # an unsaved correction
    review.labels_combo.set_layer(truth)
    review.export_labels(tmp_path / "corrected.nii.gz", sync=True)
    saved = read_volume(review.exported)
    assert saved.geometry.is_close(phantom.labels.geometry)
    np.testing.assert_array_equal(saved.array, truth.data)
    assert not errors(notifications)


def test_settings_are_remembered(viewer, tiny_model) -> None:
    from napari_spineseg.widgets.segment import SegmentWidget

    first = SegmentWidget(viewer)
    viewer.window.add_dock_widget(first, name="first")
    assert first.model_combo.set_model("tiny")
    first.plane_boxes["coronal"].setChecked(False)
    first.fusion_combo.setCurrentText("vote")
    first.device_combo.setCurrentIndex(1)
    first.run(sync=True)
    second = SegmentWidget(viewer)
    viewer.window.add_dock_widget(second, name="second")
    assert second.settings() == {**first.settings(), "model": "tiny"}
    assert second.settings()["planes"] == ["axial", "sagittal"] and second.settings()["fusion"] == "vote"


def test_a_crashing_worker_leaves_the_viewer_and_the_edits_intact(
    viewer, tiny_model, dirs, qtbot, notifications, monkeypatch, tmp_path
) -> None:
    from napari_spineseg.inference import Predictor
    from napari_spineseg.io import read_volume

    segment = dock(viewer, "Segment spine")
    segment.run(sync=True)
    labels = segment.last_layer
    labels.data_setitem((np.array([3]), np.array([30]), np.array([30])), 2)  # an unsaved correction
    edited = np.array(labels.data, copy=True)
    names = [layer.name for layer in viewer.layers]

    def crashing_run(self, volume, cancel=None):
        yield from ()
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(Predictor, "run", crashing_run)
    segment.run()
    qtbot.waitUntil(lambda: not segment.running, timeout=30_000)
    assert any("simulated device failure" in e for e in errors(notifications))
    assert [layer.name for layer in viewer.layers] == names
    np.testing.assert_array_equal(labels.data, edited)
    assert segment.run_button.isEnabled()

    def crashing_finetune(*args, **kwargs):
        yield from ()
        raise RuntimeError("simulated training failure")

    monkeypatch.setattr("napari_spineseg.training.finetune.finetune", crashing_finetune)
    finetune = dock(viewer, "Fine-tune model")
    finetune.add_pair(viewer.layers[0], labels)
    finetune.start()
    qtbot.waitUntil(lambda: finetune._run is None, timeout=60_000)
    assert any("simulated training failure" in e for e in errors(notifications))
    assert finetune.result is None and not finetune.save_button.isEnabled()
    assert sorted(p.name for p in dirs.iterdir()) == ["tiny.safetensors"]
    np.testing.assert_array_equal(labels.data, edited)

    review = dock(viewer, "Review segmentation")  # the corrections can still be saved
    review.labels_combo.set_layer(labels)
    review.export_labels(tmp_path / "unsaved.nii.gz", sync=True)
    np.testing.assert_array_equal(read_volume(review.exported).array, edited)
