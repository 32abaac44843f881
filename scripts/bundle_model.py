"""Turn a trained model file into the bundled default: version, stage record and held-out figures.

    .venv/bin/python scripts/evaluate_model.py --model stage3.safetensors   # writes the summary JSON
    .venv/bin/python scripts/bundle_model.py stage3.safetensors --version 3 \\
        --stage-command "spineseg train --recipe default --init spineseg-default ..." --stage-lr 3e-4

Reads the trained file, appends its training command to ``training.stages`` of the current bundled
model (the stages before it), stores the held-out fused figures of
``benchmarks/results/<name>_summary.json`` as ``metrics.held_out_fused`` (what ``spineseg models``
and the report show), keeps the bundled model's post-processing and change log, and writes
``src/napari_spineseg/bundled_models/spineseg-default.safetensors`` atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from napari_spineseg.modelfile import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "napari_spineseg" / "bundled_models" / "spineseg-default.safetensors"
RESULTS = ROOT / "benchmarks" / "results"


def held_out_figures(summary_path: Path) -> tuple[dict, list[str]]:
    """``{"<dataset> <class>": {dice, iou, asd_mm, nsd_2mm, hd95_mm}}`` of the fused rows, and the cases."""
    summary = json.loads(summary_path.read_text())
    figures = {
        f"{row['dataset']} {row['class']}": {k: row[k] for k in ("dice", "iou", "asd_mm", "nsd_2mm", "hd95_mm")}
        for row in summary["summary"]
        if row["planes"] == "fused"
    }
    return figures, list(summary["validation_cases"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trained", type=Path, help="the model file written by spineseg train")
    parser.add_argument("--version", required=True)
    parser.add_argument("--stage-command", required=True, help="the spineseg train command of this stage")
    parser.add_argument("--stage-lr", type=float, required=True)
    parser.add_argument("--summary", type=Path, default=RESULTS / "spineseg-default_summary.json")
    parser.add_argument("--output", type=Path, default=BUNDLED)
    parser.add_argument("--name", default=None, help="model name (default: the bundled default's)")
    parser.add_argument(
        "--test-time-mirror", action="store_true", help="the model asks for the test-time left-right mirror"
    )
    parser.add_argument("--description", default=None)
    parser.add_argument(
        "--estimate",
        type=Path,
        default=None,
        metavar="SUMMARY",
        help="summary JSON of the last version that never saw the patients this one was also trained on: "
        "stored as metrics.held_out_estimate (a final model trained on more patients)",
    )
    parser.add_argument("--estimate-from", default=None, help="which version the estimate is of, e.g. 'version 5'")
    args = parser.parse_args()

    trained = load_model(args.trained)
    previous = load_model(BUNDLED).metadata
    training = dict(trained.metadata.training)
    stages = list(previous.training.get("stages") or [])
    stages.append(
        {
            "stage": len(stages) + 1,
            "steps": int(training.get("steps") or 0),
            "lr": args.stage_lr,
            "command": args.stage_command,
        }
    )
    training["stages"] = stages
    training["changes"] = list(previous.training.get("changes") or [])
    figures, cases = held_out_figures(args.summary)
    metrics = dict(trained.metadata.metrics)
    metrics.update(
        held_out_fused=figures,
        held_out_cases=cases,
        evaluation=previous.metrics.get("evaluation", "scripts/evaluate_model.py"),
    )
    if args.estimate is not None:
        estimate, estimate_cases = held_out_figures(args.estimate)
        metrics.update(
            held_out_estimate=estimate,
            held_out_estimate_cases=estimate_cases,
            held_out_estimate_from=args.estimate_from or "an earlier version",
        )
    extra = dict(trained.metadata.extra)
    if args.test_time_mirror:
        extra["inference"] = {**(extra.get("inference") or {}), "test_time_mirror": True}
    same_values = [c.value for c in previous.classes] == [c.value for c in trained.metadata.classes]
    metadata = dataclasses.replace(
        trained.metadata,
        name=args.name or previous.name,
        description=args.description or previous.description or trained.metadata.description,
        # the bundled class names and colours (e.g. the canal's "experimental" caveat) carry over
        classes=list(previous.classes) if same_values else trained.metadata.classes,
        extra=extra,
        version=str(args.version),
        postprocess=previous.postprocess,
        training=training,
        metrics=metrics,
    )
    path = save_model(trained.network, metadata, args.output, gate=trained.gate)
    print(f"wrote {path} (version {args.version}):")
    for key, values in figures.items():
        print(f"  {key}: Dice {values['dice']:.3f}")


if __name__ == "__main__":
    main()
