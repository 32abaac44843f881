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
from ._jobs import Outcome, notify_error, notify_info, start_job
from ._layer_data import RESULT_KEY, is_kind, layer_volume, study_image
from ._panels import fill_table, scrolling_layout
from ._pickers import LayerCombo
from ._views import PLANE_NAMES, show_plane
from .adapt import AdaptPanel


def review_job(array: np.ndarray, geometry: Any, classes: list):
    from ..review import review_labels

    yield "review"
    return review_labels(array, geometry, classes)


def compare_job(pred: Any, truth: Any, names: dict[int, str]):
    from ..metrics import evaluate_volumes

    yield "compare"
    return evaluate_volumes(pred, truth, class_names=names)


def export_job(
    array: np.ndarray,
    geometry: Any,
    path: str,
    metadata: dict | None = None,
    name: str = "labels",
    levels: Any = None,
):
    """Write the labels (a levels layer: its level map and JSON sidecar, or one DICOM segment per
    level); ``levels`` (the reviewed layer's corrected LevelResult) goes beside as ``<name>_levels``."""
    from ..io import write_labels

    yield "export"
    if levels is not None and not str(path).lower().endswith(".dcm"):
        from ..io import strip_suffix, volume_suffix
        from ..levels import write_levels

        beside = Path(path).with_name(f"{strip_suffix(path)}_levels{volume_suffix(path)}")
        write_levels(levels, beside, geometry)
    if str(path).lower().endswith(".dcm"):  # a DICOM Segmentation of the layer's source series
        from .._writer import dicom_seg_from_layer

        return dicom_seg_from_layer(path, array, metadata or {}, geometry, name)
    return write_labels(array, path, geometry)


def export_levels_job(levels: Any, path: str, metadata: dict, name: str):
    """A (corrected) level map: NIfTI/MHA/NRRD plus its JSON sidecar, or a DICOM-SEG of the study."""
    from ..levels import write_levels, write_levels_dicom_seg

    yield "export"
    if str(path).lower().endswith(".dcm"):
        from ..dicomseg import NOT_DICOM_MESSAGE
        from ..errors import InputError
        from ..volume import Volume

        files, source = metadata.get("dicom_files"), metadata.get("source")
        if not files and not source:
            raise InputError(f"{name}: {NOT_DICOM_MESSAGE}; this layer records no source study")
        series = Volume(levels.level_map, levels.geometry, metadata={"dicom_files": files}) if files else source
        return str(write_levels_dicom_seg(levels, series, path))
    write_levels(levels, path, levels.geometry)
    return str(path)


def _table(parent: QWidget) -> QTableWidget:
    table = QTableWidget(parent)
    table.setFixedHeight(40)
    return table


def fit_width(table: QTableWidget) -> None:
    """Keep every number column in view: the first (name) column takes what is left, elided.

    The full name is the cell's tooltip.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QHeaderView

    table.setWordWrap(False)  # a long name is elided, not wrapped (taller rows would need a scrollbar)
    table.setTextElideMode(Qt.TextElideMode.ElideRight)
    table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
    for row in range(table.rowCount()):
        item = table.item(row, 0)
        if item is not None:
            item.setToolTip(item.text())
    table.resizeRowsToContents()
    rows = sum(table.rowHeight(r) for r in range(min(table.rowCount(), 8)))
    header = max(table.horizontalHeader().height(), table.horizontalHeader().sizeHint().height())  # two-line
    table.setFixedHeight(header + rows + 2 * table.frameWidth() + table.horizontalScrollBar().sizeHint().height() + 2)


def is_uncertainty_map(layer: Any) -> bool:
    """An uncertainty map made by Segment spine (or one opened from a file named so); never a study."""
    kind = ((getattr(layer, "metadata", None) or {}).get(RESULT_KEY) or {}).get("kind")
    return kind == "uncertainty" or (kind is None and "uncertainty" in str(layer.name).lower())


class UncertaintyCombo(LayerCombo):
    """The uncertainty maps of the viewer (studies and other images are never ranked)."""

    def layers(self) -> list[Any]:
        return [layer for layer in super().layers() if is_uncertainty_map(layer)]


#: Voxels around the segmented anatomy that still count when ranking uncertain slices (mm).
ANATOMY_MARGIN_MM = 10.0
#: Proposed slices are at least this far apart (mm) until every spread-out slice was shown.
PROPOSAL_GAP_MM = 8.0


def layer_names(layer: Any) -> dict[int, str]:
    """Value -> name as a Labels layer itself names them (its features table, else recorded classes)."""
    from .._napari_layers import CLASSES_KEY, classes_from_layer

    features = getattr(layer, "features", None)
    try:
        if features is not None and {"index", "name"} <= set(features.columns):
            return {int(v): str(n) for v, n in zip(features["index"], features["name"])}
    except (TypeError, ValueError):
        pass
    if (layer.metadata or {}).get(CLASSES_KEY):
        return {c.value: c.name for c in classes_from_layer(layer)}
    return {}


class ReviewWidget(QWidget):
    """Check a Labels layer before it is used: numbers per class and level, and where to look."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.review: Any = None
        self._measured: Any = None  # the last LabelReview as measured (before level names)
        self.comparison: list = []
        self.exported: Path | None = None
        # (scores, order, next position, study resampled from thicker slices) per layer, plane and anatomy
        self._ranking: dict[tuple[Any, str], tuple[np.ndarray, np.ndarray, int, bool]] = {}

        self.labels_combo = LayerCombo(napari_viewer, "labels", self)
        self.refresh_button = QPushButton("Measure", self)
        self.refresh_button.setToolTip("Volumes, components, levels and lesions of the chosen Labels layer")
        self.refresh_button.clicked.connect(lambda: self.refresh())
        self.export_button = QPushButton("Export labels…", self)
        self.export_button.clicked.connect(lambda: self.export_labels())
        self.status = QLabel("", self)  # the last export's outcome in full (a toast may be cut off)
        self.status.setWordWrap(True)
        self.lesion_label = QLabel("", self)
        self.lesion_label.setWordWrap(True)
        self.class_table = _table(self)
        self.level_table = _table(self)
        self.level_table.cellClicked.connect(lambda row, _col: self.go_to_level(row))
        self.level_note = QLabel("", self)  # how the levels were named (anatomically or counted)
        self.level_note.setWordWrap(True)
        self.goto_button = QPushButton("Go to level", self)
        self.goto_button.setToolTip("Move the sliders to the chosen level (or click a row)")
        self.goto_button.clicked.connect(lambda: self.go_to_level())
        self.up_button = QPushButton("Levels up one", self)
        self.up_button.setToolTip("Every level name one level up the spine (L3 → L2, S1 → L5)")
        self.up_button.clicked.connect(lambda: self.renumber_levels(-1))
        self.down_button = QPushButton("Levels down one", self)
        self.down_button.setToolTip("Every level name one level down the spine (L2 → L3, L5 → S1)")
        self.down_button.clicked.connect(lambda: self.renumber_levels(+1))
        self.uncertain_button = QPushButton("Mark levels uncertain", self)
        self.uncertain_button.setToolTip("Remove every level name: the report and exports say 'levels uncertain'")
        self.uncertain_button.clicked.connect(lambda: self.mark_levels_uncertain())

        self.model_combo = LayerCombo(napari_viewer, "labels", self)
        self.truth_combo = LayerCombo(napari_viewer, "labels", self)
        self.compare_button = QPushButton("Compare", self)
        self.compare_button.clicked.connect(lambda: self.compare())
        self.compare_table = _table(self)
        self.compare_note = QLabel("", self)
        self.compare_note.setWordWrap(True)

        self.uncertainty_combo = UncertaintyCombo(napari_viewer, "image", self)
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
        layout.addWidget(self.status)
        self.tabs = QTabWidget(self)
        layout.addWidget(self.tabs)
        numbers = scrolling_layout(self._tab("Numbers"))
        numbers.addWidget(self.lesion_label)
        numbers.addWidget(self.class_table)
        numbers.addWidget(QLabel("Levels, superior → inferior", self))
        numbers.addWidget(self.level_note)
        numbers.addWidget(self.level_table)
        row = QHBoxLayout()
        row.addWidget(self.goto_button)
        row.addWidget(self.uncertain_button)
        numbers.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(self.up_button)
        row.addWidget(self.down_button)
        numbers.addLayout(row)
        numbers.addStretch(1)
        compare = scrolling_layout(self._tab("Compare"))
        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Corrected", self.truth_combo)
        compare.addLayout(form)
        compare.addWidget(self.compare_button)
        compare.addWidget(self.compare_note)
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
            if is_kind(layer, "image") and is_uncertainty_map(layer):
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
        self._measured = outcome.value
        self._show_review()

    def _show_review(self) -> None:
        """The measured numbers, structures named by level when the layer has a levels layer."""
        from ..levels import name_review

        review, note = self._measured, ""
        levels = self._levels()
        if levels is not None:
            review, note = name_review(review, levels[1])
        self.review = review
        self.level_note.setText(note)
        rows = [[c.name, c.value, c.volume_ml, c.components] for c in review.classes]
        fill_table(self.class_table, ["class", "value", "mL", "parts"], rows)
        noted = any(s.note for s in review.levels)  # the "note" column only when there is one (narrow docks)
        rows = [[s.name, s.volume_ml, s.height_mm, *([s.note] if noted else [])] for s in review.levels]
        fill_table(self.level_table, ["structure", "volume mL", "height mm", *(["note"] if noted else [])], rows)
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

    # Anatomical levels ---------------------------------------------------------------------------
    def _levels(self, say: bool = False) -> tuple[Any, Any] | None:
        """(levels layer, its LevelResult) of the chosen Labels layer; ``None`` when it has none."""
        from ._levels import levels_layer_for, result_from_layer

        layer = levels_layer_for(self.viewer, self.labels_combo.current_layer())
        if layer is None:
            if say:
                notify_error(
                    "No levels layer for these labels: Segment spine adds '<study> levels' when it names levels"
                )
            return None
        try:
            return layer, result_from_layer(layer)
        except SpinesegError as error:
            notify_error(f"{layer.name}: {error}")
            return None

    def go_to_level(self, row: int | None = None) -> tuple[int, int, int] | None:
        """Move the sliders to the level of a table row (the selected one by default)."""
        from ._levels import go_to_level

        row = self.level_table.currentRow() if row is None else row
        item = self.level_table.item(row, 0) if row is not None and row >= 0 else None
        levels = self._levels(say=item is not None)
        if item is None or levels is None:
            if item is None:
                notify_error("Choose a level in the table first")
            return None
        index = go_to_level(self.viewer, levels[0], levels[1], item.text())
        if index is None:
            why = "" if levels[1].named else f" (levels uncertain: {levels[1].reason})"
            notify_error(f"{item.text()} is not a named level{why}")
        return index

    def renumber_levels(self, shift: int) -> None:
        """Every level name ``shift`` levels down the spine (+1) or up (-1); the table, hover, legend
        and exports follow."""
        from ..levels import renumber

        self._correct_levels(lambda result: renumber(result, shift), f"levels moved {'down' if shift > 0 else 'up'}")

    def mark_levels_uncertain(self, reason: str = "marked uncertain by hand in Review") -> None:
        """Remove every level name: the levels layer is emptied and the exports say why."""
        from ..levels import mark_uncertain

        self._correct_levels(lambda result: mark_uncertain(result, reason), "levels uncertain")

    def _correct_levels(self, change: Any, what: str) -> None:
        from ._levels import apply_result

        levels = self._levels(say=True)
        if levels is None:
            return
        layer, result = levels
        try:
            corrected = change(result)
        except SpinesegError as error:
            self.status.setText(f"Levels not changed: {error}")
            notify_error(str(error))
            return
        changed = apply_result(layer, corrected)
        if corrected.named:
            names = [i.name for i in corrected.instances if i.kind == "body" and i.name]
            summary = f"{what}: {names[0]}–{names[-1]}" if names else what
        else:
            summary = f"levels uncertain: {corrected.reason}"
        self.status.setText(f"{layer.name}: {summary} ({changed} voxels; Ctrl+Z on the layer undoes the map)")
        notify_info(self.status.text())
        if self._measured is not None:
            self._show_review()

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
        names = {c.value: c.name for c in classes_from_layer(pred)}
        names.update(layer_names(truth))  # the truth's values keep the truth's own names
        schema = (truth.metadata or {}).get("spineseg_schema", True)
        self.compare_note.setText(
            ""
            if schema
            else f"{truth.name} does not use the model's classes (one value per structure?): its values "
            "are compared as they are; merge instance labels first (e.g. spineseg evaluate --merge 1-7=1)"
        )
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
        fill_table(self.compare_table, ["class", "Dice", "HD95\nmm", "mL\nmodel", "mL\ncorr."], rows)
        fit_width(self.compare_table)

    # Uncertainty navigation --------------------------------------------------------------------
    def next_uncertain_slice(self) -> int | None:
        """Show the next slice (along the chosen plane) worth checking: most uncertain first.

        Only the segmented anatomy (plus a margin) counts, and the proposals are spread out.
        """
        from ..review import rank_uncertain_slices

        layer = self.uncertainty_combo.current_layer()
        if layer is None or getattr(layer.data, "ndim", 0) != 3:
            notify_error("No uncertainty map: run Segment spine with 'add an uncertainty map' first")
            return None
        plane = self.plane_combo.currentText()
        try:
            axis = show_plane(self.viewer, layer, plane)
        except SpinesegError as error:
            notify_error(str(error))
            return None
        anatomy = self._anatomy_for(layer)
        key = (layer.unique_id, plane, None if anatomy is None else anatomy.unique_id)
        cached = self._ranking.get(key)
        if cached is None or cached[0].shape[0] != layer.data.shape[axis]:
            spacing = np.asarray(layer.scale[-3:], dtype=float)
            margin = max(1, round(ANATOMY_MARGIN_MM / float(spacing.min())))
            gap = max(2, int(np.ceil(PROPOSAL_GAP_MM / float(spacing[axis]))))
            mask = None if anatomy is None else np.asarray(anatomy.data)
            runs = self._resampled_runs(layer, axis)
            order, scores = rank_uncertain_slices(np.asarray(layer.data), axis, mask, margin, gap, runs)
            cached = (scores, order, 0, bool(runs))
        scores, order, position, resampled = cached
        if not len(order):
            notify_error(f"{anatomy.name} is empty: nothing to rank")
            return None
        index = int(order[position % len(order)])
        self._ranking[key] = (scores, order, position + 1, resampled)
        show_plane(self.viewer, layer, plane, index)
        rank = position % len(order) + 1
        where = f"inside {anatomy.name} (+{ANATOMY_MARGIN_MM:g} mm)" if anatomy is not None else "whole field of view"
        if resampled:
            where += "; the study was resampled from thicker slices: one proposal per acquired slice"
        self.uncertainty_label.setText(
            f"{plane} slice {index} — rank {rank} of {len(order)}, mean uncertainty {scores[index]:.3f} ({where})"
        )
        self.uncertainty_label.setToolTip(self.uncertainty_label.text())
        return index

    def _resampled_runs(self, uncertainty: Any, axis: int) -> list[range]:
        """Runs of slices resampled from the same acquired slices of the study's image (one proposal each)."""
        from ..resampled import resampled_runs

        image = study_image(self.viewer, uncertainty)
        return resampled_runs(image, axis) if image is not None else []

    def _anatomy_for(self, uncertainty: Any) -> Any:
        """The segmentation the map belongs to (same study and model), else the chosen Labels layer."""
        meta = (uncertainty.metadata or {}).get(RESULT_KEY) or {}
        shape = tuple(uncertainty.data.shape)
        candidates = [la for la in self.viewer.layers if is_kind(la, "labels") and tuple(la.data.shape) == shape]
        for layer in reversed(candidates):
            made = (layer.metadata or {}).get(RESULT_KEY) or {}
            if meta.get("image") and made.get("image") == meta.get("image") and made.get("model") == meta.get("model"):
                return layer
        chosen = self.labels_combo.current_layer()
        return chosen if chosen is not None and tuple(chosen.data.shape) == shape else None

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
        levels = self._levels()  # the corrected levels go with every export
        if levels is not None and levels[0] is layer:
            job = partial(export_levels_job, levels[1], str(path), metadata, layer.name)
        else:
            array = np.array(volume.array, copy=True)
            result = None if levels is None else levels[1]
            job = partial(export_job, array, volume.geometry, str(path), metadata, layer.name, result)
        start_job(job, "export", lambda _: None, partial(self._on_export, layer.name), sync=sync)

    def _on_export(self, name: str, outcome: Outcome) -> None:
        self.export_button.setEnabled(True)
        if outcome.error:
            self.status.setText(f"Not exported: {outcome.error}")
            notify_error(outcome.error)
        elif outcome.value is not None:
            self.exported = Path(outcome.value)
            self.status.setText(f"Saved {name} to {outcome.value}")
            notify_info(f"Saved {name} to {outcome.value}")
