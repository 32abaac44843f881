"""napari-spineseg: spine MRI segmentation (three-plane 2-D networks), review and fine-tuning.

The compute core (``volume``, ``io``, ``orientation``, ``inference``, ``training``, ``metrics``)
never imports Qt or napari; the napari layer lives in ``_reader``, ``_writer``, ``_sample_data``
and ``widgets``.
"""

__version__ = "0.1.0"

from .errors import SpinesegError
from .volume import Geometry, Volume

__all__ = ["Geometry", "SpinesegError", "Volume", "__version__"]
