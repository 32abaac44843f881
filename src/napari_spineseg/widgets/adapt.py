""" "Apply my corrections to this study": a panel (shown in the Review widget) with one button.

The model that segmented the chosen Labels layer is adapted for a few steps to the slices the
annotator painted (:mod:`napari_spineseg.adaptation`, in a napari thread worker), the study is
segmented again, and the unpainted voxels take the new labels as **one undo step** (Ctrl+Z, or
the layer's undo, restores the exact previous array); voxels the annotator painted are never
changed (:mod:`._undo`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from qtpy.QtWidgets import QFormLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..errors import SpinesegError
from ._jobs import Outcome, notify_error, start_job
from ._layer_data import RESULT_KEY, is_kind, layer_volume
from ._pickers import LayerCombo
from ._undo import apply_change, paint_tracker, painted_mask

DEFAULT_MODEL = "spineseg-default"
BUTTON_TEXT = "Apply my corrections to this study"


def adaptation_job(model: str, image: Any, labels: np.ndarray, painted: np.ndarray, config: Any = None):
    """Worker: adapt ``model`` to the painted slices and re-segment; yields progress text, returns the result."""
    from ..adaptation import adapt_to_study

    events = adapt_to_study(model, image, labels, painted, config)
    try:
        while True:
            event = next(events)
            if event.kind == "step":
                yield f"adapting: step {event.step}/{event.total_steps}"
            elif event.message:
                yield event.message
    except StopIteration as stop:
        return stop.value


def layer_model(layer: Any) -> str:
    """The model that segmented ``layer`` (Segment spine records it), else the bundled default."""
    record = (layer.metadata or {}).get(RESULT_KEY) or {}
    return str(record.get("model") or DEFAULT_MODEL)


class AdaptPanel(QWidget):
    """The button and its handler; ``labels_combo``: the host widget's choice of Labels layer."""

    def __init__(
        self,
        napari_viewer: Any,
        labels_combo: LayerCombo | None = None,
        parent: QWidget | None = None,
        config: Any = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.config = config  # an AdaptConfig (None: its defaults)
        self.result: Any = None
        self.labels_combo = labels_combo or LayerCombo(napari_viewer, "labels", self)
        self.image_combo = LayerCombo(napari_viewer, "image", self, studies_only=True)
        self.button = QPushButton(BUTTON_TEXT, self)
        self.button.setToolTip(
            "Adapt the model to the slices you painted (under a minute on a CPU), then re-segment the "
            "voxels you did not paint. Your painting is never changed; one undo restores the previous labels."
        )
        self.button.clicked.connect(lambda: self.apply_corrections())
        self.status = QLabel("Correct a few slices of the study, then apply your corrections to the rest.", self)
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("Study", self.image_combo)
        if labels_combo is None:
            form.addRow("Labels", self.labels_combo)
        layout.addLayout(form)
        layout.addWidget(self.button)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._track_all()  # painting is recorded from now on (adaptation must never overwrite it)
        napari_viewer.layers.events.inserted.connect(self._track_all)
        self.destroyed.connect(lambda *_: napari_viewer.layers.events.inserted.disconnect(self._track_all))

    def _track_all(self, *_: Any) -> None:
        for layer in self.viewer.layers:
            if is_kind(layer, "labels") and getattr(layer.data, "ndim", 0) == 3:
                paint_tracker(layer)

    def apply_corrections(self, sync: bool = False) -> None:
        """Start the adaptation on the chosen study and Labels layer (in a thread worker)."""
        layer, image_layer = self.labels_combo.current_layer(), self.image_combo.current_layer()
        if layer is None or image_layer is None:
            notify_error("Choose the study (Image) and its Labels layer")
            return
        try:
            image = layer_volume(image_layer)
            if tuple(layer.data.shape) != tuple(image.shape):
                raise SpinesegError(f"{layer.name} {layer.data.shape} is not on the grid of {image_layer.name}")
            painted = painted_mask(layer)
            if not painted.any():
                raise SpinesegError("nothing painted yet: correct at least one slice first")
        except SpinesegError as error:
            notify_error(str(error))
            return
        tracker = paint_tracker(layer)
        edits = tracker.edits
        labels = np.array(layer.data, copy=True)
        self.button.setEnabled(False)
        self.status.setText("Adapting the model to your corrections…")
        job = partial(adaptation_job, layer_model(layer), image, labels, painted, self.config)
        start_job(job, "study adaptation", self._on_progress, partial(self._on_done, layer, edits), sync=sync)

    def _on_progress(self, message: Any) -> None:
        if isinstance(message, str):
            self.status.setText(message)

    def _on_done(self, layer: Any, edits: int, outcome: Outcome) -> None:
        self.button.setEnabled(True)
        if outcome.error:
            self.status.setText("Adaptation failed.")
            notify_error(outcome.error)
            return
        result = self.result = outcome.value
        if outcome.cancelled or result is None or result.cancelled:
            self.status.setText("Cancelled: nothing changed.")
            return
        try:
            if paint_tracker(layer).edits != edits:
                raise SpinesegError(f"{layer.name} was edited during the adaptation; apply your corrections again")
            changed = apply_change(layer, result.change)
        except SpinesegError as error:
            notify_error(str(error))
            self.status.setText("Nothing changed.")
            return
        self.status.setText(
            f"Adapted to {len(result.slices)} painted {result.plane} slice(s) in {result.seconds:.0f} s: "
            f"{changed} unpainted voxels changed. Ctrl+Z on the layer restores them."
        )
