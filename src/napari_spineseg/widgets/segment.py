"""The "Segment spine" dock widget: run a model on an image layer in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..errors import SpinesegError
from ..orientation import Plane
from ..volume import Volume
from ._jobs import LAYER_MODULES, Outcome, in_event_loop_turns, notify_error, notify_info, start_job, warm_up
from ._layer_data import PREDICTION_KEY, RESULT_KEY, checksum, is_kind, layer_volume, unique_layer_name
from ._layers import add_in_turns, prepare_layers, replace_in_turns, replace_labels_in_turns
from ._panels import legend_html, legend_label
from ._pickers import LayerCombo, ModelCombo, model_classes
from ._settings import load_settings, save_settings
from ._threads import gui_friendly_torch
from ._undo import follow_history, in_plugin_edit
from ._views import PLANE_NAMES, show_plane

DEVICES = ("auto", "cpu", "cuda", "mps")
FUSIONS = ("mean", "weighted", "vote")
#: Image-layer metadata that says where the study came from: copied onto its results, so a result
#: can be exported as a DICOM Segmentation of the series (and the report knows the body part).
SOURCE_KEYS = ("source", "format", "dicom", "dicom_files", "series_id")


def source_metadata(layer: Any) -> dict[str, Any]:
    """The study-source entries of an image layer's metadata (see :data:`SOURCE_KEYS`)."""
    meta = getattr(layer, "metadata", None) or {}
    return {key: meta[key] for key in SOURCE_KEYS if meta.get(key) is not None}


def result_name(image_name: str, model: str, version: str | None, kind: str = "segmentation") -> str:
    """``"<study> segmentation (<model> v<version>)"``: a result says which model made it."""
    tag = f"{model} v{version}" if version and version != "unknown" else model
    return f"{image_name} {kind} ({tag})"


def segment_job(
    volume: Volume,
    model: str,
    settings: dict[str, Any],
    cancel: threading.Event,
    source: dict[str, Any] | None = None,
):
    """Worker body: load the model, segment, and prepare the layers (no Qt, nothing in the viewer).

    Everything proportional to the study's size (unique values, percentiles, hashes, copies)
    and the layer objects themselves are made here, so the GUI thread only has to add them.
    ``source`` (the image layer's :func:`source_metadata`) is recorded on the result layers.
    """
    from napari.utils.colormaps import DirectLabelColormap

    from .._napari_layers import image_layer_data, labels_layer_data, levels_layer_data
    from ..inference import Predictor, ProgressEvent, SegmentationSettings
    from ..levels import identify_levels
    from ..plausibility import body_part_of, plausibility_warnings
    from ..review import review_labels
    from ..schema import VERTEBRAL_BODY, class_for_value, color_dict, extend_classes
    from ._finetune_job import label_values
    from ._layers import build_layer

    yield ProgressEvent("load", fraction=0.0)
    with gui_friendly_torch():
        predictor = Predictor(SegmentationSettings(**settings))
        loaded = predictor.load(model)
        result = yield from predictor.run(volume, cancel)
    classes = extend_classes(loaded.metadata.classes, label_values(result.labels.array))
    labels = labels_layer_data(result.labels, classes)
    labels[1]["metadata"].update(source or {})
    version = loaded.metadata.version
    # Values an annotator may paint next (new structures) get the colour fine-tuning will give them.
    colours = color_dict(classes)
    top = max(c.value for c in classes)
    colours.update({v: class_for_value(v, classes).color for v in range(top + 1, min(top + 11, 255))})
    labels[1]["colormap"] = DirectLabelColormap(color_dict=colours)
    labels[1]["metadata"][RESULT_KEY] = {
        "kind": "labels",
        "image": volume.name,
        "model": result.model_name,
        "version": version,
        "planes": list(result.planes),
        "checksum": checksum(result.labels.array),
        "edited": False,
    }
    # The untouched prediction is kept so fine-tuning can tell which slices the annotator changed.
    labels[1]["metadata"][PREDICTION_KEY] = np.array(result.labels.array, copy=True)
    uncertainty = None
    if result.uncertainty is not None:
        uncertainty = image_layer_data(result.uncertainty)
        uncertainty[1].update(colormap="inferno", contrast_limits=(0.0, 1.0), opacity=0.5, blending="additive")
        uncertainty[1]["metadata"].update(source or {})
        uncertainty[1]["metadata"][RESULT_KEY] = {
            "kind": "uncertainty",
            "image": volume.name,
            "model": result.model_name,
            "version": version,
        }
    # The layer objects too (napari's colormap, features and slicing work): the GUI thread only appends them.
    layers = {"labels": build_layer(*labels)}
    if uncertainty is not None:
        layers["uncertainty"] = build_layer(*uncertainty)
    levels = identify_levels(result.labels)  # vertebral levels (levels.py); a layer only when named
    if levels.named:
        layers["levels"] = build_layer(*levels_layer_data(levels, f"{volume.name} levels"))
    review = review_labels(result.labels.array, result.labels.geometry, classes)
    expects_bodies = any(c.value == VERTEBRAL_BODY for c in loaded.metadata.classes)
    implausible = plausibility_warnings(review, body_part_of(source), expects_bodies)
    return _Output(result, classes, labels, uncertainty, layers, version, implausible, levels)


@dataclass
class _Output:
    result: Any  # SegmentationResult
    classes: list
    labels: tuple  # layer data tuple
    uncertainty: tuple | None
    layers: dict[str, Any]  # hidden napari layers made from the tuples ("labels", "uncertainty", "levels")
    version: str = ""  # the model's version
    implausible: list[str] = field(default_factory=list)  # plausibility warnings (not a spine result?)
    levels: Any = None  # LevelResult


ACCURATE_MODEL_NAME = "spineseg-accurate"


def _available_devices() -> list[str]:
    try:
        from ..inference import available_devices

        return available_devices()
    except Exception:  # no usable torch: the run will report it
        return ["cpu"]


def is_edited(layer: Any) -> bool:
    """Whether a Labels layer is not (or no longer) an untouched result of this widget."""
    follow_history(layer)  # a re-segmentation undone since: its metadata goes back too
    meta = (layer.metadata or {}).get(RESULT_KEY)
    if not meta or meta.get("kind", "labels") != "labels":
        return True
    return bool(meta.get("edited")) or checksum(np.asarray(layer.data)) != meta.get("checksum")


def _mark_edited(event: Any) -> None:
    if in_plugin_edit(event.source):  # the plugin's own edits (a checksum tells whether the result changed)
        return
    meta = (event.source.metadata or {}).get(RESULT_KEY)
    if meta is not None:
        meta["edited"] = True


@dataclass
class _Run:
    image_name: str
    cancel: threading.Event
    progress: Any
    settings: dict[str, Any] = field(default_factory=dict)
    sync: bool = False
    started: float = field(default_factory=time.monotonic)


class SegmentWidget(QWidget):
    """Image + model + planes/fusion/device → a Labels layer (and optionally an uncertainty map)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._run: _Run | None = None
        self._worker: Any = None
        self.last_layer: Any = None

        self.image_combo = LayerCombo(napari_viewer, "image", self, studies_only=True)
        self.model_combo = ModelCombo(self)
        self.model_combo.currentIndexChanged.connect(self._show_model_legend)
        for combo in (self.image_combo, self.model_combo):  # long names are elided: in full as a tooltip
            combo.setToolTip(combo.currentText())
        napari_viewer.layers.events.inserted.connect(self._follow_new_study)
        self.destroyed.connect(lambda *_: napari_viewer.layers.events.inserted.disconnect(self._follow_new_study))
        self.view_buttons = {name: QPushButton(name.capitalize(), self) for name in PLANE_NAMES}
        views = QHBoxLayout()
        for name, button in self.view_buttons.items():
            button.setToolTip(f"Show {name} slices the radiological way (the slider is named after the plane)")
            button.clicked.connect(partial(self.show_view, name))
            views.addWidget(button)
        self.plane_boxes = {name: QCheckBox(name, self) for name in PLANE_NAMES}
        planes = QHBoxLayout()
        for box in self.plane_boxes.values():
            box.setChecked(True)
            planes.addWidget(box)
        self.fusion_combo = QComboBox(self)
        self.fusion_combo.addItems(FUSIONS)
        self.fusion_combo.setToolTip("mean: average probabilities; weighted: model's plane weights; vote: majority")
        self.device_combo = QComboBox(self)
        self.postprocess_box = QCheckBox("clean up (largest parts, fill holes)", self)
        self.postprocess_box.setChecked(True)
        self.uncertainty_box = QCheckBox("add an uncertainty map", self)
        self.run_button = QPushButton("Run", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.legend = legend_label()

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Planes", planes)
        form.addRow("Fusion", self.fusion_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Post-processing", self.postprocess_box)
        form.addRow("Uncertainty", self.uncertainty_box)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        view_form = QFormLayout()
        view_form.addRow("View", views)
        layout.addLayout(view_form)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("<b>Legend</b>", self))
        layout.addWidget(self.legend)
        layout.addStretch(1)

        self._set_devices(None)
        # torch and pandas (the first Labels layer) take seconds to import: never on the GUI thread.
        self.ready = warm_up(
            (*LAYER_MODULES, "torch"), lambda: self._set_devices(_available_devices()), self, then=(prepare_layers,)
        )
        self._restore_settings()
        self._show_model_legend()

    # Settings ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The current choices (as remembered between sessions)."""
        return {
            "model": self.model_combo.current_model(),
            "planes": [name for name, box in self.plane_boxes.items() if box.isChecked()],
            "fusion": self.fusion_combo.currentText(),
            "device": DEVICES[max(self.device_combo.currentIndex(), 0)],
            "postprocess": self.postprocess_box.isChecked(),
            "uncertainty": self.uncertainty_box.isChecked(),
        }

    def _restore_settings(self) -> None:
        saved = load_settings("segment")
        if saved.get("model"):
            self.model_combo.set_model(str(saved["model"]))
        if isinstance(saved.get("planes"), list) and saved["planes"]:
            for name, box in self.plane_boxes.items():
                box.setChecked(name in saved["planes"])
        if saved.get("fusion") in FUSIONS:
            self.fusion_combo.setCurrentText(saved["fusion"])
        if saved.get("device") in DEVICES:
            self.device_combo.setCurrentIndex(DEVICES.index(saved["device"]))
        self.postprocess_box.setChecked(bool(saved.get("postprocess", True)))
        self.uncertainty_box.setChecked(bool(saved.get("uncertainty", False)))

    def _set_devices(self, available: list[str] | None) -> None:
        try:
            current = max(self.device_combo.currentIndex(), 0)
        except RuntimeError:  # widget closed before torch answered
            return
        self.device_combo.clear()
        for device in DEVICES:
            if available is None:
                text = device if device in ("auto", "cpu") else f"{device} (checking…)"
            elif device == "auto":
                text = f"auto ({available[0]})"
            else:
                text = device if device in available else f"{device} (not available)"
            self.device_combo.addItem(text)
            usable = device in ("auto", "cpu") or (available is not None and device in available)
            self.device_combo.model().item(self.device_combo.count() - 1).setEnabled(usable)
        self.device_combo.setCurrentIndex(current)
        self._suggest_accurate_model(available)

    def _suggest_accurate_model(self, available: list[str] | None) -> None:
        """With a CUDA device, the accurate model costs little: say so beside the model picker."""
        if not available or "cuda" not in available:
            return
        if ACCURATE_MODEL_NAME in self.model_combo.models() and self.model_combo.current_model() != ACCURATE_MODEL_NAME:
            self.status.setText(f"A CUDA GPU is present: the more accurate model {ACCURATE_MODEL_NAME} is recommended.")
            self.model_combo.setToolTip(f"Recommended with a GPU: {ACCURATE_MODEL_NAME}")

    def _follow_new_study(self, event: Any) -> None:
        """A study just opened becomes the image to segment, and is brought into view."""
        layer = event.value
        if not is_kind(layer, "image") or _is_ours(layer) or getattr(layer, "ndim", 0) != 3:
            return
        try:
            self.image_combo.set_layer(layer)
        except RuntimeError:  # the widget is gone
            return
        # The slice shown for an earlier study may lie outside the new one (a black canvas): go to its middle.
        extent = np.asarray(layer.extent.world, dtype=float)
        for axis, middle in enumerate(extent.mean(axis=0)[-3:]):
            self.viewer.dims.set_point(self.viewer.dims.ndim - 3 + axis, float(middle))
        self.viewer.reset_view()
        labels = plane_labels(layer)
        if labels is not None and self.viewer.dims.ndim == 3:
            self.viewer.dims.axis_labels = labels

    def show_view(self, plane: str) -> int | None:
        """Show the chosen study in ``plane`` (axial/coronal/sagittal), radiological orientation."""
        layer = self.image_combo.current_layer() or next(
            (la for la in reversed(list(self.viewer.layers)) if getattr(la, "ndim", 0) == 3), None
        )
        if layer is None:
            notify_error("Open a study first")
            return None
        try:
            axis = show_plane(self.viewer, layer, Plane(plane).value)
        except SpinesegError as error:
            notify_error(str(error))
            return None
        self.viewer.reset_view()
        return axis

    def _show_model_legend(self, *_: Any) -> None:
        classes = model_classes(self.model_combo.current_model())
        self.legend.setText(legend_html(classes) if classes else "<i>choose a model</i>")

    # Running -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._run is not None

    def run(self, sync: bool = False) -> None:
        """Segment the chosen image (``sync`` drains the job on this thread, for tests/scripts)."""
        if self._run is not None:
            notify_info("A segmentation is already running")
            return
        image = self.image_combo.current_layer()
        model = self.model_combo.current_model()
        if image is None:
            notify_error("Open a study (an image layer) to segment first")
            return
        if model is None:
            notify_error("Choose a model, or load a model file")
            return
        choices = self.settings()
        if not choices["planes"]:
            notify_error("Choose at least one plane")
            return
        try:
            volume = layer_volume(image)
        except SpinesegError as error:
            notify_error(str(error))
            return
        save_settings("segment", choices)
        settings = {
            "planes": choices["planes"],
            "fusion": choices["fusion"],
            "device": choices["device"],
            "postprocess": choices["postprocess"],
            "uncertainty": "entropy" if choices["uncertainty"] else None,
        }
        from napari.utils import progress

        cancel = threading.Event()
        self._run = _Run(image.name, cancel, progress(total=1000, desc=f"Segmenting {image.name}"), settings, sync)
        self._set_running(True)
        self.status.setText(f"Loading {model}…")
        job = partial(segment_job, volume, model, settings, cancel, source_metadata(image))
        self._worker = start_job(job, "segmentation", self._on_progress, self._on_done, sync=sync)

    def cancel(self) -> None:
        """Stop at the next batch; nothing is added to the viewer."""
        if self._run is not None:
            self._run.cancel.set()
            self.status.setText("Cancelling…")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_progress(self, event: Any) -> None:
        run = self._run
        if run is None:
            return
        target = round(1000 * event.fraction)
        if target > run.progress.n:
            run.progress.update(target - run.progress.n)
        if event.stage == "plane":
            overall = overall_progress(event.fraction, time.monotonic() - run.started)
            self.status.setText(f"{overall} — {event.plane}: slice {event.done} of {event.total}")
        elif event.stage == "fuse":
            self.status.setText("Fusing planes…")

    def _on_done(self, outcome: Outcome) -> None:
        run, self._worker = self._run, None
        if run is None:
            return
        run.progress.close()
        if outcome.cancelled or run.cancel.is_set():
            self.status.setText("Cancelled: nothing was added.")
            notify_info("Segmentation cancelled: nothing was added")
        elif outcome.error is not None:
            self.status.setText(f"Failed: {outcome.error}")
            notify_error(outcome.error)
        else:
            in_event_loop_turns(self._show(run, outcome.value), self._finish, sync=run.sync)
            return
        self._finish()

    def _finish(self) -> None:
        self._run = None
        self._set_running(False)

    # Results (GUI thread: one short step per event-loop turn) ---------------------------------
    def _show(self, run: _Run, output: _Output) -> Iterator[None]:
        if output.uncertainty is not None:
            yield from self._show_uncertainty(run, output)
            yield
        yield from self._show_labels(run, output)
        yield from self._show_levels(run, output)

    def _show_uncertainty(self, run: _Run, output: _Output) -> Iterator[None]:
        name = result_name(run.image_name, output.result.model_name, output.version, "uncertainty")
        existing = next((lay for lay in self.viewer.layers if lay.name == name and _is_ours(lay)), None)
        if existing is not None:
            existing.data = output.uncertainty[0]
        else:
            layer = output.layers["uncertainty"]
            layer.name = name
            yield from add_in_turns(self.viewer, layer, select=False)  # the labels layer is selected next

    def _show_labels(self, run: _Run, output: _Output) -> Iterator[None]:
        result = output.result
        data, kwargs, _ = output.labels
        layer = self._replaceable(run.image_name, data.shape, result.model_name, output.version, data.dtype)
        if layer is not None:  # one step of the layer's undo history (Ctrl+Z: the previous result)
            yield from replace_labels_in_turns(layer, data, kwargs)
        else:
            layer = output.layers["labels"]
            name = result_name(run.image_name, result.model_name, output.version)
            layer.name = unique_layer_name(self.viewer, name)
            layer.events.paint.connect(_mark_edited)
            yield from add_in_turns(self.viewer, layer)
        yield
        self.last_layer = layer
        self.legend.setText(legend_html(output.classes))
        planes = ", ".join(result.planes)
        text = f"{layer.name}: {result.model_name} ({planes}) in {result.seconds:.1f} s"
        if output.implausible:
            text += "<br><b>Check this result:</b> " + "; ".join(output.implausible)
        self.status.setText(text)
        from napari.utils.notifications import show_warning

        for warning in [*result.warnings, *output.implausible]:
            show_warning(f"{run.image_name}: {warning}")

    def _show_levels(self, run: _Run, output: _Output) -> Iterator[None]:
        """The levels layer ("L3", "L4/L5" on hover) when the levels are named; the status says either way."""
        from .._napari_layers import LEVELS_KEY
        from .._napari_layers import levels_layer_data as levels_data

        levels = output.levels
        if levels is None:
            return
        name = f"{run.image_name} levels"
        stale = [lay for lay in self.viewer.layers if lay.name == name and LEVELS_KEY in (lay.metadata or {})]
        if levels.named and stale:  # new data for the existing layer (removing a layer stalls the viewer)
            data, kwargs, _ = levels_data(levels, name)
            layer = stale.pop()
            if layer.data.shape == data.shape and np.can_cast(data.dtype, layer.data.dtype):
                yield from replace_labels_in_turns(layer, data, kwargs)  # Ctrl+Z: the levels of before
            else:
                yield from replace_in_turns(layer, data, kwargs)
        for old in stale:
            self.viewer.layers.remove(old)
            yield
        if levels.named:
            if not any(lay.name == name for lay in self.viewer.layers):
                layer = output.layers["levels"]
                layer.name = name
                yield from add_in_turns(self.viewer, layer, select=False)
            names = [i.name for i in levels.instances if i.kind == "body" and i.name]
            summary = f"levels {names[0]}–{names[-1]}"
        else:
            summary = f"levels uncertain: {levels.reason}"
        self.status.setText(f"{self.status.text()}; {summary}")

    def _replaceable(self, image_name: str, shape: tuple, model: str, version: str, dtype: Any = np.uint8) -> Any:
        """An earlier, unedited result of the same model for the same image.

        Edited results are never overwritten, nor are another model's (base and fine-tuned
        results stay side by side for comparison).
        """
        for layer in reversed(list(self.viewer.layers)):
            meta = (layer.metadata or {}).get(RESULT_KEY)
            if not (is_kind(layer, "labels") and meta and meta.get("image") == image_name):
                continue
            if meta.get("model") != model or str(meta.get("version", "")) != str(version):
                continue
            fits = layer.data.shape == shape and np.can_cast(dtype, layer.data.dtype)
            if fits and not is_edited(layer):
                return layer
        return None

    # Used by the fine-tune widget --------------------------------------------------------------
    def segment_with(self, model: str, image_layer: Any, sync: bool = False) -> None:
        """Select ``model`` and ``image_layer`` and run."""
        self.model_combo.refresh(select=model)
        self.image_combo.set_layer(image_layer)
        self.run(sync=sync)


def _is_ours(layer: Any) -> bool:
    return (layer.metadata or {}).get(RESULT_KEY) is not None


def plane_labels(layer: Any) -> list[str] | None:
    """The plane each array axis of a 3-D layer stacks (``["sagittal", "axial", "coronal"]``...)."""
    from .._napari_layers import geometry_from_layer
    from ..orientation import plane_array_axis

    try:
        geometry = geometry_from_layer(layer, layer.data.shape)
        return [p.value for p in sorted(Plane, key=lambda p: plane_array_axis(geometry, p))]
    except (SpinesegError, ValueError, KeyError):
        return None


def overall_progress(fraction: float, elapsed_s: float) -> str:
    """``"42 % — about 1 min 20 s left"`` from the overall fraction done and the time spent."""
    percent = f"{100 * min(max(fraction, 0.0), 1.0):.0f} %"
    if fraction <= 0.02 or elapsed_s < 1.0:
        return percent
    left = max(elapsed_s * (1.0 - fraction) / fraction, 0.0)
    minutes, seconds = divmod(round(left), 60)
    return f"{percent} — about {minutes} min {seconds:02d} s left" if minutes else f"{percent} — about {seconds} s left"
