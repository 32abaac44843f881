"""Training input benchmark: samples/s of the default recipe per data loader worker count.

Run: ``.venv/bin/python benchmarks/bench_training.py --data ../shared/data/lumbar-mri [--workers 0,1]
[--steps 40] [--crop 192] [--device auto] [--out benchmarks/results/training_input.csv]``.  ``--data`` may be
a packed ``cases.npz`` (``scripts/pack_training_data.py``): then neither SimpleITK nor the NIfTI files
are needed (a GPU server).  Samples/s are taken over the steps after ``--warmup`` (worker start-up and
the first allocations excluded; the total with them is also written).  No validation runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from results_csv import write_csv

from napari_spineseg.runtime import resolve_workers, usable_cores
from napari_spineseg.training.commands import add_train_arguments, prepare_run
from napari_spineseg.training.loop import train

RESULTS = Path(__file__).parent / "results"


def samples_per_second(
    data: str, workers: int | str, steps: int, crop: int, device: str, warmup: int, extra=()
) -> dict:
    """One short training run; its samples/s after ``warmup`` steps and over all steps."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with tempfile.TemporaryDirectory() as folder:
        argv = ["--data", data, "--steps", str(steps), "--val-every", str(steps + 1), "--crop", str(crop)]
        argv += ["--workers", str(workers), "--device", device, "-o", str(Path(folder) / "m.safetensors"), *extra]
        recipe, train_cases, _, _ = prepare_run(parser.parse_args(argv))
        config = recipe.config
        times = []
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        for event in train(config, train_cases, []):
            if event.kind == "step":
                times.append(time.perf_counter())
        cpu = _cpu_seconds() - cpu_start
    batch = config.batch_size
    steady = (
        (len(times) - 1 - warmup) * batch / (times[-1] - times[warmup]) if len(times) > warmup + 1 else float("nan")
    )
    return {
        "workers": resolve_workers(workers),
        "steps": len(times),
        "batch_size": batch,
        "crop": crop,
        "samples_per_s": steady,
        "samples_per_s_total": len(times) * batch / (times[-1] - start),
        # CPU seconds (this process and its reaped workers) per sample: what a worker costs on a
        # machine whose cores are all busy, where samples/s mostly measure the neighbours' load
        "cpu_s_per_sample": cpu / max(1, len(times) * batch),
    }


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the lumbar-mri folder or a packed cases.npz")
    parser.add_argument("--workers", default="0,1", help="comma-separated worker counts (or auto)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--out", default=str(RESULTS / "training_input.csv"))
    args = parser.parse_args()
    extra = [*(["--threads", str(args.threads)] if args.threads else [])]
    extra += [*(["--datasets", args.datasets] if args.datasets else [])]
    machine = f"{platform.node()} {usable_cores()} cores" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    )
    rows = []
    for workers in args.workers.split(","):
        row = samples_per_second(args.data, workers.strip(), args.steps, args.crop, args.device, args.warmup, extra)
        row.update(machine=machine, device=args.device, load=os.getloadavg()[0], torch=torch.__version__)
        print(
            f"workers {row['workers']:2d}: {row['samples_per_s']:8.1f} samples/s "
            f"({row['samples_per_s_total']:.1f} with start-up), {row['cpu_s_per_sample']:.3f} CPU s/sample, "
            f"load {row['load']:.1f}"
        )
        rows.append(row)
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
