"""The "Review segmentation" dock widget: volumes, levels, lesions, comparison, uncertainty, export."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..errors import SpinesegError
from ._shared import (
    PLANE_NAMES,
    LayerCombo,
    Outcome,
    fill_table,
    is_kind,
    layer_volume,
    notify_error,
    notify_info,
    scrolling_layout,
    show_plane,
    start_job,
)
from .adapt import AdaptPanel


def review_job(array: np.ndarray, geometry: Any, classes: list):
    from ..review import review_labels

    yield "review"
    return review_labels(array, geometry, classes)


def compare_job(pred: Any, truth: Any, names: dict[int, str]):
    from ..metrics import evaluate_volumes

    yield "compare"
    return evaluate_volumes(pred, truth, class_names=names)


def export_job(array: np.ndarray, geometry: Any, path: str, metadata: dict | None = None, name: str = "labels"):
    from ..io import write_labels

    yield "export"
    if str(path).lower().endswith(".dcm"):  # a DICOM Segmentation of the layer's source series
        from .._writer import dicom_seg_from_layer

        return dicom_seg_from_layer(path, array, metadata or {}, geometry, name)
    return write_labels(array, path, geometry)


def _table(parent: QWidget) -> QTableWidget:
    table = QTableWidget(parent)
    table.setFixedHeight(40)
    return table


class ReviewWidget(QWidget):
    """Check a Labels layer before it is used: numbers per class and level, and where to look."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.review: Any = None
        self.comparison: list = []
        self.exported: Path | None = None
        self._ranking: dict[tuple[Any, str], tuple[np.ndarray, np.ndarray, int]] = {}

        self.labels_combo = LayerCombo(napari_viewer, "labels", self)
        self.refresh_button = QPushButton("Measure", self)
        self.refresh_button.setToolTip("Volumes, components, levels and lesions of the chosen Labels layer")
        self.refresh_button.clicked.connect(lambda: self.refresh())
        self.export_button = QPushButton("Export labels…", self)
        self.export_button.clicked.connect(lambda: self.export_labels())
        self.lesion_label = QLabel("", self)
        self.lesion_label.setWordWrap(True)
        self.class_table = _table(self)
        self.level_table = _table(self)

        self.model_combo = LayerCombo(napari_viewer, "labels", self)
        self.truth_combo = LayerCombo(napari_viewer, "labels", self)
        self.compare_button = QPushButton("Compare", self)
        self.compare_button.clicked.connect(lambda: self.compare())
        self.compare_table = _table(self)

        self.uncertainty_combo = LayerCombo(napari_viewer, "image", self)
        self.plane_combo = QComboBox(self)
        self.plane_combo.addItems(PLANE_NAMES)
        self.next_button = QPushButton("Go to next most uncertain slice", self)
        self.next_button.clicked.connect(lambda: self.next_uncertain_slice())
        self.uncertainty_label = QLabel("", self)
        self.uncertainty_label.setWordWrap(True)
        self._prefer_uncertainty()
        napari_viewer.layers.events.inserted.connect(self._prefer_uncertainty)
        self.destroyed.connect(lambda *_: napari_viewer.layers.events.inserted.disconnect(self._prefer_uncertainty))

        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        layout.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.refresh_button)
        row.addWidget(self.export_button)
        layout.addLayout(row)
        self.tabs = QTabWidget(self)
        layout.addWidget(self.tabs)
        numbers = scrolling_layout(self._tab("Numbers"))
        numbers.addWidget(self.lesion_label)
        numbers.addWidget(self.class_table)
        numbers.addWidget(QLabel("Levels, superior → inferior", self))
        numbers.addWidget(self.level_table)
        numbers.addStretch(1)
        compare = scrolling_layout(self._tab("Compare"))
        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Corrected", self.truth_combo)
        compare.addLayout(form)
        compare.addWidget(self.compare_button)
        compare.addWidget(self.compare_table)
        compare.addStretch(1)
        uncertainty = scrolling_layout(self._tab("Uncertainty"))
        form = QFormLayout()
        form.addRow("Map", self.uncertainty_combo)
        form.addRow("Plane", self.plane_combo)
        uncertainty.addLayout(form)
        uncertainty.addWidget(self.next_button)
        uncertainty.addWidget(self.uncertainty_label)
        uncertainty.addStretch(1)
        self.adapt_panel = AdaptPanel(napari_viewer, self.labels_combo, self.tabs)  # issue 16: apply corrections
        self.tabs.addTab(self.adapt_panel, "Corrections")

    def _tab(self, title: str) -> QWidget:
        page = QWidget(self.tabs)
        self.tabs.addTab(page, title)
        return page

    def _prefer_uncertainty(self, *_: Any) -> None:
        for layer in reversed(list(self.viewer.layers)):
            if is_kind(layer, "image") and "uncertainty" in layer.name:
                self.uncertainty_combo.set_layer(layer)
                return

    # Per-class and per-level numbers -----------------------------------------------------------
    def refresh(self, sync: bool = False) -> None:
        """Measure the chosen Labels layer (volumes, components, levels, lesions)."""
        from .._napari_layers import classes_from_layer

        layer = self.labels_combo.current_layer()
        if layer is None:
            notify_error("Choose a Labels layer to review")
            return
        try:
            volume = layer_volume(layer)
        except SpinesegError as error:
            notify_error(str(error))
            return
        self.refresh_button.setEnabled(False)
        job = partial(review_job, np.asarray(volume.array), volume.geometry, classes_from_layer(layer))
        start_job(job, "review", lambda _: None, self._on_review, sync=sync)

    def _on_review(self, outcome: Outcome) -> None:
        self.refresh_button.setEnabled(True)
        if outcome.error:
            notify_error(outcome.error)
            return
        if outcome.value is None:
            return
        self.review = review = outcome.value
        rows = [[c.name, c.value, c.volume_ml, c.components] for c in review.classes]
        fill_table(self.class_table, ["class", "value", "mL", "parts"], rows)
        rows = [[s.name, s.volume_ml, s.height_mm] for s in review.levels]
        fill_table(self.level_table, ["structure", "volume mL", "height mm"], rows)
        names = {c.value: c.name for c in review.classes}
        lines = [f"<b>{review.lesion_message()}</b>"]
        others = [c for c in review.classes if c.value > 4]
        if others:
            listed = ", ".join(f"{c.name} ({c.components} part(s), {c.volume_ml:.2f} mL)" for c in others)
            lines.append(f"Other labelled structures: {listed}")
        fragments = ", ".join(f"{names.get(v, v)} {n}" for v, n in review.fragments.items() if n)
        if fragments:
            lines.append(f"Small fragments, not listed as levels: {fragments}")
        self.lesion_label.setText("<br>".join(lines))

    # Model vs corrected ------------------------------------------------------------------------
    def compare(self, sync: bool = False) -> None:
        """Dice and HD95 per class between the model's and the corrected Labels layers."""
        from .._napari_layers import classes_from_layer

        pred, truth = self.model_combo.current_layer(), self.truth_combo.current_layer()
        if pred is None or truth is None or pred is truth:
            notify_error("Choose two different Labels layers: the model's result and the corrected one")
            return
        try:
            pred_volume = layer_volume(pred)
            truth_volume = layer_volume(truth, like=pred_volume)
            pred_volume = layer_volume(pred, like=truth_volume)
        except SpinesegError as error:
            notify_error(str(error))
            return
        names = {c.value: c.name for c in [*classes_from_layer(pred), *classes_from_layer(truth)]}
        self.compare_button.setEnabled(False)
        job = partial(compare_job, pred_volume, truth_volume, names)
        start_job(job, "comparison", lambda _: None, self._on_compare, sync=sync)

    def _on_compare(self, outcome: Outcome) -> None:
        self.compare_button.setEnabled(True)
        if outcome.error:
            notify_error(outcome.error)
            return
        self.comparison = outcome.value or []
        rows = [[m.name, m.dice, m.hd95_mm, m.volume_pred_ml, m.volume_truth_ml] for m in self.comparison]
        fill_table(self.compare_table, ["class", "Dice", "HD95 mm", "mL model", "mL corr."], rows)

    # Uncertainty navigation --------------------------------------------------------------------
    def next_uncertain_slice(self) -> int | None:
        """Show the next slice (along the chosen plane) in order of decreasing mean uncertainty."""
        from ..review import slice_means, uncertain_slices

        layer = self.uncertainty_combo.current_layer()
        if layer is None or getattr(layer.data, "ndim", 0) != 3:
            notify_error("Choose a 3-D uncertainty map (run Segment spine with 'add an uncertainty map')")
            return None
        plane = self.plane_combo.currentText()
        try:
            axis = show_plane(self.viewer, layer, plane)
        except SpinesegError as error:
            notify_error(str(error))
            return None
        key = (layer.unique_id, plane)
        cached = self._ranking.get(key)
        if cached is None or cached[0].shape[0] != layer.data.shape[axis]:
            data = np.asarray(layer.data)
            cached = (slice_means(data, axis), uncertain_slices(data, axis), 0)
        means, order, position = cached
        index = int(order[position % len(order)])
        self._ranking[key] = (means, order, position + 1)
        show_plane(self.viewer, layer, plane, index)
        rank = position % len(order) + 1
        self.uncertainty_label.setText(
            f"{plane} slice {index} — rank {rank} of {len(order)}, mean uncertainty {means[index]:.3f}"
        )
        return index

    # Export ------------------------------------------------------------------------------------
    def export_labels(self, path: str | Path | None = None, sync: bool = False) -> None:
        """Save the chosen Labels layer (with any unsaved corrections) in its study's geometry.

        The labels are copied now (painting may go on) and written in the background.
        """
        layer = self.labels_combo.current_layer()
        if layer is None:
            notify_error("Choose a Labels layer to export")
            return
        if path is None:
            source = (layer.metadata or {}).get("source")
            folder = Path(source).parent if source else Path.home()
            path, _ = QFileDialog.getSaveFileName(
                self,
                "Export labels",
                str(folder / f"{layer.name}.nii.gz"),
                "NIfTI (*.nii.gz *.nii);;MetaImage (*.mha *.mhd);;NRRD (*.nrrd);;"
                "DICOM Segmentation of a DICOM study (*.dcm)",
            )
            if not path:
                return
        try:
            volume = layer_volume(layer)
        except SpinesegError as error:
            notify_error(str(error))
            return
        self.export_button.setEnabled(False)
        metadata = dict(layer.metadata or {})
        job = partial(export_job, np.array(volume.array, copy=True), volume.geometry, str(path), metadata, layer.name)
        start_job(job, "export", lambda _: None, partial(self._on_export, layer.name), sync=sync)

    def _on_export(self, name: str, outcome: Outcome) -> None:
        self.export_button.setEnabled(True)
        if outcome.error:
            notify_error(outcome.error)
        elif outcome.value is not None:
            self.exported = Path(outcome.value)
            notify_info(f"Saved {name} to {outcome.value}")
