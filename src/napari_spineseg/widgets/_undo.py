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

__all__ = ["PaintTracker", "apply_change", "paint_tracker", "painted_mask", "plugin_edit"]

_TRACKERS: dict[Any, PaintTracker] = {}


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


def paint_tracker(layer: Any) -> PaintTracker:
    """The layer's tracker of painted voxels, created (and connected) on first use."""
    key = id(layer)
    tracker = _TRACKERS.get(key)
    if tracker is None or tracker.layer is not layer:
        tracker = _TRACKERS[key] = PaintTracker(layer)
        weakref.finalize(layer, _TRACKERS.pop, key, None)
    return tracker


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
    data = layer.data
    if change.size == 0:
        return 0
    if any(int(i.max()) >= n for i, n in zip(change.indices, data.shape)) or len(change.indices) != data.ndim:
        raise InputError(f"{layer.name}: the change does not fit the layer's shape {data.shape}")
    if not np.array_equal(np.asarray(data[change.indices]), change.previous):
        raise InputError(f"{layer.name} was edited after the preview; preview again")
    keep = painted_mask(layer)
    if protect is not None:
        keep |= np.asarray(protect, dtype=bool)
    change = change.without(keep)
    if change.size == 0:
        return 0
    with plugin_edit(layer):
        layer.data_setitem(change.indices, np.asarray(change.values, dtype=data.dtype))
    return change.size
