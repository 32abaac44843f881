"""Provenance helpers shared by model files, training, fine-tuning, cohorts and reports.

- :func:`json_safe`: plain JSON values (one rule everywhere: numpy scalars → Python numbers,
  non-finite floats → ``None`` so records stay strict JSON, tuples → lists, sets → sorted lists,
  paths and other objects → strings).
- :func:`file_sha256`: the SHA-256 of a file's bytes.
- :func:`tensor_digest`: the SHA-256 of a tensor table (names, shapes, dtypes and bytes), the
  ``content_sha256`` of model files and the digest binding a lesion gate's record to its weights.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["file_sha256", "json_safe", "tensor_digest"]


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types (see the module docstring for the rule)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [json_safe(v) for v in sorted(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the file at ``path``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensors: dict[str, Any]) -> str:
    """SHA-256 (hex) over a tensor table: each name, shape, dtype and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
