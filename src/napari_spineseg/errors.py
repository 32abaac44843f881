"""The error types of napari-spineseg.

Every problem a user can cause (a bad file, a wrong shape, a missing model) is raised as a
:class:`SpinesegError` subclass whose message names the file or object and the problem in one
line.  The CLI prints that line and exits non-zero; the napari layer shows it as a notification.
Anything else escaping is a bug.
"""

from __future__ import annotations


class SpinesegError(Exception):
    """Base class of every error meant for the user."""


class VolumeReadError(SpinesegError):
    """A study or label file could not be read."""


class VolumeWriteError(SpinesegError):
    """A label map or report could not be written."""


class GeometryMismatchError(SpinesegError):
    """Two volumes that must share voxel geometry do not."""


class ModelFileError(SpinesegError):
    """A model file is missing, truncated, tampered with or inconsistent."""


class InputError(SpinesegError):
    """Arguments or data that cannot be used (wrong shape, NaNs, empty labels, ...)."""


class Cancelled(SpinesegError):
    """Long work was cancelled by the user; nothing was written."""
