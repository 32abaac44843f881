"""The "Fine-tune model" dock widget: teach a model from corrected labels, live, cancellable."""

from __future__ import annotations

import datetime as _dt
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..errors import SpinesegError
from ._chart import TrainingChart
from ._finetune_job import dice_table, label_values, preview_classes, save_result, start_finetune
from ._jobs import LAYER_MODULES, Outcome, notify_error, notify_info, start_job, warm_up
from ._layer_data import PREDICTION_KEY, RESULT_KEY, layer_volume
from ._panels import fill_table, fit_height, scrolling_layout
from ._pickers import LayerCombo, ModelCombo, model_classes, models_changed
from ._settings import load_settings, save_settings
from .review import fit_width


@dataclass
class _Run:
    cancel: threading.Event
    progress: Any
    base: str
    image_layer: Any


class FinetuneWidget(QWidget):
    """(image, corrected labels) pairs + base model → a new named model in the user directory."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.pairs: list[tuple[Any, Any]] = []
        self.result: Any = None
        self.saved_model: str | None = None
        self._run: _Run | None = None
        self._classes: list = []

        self.image_combo = LayerCombo(napari_viewer, "image", self, studies_only=True)
        self.labels_combo = LayerCombo(napari_viewer, "labels", self)
        self.add_button = QPushButton("Add pair", self)
        self.remove_button = QPushButton("Remove pair", self)
        self.add_button.clicked.connect(lambda: self.add_pair())
        self.remove_button.clicked.connect(self.remove_pair)
        self.pair_list = QListWidget(self)
        self.pair_list.setMaximumHeight(50)
        self.model_combo = ModelCombo(self)
        self.model_combo.currentIndexChanged.connect(self.update_classes)
        self.labels_combo.currentIndexChanged.connect(self.update_classes)
        self.steps_box = QSpinBox(self)
        self.steps_box.setRange(1, 100_000)
        self.steps_box.setValue(100)
        self.lr_box = QDoubleSpinBox(self)
        self.lr_box.setDecimals(6)
        # The encoder's rate; the decoder learns 10x faster, so 1e-3 (decoder 1e-2) is the ceiling
        # (a value saved by an older version above it is clamped by the spin box).
        self.lr_box.setRange(1e-6, 1e-3)
        self.lr_box.setSingleStep(1e-5)
        self.lr_box.setValue(1e-4)
        self.lr_box.setToolTip(
            "Learning rate of the encoder; the decoder and new classes learn 10x faster. "
            "1e-4 suits a few corrected slices; higher rates forget what the model knew."
        )
        self.class_table = QTableWidget(0, 3, self)
        self.class_table.setHorizontalHeaderLabels(["value", "name", "from"])
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.setFixedHeight(40)
        self.changed_only_box = QCheckBox("learn only from the slices I changed", self)
        self.changed_only_box.setChecked(True)
        self.forgetting_box = QCheckBox("check for forgetting (slower)", self)
        self.forgetting_box.setChecked(True)
        self.forgetting_box.setToolTip(
            "Measures the model before and after on its fixed validation set (a few recorded studies), so a model that "
            "forgot what it knew is caught. The base model's figures are remembered: only the first run "
            "with a base model pays for them."
        )
        self.changed_only_box.setToolTip(
            "Known for results of 'Segment spine': slices you did not edit are treated as 'not annotated'. "
            "Untick when you corrected the whole study."
        )
        self.start_button = QPushButton("Start", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.start_button.clicked.connect(lambda: self.start())
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.chart = TrainingChart(self)
        self.metrics_table = QTableWidget(self)
        self.metrics_table.setFixedHeight(40)
        self.name_edit = QLineEdit(self)
        self.save_button = QPushButton("Save model", self)
        self.save_button.clicked.connect(lambda: self.save_model())
        self.resegment_button = QPushButton("Re-segment with it", self)
        self.resegment_button.clicked.connect(lambda: self.resegment())
        for button in (self.save_button, self.resegment_button):
            button.setEnabled(False)

        layout = scrolling_layout(self)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Corrected labels", self.labels_combo)
        layout.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.add_button)
        row.addWidget(self.remove_button)
        layout.addLayout(row)
        layout.addWidget(self.pair_list)
        form = QFormLayout()
        form.addRow("Base model", self.model_combo)
        form.addRow("Steps", self.steps_box)
        form.addRow("Learning rate", self.lr_box)
        layout.addLayout(form)
        layout.addWidget(QLabel("Classes (names are editable)", self))
        layout.addWidget(self.class_table)
        layout.addWidget(self.changed_only_box)
        layout.addWidget(self.forgetting_box)
        row = QHBoxLayout()
        row.addWidget(self.start_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        # What matters while and after it runs stays near the top: status, then name and Save.
        layout.addWidget(self.status)
        form = QFormLayout()
        form.addRow("Model name", self.name_edit)
        layout.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.save_button)
        row.addWidget(self.resegment_button)
        layout.addLayout(row)
        layout.addWidget(QLabel("Dice on the corrected studies, before → after", self))
        layout.addWidget(self.metrics_table)
        layout.addWidget(self.chart)
        note = QLabel("Dice lines use the class colours; solid: your corrections, dashed: fixed validation set", self)
        note.setWordWrap(True)
        layout.addWidget(note)
        layout.addStretch(1)

        saved = load_settings("finetune")
        if saved.get("model"):
            self.model_combo.set_model(str(saved["model"]))
        self.steps_box.setValue(int(saved.get("steps", 100)))
        self.lr_box.setValue(float(saved.get("lr", 1e-4)))
        self.update_classes()
        # Every torch optimizer imports torch._dynamo (seconds): load it before the first run.
        self.ready = warm_up((*LAYER_MODULES, "torch", "torch._dynamo", "napari_spineseg.training"))

    # Pairs and classes ---------------------------------------------------------------------------
    def training_pairs(self) -> list[tuple[Any, Any]]:
        """The listed pairs, or the current image/labels selection when none is listed."""
        if self.pairs:
            return list(self.pairs)
        image, labels = self.image_combo.current_layer(), self.labels_combo.current_layer()
        return [(image, labels)] if image is not None and labels is not None else []

    def add_pair(self, image: Any = None, labels: Any = None) -> None:
        image = self.image_combo.current_layer() if image is None else image
        labels = self.labels_combo.current_layer() if labels is None else labels
        if image is None or labels is None:
            notify_error("Choose an image and its corrected Labels layer")
            return
        if tuple(image.data.shape) != tuple(labels.data.shape):
            notify_error(f"{labels.name} ({labels.data.shape}) is not on the grid of {image.name} ({image.data.shape})")
            return
        if (image, labels) not in self.pairs:
            self.pairs.append((image, labels))
            self.pair_list.addItem(f"{image.name}  ←  {labels.name}")
        self.image_combo.set_layer(image)
        self.labels_combo.set_layer(labels)
        produced_by = ((labels.metadata or {}).get(RESULT_KEY) or {}).get("model")
        if produced_by and not self.pairs[:-1]:  # the first pair: fine-tune the model that made it
            self.model_combo.set_model(str(produced_by))
        self.update_classes()

    def remove_pair(self) -> None:
        row = self.pair_list.currentRow()
        if 0 <= row < len(self.pairs):
            del self.pairs[row]
            self.pair_list.takeItem(row)
            self.update_classes()

    def class_names(self) -> dict[int, str]:
        """Value → name as edited in the class table."""
        names = {}
        for row in range(self.class_table.rowCount()):
            value, name = self.class_table.item(row, 0), self.class_table.item(row, 1)
            if value is not None and name is not None:
                names[int(value.text())] = name.text().strip()
        return names

    def update_classes(self, *_: Any) -> None:
        """Show the base model's classes and every new value painted in the pairs' labels."""
        base = model_classes(self.model_combo.current_model()) or []
        edited = self.class_names()
        values: set[int] = set()
        for _image, labels in self.training_pairs():
            values.update(label_values(np.asarray(labels.data)))
        known = {c.value for c in base}
        classes = preview_classes(base, sorted(values), edited) if base else []
        self._classes = classes
        self.class_table.setRowCount(0)
        for label_class in classes:
            if label_class.value == 0:
                continue
            row = self.class_table.rowCount()
            self.class_table.insertRow(row)
            value = QTableWidgetItem(str(label_class.value))
            value.setFlags(value.flags() & ~Qt.ItemFlag.ItemIsEditable)
            value.setBackground(QColor.fromRgbF(*label_class.color))
            origin = QTableWidgetItem("model" if label_class.value in known else "new (painted)")
            origin.setFlags(origin.flags() & ~Qt.ItemFlag.ItemIsEditable)
            self.class_table.setItem(row, 0, value)
            self.class_table.setItem(row, 1, QTableWidgetItem(label_class.name))
            self.class_table.setItem(row, 2, origin)
        fit_height(self.class_table)

    # Training ------------------------------------------------------------------------------------
    def start(self, sync: bool = False) -> None:
        """Fine-tune the base model on the pairs (``sync`` drains the job here, for tests/scripts)."""
        if self._run is not None:
            notify_info("Fine-tuning is already running")
            return
        base = self.model_combo.current_model()
        pairs = self.training_pairs()
        if base is None or not pairs:
            notify_error("Choose a base model and at least one (image, corrected labels) pair")
            return
        try:
            volumes = []
            for image_layer, labels_layer in pairs:
                image = layer_volume(image_layer)
                labels = layer_volume(labels_layer, like=image)  # painting may go on: train on a copy
                labels = labels.with_array(np.array(labels.array, copy=True))
                original = (labels_layer.metadata or {}).get(PREDICTION_KEY)
                prediction = None
                if self.changed_only_box.isChecked() and getattr(original, "shape", None) == labels.shape:
                    prediction = labels.with_array(original, name=f"{labels_layer.name} (model)")
                volumes.append((image, labels, prediction))
        except SpinesegError as error:
            notify_error(str(error))
            return
        steps, lr = self.steps_box.value(), self.lr_box.value()
        save_settings("finetune", {"model": base, "steps": steps, "lr": lr})
        from napari.utils import progress

        self.result = None
        self.save_button.setEnabled(False)
        self.resegment_button.setEnabled(False)
        self._run = _Run(threading.Event(), progress(total=steps, desc="Fine-tuning"), base, pairs[0][0])
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        names = self.class_names()
        self.chart.reset(steps, {names.get(c.value, c.name): c.color for c in self._classes if c.value != 0})
        self.status.setText(f"Starting: loading {base}…")
        job = partial(
            start_finetune,
            base,
            volumes,
            steps,
            lr,
            names,
            self._run.cancel,
            measure_forgetting=self.forgetting_box.isChecked(),
        )
        start_job(job, "fine-tuning", self._on_event, self._on_done, sync=sync)

    def cancel(self) -> None:
        """Stop before the next step; no model is kept."""
        if self._run is not None:
            self._run.cancel.set()
            self.status.setText("Cancelling…")

    def _on_event(self, event: Any) -> None:
        run = self._run
        if run is None:
            return
        if event.step > run.progress.n:
            run.progress.update(event.step - run.progress.n)
        self.chart.add(event.step, event.loss, event.val_dice)
        loss = f", loss {event.loss:.3f}" if event.loss is not None else ""
        text = event.message or f"training: step {event.step} of {event.total_steps}{loss}"
        self.status.setText(text)
        run.progress.set_description(f"Fine-tuning: {text}")

    def _on_done(self, outcome: Outcome) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        run.progress.close()
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.chart.redraw(force=True)
        if outcome.cancelled or run.cancel.is_set():
            self.status.setText("Cancelled: no model was saved.")
            notify_info("Fine-tuning cancelled: no model was saved")
            return
        if outcome.error is not None:
            self.status.setText(f"Failed: {outcome.error}")
            notify_error(outcome.error)
            return
        self.result = result = outcome.value
        self._image_layer = run.image_layer
        headers, rows = dice_table(result)
        fill_table(self.metrics_table, ["\n".join(h.rsplit(" ", 1)) for h in headers], rows)  # two-line headers
        fit_width(self.metrics_table)  # every number column in view
        for warning in result.warnings:
            notify_info(f"Fine-tuning: {warning}")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
        self.name_edit.setText(f"{run.base.rsplit('/', 1)[-1].removesuffix('.safetensors')}-ft-{stamp}")
        self.status.setText(f"Finished {result.steps} steps. Name the model and save it.")
        self.save_button.setEnabled(True)
        self._show(self.save_button)
        notify_info(f"Fine-tuning finished ({result.steps} steps): name the model and save it")

    def _show(self, widget: QWidget) -> None:
        """Scroll the dock so ``widget`` is in view (the docks may be stacked and short)."""
        from qtpy.QtWidgets import QScrollArea

        scroll = self.findChild(QScrollArea)
        if scroll is not None:
            scroll.ensureWidgetVisible(widget)

    # Saving and using the model ------------------------------------------------------------------
    def save_model(self, name: str | None = None) -> str | None:
        """Save the fine-tuned model as ``name`` in the user model directory; it shows up everywhere."""
        if self.result is None:
            notify_error("Nothing to save: fine-tune a model first")
            return None
        name = (name if name is not None else self.name_edit.text()).strip()
        try:
            path = save_result(self.result, name)
        except SpinesegError as error:
            notify_error(str(error))
            return None
        self.saved_model = name
        self.resegment_button.setEnabled(True)
        from ..training.finetune import replay_path

        replay_file = replay_path(path)
        private = (
            f" Its painted slices are kept beside it in {replay_file.name} for the next round:"
            " patient images, keep that file private (share the model file alone)."
            if replay_file.is_file()
            else ""
        )
        self.status.setText(f"Saved as {name} ({path}).{private}")
        notify_info(f"Saved model {name!r}")  # the path is in the status line (a toast is cut short)
        models_changed.emit(name)
        return name

    def resegment(self, sync: bool = False) -> Any:
        """Open the Segment widget and run the saved model on the (first) pair's image."""
        if self.saved_model is None:
            notify_error("Save the fine-tuned model first")
            return None
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-spineseg", "Segment spine")
        image = getattr(self, "_image_layer", None)
        if image not in self.viewer.layers:
            image = widget.image_combo.current_layer()
        widget.segment_with(self.saved_model, image, sync=sync)
        return widget
