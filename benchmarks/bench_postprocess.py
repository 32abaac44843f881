"""Post-processing benchmark: seconds of each step of ``postprocess_labels`` (default rules) on a
synthetic 512³ spine-like label map at 0.5 mm (five bodies with a cavity, four discs, a canal, and
specks of every class spread over the whole volume: the worst case for the component filter).

Run: ``.venv/bin/python benchmarks/bench_postprocess.py [--size 512] [--repeats 2]``; prints the steps
and writes ``benchmarks/results/postprocess.csv`` (one row per step: best seconds over the repeats).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from results_csv import write_csv

from napari_spineseg.postprocess import default_postprocess, postprocess_labels

RESULTS = Path(__file__).parent / "results"


def synthetic_labels(
    shape: tuple[int, int, int] = (512, 512, 512), spacing: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A spine-like label map: 5 bodies (1) with a cavity, 4 discs (2), a canal (3), lesion specks (4), speckles."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    labels = np.zeros(shape, np.uint8)
    yy = np.arange(y)[None, :, None]
    xx = np.arange(x)[None, None, :]
    cy, cx = y // 2, x // 2
    height = z // 11
    for level in range(5):
        z0 = height + level * 2 * height
        body = ((yy - cy) / (0.12 * y)) ** 2 + ((xx - cx) / (0.14 * x)) ** 2 <= 1
        labels[z0 : z0 + height][np.broadcast_to(body, (height, y, x))] = 1
        labels[z0 + height // 2, cy - 3 : cy + 3, cx - 3 : cx + 3] = 0  # a hole
        if level < 4:
            labels[z0 + height : z0 + 2 * height][np.broadcast_to(body, (height, y, x))] = 2
    canal = ((yy - cy - 0.2 * y) / (0.04 * y)) ** 2 + ((xx - cx) / (0.05 * x)) ** 2 <= 1
    labels[np.broadcast_to(canal, shape) & (labels == 0)] = 3
    for value, fraction in ((1, 2e-4), (2, 2e-4), (3, 1e-4), (4, 5e-5)):
        specks = rng.random(shape, dtype=np.float32) < fraction
        labels[specks] = value
    return labels, (spacing,) * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "postprocess.csv"))
    args = parser.parse_args()
    labels, spacing = synthetic_labels((args.size,) * 3)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        postprocess_labels(labels, spacing, default_postprocess(), timings)
        timings["total"] = time.perf_counter() - start
        best = {k: min(v, best.get(k, float("inf"))) for k, v in timings.items()}
    shape = "x".join([str(args.size)] * 3)
    load = os.getloadavg()[0]
    rows = [{"shape": shape, "step": k, "seconds": round(v, 3), "load": round(load, 1)} for k, v in best.items()]
    for row in rows:
        print(f"{row['shape']} {row['step']:12s} {row['seconds']:7.2f} s")
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
