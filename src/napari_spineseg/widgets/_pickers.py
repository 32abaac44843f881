"""Pickers of the dock widgets: layers of one kind, models (bundled, user, loaded files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from psygnal import SignalInstance
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog

from ..errors import SpinesegError
from ..schema import LabelClass
from ._jobs import notify_error
from ._layer_data import RESULT_KEY, is_kind

#: Emitted with a model name whenever a model is saved to (or removed from) the user directory.
models_changed = SignalInstance((str,), name="models_changed")
LOAD_FILE = "Load file…"


def elide_with_tooltip(combo: QComboBox, characters: int = 12) -> None:
    """Let a picker shrink (long names elided) and show the current name in full as its tooltip."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(characters)
    combo.currentIndexChanged.connect(lambda *_: combo.setToolTip(combo.currentText()))


class LayerCombo(QComboBox):
    """The layers of one kind ("image" or "labels") in a viewer, kept up to date."""

    def __init__(self, viewer: Any, kind: str, parent: Any = None, studies_only: bool = False) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        self.studies_only = studies_only  # leave out uncertainty maps made by Segment spine
        elide_with_tooltip(self)
        events = viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.connect(self.refresh)
        self.destroyed.connect(lambda *_: self._disconnect(events))
        self.refresh()

    def _disconnect(self, events: Any) -> None:
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.disconnect(self.refresh)

    def layers(self) -> list[Any]:
        layers = [layer for layer in self.viewer.layers if is_kind(layer, self.kind)]
        if self.studies_only:
            layers = [la for la in layers if ((la.metadata or {}).get(RESULT_KEY) or {}).get("kind") != "uncertainty"]
        return layers

    def refresh(self, *_: Any) -> None:
        current = self.current_layer()
        self.blockSignals(True)
        self.clear()
        for layer in reversed(self.layers()):  # top of the layer list first
            self.addItem(layer.name, layer)
            layer.events.name.connect(self._rename)
        self.blockSignals(False)
        if current is not None and any(current == layer for layer in self.layers()):
            self.set_layer(current)
        else:
            self.currentIndexChanged.emit(self.currentIndex())

    def _rename(self, event: Any) -> None:
        try:
            for index in range(self.count()):
                if self.itemData(index) == event.source:
                    self.setItemText(index, event.source.name)
        except RuntimeError:  # the widget is gone
            event.source.events.name.disconnect(self._rename)

    def current_layer(self) -> Any:
        return self.currentData() if self.count() else None

    def set_layer(self, layer: Any) -> None:
        for index in range(self.count()):
            if layer is not None and self.itemData(index) == layer:
                self.setCurrentIndex(index)
                return


class ModelCombo(QComboBox):
    """Bundled and user models, plus files loaded this session and a "Load file…" entry.

    Item data is what :func:`napari_spineseg.modelfile.load_model` accepts (a name or a path).
    Refreshes itself when :data:`models_changed` fires.
    """

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._files: list[str] = []
        self._last = 0
        elide_with_tooltip(self)
        self.refresh()
        self.activated.connect(self._on_activated)
        models_changed.connect(self._on_models_changed)
        self.destroyed.connect(lambda *_: models_changed.disconnect(self._on_models_changed))

    def _on_models_changed(self, name: str) -> None:
        try:
            self.refresh()  # the current choice stays; the new model is listed
        except RuntimeError:  # the Qt object is gone
            models_changed.disconnect(self._on_models_changed)

    def refresh(self, *_: Any, select: str | None = None) -> None:
        from ..modelfile import DEFAULT_MODEL_NAME, list_models

        current = select or self.current_model() or DEFAULT_MODEL_NAME  # the default everywhere
        self.blockSignals(True)
        self.clear()
        for info in list_models():
            text = f"{info.name} ({info.source})" if info.error is None else f"{info.name} (unreadable)"
            self.addItem(text, info.name)
            self.setItemData(self.count() - 1, info.error or str(info.path), Qt.ItemDataRole.ToolTipRole)
        for path in self._files:
            self.addItem(Path(path).name, path)
            self.setItemData(self.count() - 1, path, Qt.ItemDataRole.ToolTipRole)
        self.addItem(LOAD_FILE, LOAD_FILE)
        self.blockSignals(False)
        if current:
            self.set_model(current)
        if self.currentData() == LOAD_FILE and self.count() > 1:
            self.setCurrentIndex(0)
        self._last = self.currentIndex()
        self.currentIndexChanged.emit(self.currentIndex())

    def models(self) -> list[str]:
        """The names (and files) offered."""
        return [str(self.itemData(i)) for i in range(self.count()) if self.itemData(i) != LOAD_FILE]

    def current_model(self) -> str | None:
        value = self.currentData()
        return None if value in (None, LOAD_FILE) else str(value)

    def set_model(self, model: str) -> bool:
        for index in range(self.count()):
            if self.itemData(index) == model:
                self.setCurrentIndex(index)
                return True
        return False

    def add_file(self, path: str | os.PathLike) -> bool:
        """Offer a model file (its metadata is checked now); errors become a notification."""
        from ..modelfile import read_metadata

        path = str(Path(path).expanduser().resolve())
        try:
            read_metadata(path)
        except (SpinesegError, OSError) as error:
            notify_error(str(error) if isinstance(error, SpinesegError) else f"{path}: {error}")
            self.setCurrentIndex(self._last)
            return False
        if path not in self._files:
            self._files.append(path)
        self.refresh(select=path)
        return True

    def _on_activated(self, index: int) -> None:
        if self.itemData(index) != LOAD_FILE:
            self._last = index
            return
        path, _ = QFileDialog.getOpenFileName(self, "Load a napari-spineseg model", "", "Models (*.safetensors)")
        if path:
            self.add_file(path)
        else:
            self.setCurrentIndex(self._last)


def model_classes(model: str | None) -> list[LabelClass] | None:
    """The classes recorded in a model file (``None`` when unreadable)."""
    if not model:
        return None
    from ..modelfile import read_metadata, resolve_model

    try:
        return list(read_metadata(resolve_model(model)).classes)
    except (SpinesegError, OSError):
        return None
