"""Lesion-presence gate benchmark on SIMULATED lesions in real lumbar MRI, held-out patients.

Run: ``.venv/bin/python benchmarks/bench_gate.py [--steps N] [--quick]``; prints a table and writes
``benchmarks/results/gate.csv`` (``gate-quick.csv`` with ``--quick``: 200 steps, 6 training cases)
and the training log ``gate-training.csv``.

No labelled lesion MRI exists: hemangioma-like lesions are planted by
:mod:`napari_spineseg.lesion_sim` in the vertebral bodies of real VB3/VB1 studies.  Every number
here is about those SIMULATED lesions, not about real ones.

Patients, not cases, are split (VB1 02/03 are one patient, 06/07/08 another):

* test (never seen in training or model selection): VB3-01, VB3-02, VB1-P06 (06, 07, 08);
* validation (best step and the threshold, at 98 % sensitivity on its lesion slices):
  VB3-04, VB3-05, VB1-P02 (02, 03);
* training: the other 16 VB3 patients and VB1 15, 16, 17 (two simulated-lesion copies each).

The gate (``lesion-classifier``, ResNet-50 style, width 0.125, average + max pool) sees what the
bundled ``spineseg-default`` segmenter sees: 3 adjacent slices at 1 mm, all three planes.  On the
test patients every slice of every plane of the clean study counts as a lesion-free slice, the
slices through the lesions of three simulated-lesion copies (seeds never used in training) as
lesion slices (a slice is positive from 20 lesion pixels on).

Inference time: the bundled model has no lesion class, so a *stand-in* with one (the bundled
network with a lesion output row that is never chosen: zero weights, bias −30) segments a clean
test study with and without the gate.  The gate does not make the segmentation cheaper (one
multi-class network gives all classes of a slice at once, so nothing is skipped in compute); the
table shows what the gate costs.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_spineseg.gate import SIMULATED_NOTE, attach_gate
from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.modelfile import LoadedModel, load_model
from napari_spineseg.models.common import extend_output_classes
from napari_spineseg.preprocess import PreprocessConfig
from napari_spineseg.schema import default_classes
from napari_spineseg.training.data import load_lumbar_dataset, patient_split
from napari_spineseg.training.lesion_gate_trainer import (
    GateConfig,
    _lesion_studies,
    _prepare,
    evaluate_gate,
    gate_metrics,
    train_gate,
)

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lumbar-mri"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-spineseg-bench"
TEST = ["VB3-01", "VB3-02", "VB1-P06"]
VAL = ["VB3-04", "VB3-05", "VB1-P02"]
COLUMNS = [
    "split",
    "plane",
    "auc",
    "threshold",
    "sensitivity",
    "specificity",
    "skipped_lesion_free_fraction",
    "skipped_lesion_free_body_fraction",
    "lesion_pixels_on_skipped_slices",
    "positive_slices",
    "negative_slices",
    "seconds_without_gate",
    "seconds_with_gate",
    "gate_overhead_fraction",
    "slices_skipped_in_segmentation",
    "labels_identical",
    "training_steps",
    "training_seconds",
    "lesions",
]


def stand_in_model(gate) -> LoadedModel:
    """The bundled model plus a lesion class that is never chosen, with ``gate``: for timing only."""
    base = load_model("spineseg-default")
    network = base.network
    extend_output_classes(network, 5)
    with torch.no_grad():
        conv = network.get_submodule(network.output_layer_name)
        conv.weight[4].zero_()
        conv.bias[4] = -30.0
    metadata = base.metadata
    metadata.classes = default_classes()
    metadata.architecture_kwargs = {**metadata.architecture_kwargs, "num_classes": 5}
    return LoadedModel(network.eval(), metadata, None, gate)


def timing(model: LoadedModel, volume, repeats: int) -> tuple[float, float, float, bool]:
    """(seconds without gate, with gate, fraction of slices skipped, labels identical)."""
    out = {}
    skipped = 0.0
    for use_gate in (False, True):
        predictor = Predictor(SegmentationSettings(lesion_gate=use_gate, device="cpu"))
        predictor.load(model)
        predictor.predict(volume)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = predictor.predict(volume)
            times.append(time.perf_counter() - t0)
        out[use_gate] = (min(times), result.labels.array)
        if use_gate and predictor.lesion_gate is not None:
            skipped = predictor.lesion_gate.skipped / max(predictor.lesion_gate.slices, 1)
    same = bool(np.array_equal(out[False][1], out[True][1]))
    return out[False][0], out[True][0], skipped, same


def row(split: str, plane: str, m: dict, **extra) -> dict:
    keys = [c for c in COLUMNS if c in m]
    return {"split": split, "plane": plane, **{k: m[k] for k in keys}, "lesions": "SIMULATED", **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="200 steps, fewer training cases")
    parser.add_argument("--output", default=None, help="CSV (default results/gate.csv, gate-quick.csv with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 200 if args.quick else args.steps

    cases = load_lumbar_dataset(args.data, ("VB3", "VB1"))
    rest, test = patient_split(cases, val_patients=TEST)
    train, val = patient_split(rest, val_patients=VAL)
    if args.quick:
        train = train[:6]
    default = load_model("spineseg-default").metadata
    config = GateConfig(
        architecture_kwargs={"width": args.width, "dropout": 0.0, "pool": "avgmax"},
        context_slices=default.context_slices,
        preprocess=PreprocessConfig.from_dict(default.preprocess),
        planes=list(default.planes),
        steps=steps,
        val_every=max(50, steps // 6),
        seed=args.seed,
        num_threads=args.threads,
        log_csv=RESULTS / "gate-training.csv" if not args.quick else None,
    )
    if config.log_csv is not None and config.log_csv.exists():
        config.log_csv.unlink()
    print(
        f"training {len(train)} cases ({len({c.patient for c in train})} patients), validation {len(val)}, "
        f"test {len(test)}; {steps} steps; SIMULATED lesions",
        file=sys.stderr,
    )
    result = None
    for event in train_gate(config, train, val):
        if event.kind == "step" and event.step % 50 == 0:
            print(
                f"  step {event.step}/{event.total_steps} loss {event.loss:.3f} {event.seconds:.0f} s",
                file=sys.stderr,
            )
        elif event.kind == "validation":
            m = event.metrics or {}
            print(
                f"  validation step {event.step}: AUC {m.get('auc')}, specificity {m.get('specificity')} "
                f"at threshold {m.get('threshold')}",
                file=sys.stderr,
            )
        elif event.kind == "done":
            result = event.result
    assert result is not None and result.gate is not None
    gate = result.gate
    training_seconds = gate.record.training.get("seconds")

    # Held-out test patients: clean studies and three simulated-lesion copies each (new seeds).
    test_config = GateConfig(**{**config.__dict__, "seed": args.seed + 1000, "log_csv": None})
    clean = [_prepare(c, test_config, clean=True) for c in test]
    lesioned = [s for _, s in _lesion_studies(test, test_config, 3, "test", None) if s is not None]
    scores = evaluate_gate(gate.network, clean, lesioned, test_config)
    threshold = gate.record.threshold
    rows = [row("validation", "all", gate.record.metrics, training_steps=steps, training_seconds=training_seconds)]
    test_metrics = gate_metrics(scores, config.target_sensitivity, threshold=threshold)

    # Inference time on a clean test study, with a lesion-capable stand-in model.
    model = stand_in_model(gate)
    without, with_gate, skipped, same = timing(model, test[0].image, args.repeats)
    rows.append(
        row(
            "test",
            "all",
            test_metrics,
            seconds_without_gate=round(without, 2),
            seconds_with_gate=round(with_gate, 2),
            gate_overhead_fraction=round(with_gate / without - 1.0, 3),
            slices_skipped_in_segmentation=round(skipped, 3),
            labels_identical=same,
            training_steps=steps,
            training_seconds=training_seconds,
        )
    )
    for plane in config.planes:
        per_plane = evaluate_gate(
            gate.network,
            [_restrict(s, plane) for s in clean],
            [_restrict(s, plane) for s in lesioned],
            test_config,
        )
        rows.append(row("test", plane, gate_metrics(per_plane, config.target_sensitivity, threshold=threshold)))

    out = Path(args.output) if args.output else RESULTS / ("gate-quick.csv" if args.quick else "gate.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    CACHE.mkdir(parents=True, exist_ok=True)
    saved = attach_gate(model, gate, CACHE / f"gate-stand-in-{steps}.safetensors", name="gate-stand-in")

    print(f"\nLesion-presence gate, SIMULATED lesions ({SIMULATED_NOTE[:60]}...)")
    titles = ("AUC", "thr", "sens", "spec")
    print(f"{'split':10s} {'plane':9s} " + " ".join(f"{t:>6s}" for t in titles) + f" {'skip-body':>9s} {'lost px':>8s}")
    for r in rows:

        def f(key: str, r: dict = r) -> str:
            v = r.get(key)
            return "   n/a" if v is None else f"{v:6.3f}"

        print(
            f"{r['split']:10s} {r['plane']:9s} {f('auc')} {f('threshold')} {f('sensitivity')} {f('specificity')} "
            f"{f('skipped_lesion_free_body_fraction'):>9s} {f('lesion_pixels_on_skipped_slices'):>8s}"
        )
    print(
        f"segmentation of {test[0].case_id} (clean, stand-in with a lesion class): {without:.2f} s without gate, "
        f"{with_gate:.2f} s with gate ({100 * (with_gate / without - 1):+.0f} %); {100 * skipped:.0f} % of slices "
        f"skipped the lesion decision; labels identical: {same}"
    )
    print(f"-> {out}; stand-in model with gate -> {saved}")
    return 0


def _restrict(study, plane: str):
    from dataclasses import replace

    return replace(study, stacks={plane: study.stacks[plane]})


if __name__ == "__main__":
    sys.exit(main())
