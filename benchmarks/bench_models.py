"""Bundled models side by side: Dice per dataset on held-out patients, and seconds per study.

    .venv/bin/python benchmarks/bench_models.py [--models spineseg-default,spineseg-accurate]
                                               [--variants plain,mirror] [--quick]

For each model (a bundled name or a ``.safetensors`` path) and each inference variant (``plain``:
the three planes as they are; ``mirror``: plus the test-time left-right mirror; ``model``: what
the model file asks for), it segments the held-out validation cases recorded in the model file
(split by patient; version 5: VB3-01/02/04/05, VB1 patient P06 = cases 06/07/08, IVD-11; version 6,
trained on more patients: the sentinels VB3-01/05; ``--cases`` chooses others), with the model's
post-processing, and reports the mean Dice per dataset inside the labelled superior–inferior span
(the model card's protocol).  It also times three planes of a 224×224×77 study on this machine's
CPU (and on CUDA when present).  Writes ``benchmarks/results/models.csv`` (one row per case) and
prints a table.  ``--quick``: one case per dataset, no timing study.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.metrics import evaluate_labels
from napari_spineseg.modelfile import load_model
from napari_spineseg.training.data import load_lumbar_dataset
from napari_spineseg.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("VB3", "VB1", "IVD")
PIR = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # the lumbar data's storage orientation


def settings_for(variant: str, device: str = "cpu") -> SegmentationSettings:
    mirror = {"plain": False, "mirror": True, "model": None}[variant]
    return SegmentationSettings(device=device, test_time_mirror=mirror)


def dice_rows(model_name: str, variant: str, predictor: Predictor, cases) -> list[dict]:
    rows = []
    for case in cases:
        started = time.perf_counter()
        labels = predictor.predict(case.image).labels.array
        seconds = time.perf_counter() - started
        truth = case.evaluation_labels()
        for value in sorted(case.known_classes):
            if value == 0:
                continue
            (m,) = evaluate_labels(
                labels, truth, case.labels.geometry.spacing_zyx, classes=[value], region=case.region, surface=False
            )
            rows.append(
                {
                    "model": model_name,
                    "variant": variant,
                    "case": case.case_id,
                    "dataset": case.dataset,
                    "class": value,
                    "dice": round(float(m.dice), 4),
                    "seconds": round(seconds, 2),
                }
            )
        print(f"  {model_name} [{variant}] {case.case_id}: {rows[-1]['dice']:.3f} ({seconds:.1f} s)", flush=True)
    return rows


def standard_study_seconds(predictor: Predictor, repeats: int = 2) -> float:
    """Best of ``repeats`` end-to-end seconds (with post-processing) for a 224×224×77 PIR study."""
    rng = np.random.default_rng(0)
    array = rng.random((77, 224, 224), dtype=np.float32) * 500
    volume = Volume.from_array(array, direction=PIR, name="timing")
    predictor.predict(volume)  # warm-up
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(volume)
        best = min(best, time.perf_counter() - started)
    return float(best)


def print_table(rows: list[dict], timings: dict[tuple[str, str, str], float]) -> None:
    keys = sorted({(r["model"], r["variant"]) for r in rows})
    print(f"\n{'model':28s} {'variant':8s} " + " ".join(f"{d:>6s}" for d in DATASETS) + "  s/study(224x224x77)")
    for model, variant in keys:
        cells = []
        for dataset in DATASETS:
            values = [r["dice"] for r in rows if (r["model"], r["variant"], r["dataset"]) == (model, variant, dataset)]
            cells.append(f"{np.mean(values):6.3f}" if values else "   n/a")
        times = " ".join(
            f"{dev} {timings[(model, variant, dev)]:.2f}" for dev in ("cpu", "cuda") if (model, variant, dev) in timings
        )
        print(f"{model:28s} {variant:8s} " + " ".join(cells) + f"  {times}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="spineseg-default")
    parser.add_argument("--variants", default="model")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lumbar-mri"))
    parser.add_argument("--cases", help="comma-separated case ids (default: each model's held-out cases)")
    parser.add_argument("--quick", action="store_true", help="one case per dataset, no timing study")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "models.csv"))
    args = parser.parse_args(argv)
    rows: list[dict] = []
    timings: dict[tuple[str, str, str], float] = {}
    import torch

    for model_name in args.models.split(","):
        model = load_model(model_name)
        ids = args.cases.split(",") if args.cases else model.metadata.validation_cases
        if args.quick:
            ids = [next(i for i in ids if i.startswith(d)) for d in DATASETS if any(i.startswith(d) for i in ids)]
        cases = load_lumbar_dataset(args.data, cases=ids)
        for variant in args.variants.split(","):
            predictor = Predictor(settings_for(variant))
            predictor.load(model)
            rows += dice_rows(model.metadata.name, variant, predictor, cases)
            if not (args.quick or args.no_timing):
                timings[(model.metadata.name, variant, "cpu")] = standard_study_seconds(predictor)
                if torch.cuda.is_available():
                    gpu = Predictor(settings_for(variant, "cuda"))
                    gpu.load(model)
                    timings[(model.metadata.name, variant, "cuda")] = standard_study_seconds(gpu)
    for row in rows:
        for device in ("cpu", "cuda"):
            row[f"{device}_s_224x224x77"] = timings.get((row["model"], row["variant"], device), "")
        row["threads"] = torch.get_num_threads()
        row["machine"] = f"{os.cpu_count()} CPU cores" + (
            f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
