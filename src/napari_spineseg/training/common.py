"""Parts shared by the training loops of this package (segmenter :mod:`.loop`, lesion gate
:mod:`.lesion_gate_trainer`, fine-tuning :mod:`.finetune`): the append-only CSV log and the
learning-rate schedule (linear warm-up, then cosine to a floor, steps, or constant)."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SCHEDULES", "CsvLog", "scheduled_lr"]

SCHEDULES = ("none", "cosine", "step")


class CsvLog:
    """Append-only CSV log: one complete, flushed row per write (header when the file is new).

    ``path=None`` logs nothing; columns not in ``columns`` are ignored, missing ones left empty.
    """

    def __init__(self, path: Path | None, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        with self.path.open("a", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())


def scheduled_lr(
    base: float,
    step: int,
    total: int,
    *,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_fraction: float = 0.02,
    step_size: int = 1000,
    step_gamma: float = 0.5,
) -> float:
    """The learning rate at ``step`` of ``total``: linear warm-up over ``warmup_steps``, then
    ``cosine`` (to ``min_lr_fraction`` of ``base`` at ``total``), ``step`` (times ``step_gamma``
    every ``step_size`` steps) or ``none`` (constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total - warmup_steps)
        t = min(1.0, max(0.0, (step - warmup_steps) / span))
        floor = min_lr_fraction
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    if schedule == "step":
        return base * step_gamma ** (step // max(1, step_size))
    return base
