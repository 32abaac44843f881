"""Widget settings remembered between sessions (``widgets.json`` in the user config folder)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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
