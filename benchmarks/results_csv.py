"""One CSV writer for the benchmarks' result tables (temp file, then rename: never half a table)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def write_csv(rows: list[dict], path: Path | str, fieldnames: Sequence[str] | None = None) -> None:
    """Write ``rows`` to ``path`` (columns: ``fieldnames``, else the first row's keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)
