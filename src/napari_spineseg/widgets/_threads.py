"""CPU threads of background jobs (Qt-free)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator


@contextlib.contextmanager
def gui_friendly_torch() -> Generator[None, None, None]:
    """Leave one CPU core to the viewer while a job runs torch on the CPU.

    With as many torch threads as cores, the GUI thread and torch's worker threads compete for
    every core (on a busy 2-core machine a training step was 20x slower and the viewer stalled).
    """
    import torch

    previous = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(previous, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
