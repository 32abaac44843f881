"""napari dock widgets: Segment spine, Review segmentation, Fine-tune model, Interpolate slices.

One module per widget; each widget is a ``QWidget`` taking the viewer.  Heavy work runs in napari
thread workers on plain arrays (a worker may also build a layer object that is in no viewer yet);
layers are only added to the viewer or changed on the GUI thread, in short event-loop turns.
Imported lazily so that ``import napari_spineseg.widgets`` does not pull in Qt or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinetuneWidget", "InterpolateWidget", "ReviewWidget", "SegmentWidget"]

_MODULES = {
    "SegmentWidget": "segment",
    "ReviewWidget": "review",
    "FinetuneWidget": "finetune",
    "InterpolateWidget": "interpolate",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
