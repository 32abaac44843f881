"""Vertebral level identification benchmark on the real lumbar MRI (VB3, IVD, VB1).

Run: ``.venv/bin/python benchmarks/bench_levels.py [--cache DIR]``; prints a table and writes
``benchmarks/results/levels.csv`` (one row per case and input) and ``levels-summary.csv``.

What is scored (``napari_spineseg.levels.identify_levels`` on a class map):

* ``model``: the bundled ``spineseg-default`` segmentation of the study (CPU, cached in ``--cache``).
  Held-out cases (the model's validation split, never trained on): VB3-01/02/04/05, IVD-11,
  VB1-06/07/08; the other cases were in its training set (optimistic, listed apart).
* ``gt``: the ground truth alone as the class map (VB3 values → body 1, IVD values → disc 2).  VB3
  labels bodies only and IVD discs only, and neither labels the sacrum, so the anchor (the sacrum
  below the L5/S1 disc) is never in these maps: the expected outcome is "uncertain", never a name.
* ``gt+model``: the ground-truth structures placed in the model's map (inside the labelled S-I span
  the model's voxels of the labelled class are replaced by the ground truth; the sacrum and the
  other class come from the model): tests naming of exact ground-truth instances.

A labelled structure (VB3 body k = L_k, IVD disc k = L(6-k)/L(7-k)) is *correct* when the
instance holding most of its voxels carries its level, *wrong* when it carries another level,
*unnamed* when the result is uncertain.  VB1 has no level names (ids are unordered): it counts
merges (one instance over two labelled bodies) and splits (a labelled body over two instances)
and whether the study was named.  Time: identify_levels per study vs the segmentation time.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_spineseg.io import read_volume, write_labels  # noqa: E402
from napari_spineseg.levels import DISC_OFFSET, identify_levels  # noqa: E402
from napari_spineseg.schema import INTERVERTEBRAL_DISC, VERTEBRAL_BODY  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lumbar-mri"
RESULTS = ROOT / "benchmarks" / "results"


def expected_value(dataset: str, label: int) -> int | None:
    """The level value of a ground-truth label: VB3 1..5 = L1..L5, IVD 1..5 = L5/S1..L1/L2."""
    if dataset == "VB3":
        return 19 + label
    if dataset == "IVD":
        return DISC_OFFSET + 25 - label
    return None


def predict(case: str, image_path: Path, cache: Path, predictor) -> tuple[np.ndarray, float]:
    """The model's class map of a case (cached) and the segmentation seconds (0 when cached)."""
    path = cache / f"{case}_pred.nii.gz"
    if path.exists():
        return read_volume(path).array, float("nan")
    volume = read_volume(image_path)
    start = time.perf_counter()
    result = predictor.predict(volume)
    seconds = time.perf_counter() - start
    write_labels(result.labels, path)
    return np.asarray(result.labels.array), seconds


def hybrid(dataset: str, gt: np.ndarray, model: np.ndarray) -> np.ndarray:
    """The model's class map with the ground-truth structures put in over their labelled span (axis 1 = S-I)."""
    cls = VERTEBRAL_BODY if dataset == "VB3" else INTERVERTEBRAL_DISC
    rows = np.flatnonzero(np.any(gt > 0, axis=(0, 2)))
    out = model.copy()
    span = out[:, rows[0] : rows[-1] + 1]
    span[span == cls] = 0
    out[gt > 0] = cls
    return out


def score(dataset: str, gt: np.ndarray, result) -> dict[str, int]:
    """Correct / wrong / unnamed labelled structures, merges and splits."""
    counts = dict.fromkeys(("labelled", "correct", "wrong", "unnamed", "merged", "split"), 0)
    ids = result.instance_map
    owners: dict[int, set[int]] = {}
    for label in np.unique(gt)[1:]:
        counts["labelled"] += 1
        inside = ids[gt == label]
        inside = inside[inside > 0]
        if inside.size == 0:
            counts["unnamed"] += 1
            continue
        hist = np.bincount(inside)
        if np.sum(hist >= 0.2 * (gt == label).sum()) > 1:
            counts["split"] += 1
        for number in np.flatnonzero(hist >= 0.2 * (gt == label).sum()):
            owners.setdefault(int(number), set()).add(int(label))
        value = result.instances[int(hist.argmax()) - 1].value
        expected = expected_value(dataset, int(label))
        if not value:
            counts["unnamed"] += 1
        elif expected is not None:
            counts["correct" if value == expected else "wrong"] += 1
    counts["merged"] = sum(len(v) > 1 for v in owners.values())
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--cache", default="/tmp/spineseg-levels-cache", help="model predictions are cached here")
    args = parser.parse_args()
    data, cache = Path(args.data), Path(args.cache)
    if not data.is_dir():
        print(f"no data at {data}", file=sys.stderr)
        return 1
    cache.mkdir(parents=True, exist_ok=True)
    from napari_spineseg.inference import Predictor, SegmentationSettings

    predictor = Predictor(SegmentationSettings(device="cpu"))
    held_out = set(predictor.load("spineseg-default").metadata.validation_cases)
    rows = []
    for dataset in ("VB3", "IVD", "VB1"):
        for seg_path in sorted((data / dataset).glob("*_seg.nii.gz")):
            case = f"{dataset}-{seg_path.name.split('_')[0]}"
            labels = read_volume(seg_path)
            gt = np.asarray(labels.array)
            model, seg_seconds = predict(
                case, seg_path.with_name(seg_path.name.replace("_seg", "_img")), cache, predictor
            )
            inputs = {"model": model}
            if dataset != "VB1":
                cls = VERTEBRAL_BODY if dataset == "VB3" else INTERVERTEBRAL_DISC
                inputs["gt"] = np.where(gt > 0, cls, 0).astype(np.uint8)
                inputs["gt+model"] = hybrid(dataset, gt, model)
            for name, class_map in inputs.items():
                start = time.perf_counter()
                result = identify_levels(class_map, labels.geometry)
                seconds = time.perf_counter() - start
                row = {
                    "case": case,
                    "dataset": dataset,
                    "held_out": case in held_out,
                    "input": name,
                    "status": result.status,
                    **score(dataset, gt, result),
                    "levels_s": round(seconds, 3),
                    "segment_s": round(seg_seconds, 2) if name == "model" and np.isfinite(seg_seconds) else "",
                    "named": " ".join(i.name for i in result.instances if i.kind == "body" and i.name),
                    "reason": result.reason,
                }
                rows.append(row)
                print(
                    f"{case:7} {name:9} {row['status']:9} correct {row['correct']}/{row['labelled']} "
                    f"wrong {row['wrong']} merged {row['merged']} split {row['split']} {seconds:.2f} s  {result.reason}"
                )
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "levels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    with open(RESULTS / "levels-summary.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    print()
    print(
        f"{'dataset':8} {'input':9} {'split':9} {'cases':>5} {'named':>5} {'labelled':>8} {'correct %':>9} {'wrong':>5}"
    )
    for s in summary:
        print(
            f"{s['dataset']:8} {s['input']:9} {s['split']:9} {s['cases']:5d} {s['named_cases']:5d} "
            f"{s['labelled']:8d} {s['correct_pct']:9.1f} {s['wrong']:5d}  "
            f"merged {s['merged']} split {s['split_bodies']}"
        )
    times = [r["levels_s"] for r in rows if r["input"] == "model"]
    print(f"identify_levels: median {np.median(times):.2f} s, max {np.max(times):.2f} s per study")
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for dataset in ("VB3", "IVD", "VB1"):
        for name in ("model", "gt", "gt+model"):
            for split in ("held-out", "trained", "all"):
                chosen = [
                    r
                    for r in rows
                    if r["dataset"] == dataset
                    and r["input"] == name
                    and (split == "all" or r["held_out"] == (split == "held-out"))
                ]
                if not chosen:
                    continue
                labelled = sum(r["labelled"] for r in chosen)
                correct = sum(r["correct"] for r in chosen)
                out.append(
                    {
                        "dataset": dataset,
                        "input": name,
                        "split": split,
                        "cases": len(chosen),
                        "named_cases": sum(r["status"] == "named" for r in chosen),
                        "labelled": labelled,
                        "correct": correct,
                        "correct_pct": round(100.0 * correct / labelled, 1) if labelled else 0.0,
                        "wrong": sum(r["wrong"] for r in chosen),
                        "merged": sum(r["merged"] for r in chosen),
                        "split_bodies": sum(r["split"] for r in chosen),
                    }
                )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
