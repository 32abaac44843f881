"""Former name of :mod:`napari_spineseg.lesion_gate` (the lesion-presence gate of a model file), kept so
existing imports work; new code imports :mod:`.lesion_gate` (and ``attach_gate`` from :mod:`.modelfile`)."""

from .lesion_gate import *  # noqa: F403
from .lesion_gate import __all__ as _lesion_gate_all
from .modelfile import attach_gate

__all__ = [*_lesion_gate_all, "attach_gate"]
