"""Shared fixtures: the real data beside the project and display detection for napari tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` (skips with a clear message when it is absent; CI always has it)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} is absent")
    return DATA_DIR


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY")) and os.environ.get("QT_QPA_PLATFORM", "xcb") != "offscreen"


requires_display = pytest.mark.skipif(not has_display(), reason="napari rendering needs a display (run under xvfb-run)")
