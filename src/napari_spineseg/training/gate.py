"""Former name of :mod:`napari_spineseg.training.lesion_gate_trainer` (training the lesion-presence gate),
kept so existing imports work."""

from .lesion_gate_trainer import *  # noqa: F403
from .lesion_gate_trainer import __all__  # noqa: F401
