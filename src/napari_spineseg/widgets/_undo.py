"""Plugin edits of a Labels layer that are always one undo away and never overwrite painting.

    tracker = paint_tracker(layer)                 # starts recording the annotator's paint events
    apply_change(layer, change)                    # one undo step; painted voxels are left alone
    layer.undo()                                   # the exact previous array

What counts as *painted*: every voxel an annotator's edit touched (brush, eraser, fill, polygon:
napari's ``Labels.events.paint``) since the tracker was attached, minus nothing: a painted voxel
the annotator later undid stays protected (erring on the side of the annotator).  Edits made by
the plugin inside :func:`plugin_edit` (or :func:`apply_change`) are not counted.  A layer that
was edited before its tracker existed is seeded from the Segment widget's original prediction
(``PREDICTION_KEY`` metadata): voxels that differ from it count as painted.

Some plugin edits change more than voxels: a re-segmentation in place brings a new checksum and
prediction (metadata), renumbered levels new names (features, colours, the levels record).
:func:`record_step` keeps those attributes beside the voxel change, and they follow Ctrl+Z and
Ctrl+Shift+Z: when the layer's voxels are back to exactly what they were before the change
(napari's undo), the attributes of then are put back, and those of after on a redo.

    with plugin_step(layer, ("colormap",), metadata_keys=("spineseg_result",)) as step:
        step.change = replace_data(layer, new_array)   # one undo step
        layer.metadata = {...}                         # the new attributes follow undo and redo
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import InputError
from ..interpolation import LabelChange
from ._layer_data import PREDICTION_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "LayerSteps",
    "PaintTracker",
    "apply_change",
    "follow_history",
    "in_plugin_edit",
    "layer_steps",
    "paint_tracker",
    "painted_mask",
    "plugin_edit",
    "plugin_step",
    "replace_data",
]

_TRACKERS: dict[Any, PaintTracker] = {}
_STEPS: dict[Any, LayerSteps] = {}
#: Plugin steps whose attributes a layer remembers (older ones fall out, as napari's history does).
MAX_STEPS = 10
_SAMPLE = 64  # voxels of a change compared first (cheap) before a whole comparison


class PaintTracker:
    """Records which voxels of one Labels layer the annotator painted (from its paint events)."""

    def __init__(self, layer: Any) -> None:
        self._layer = weakref.ref(layer)
        self._plugin_depth = 0
        self.edits = 0  # every recorded edit (painting or plugin) bumps it: a preview can tell it is stale
        self.mask = np.zeros(layer.data.shape, dtype=bool)
        prediction = (layer.metadata or {}).get(PREDICTION_KEY)
        if isinstance(prediction, np.ndarray) and prediction.shape == layer.data.shape:
            self.mask |= np.asarray(layer.data) != prediction  # edited before tracking began
        layer.events.paint.connect(self._on_paint)

    @property
    def layer(self) -> Any:
        return self._layer()

    def current_mask(self) -> np.ndarray:
        """The painted mask, reset (all False) if the layer's data changed shape."""
        layer = self.layer
        if layer is not None and layer.data.shape != self.mask.shape:
            logger.warning("%s: data changed shape; the record of painted voxels starts again", layer.name)
            self.mask = np.zeros(layer.data.shape, dtype=bool)
        return self.mask

    def _on_paint(self, event: Any) -> None:
        self.edits += 1
        if self._plugin_depth:
            return
        mask = self.current_mask()
        for atom in event.value or ():
            key = getattr(atom, "slice_key", None)
            if key is not None:  # napari >= 0.9: a masked edit of a bounding box
                if atom.mask is None:
                    mask[key] = True
                else:
                    mask[key] |= atom.mask
            else:  # (indices, previous values, new values)
                mask[tuple(atom[0])] = True

    def disconnect(self) -> None:
        layer = self.layer
        if layer is not None:
            layer.events.paint.disconnect(self._on_paint)


def _unwrap(layer: Any) -> Any:
    """The layer itself (plugin widgets see layers through napari's proxies, a new one each time)."""
    return getattr(layer, "__wrapped__", layer)


def paint_tracker(layer: Any) -> PaintTracker:
    """The layer's tracker of painted voxels, created (and connected) on first use."""
    return _registered(_TRACKERS, _unwrap(layer), PaintTracker, lambda tracker: tracker.layer)


def _registered(registry: dict[int, Any], layer: Any, make: Any, owner: Any) -> Any:
    """What ``registry`` keeps for ``layer`` (by id): made by ``make(layer)`` on first use or when
    the id now belongs to another layer (``owner(item)`` is not ``layer``); dropped with the layer."""
    key = id(layer)
    item = registry.get(key)
    if item is None or owner(item) is not layer:
        item = registry[key] = make(layer)
        weakref.finalize(layer, registry.pop, key, None)
    return item


def in_plugin_edit(layer: Any) -> bool:
    """Whether ``layer`` is being edited by the plugin now (inside :func:`plugin_edit`): for paint handlers."""
    layer = _unwrap(layer)
    tracker = _TRACKERS.get(id(layer))
    return tracker is not None and tracker.layer is layer and tracker._plugin_depth > 0


def painted_mask(layer: Any) -> np.ndarray:
    """Boolean mask of the voxels the annotator painted on ``layer`` (a copy)."""
    return paint_tracker(layer).current_mask().copy()


@contextmanager
def plugin_edit(layer: Any) -> Iterator[None]:
    """Group the plugin's ``data_setitem`` calls into one undo step, not counted as painting."""
    tracker = paint_tracker(layer)
    tracker._plugin_depth += 1
    try:
        with layer.block_history():
            yield
    finally:
        tracker._plugin_depth -= 1


def apply_change(layer: Any, change: LabelChange, protect: np.ndarray | None = None) -> int:
    """Write ``change`` into ``layer`` as one undoable step; returns the number of voxels changed.

    Voxels the annotator painted (and any True in ``protect``) are left as they are.  If the layer
    no longer holds ``change.previous`` (it was edited after the change was computed) nothing is
    written and an :class:`InputError` asks for a new preview.
    """
    return _apply(layer, change, protect).size


def _apply(layer: Any, change: LabelChange, protect: np.ndarray | None = None) -> LabelChange:
    """:func:`apply_change`, returning the change as written (painted and protected voxels left out)."""
    data = layer.data
    if change.size == 0:
        return change
    if any(int(i.max()) >= n for i, n in zip(change.indices, data.shape)) or len(change.indices) != data.ndim:
        raise InputError(f"{layer.name}: the change does not fit the layer's shape {data.shape}")
    if not np.array_equal(np.asarray(data[change.indices]), change.previous):
        raise InputError(f"{layer.name} was edited after the preview; preview again")
    keep = painted_mask(layer)
    if protect is not None:
        keep |= np.asarray(protect, dtype=bool)
    change = change.without(keep)
    if change.size == 0:
        return change
    with plugin_edit(layer):
        layer.data_setitem(change.indices, np.asarray(change.values, dtype=data.dtype))
    return change


def replace_data(layer: Any, new: np.ndarray, protect: np.ndarray | None = None) -> LabelChange:
    """Make ``layer``'s voxels ``new`` (same shape) as one undo step; returns the change written.

    Only the voxels that differ are written (and kept in napari's history); voxels the annotator
    painted (and any True in ``protect``) keep their values.
    """
    data = np.asarray(layer.data)
    new = np.asarray(new)
    if new.shape != data.shape:
        raise InputError(f"{layer.name}: new data {new.shape} does not fit the layer's shape {data.shape}")
    if new.dtype != data.dtype and not np.can_cast(new.dtype, data.dtype):
        new = new.astype(np.int64)
        if new.size and (new.min() < np.iinfo(data.dtype).min or new.max() > np.iinfo(data.dtype).max):
            raise InputError(f"{layer.name}: the new labels do not fit its {data.dtype} voxels")
    indices = np.nonzero(data != new)
    change = LabelChange(indices, new[indices].astype(data.dtype), data[indices].copy())
    return _apply(layer, change, protect)


# Attributes that follow undo and redo ----------------------------------------------------------

_ABSENT = object()  # a metadata key the layer did not have (removed again on undo)


def _capture(layer: Any, attributes: tuple[str, ...], metadata_keys: tuple[str, ...]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in attributes:
        value = getattr(layer, name)
        state[name] = value.copy() if name == "features" else value
    metadata = layer.metadata or {}
    state["metadata"] = {key: metadata.get(key, _ABSENT) for key in metadata_keys}
    return state


def _restore(layer: Any, state: dict[str, Any]) -> None:
    for name in ("colormap", "features"):
        if name in state:
            setattr(layer, name, state[name])
    entries = state.get("metadata") or {}
    if entries:
        metadata = {**(layer.metadata or {}), **entries}
        layer.metadata = {key: value for key, value in metadata.items() if value is not _ABSENT}


def _holds(data: Any, change: LabelChange, which: str) -> bool:
    """Whether ``data`` holds ``change``'s ``which`` ("values": applied, "previous": undone) everywhere."""
    if change.size == 0:
        return False
    expected = getattr(change, which)
    picks = np.linspace(0, change.size - 1, min(_SAMPLE, change.size)).astype(np.intp)
    if not np.array_equal(np.asarray(data[tuple(i[picks] for i in change.indices)]), expected[picks]):
        return False  # the cheap look (every slice change of the viewer comes here) ends most calls
    return bool(np.array_equal(np.asarray(data[change.indices]), expected))


class LayerSteps:
    """The plugin's steps on one layer: (voxel change, attributes before, attributes after), in order.

    ``current`` steps are in effect.  :meth:`follow` runs on every ``set_data`` of the layer (which
    napari's undo and redo emit) and before a new step: it moves ``current`` down while the voxels
    of the step in effect are exactly as before it (undone), else up while those of the next step
    are exactly as after it (redone), and puts the attributes of then back.  Voxels that are
    neither (the annotator painted over some) leave everything as it is.
    """

    def __init__(self, layer: Any) -> None:
        self._layer = weakref.ref(layer)
        self.steps: list[tuple[LabelChange, dict[str, Any], dict[str, Any]]] = []
        self.current = 0
        self.suspended = 0  # inside plugin_step: the layer is half-way through a step
        layer.events.set_data.connect(self.follow)

    def record(self, change: LabelChange, before: dict[str, Any], after: dict[str, Any]) -> None:
        del self.steps[self.current :]  # undone steps cannot come back (napari clears its redo history)
        self.steps.append((change, before, after))
        del self.steps[:-MAX_STEPS]
        self.current = len(self.steps)

    def follow(self, event: Any = None) -> None:
        layer = self._layer()
        if layer is None or self.suspended or not self.steps:
            return
        start = self.current
        while self.current > 0 and _holds(layer.data, self.steps[self.current - 1][0], "previous"):
            self.current -= 1
        if self.current == start:
            while self.current < len(self.steps) and _holds(layer.data, self.steps[self.current][0], "values"):
                self.current += 1
        if self.current != start:
            _restore(layer, self.steps[self.current - 1][2] if self.current else self.steps[0][1])


def layer_steps(layer: Any) -> LayerSteps:
    """The layer's :class:`LayerSteps`, created (and connected) on first use."""
    return _registered(_STEPS, _unwrap(layer), LayerSteps, lambda steps: steps._layer())


def follow_history(layer: Any) -> None:
    """Bring the attributes of ``layer`` in line with an undo or redo not seen yet (call before reading them)."""
    layer = _unwrap(layer)
    steps = _STEPS.get(id(layer))
    if steps is not None and steps._layer() is layer:
        steps.follow()


class PluginStep:
    """What :func:`plugin_step` records: set ``change`` to the voxel change written."""

    change: LabelChange | None = None


@contextmanager
def plugin_step(
    layer: Any, attributes: tuple[str, ...] = (), metadata_keys: tuple[str, ...] = ()
) -> Iterator[PluginStep]:
    """A plugin edit whose ``attributes`` (``"colormap"``, ``"features"``) and metadata entries follow
    the voxels through undo and redo.

    Inside, write the voxels (one undo step: :func:`replace_data`, :func:`apply_change` or
    ``data_setitem`` in ``layer.block_history()``), set the new attributes and set the yielded
    record's ``change`` to the voxel change.  A step whose change is empty is not recorded.
    """
    steps = layer_steps(layer)
    steps.follow()  # an undo not seen yet is taken into account first
    before = _capture(layer, attributes, metadata_keys)
    record = PluginStep()
    steps.suspended += 1
    try:
        yield record
    finally:
        steps.suspended -= 1
    if record.change is not None and record.change.size:
        steps.record(record.change, before, _capture(layer, attributes, metadata_keys))
