"""The "Interpolate slices" dock widget: fill between the slices the annotator corrected.

Preview shows the proposed voxels in a temporary Labels layer; Apply writes them into the chosen
layer as one undo step (Ctrl+Z, or Undo here, restores the exact previous array); voxels the
annotator painted are never changed (see :mod:`._undo`).  On a Segment result (which keeps the
model's original prediction) the fill is blended into the model's shapes with distance from the
painted slices (``prior``, see :func:`napari_spineseg.interpolation.interpolate_between_slices`).
When the study's image (the Image layer of the same shape) was resampled from thicker slices, a
painted slice is first copied to the slices resampled from the same acquired slices
(:mod:`napari_spineseg.resampled`); the status says which.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import SpinesegError
from ._jobs import Outcome, in_event_loop_turns, notify_error, start_job
from ._layer_data import PREDICTION_KEY, is_kind, study_image
from ._layers import add_in_turns, build_layer
from ._pickers import LayerCombo
from ._undo import apply_change, paint_tracker, painted_mask
from ._views import PLANE_NAMES

PREVIEW_KEY = "spineseg_interpolation_preview"


def interpolation_job(
    labels: np.ndarray,
    axis: int,
    painted: np.ndarray,
    prior: np.ndarray | None = None,
    preview_kwargs: dict[str, Any] | None = None,
    image: np.ndarray | None = None,
):
    """Worker: the change filling between the painted slices, and a hidden preview layer of it.

    Plain arrays in (``image``: the study, to copy painted slices to their resampled twins);
    ``({"painted": [...], "copied": [...]} slice indices, LabelChange, preview layer or None)`` out.
    """
    from ..resampled import fill_from_corrections

    yield "interpolate"
    change, slices = fill_from_corrections(labels, axis, painted, image=image, prior=prior)
    if change.size == 0 or preview_kwargs is None:
        return slices, change, None
    yield "preview"
    shown = np.zeros(labels.shape, dtype=labels.dtype)
    shown[change.indices] = change.values  # cleared voxels (0) show as background
    return slices, change, build_layer(shown, preview_kwargs, "labels")


def model_prior(layer: Any) -> np.ndarray | None:
    """The Segment widget's original prediction of ``layer`` (same shape), if it has one."""
    prior = (layer.metadata or {}).get(PREDICTION_KEY)
    return prior if isinstance(prior, np.ndarray) and prior.shape == layer.data.shape else None


class InterpolateWidget(QWidget):
    """Fill the slices between corrected slices of a Labels layer (shape-based), with preview and undo."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.change: Any = None
        self.preview_layer: Any = None
        self._target: Any = None
        self._edits_at_preview = -1
        self.labels_combo = LayerCombo(napari_viewer, "labels", self)
        self.plane_combo = QComboBox(self)
        self.plane_combo.addItems(PLANE_NAMES)
        self.plane_combo.setCurrentText("sagittal")
        self.model_check = QCheckBox("Far from painted slices, keep the model's shapes", self)
        self.model_check.setChecked(True)
        self.model_check.setToolTip(
            "On a Segment result: the fill follows the painted slices near them and the model's own "
            "result further away (better than a long blend between distant slices)"
        )
        self.twins_check = QCheckBox("Copy to slices resampled from the same acquired slice", self)
        self.twins_check.setChecked(True)
        self.twins_check.setToolTip(
            "When the study was resampled from thicker slices (e.g. 4 mm to 1 mm), a painted slice also "
            "holds for the slices interpolated from the same acquired slices: they take its shapes first"
        )
        self.preview_button = QPushButton("Preview", self)
        self.preview_button.setToolTip("Fill between consecutive painted slices of the plane (shown, not yet applied)")
        self.preview_button.clicked.connect(lambda: self.preview())
        self.apply_button = QPushButton("Apply", self)
        self.apply_button.clicked.connect(lambda: self.apply())
        self.undo_button = QPushButton("Undo", self)
        self.undo_button.clicked.connect(lambda: self.undo())
        self.status = QLabel("Paint a structure on two or more slices, then Preview.", self)
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        form.addRow("Plane", self.plane_combo)
        layout.addLayout(form)
        layout.addWidget(self.model_check)
        layout.addWidget(self.twins_check)
        row = QHBoxLayout()
        for button in (self.preview_button, self.apply_button, self.undo_button):
            row.addWidget(button)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._track_all()
        napari_viewer.layers.events.inserted.connect(self._track_all)
        self.destroyed.connect(lambda *_: napari_viewer.layers.events.inserted.disconnect(self._track_all))

    def _track_all(self, *_: Any) -> None:
        """Record painting on every Labels layer from now on (interpolation needs to know it)."""
        for layer in self.viewer.layers:
            if is_kind(layer, "labels") and PREVIEW_KEY not in (layer.metadata or {}):
                paint_tracker(layer)

    def _axis(self, layer: Any) -> int:
        from .._napari_layers import geometry_from_layer
        from ..orientation import Plane, plane_array_axis

        return plane_array_axis(geometry_from_layer(layer, layer.data.shape), Plane(self.plane_combo.currentText()))

    def preview(self, sync: bool = False) -> None:
        """Compute the fill between painted slices and show it in a temporary layer."""
        layer = self.labels_combo.current_layer()
        if layer is None or PREVIEW_KEY in (layer.metadata or {}) or getattr(layer.data, "ndim", 0) != 3:
            notify_error("Choose a 3-D Labels layer to interpolate")
            return
        try:
            axis = self._axis(layer)
        except SpinesegError as error:
            notify_error(str(error))
            return
        self._remove_preview()
        self._target = layer
        self._edits_at_preview = paint_tracker(layer).edits
        self.preview_button.setEnabled(False)
        prior = model_prior(layer) if self.model_check.isChecked() else None
        preview_kwargs = {
            "name": f"{layer.name} interpolation preview",
            "scale": layer.scale,
            "translate": layer.translate,
            "opacity": 0.5,
            "metadata": {PREVIEW_KEY: True},
        }
        data = np.array(layer.data, copy=True)
        image = study_image(self.viewer, layer) if self.twins_check.isChecked() else None
        job = partial(interpolation_job, data, axis, painted_mask(layer), prior, preview_kwargs, image)
        start_job(job, "interpolation", lambda _: None, partial(self._on_preview, sync=sync), sync=sync)

    def _on_preview(self, outcome: Outcome, sync: bool = False) -> None:
        self.preview_button.setEnabled(True)
        if outcome.error:
            notify_error(outcome.error)
            return
        if outcome.value is None:
            return
        slices, self.change, preview = outcome.value
        painted, copied = slices["painted"], slices["copied"]
        if (len(painted) < 2 and not copied) or self.change.size == 0:
            self.change = None
            self.status.setText(f"Painted slices: {painted} — nothing to fill between them.")
            return
        self.preview_layer = preview
        in_event_loop_turns(add_in_turns(self.viewer, preview, select=False), lambda: None, sync=sync)
        removed = int(np.count_nonzero(self.change.values == 0))
        twins = f" The study was resampled from thicker slices: copied to slices {copied} first." if copied else ""
        self.status.setText(
            f"From painted slices {painted}: {self.change.size} voxels change "
            f"({removed} cleared, not shown).{twins} Apply to write them (undoable)."
        )

    def apply(self) -> int:
        """Write the previewed change into its layer as one undo step; returns voxels changed."""
        if self.change is None or self._target is None:
            notify_error("Preview an interpolation first")
            return 0
        try:
            if paint_tracker(self._target).edits != self._edits_at_preview:
                raise SpinesegError(f"{self._target.name} was edited after the preview; preview again")
            changed = apply_change(self._target, self.change)
        except SpinesegError as error:
            notify_error(str(error))
            return 0
        finally:
            self._remove_preview()
            self.change = None
        self.status.setText(f"Applied: {changed} voxels changed. Undo (or Ctrl+Z on the layer) restores them.")
        return changed

    def undo(self) -> None:
        """Undo the last edit of the chosen layer (napari's undo history)."""
        layer = self._target or self.labels_combo.current_layer()
        if layer is not None:
            layer.undo()
            self.status.setText(f"Undid the last edit of {layer.name}.")

    def _remove_preview(self) -> None:
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self.preview_layer)
        self.preview_layer = None
