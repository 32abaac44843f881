"""Cohort throughput on a Dask LocalCluster: 1 worker against 2 workers (one thread each).

Run: ``.venv/bin/python benchmarks/bench_cohort.py [--quick] [--studies N] [--workers 1,2]``; synthesises
phantom studies (160×160×40 by default) in a temporary directory, segments them with the bundled default
model through :func:`napari_spineseg.cohort.segment_cohort` on each cluster size, checks that every
run wrote identical labels, prints a table and writes ``benchmarks/results/cohort.csv``
(``cohort-quick.csv`` with ``--quick``: 2 small studies, a smoke run).

Workers load the model before the clock starts, so the figures are steady-state throughput; the
cluster start-up (a few seconds) and the per-worker model load are reported separately.  Load from
other processes on the machine lowers the speed-up: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _warm(model, settings) -> int:
    """Runs on a worker: load the model into the worker's cache."""
    from napari_spineseg.cohort import cached_predictor

    cached_predictor(model, settings)
    return os.getpid()


def make_studies(directory: Path, count: int, size: tuple[int, int, int]) -> None:
    from napari_spineseg.io import write_volume
    from napari_spineseg.phantom import make_phantom

    directory.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        phantom = make_phantom(size=size, seed=seed, lesions=seed % 2)
        write_volume(phantom.image, directory / f"study{seed:02d}.nii.gz")


def run_once(workers: int, inputs: Path, output: Path, model: str) -> dict:
    from napari_spineseg.cohort import ModelRef, open_client, segment_cohort
    from napari_spineseg.inference import SegmentationSettings

    settings = SegmentationSettings()
    started = time.perf_counter()
    with open_client(f"local:{workers}") as client:
        startup = time.perf_counter() - started
        addresses = list(client.scheduler_info()["workers"])
        ref = ModelRef.resolve(model)
        loading = time.perf_counter()
        warm = [
            client.submit(_warm, ref, settings, workers=[a], allow_other_workers=False, pure=False) for a in addresses
        ]
        client.gather(warm)
        load_seconds = time.perf_counter() - loading
        load_average = os.getloadavg()[0]
        clock = time.perf_counter()
        results = [p.result for p in segment_cohort(inputs, output, model=model, settings=settings, scheduler=client)]
        seconds = time.perf_counter() - clock
    bad = [f"{r.study}: {r.status} {r.error}" for r in results if r.status != "done"]
    if bad:
        raise SystemExit("benchmark studies failed: " + "; ".join(bad))
    return {
        "workers": workers,
        "studies": len(results),
        "seconds": round(seconds, 2),
        "studies_per_min": round(60.0 * len(results) / seconds, 2),
        "mean_study_seconds": round(sum(r.seconds for r in results) / len(results), 2),
        "cluster_start_seconds": round(startup, 2),
        "model_load_seconds": round(load_seconds, 2),
        "load_average": round(load_average, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 studies of 64x64x16 (smoke run)")
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=3, default=(160, 160, 40), metavar=("X", "Y", "Z"))
    parser.add_argument("--workers", default="1,2", help="comma-separated LocalCluster sizes")
    parser.add_argument("--model", default="spineseg-default")
    args = parser.parse_args()
    count, size = (2, (64, 64, 16)) if args.quick else (args.studies, tuple(args.size))
    sizes = [int(w) for w in args.workers.split(",")]

    import torch

    from napari_spineseg.io import read_volume

    rows = []
    with tempfile.TemporaryDirectory(prefix="spineseg-bench-cohort-") as temp:
        inputs = Path(temp) / "studies"
        make_studies(inputs, count, size)
        for workers in sizes:
            print(f"{workers} worker(s), {count} studies of {size[0]}x{size[1]}x{size[2]} ...", flush=True)
            rows.append(run_once(workers, inputs, Path(temp) / f"out-{workers}", args.model))
        reference = Path(temp) / f"out-{sizes[0]}"
        identical = all(
            (Path(temp) / f"out-{w}" / p.name).read_bytes() == p.read_bytes()
            for p in reference.glob("*_seg.nii.gz")
            for w in sizes[1:]
        )
        assert read_volume(next(reference.glob("*_seg.nii.gz"))).array.any()
    base = rows[0]["studies_per_min"]
    for row in rows:
        row.update(
            speedup=round(row["studies_per_min"] / base, 2),
            size="x".join(map(str, size)),
            model=args.model,
            identical_outputs=identical,
            cpus=os.cpu_count(),
            torch=torch.__version__,
            machine=platform.processor() or platform.machine(),
        )

    print(f"\n{'workers':>7} {'studies':>7} {'seconds':>8} {'studies/min':>11} {'speed-up':>8}  (load avg)")
    for row in rows:
        print(
            f"{row['workers']:>7} {row['studies']:>7} {row['seconds']:>8.1f} {row['studies_per_min']:>11.2f} "
            f"{row['speedup']:>7.2f}×  ({row['load_average']:.1f})"
        )
    print(f"outputs identical across cluster sizes: {'yes' if identical else 'NO'}")
    busy = max(row["load_average"] for row in rows)
    if busy > 0.5:
        print(f"note: load average up to {busy:.1f} before the runs: other processes were using the CPU")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("cohort-quick.csv" if args.quick else "cohort.csv")
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"-> {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
