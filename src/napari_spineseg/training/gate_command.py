"""``spineseg train-gate``: attach a lesion-presence gate to an existing model (SIMULATED lesions).

    spineseg train-gate --model my-lesion-model --data ../shared/data/lumbar-mri -o my-lesion-model-gated.safetensors

The model must have a lesion class; the gate sees the model's own input (context slices,
pre-processing, planes).  The new file holds the model unchanged plus the gate; the input model
file is never modified.  Also used by ``spineseg train`` for recipes that come with a gate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

GATE_DATASETS = ("VB3", "VB1")  # datasets with vertebral bodies, where lesions are simulated


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="segmentation model with a lesion class (name or path)")
    parser.add_argument("--data", required=True, metavar="DIR", help="lumbar-mri folder (with VB3/, VB1/)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.safetensors", help="new model file (with gate)")
    parser.add_argument("--datasets", default="VB3,VB1", help="datasets with vertebral bodies (default VB3,VB1)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-patients", metavar="IDS", help="comma-separated patient or case ids held out")
    split.add_argument("--val-fraction", type=float, default=None, help="patients per dataset held out (default 0.2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None, help="training crop size in pixels (default 96)")
    parser.add_argument("--width", type=float, default=None, help="classifier width (default 0.125)")
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="share of lesion slices the gate must keep on validation; sets the threshold (default 0.98)",
    )
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda|mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "off", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="model name stored in the new file (default: the model's)")
    parser.add_argument("--log", metavar="CSV", help="CSV log (one row per validation)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def gate_config_from_args(args: argparse.Namespace, metadata, output: Path | None):
    from .lesion_gate_trainer import GateConfig, gate_config_for_model

    overrides: dict[str, Any] = {
        "steps": getattr(args, "steps", None),
        "batch_size": getattr(args, "batch_size", None),
        "lr": getattr(args, "lr", None),
        "val_every": getattr(args, "val_every", None),
        "crop_size": getattr(args, "crop", None),
        "target_sensitivity": getattr(args, "target_sensitivity", None),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = GateConfig(
        **overrides,
        device=getattr(args, "device", "cpu"),
        mixed_precision=getattr(args, "precision", "auto"),
        num_threads=getattr(args, "threads", None),
        seed=getattr(args, "seed", 0),
        output=output,
        log_csv=Path(args.log).expanduser() if getattr(args, "log", None) else None,
        model_name=getattr(args, "name", None),
    )
    width = getattr(args, "width", None)
    if width is not None:
        config.architecture_kwargs = {**config.architecture_kwargs, "width": float(width)}
    return gate_config_for_model(config, metadata)


def run_gate_stage(
    config,
    base,
    train_cases: Sequence,
    val_cases: Sequence,
    quiet: bool = False,
    provenance: dict[str, Any] | None = None,
):
    """Run :func:`~.lesion_gate_trainer.train_gate` with a progress bar; returns its result (``None``: interrupted)."""
    from tqdm import tqdm

    from .lesion_gate_trainer import train_gate

    generator = train_gate(config, train_cases, val_cases, base=base, provenance=provenance)
    bar = None
    result = None
    try:
        for event in generator:
            if event.kind == "prepare":
                if not quiet:
                    print(f"  {event.message}", file=sys.stderr)
                continue
            if bar is None:
                bar = tqdm(total=event.total_steps, unit="step", desc="lesion gate", disable=quiet)
            if event.kind == "step":
                bar.update(1)
                bar.set_postfix_str(f"loss {event.loss:.4f}", refresh=False)
            elif event.kind == "validation":
                m = event.metrics or {}
                if m.get("auc") is not None:
                    bar.write(
                        f"step {event.step}: val AUC {m['auc']:.3f}, sensitivity {m['sensitivity']:.3f} at "
                        f"threshold {m['threshold']:.3f}, lesion-free slices skipped "
                        f"{m['skipped_lesion_free_fraction']:.3f} (SIMULATED lesions)"
                    )
            elif event.kind == "checkpoint":
                bar.write(event.message)
            elif event.kind == "done":
                result = event.result
    except KeyboardInterrupt:
        generator.close()
        print("spineseg: gate training interrupted; files written so far are intact", file=sys.stderr)
        return None
    finally:
        if bar is not None:
            bar.close()
    return result


def gate_cases(data: str | Path, datasets: Sequence[str], val_patients, val_fraction, seed: int):
    from .data import load_lumbar_dataset, patient_split

    unknown = sorted(set(datasets) - set(GATE_DATASETS))
    if unknown:
        raise InputError(f"the lesion gate needs vertebral-body labels: use {', '.join(GATE_DATASETS)}, not {unknown}")
    cases = load_lumbar_dataset(data, tuple(datasets))
    if val_patients:
        return patient_split(cases, val_patients=val_patients)
    fraction = 0.2 if val_fraction is None else float(val_fraction)
    return patient_split(cases, val_fraction=fraction, seed=seed)


def run_train_gate(args: argparse.Namespace) -> int:
    from ..modelfile import load_model

    output = Path(args.output).expanduser()
    if output.suffix != ".safetensors":
        raise InputError(f"{output}: the model file must end in .safetensors")
    from ..modelfile import check_not_hiding_bundled

    check_not_hiding_bundled(output)
    base = load_model(args.model)
    if base.path is not None and output.resolve() == Path(base.path).resolve():
        raise InputError(f"{output}: write the gated model to a new file (the input model is never overwritten)")
    config = gate_config_from_args(args, base.metadata, output)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    ids = [t.strip() for t in args.val_patients.split(",") if t.strip()] if args.val_patients else None
    train_cases, val_cases = gate_cases(args.data, datasets, ids, args.val_fraction, args.seed)
    print(
        f"lesion gate for {base.metadata.name}: {len(train_cases)} training cases, {len(val_cases)} validation "
        f"cases ({', '.join(sorted({c.patient for c in val_cases})) or 'no validation'}); SIMULATED lesions",
        file=sys.stderr,
    )
    provenance = {
        "data_root": str(Path(args.data).resolve()),
        "datasets": datasets,
        "command": " ".join(["spineseg", *sys.argv[1:]]) if sys.argv else "",
    }
    result = run_gate_stage(config, base, train_cases, val_cases, args.quiet, provenance)
    if result is None:
        return 130
    if result.model_path is None:
        print("spineseg: error: no model was saved", file=sys.stderr)
        return 1
    m = result.gate.record.metrics if result.gate is not None else {}
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    print(
        f"lesion gate (validation AUC {auc}, threshold {result.gate.record.threshold:.3f}, SIMULATED lesions) "
        f"-> {result.model_path}"
    )
    return 0
