"""What the dock widgets share: the model registry signal, settings, layer pickers and workers.

Nothing here imports torch.  Workers run generators built by the widgets; they receive plain
arrays and geometry (never layers or widgets) and report through :class:`Outcome`, so an error
becomes one notification line and never a traceback dialog.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import SignalInstance
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QLabel

from ..errors import Cancelled, InputError, SpinesegError
from ..schema import LabelClass
from ..volume import Volume

logger = logging.getLogger(__name__)

#: Emitted with a model name whenever a model is saved to (or removed from) the user directory.
models_changed = SignalInstance((str,), name="models_changed")

#: Layer metadata key of the results the Segment widget created (image name, checksum, edited).
RESULT_KEY = "spineseg_result"
#: Layer metadata key holding a result's original prediction (fine-tuning learns from what changed).
PREDICTION_KEY = "spineseg_prediction"
LOAD_FILE = "Load file…"
PLANE_NAMES = ("axial", "coronal", "sagittal")
# Orientation letter -> (LPS axis 0 L-R / 1 P-A / 2 S-I, +1 towards L/P/S or -1 towards R/A/I).
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


# ------------------------------------------------------------------------------------------------
# Settings remembered between sessions
# ------------------------------------------------------------------------------------------------
def config_dir() -> Path:
    """``$SPINESEG_CONFIG_DIR`` or the platform's user config folder for napari-spineseg."""
    override = os.environ.get("SPINESEG_CONFIG_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("napari-spineseg", appauthor=False))


def _settings_file() -> Path:
    return config_dir() / "widgets.json"


def load_settings(section: str) -> dict[str, Any]:
    """The remembered values of one widget (empty when none or unreadable)."""
    try:
        data = json.loads(_settings_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    value = data.get(section) if isinstance(data, dict) else None
    return dict(value) if isinstance(value, dict) else {}


def save_settings(section: str, values: dict[str, Any]) -> None:
    """Remember ``values`` for ``section`` (atomic write; failures are only logged)."""
    path = _settings_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[section] = values
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".json.part")
        temp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(temp, path)
    except OSError as error:
        logger.warning("cannot save widget settings to %s: %s", path, error)


# ------------------------------------------------------------------------------------------------
# Notifications and outcomes
# ------------------------------------------------------------------------------------------------
def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


@dataclass
class Outcome:
    """How a job ended: a value, a one-line error, or cancelled."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False


_IMPORT_LOCK = threading.Lock()  # one warm-up at a time: torch must not be imported by two threads at once


def guarded(job: Callable[[], Generator[Any, None, Any]], what: str) -> Generator[Any, None, Outcome]:
    """Run ``job()`` (a generator) and turn its end into an :class:`Outcome` (never raises)."""
    with _IMPORT_LOCK:  # let a running warm-up finish its imports first (no two threads import torch)
        pass
    try:
        value = yield from job()
    except Cancelled:
        return Outcome(cancelled=True)
    except SpinesegError as error:
        return Outcome(error=str(error))
    except MemoryError:
        return Outcome(error=f"{what}: not enough memory")
    except Exception as error:  # a bug must not take the viewer down
        logger.exception("%s failed", what)
        return Outcome(error=f"{what}: unexpected error ({type(error).__name__}: {error})")
    return Outcome(value)


def start_job(
    job: Callable[[], Generator[Any, None, Any]],
    what: str,
    on_yield: Callable[[Any], None],
    on_done: Callable[[Outcome], None],
    sync: bool = False,
):
    """Run ``job`` in a napari thread worker (or drain it here when ``sync``).

    ``on_yield``/``on_done`` always run on the GUI thread.  Returns the worker (``None`` if sync).
    ``worker.quit()`` ends the job at its next yield and reports it as cancelled.
    """
    if sync:
        generator = guarded(job, what)
        while True:
            try:
                on_yield(next(generator))
            except StopIteration as stop:
                on_done(stop.value)
                return None
    from napari.qt.threading import create_worker

    worker = create_worker(guarded, job, what, _start_thread=False)
    worker.yielded.connect(on_yield)
    worker.returned.connect(on_done)
    worker.aborted.connect(lambda: on_done(Outcome(cancelled=True)))
    worker.start()
    return worker


# Imported the first time a Labels/Image layer is added (pandas for features, the label colormap
# helpers): loading them in the background keeps adding the first result layer short.
LAYER_MODULES = ("pandas", "skimage", "skimage.color.colorconv", "skimage.exposure", "scipy.linalg")


#: Pause between two GUI turns: a timer (not a posted event) lets Qt paint, take input and fire
#: other timers in between (a chain of posted events runs before the timers of the same loop pass).
TURN_PAUSE_MS = 1


def in_event_loop_turns(turns: Iterator[Any], finish: Callable[[], None], sync: bool = False) -> None:
    """Advance ``turns`` (a generator: each ``yield`` ends a turn) one event-loop turn at a time.

    Then call ``finish`` (always, even after an error).  Adding a layer costs tens of milliseconds
    in napari/vispy; splitting the work keeps every turn short.  ``sync`` runs them all now
    (tests, scripts).
    """

    def run() -> None:
        while True:
            try:
                next(turns)
            except StopIteration:
                finish()
                return
            except Exception as error:  # a broken step must not leave the widget "running"
                logger.exception("showing the result failed")
                notify_error(f"showing the result failed: {error}")
                finish()
                return
            if not sync:
                from qtpy.QtCore import QTimer

                QTimer.singleShot(TURN_PAUSE_MS, run)
                return

    run()


def warm_up(
    modules: Iterable[str],
    on_done: Callable[[], None] | None = None,
    parent: Any = None,
    then: Sequence[Callable[[], None]] = (),
) -> threading.Event:
    """Import ``modules`` in a background thread; the returned event is set when they are loaded.

    torch, pandas (napari's Labels features) and ``torch._dynamo`` (imported by every torch
    optimizer) take seconds to import: done on first use they would freeze the viewer.
    ``then`` (Qt-free first-use work, e.g. :func:`._layers.prepare_layers`) runs in the same
    thread after the imports.  ``on_done`` runs on the GUI thread afterwards, polled by a timer
    owned by ``parent`` (so a widget closed meanwhile is never called back).  The thread is a
    daemon with no Qt objects: closing the viewer while it imports is safe.
    """
    done = threading.Event()

    def job() -> None:
        with _IMPORT_LOCK:
            for name in modules:
                if name in sys.modules:
                    continue
                try:
                    importlib.import_module(name)
                except Exception as error:  # reported when the module is really needed
                    logger.warning("cannot import %s: %s", name, error)
            for work in then:
                try:
                    work()
                except Exception as error:  # only a speed-up
                    logger.warning("warm-up %s failed: %s", getattr(work, "__name__", work), error)
        done.set()

    if not then and all(name in sys.modules for name in modules):
        done.set()
    else:
        threading.Thread(target=job, name="spineseg-warm-up", daemon=True).start()
    if on_done is not None:
        if done.is_set():
            on_done()
        else:
            from qtpy.QtCore import QTimer

            timer = QTimer(parent)
            timer.setInterval(100)

            def poll() -> None:
                if done.is_set():
                    timer.stop()
                    on_done()

            timer.timeout.connect(poll)
            timer.start()
    return done


# ------------------------------------------------------------------------------------------------
# Layers <-> volumes
# ------------------------------------------------------------------------------------------------
def layer_volume(layer: Any, like: Volume | None = None) -> Volume:
    """A :class:`Volume` viewing a 3-D Image/Labels layer's data, with the layer's geometry.

    A layer without recorded geometry (e.g. napari's "new labels") that has ``like``'s shape
    takes ``like``'s geometry: it was painted on that study.
    """
    from .._napari_layers import GEOMETRY_KEY, geometry_from_layer

    if getattr(layer, "multiscale", False):
        raise InputError(f"{layer.name}: multiscale layers are not supported; open the full-resolution study")
    if getattr(layer, "rgb", False):
        raise InputError(f"{layer.name}: an RGB image is not an MRI study")
    data = layer.data
    if getattr(data, "ndim", 0) != 3:
        raise InputError(f"{layer.name}: need a 3-D layer, got shape {tuple(getattr(data, 'shape', ()))}")
    array = data if isinstance(data, np.ndarray) else np.asarray(data)
    if like is not None and GEOMETRY_KEY not in (layer.metadata or {}) and array.shape == like.shape:
        return Volume(array, like.geometry, name=layer.name)
    return Volume(array, geometry_from_layer(layer, array.shape), name=layer.name)


def checksum(array: np.ndarray) -> str:
    """A content hash of a label array (edits change it)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def is_kind(layer: Any, kind: str) -> bool:
    """Whether ``layer`` is an ``"image"`` or ``"labels"`` layer (works through napari's plugin proxies)."""
    from napari.layers import Image, Labels

    return isinstance(layer, {"image": Image, "labels": Labels}[kind])


def unique_layer_name(viewer: Any, base: str) -> str:
    """``base``, or ``base [2]``, ``base [3]``... whichever no layer of ``viewer`` uses."""
    names = {layer.name for layer in viewer.layers}
    if base not in names:
        return base
    number = 2
    while f"{base} [{number}]" in names:
        number += 1
    return f"{base} [{number}]"


def legend_html(classes: Iterable[LabelClass]) -> str:
    """Coloured swatches and names of the non-background classes."""
    rows = []
    for label_class in classes:
        if label_class.value == 0:
            continue
        r, g, b = (round(255 * c) for c in label_class.color[:3])
        rows.append(
            f"<span style='color:#{r:02x}{g:02x}{b:02x}; font-size:14pt'>&#9632;</span> "
            f"{label_class.value} {label_class.name}"
        )
    return "<br>".join(rows) or "<i>no classes</i>"


def legend_label() -> QLabel:
    label = QLabel()
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    return label


# ------------------------------------------------------------------------------------------------
# Pickers
# ------------------------------------------------------------------------------------------------
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
        from ..modelfile import list_models

        current = select or self.current_model()
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


def scrolling_layout(widget: Any) -> Any:
    """A vertical layout inside a scroll area filling ``widget`` (docks stay within the window)."""
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea(widget)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    inner = QWidget(scroll)
    scroll.setWidget(inner)
    outer.addWidget(scroll)
    return QVBoxLayout(inner)


def fill_table(table: Any, headers: list[str], rows: list[list[Any]], max_rows: int = 8) -> None:
    """Replace a QTableWidget's content (read-only cells; floats shown with 2-3 decimals)."""
    from qtpy.QtWidgets import QHeaderView, QTableWidgetItem

    table.clear()
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if isinstance(value, float):
                text = "–" if value != value else "∞" if value == float("inf") else f"{value:.3g}"
            else:
                text = str(value)
            item = QTableWidgetItem(text)
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            if isinstance(value, (int, float)):
                item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
            table.setItem(r, c, item)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    table.verticalHeader().setVisible(False)
    fit_height(table, max_rows)


def fit_height(table: Any, max_rows: int = 8) -> None:
    """Size a table to its rows (at most ``max_rows`` visible, then it scrolls)."""
    rows = min(table.rowCount(), max_rows)
    height = table.horizontalHeader().height() + 2 * table.frameWidth()
    height += sum(table.rowHeight(r) for r in range(rows)) or table.verticalHeader().defaultSectionSize()
    table.setFixedHeight(height + table.horizontalScrollBar().sizeHint().height() + 2)  # room for a scrollbar


def show_plane(viewer: Any, layer: Any, plane: str, index: int | None = None) -> int:
    """Show ``plane`` slices of ``layer`` the radiological way and go to slice ``index``.

    Sagittal: superior up, anterior left; coronal: superior up, patient right on the left;
    axial: anterior up, patient right on the left.  Returns the array axis of the slider.
    """
    from .._napari_layers import geometry_from_layer
    from ..orientation import Plane, orientation_code, plane_array_axis

    shape = layer.data.shape
    geometry = geometry_from_layer(layer, shape)
    plane = Plane(plane)
    axis = plane_array_axis(geometry, plane)
    code = orientation_code(geometry.direction)  # letter c: where index axis c points (e.g. "PIR")
    lps_axis = {2 - c: _LETTERS[letter] for c, letter in enumerate(code)}  # array axis -> (LPS axis, sign)
    by_lps = {m: a for a, (m, _) in lps_axis.items()}
    # (LPS axis shown as rows, as columns) and whether rows/columns should run towards +LPS.
    rows_lps, cols_lps = {Plane.SAGITTAL: (2, 1), Plane.CORONAL: (2, 0), Plane.AXIAL: (1, 0)}[plane]
    rows_towards_plus = rows_lps == 1  # rows run S→I (towards -S) or A→P (towards +P)
    row_axis, col_axis = by_lps[rows_lps], by_lps[cols_lps]
    row_down = (lps_axis[row_axis][1] > 0) == rows_towards_plus
    col_right = lps_axis[col_axis][1] > 0  # columns run A→P (+P) or R→L (+L)
    if viewer.dims.ndim == 3:
        viewer.dims.order = (axis, row_axis, col_axis)
        viewer.dims.axis_labels = [p.value for p in sorted(Plane, key=lambda p: plane_array_axis(geometry, p))]
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
        camera.orientation2d = ("down" if row_down else "up", "right" if col_right else "left")
    if index is not None:
        index = int(min(max(index, 0), shape[axis] - 1))
        world = layer.translate[-3:][axis] + index * layer.scale[-3:][axis]
        viewer.dims.set_point(viewer.dims.ndim - 3 + axis, world)
    return axis
