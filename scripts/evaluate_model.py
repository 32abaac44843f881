"""Validate a model by patient on the real lumbar data (and report the cervical study honestly).

    .venv/bin/python scripts/evaluate_model.py [--model spineseg-default] [--data ../shared/data]

For the model's held-out validation cases (read from its metadata; the split is by patient) it
reports, per case and per dataset, Dice, IoU, ASD, NSD (2 mm) and HD95 of each class the case
labels, counted only inside the superior–inferior span of the labelled levels (partial labels),
for the fused three planes and for every plane alone.  It also reports the cervical T2 study
(spinal-cord-t2), whose manual label is the spinal cord, against our spinal-canal class.
Writes ``benchmarks/results/<model>_validation.csv`` and ``..._summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.io import read_volume
from napari_spineseg.metrics import evaluate_labels
from napari_spineseg.modelfile import load_model
from napari_spineseg.orientation import ALL_PLANES
from napari_spineseg.training.data import load_lumbar_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def evaluate_case(predictors: dict[str, Predictor], case, surface: bool = True) -> list[dict]:
    rows = []
    truth = case.evaluation_labels()
    region = case.region
    spacing = case.labels.geometry.spacing_zyx
    for name, predictor in predictors.items():
        started = time.perf_counter()
        result = predictor.predict(case.image)
        seconds = time.perf_counter() - started
        for value in sorted(case.known_classes):
            (m,) = evaluate_labels(
                result.labels.array, truth, spacing, classes=[value], region=region, surface=surface and name == "fused"
            )
            rows.append(
                {
                    "case": case.case_id,
                    "dataset": case.dataset,
                    "patient": case.patient,
                    "planes": name,
                    "class": m.name if m.name else str(value),
                    "value": value,
                    "dice": m.dice,
                    "iou": m.iou,
                    "asd_mm": m.asd_mm,
                    "nsd_2mm": m.nsd,
                    "hd95_mm": m.hd95_mm,
                    "seconds": seconds,
                }
            )
    return rows


def cervical_report(predictor: Predictor, data: Path) -> dict:
    image = read_volume(data / "spinal-cord-t2" / "t2.nii.gz")
    cord = read_volume(data / "spinal-cord-t2" / "t2_seg-manual.nii.gz").array > 0
    labels = predictor.predict(image).labels.array
    canal = labels == 3
    voxels = {int(v): int((labels == v).sum()) for v in np.unique(labels)}
    return {
        "study": "spinal-cord-t2/t2.nii.gz (cervical T2, PSR storage)",
        "cord_voxels": int(cord.sum()),
        "cord_covered_by_canal": float((cord & canal).sum() / max(cord.sum(), 1)),
        "canal_dice_vs_cord": float(2 * (cord & canal).sum() / max(cord.sum() + canal.sum(), 1)),
        "predicted_voxels_per_class": voxels,
        "note": "the manual label is the cord only; our canal class is the dural sac (cord + CSF), so Dice is "
        "bounded well below 1 even when correct; coverage of the cord by the canal is the fairer figure",
    }


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    keys = sorted({(r["dataset"], r["class"], r["planes"]) for r in rows})
    for dataset, name, planes in keys:
        chosen = [r for r in rows if (r["dataset"], r["class"], r["planes"]) == (dataset, name, planes)]
        entry = {"dataset": dataset, "class": name, "planes": planes, "cases": len(chosen)}
        for metric in ("dice", "iou", "asd_mm", "nsd_2mm", "hd95_mm"):
            values = [r[metric] for r in chosen if r[metric] is not None and np.isfinite(r[metric])]
            entry[metric] = float(np.mean(values)) if values else None
        summary.append(entry)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spineseg-default")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cases", help="comma-separated case ids (default: the model's validation cases)")
    parser.add_argument("--no-planes", action="store_true", help="skip the per-plane runs")
    args = parser.parse_args()
    data = Path(args.data)
    model = load_model(args.model)
    ids = args.cases.split(",") if args.cases else model.metadata.validation_cases
    if not ids:
        raise SystemExit("the model records no validation cases; pass --cases")
    cases = load_lumbar_dataset(data / "lumbar-mri", cases=ids)
    predictors = {"fused": Predictor(SegmentationSettings())}
    if not args.no_planes:
        predictors.update({p.value: Predictor(SegmentationSettings(planes=[p])) for p in ALL_PLANES})
    for predictor in predictors.values():
        predictor.load(model)
    rows = []
    for case in cases:
        rows += evaluate_case(predictors, case)
        fused = [r for r in rows if r["case"] == case.case_id and r["planes"] == "fused"]
        print(case.case_id, ", ".join(f"{r['class']} Dice {r['dice']:.3f}" for r in fused), flush=True)
    summary = summarise(rows)
    cervical = cervical_report(predictors["fused"], data)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = model.metadata.name
    with (RESULTS / f"{stem}_validation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / f"{stem}_summary.json").write_text(
        json.dumps({"validation_cases": ids, "summary": summary, "cervical": cervical}, indent=2)
    )
    header = ("dataset", "class", "planes", "n", "Dice", "IoU", "ASD", "NSD2", "HD95")
    print("\n{:8s} {:22s} {:9s} {:>2s} {:>6s} {:>6s} {:>6s} {:>6s} {:>6s}".format(*header))
    for s in summary:

        def fmt(v):
            return f"{v:6.3f}" if v is not None else "   n/a"

        print(
            f"{s['dataset']:8s} {s['class']:22s} {s['planes']:9s} {s['cases']:2d} {fmt(s['dice'])} {fmt(s['iou'])} "
            f"{fmt(s['asd_mm'])} {fmt(s['nsd_2mm'])} {fmt(s['hd95_mm'])}"
        )
    print("\ncervical:", json.dumps(cervical, indent=1))


if __name__ == "__main__":
    main()
