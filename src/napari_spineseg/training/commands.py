"""``spineseg train``: arguments and the handler (imported lazily by :mod:`napari_spineseg.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..errors import InputError
from ..runtime import resolve_workers


def _load_cases(data: str, datasets: tuple[str, ...]) -> list:
    """The lumbar cases of a ``lumbar-mri`` folder, or of a packed ``.npz`` (:mod:`.packed`)."""
    from .data import load_lumbar_dataset
    from .packed import load_packed_cases

    if str(data).endswith(".npz"):
        return load_packed_cases(Path(data).expanduser(), datasets)
    return load_lumbar_dataset(data, datasets)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .recipes import recipe_names

    parser.add_argument("--recipe", default="default", help=f"one of: {', '.join(recipe_names())}")
    parser.add_argument(
        "--data", metavar="DIR", help="lumbar-mri folder (with VB3/, VB1/, IVD/) or a packed .npz of cases"
    )
    parser.add_argument("--datasets", default=None, help="comma-separated datasets (default: the recipe's)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-patients", metavar="IDS", help="comma-separated patient or case ids, e.g. VB3-01,VB1-P06")
    split.add_argument("--val-fraction", type=float, default=None, help="patients per dataset held out (default 0.2)")
    split.add_argument("--fold", type=int, default=None, help="validation fold index (0-based), with --folds")
    parser.add_argument("--folds", type=int, default=None, help="number of folds for --fold")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, help="train for epochs instead of steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    parser.add_argument("--val-every", type=int, default=None, help="steps between validations/checkpoints")
    parser.add_argument("--crop", type=int, default=None, help="training crop size in pixels")
    parser.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="validate and save a moving average of the weights (e.g. 0.999; 0: off; default: the recipe's)",
    )
    parser.add_argument("--planes", default=None, help="comma-separated planes (default: the recipe's)")
    parser.add_argument("--phantoms", type=int, default=None, help="synthetic phantoms added to training")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument(
        "--workers",
        default="auto",
        help="data loader worker processes, or auto (default): 0 on up to 4 cores, else min(12, cores - 2)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; use 1 on a busy machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="model name stored in the file (default: the recipe's)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.safetensors", help="best model file")
    parser.add_argument("--log", "--log-csv", dest="log", metavar="CSV", help="CSV log (one row per validation)")
    parser.add_argument("--resume", metavar="CKPT", help="resume from a .resume.safetensors checkpoint")
    parser.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this model (name or .safetensors): its architecture, classes, preprocessing and weights",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-gate", action="store_true", help="skip the lesion-presence gate stage of recipes that have one"
    )
    parser.add_argument("--gate-steps", type=int, default=None, help="training steps of the lesion-presence gate")


def prepare_run(args: argparse.Namespace):
    """Recipe, config, train and validation cases, provenance from parsed arguments."""
    from ..orientation import Plane
    from .data import kfold_by_patient, patient_split, phantom_cases
    from .recipes import get_recipe

    recipe = get_recipe(args.recipe)
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "val_every": args.val_every,
        "crop_size": args.crop,
        "ema_decay": getattr(args, "ema", None),
        "model_name": args.name,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.epochs is not None:
        overrides.update(epochs=args.epochs, steps=None)
    if args.planes:
        overrides["planes"] = [p.value for p in Plane.parse(args.planes)]
    output = Path(args.output).expanduser()
    if output.suffix != ".safetensors":
        raise InputError(f"{output}: the model file must end in .safetensors")
    from ..modelfile import check_not_hiding_bundled

    check_not_hiding_bundled(output)  # before training, not after it
    recipe = get_recipe(
        args.recipe,
        **overrides,
        device=args.device,
        mixed_precision=args.precision,
        num_workers=resolve_workers(args.workers),  # the stored config records the count used
        num_threads=args.threads,
        seed=args.seed,
        output=output,
        log_csv=Path(args.log).expanduser() if args.log else None,
        resume=Path(args.resume).expanduser() if args.resume else None,
    )
    if getattr(args, "init", None):
        from .loop import config_from_model

        recipe = dataclasses.replace(recipe, config=config_from_model(recipe.config, args.init))
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip()) if args.datasets else recipe.datasets
    n_phantoms = recipe.phantoms if args.phantoms is None else int(args.phantoms)
    if args.data is None and n_phantoms <= 0:
        raise InputError("give --data DIR|CASES.npz (the lumbar-mri folder) and/or --phantoms N")
    cases = _load_cases(args.data, datasets) if args.data else []
    split: dict = {}
    if args.fold is not None or args.folds is not None:
        if args.fold is None or args.folds is None:
            raise InputError("--fold and --folds go together")
        if not 0 <= args.fold < args.folds:
            raise InputError(f"--fold must be in 0..{args.folds - 1}")
        train_cases, val_cases = kfold_by_patient(cases, args.folds, seed=args.seed)[args.fold]
        split = {"kind": "kfold", "fold": args.fold, "folds": args.folds, "seed": args.seed}
    elif args.val_patients:
        ids = [t.strip() for t in args.val_patients.split(",") if t.strip()]
        train_cases, val_cases = patient_split(cases, val_patients=ids)
        split = {"kind": "patients", "val_patients": ids}
    else:
        fraction = 0.2 if args.val_fraction is None else args.val_fraction
        train_cases, val_cases = patient_split(cases, val_fraction=fraction, seed=args.seed)
        split = {"kind": "fraction", "val_fraction": fraction, "seed": args.seed}
    if n_phantoms > 0:
        max_class = max(c.value for c in recipe.config.classes)
        train_cases = train_cases + phantom_cases(n_phantoms, seed=1000 + args.seed, max_class=max_class)
    if not train_cases:
        raise InputError("no training cases left after the split")
    provenance = {
        "recipe_info": recipe.to_dict(),
        "data_root": str(Path(args.data).resolve()) if args.data else None,
        "datasets": list(datasets),
        "phantoms": n_phantoms,
        "split": split,
        "command": " ".join(["spineseg", *sys.argv[1:]]) if sys.argv else "",
    }
    return recipe, train_cases, val_cases, provenance


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .loop import train

    recipe, train_cases, val_cases, provenance = prepare_run(args)
    config = recipe.config
    print(
        f"recipe {recipe.name}: {len(train_cases)} training cases, {len(val_cases)} validation cases "
        f"({', '.join(sorted({c.patient for c in val_cases})) or 'no validation'})",
        file=sys.stderr,
    )
    generator = train(config, train_cases, val_cases, provenance=provenance)
    bar = None
    last_val = ""
    result = None
    try:
        for event in generator:
            if bar is None:
                bar = tqdm(total=event.total_steps, initial=event.step - 1, unit="step", disable=args.quiet)
            if event.kind == "step":
                bar.update(1)
                bar.set_postfix_str(f"loss {event.loss:.4f} lr {event.lr:.2g}{last_val}", refresh=False)
            elif event.kind == "validation":
                dice = ", ".join(f"{k} {v:.3f}" for k, v in (event.val_dice or {}).items())
                last_val = f" | val {event.val_mean:.3f}" if event.val_mean is not None else ""
                bar.write(f"step {event.step}: train loss {event.loss:.4f}; val Dice {dice or '-'} ({event.message})")
            elif event.kind == "checkpoint":
                bar.write(event.message)
            elif event.kind == "done":
                result = event.result
    except KeyboardInterrupt:
        generator.close()
        if bar is not None:
            bar.close()
        hint = f"; resume with --resume {config.output.with_name(config.output.stem + '.resume.safetensors')}"
        print(f"spineseg: training interrupted; the last saved files are intact{hint}", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if result is None:  # pragma: no cover - train always reports done
        return 1
    if result.best_model_path is None:
        print("spineseg: error: no model was saved", file=sys.stderr)
        return 1
    score = "n/a" if result.best_score is None else f"{result.best_score:.4f}"
    print(f"best model (mean val Dice {score} at step {result.best_step}) -> {result.best_model_path}")
    if recipe.gate is not None and not getattr(args, "no_gate", False):
        return run_recipe_gate(args, recipe, result.best_model_path, train_cases, val_cases)
    return 0


def run_recipe_gate(args: argparse.Namespace, recipe, model_path: Path, train_cases, val_cases) -> int:
    """Second stage of recipes with a lesion-presence gate: train it on SIMULATED lesions in the
    same patients' VB3/VB1 studies (same split) and store it in the model file just written."""
    from ..modelfile import load_model
    from .gate_command import run_gate_stage
    from .lesion_gate_trainer import gate_config_for_model

    if args.data is None:
        print("spineseg: lesion gate skipped: it needs --data (real studies to plant simulated lesions in)")
        return 0
    base = load_model(model_path)
    overrides = {"steps": args.gate_steps} if args.gate_steps is not None else {}
    config = dataclasses.replace(
        recipe.gate,
        **overrides,
        device=args.device,
        mixed_precision=args.precision if args.precision in ("auto", "off", "bf16") else "auto",
        num_threads=args.threads,
        seed=args.seed,
        output=Path(model_path),
        log_csv=Path(args.log).with_name(Path(args.log).stem + "-gate.csv") if args.log else None,
    )
    config = gate_config_for_model(config, base.metadata)
    gate_train = [c for c in train_cases if c.dataset in ("VB3", "VB1")]
    gate_val = [c for c in val_cases if c.dataset in ("VB3", "VB1")]
    print(
        f"lesion gate: {len(gate_train)} training and {len(gate_val)} validation studies (VB3/VB1, same split), "
        "SIMULATED lesions",
        file=sys.stderr,
    )
    provenance = {"recipe": recipe.name, "stage": "after the segmenter (spineseg train)"}
    gated = run_gate_stage(config, base, gate_train, gate_val, args.quiet, provenance)
    if gated is None:
        return 130
    if gated.model_path is None:
        print("spineseg: error: the lesion gate was not saved", file=sys.stderr)
        return 1
    threshold = gated.gate.record.threshold if gated.gate is not None else float("nan")
    print(f"lesion gate (threshold {threshold:.3f}, SIMULATED lesions) stored in {gated.model_path}")
    return 0
