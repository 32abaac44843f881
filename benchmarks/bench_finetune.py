"""Fine-tuning benchmarks: speed, Dice gain from three corrected slices, forgetting, and a
SIMULATED-lesion experiment.

Run: ``.venv/bin/python benchmarks/bench_finetune.py [--base MODEL] [--quick]``; prints a table and
writes ``benchmarks/results/finetune.csv``.

Base model: ``--base`` if given, else the bundled ``spineseg-default`` when it exists, else a
*bootstrap* base trained here with the default recipe (4 classes, VB3 + IVD training cases only,
``--bootstrap-steps``) and cached under ``~/.cache/napari-spineseg-bench``.

1. **Speed**: steps/s of the fine-tuning loop for the default-size network (U-Net base 16,
   depth 4, 2.5-D with one context slice each side, 256² crops, batch 8), measured on the
   fine-tune of experiment 2 (data loading included, evaluations excluded).  Target: 200 steps
   in ≤ 2.5 min on 2 CPU cores.
2. **Unseen study**: a real case of a kind the base has not been trained on (a VB1 case —
   other hospitals, sequences and pathology — the first VB1 case not in the base's training
   set).  The annotator corrects the vertebral bodies on three sagittal slices (at the quartiles
   of the bodies' left-right extent; the ground truth stands in for the annotator, who vouches for
   the bodies only); the model is fine-tuned on that pair (only the changed slices are trusted) and
   the vertebral-body Dice is
   measured on all *other* labelled slices.  Target: ≥ +5 points.  Forgetting: per-class Dice on
   the fixed validation set before/after.  Target: ≤ 1 point loss.
3. **Unseen kind**: the cervical T2 study (``spinal-cord-t2``: other anatomy, site, sequence and
   storage orientation; the base finds nothing there).  The spinal cord is painted as a new class
   on three axial slices; cord Dice on every other axial slice of the cord (``--only-cervical``
   writes ``finetune-cervical.csv``).
4. **Simulated lesions** (no labelled lesion MRI exists): two hemangioma-like lesions are planted
   in vertebral bodies of a real case (:mod:`napari_spineseg.lesion_sim`); label 4 is painted on
   three sagittal slices through the first one only; after fine-tuning, lesion Dice is measured on
   every other slice (and on the second, never painted lesion alone).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_spineseg.augment import IGNORE
from napari_spineseg.errors import ModelFileError
from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.lesion_sim import simulate_hemangioma
from napari_spineseg.metrics import dice_score
from napari_spineseg.modelfile import LoadedModel, load_model, resolve_model
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.resampled import copy_within_runs, resampled_runs
from napari_spineseg.schema import LESION, VERTEBRAL_BODY, default_classes
from napari_spineseg.training.data import load_lumbar_dataset
from napari_spineseg.training.finetune import CorrectionPair, FinetuneConfig, finetune, fixed_validation_ids

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lumbar-mri"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-spineseg-bench"
FIXED = ["VB3-01", "IVD-11"]  # held out of the default recipe's training and of the bootstrap base
REFERENCES = ["VB3-06", "IVD-20"]  # replayed against forgetting (training cases of both)
LESION_CASES = ["VB3-02", "VB3-04", "VB3-05"]
CORD = 5  # the cervical experiment's new label value ("spinal cord"; not in the schema)
BOOTSTRAP_HELD_OUT = {"VB3-01", "VB3-02", "VB3-04", "VB3-05", "IVD-11"}
CONFIG_KEYS = (  # the forgetting-related settings recorded with every row
    "val_every",
    "select_by_validation",
    "max_forgetting",
    "encoder_lr_scale",
    "decoder_lr_scale",
    "frozen_input_stages",
    "l2sp_weight",
    "distill_unreviewed_weight",
    "freeze_batchnorm",
)


# ------------------------------------------------------------------------------------------------
def resolve_base(args) -> tuple[Path, str]:
    if args.base:
        return resolve_model(args.base), "given"
    try:
        return resolve_model("spineseg-default"), "bundled spineseg-default"
    except ModelFileError:
        pass
    path = CACHE / f"bootstrap-base-{args.bootstrap_steps}.safetensors"
    if path.is_file():
        return path, f"bootstrap base ({args.bootstrap_steps} steps, cached)"
    from napari_spineseg.training import run_training
    from napari_spineseg.training.recipes import get_recipe

    print(f"no spineseg-default model: training a bootstrap base for {args.bootstrap_steps} steps", file=sys.stderr)
    cases = [c for c in load_lumbar_dataset(args.data, ("VB3", "IVD")) if c.case_id not in BOOTSTRAP_HELD_OUT]
    recipe = get_recipe(
        "default",
        steps=args.bootstrap_steps,
        val_every=args.bootstrap_steps,
        warmup_steps=min(100, args.bootstrap_steps // 5),
        classes=default_classes()[:4],  # no lesion class: lesions are new in experiment 3
        output=path,
        model_name="bootstrap-base",
        description="Bootstrap base for bench_finetune (default recipe, short, VB3 + IVD only).",
    )
    run_training(recipe.config, cases)
    return path, f"bootstrap base ({args.bootstrap_steps} steps)"


def predict(model, image, postprocess: bool = True) -> np.ndarray:
    predictor = Predictor(SegmentationSettings(postprocess=postprocess))
    predictor.load(model)
    return predictor.predict(image).labels.array


def take(axis: int, index: int) -> tuple:
    sl: list = [slice(None)] * 3
    sl[axis] = index
    return tuple(sl)


def run(events, label: str) -> tuple:
    """Drain a fine-tuning generator; returns (result, step times)."""
    stamps: list[float] = []
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value, stamps
        if event.kind == "step":
            stamps.append(time.perf_counter())
            if event.step % 25 == 0 or event.step == 1:
                print(f"  [{label}] step {event.step}/{event.total_steps} loss {event.loss:.3f}", file=sys.stderr)
        elif event.kind == "status":
            print(f"  [{label}] {event.message}", file=sys.stderr)


def forgetting_rows(name: str, result) -> list[dict]:
    rows = []
    before, after = result.before.get("fixed_validation", {}), result.after.get("fixed_validation", {})
    for cls in before:
        if cls in after:
            rows.append(
                row(name, f"fixed-set Dice: {cls}", before[cls], after[cls], "loss <= 1 point", fixed_note(result))
            )
    return rows


def fixed_note(result) -> str:
    kept = result.metadata.training.get("selected_step", result.steps)
    ids = ", ".join(fixed_validation_ids(result.metadata))
    return f"fixed validation: {ids}; weights of step {kept} of {result.steps}"


def row(experiment, metric, before, after, target="", notes="") -> dict:
    change = None if before is None or after is None else 100.0 * (after - before)
    return {
        "experiment": experiment,
        "metric": metric,
        "before": before,
        "after": after,
        "change_points": change,
        "target": target,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------
def unseen_study(args, base, base_path, fixed, references, config) -> tuple[list[dict], list[float]]:
    trained = set(base.metadata.training.get("train_cases") or [])
    vb1 = [c for c in load_lumbar_dataset(args.data, ("VB1",)) if c.case_id not in trained]
    if not vb1:
        raise SystemExit("every VB1 case was used to train the base: no unseen study to correct")
    preferred = [c for c in vb1 if c.case_id == "VB1-07"]  # TIRM (fat-suppressed), a validation patient
    study = (preferred or vb1)[0]
    image, truth = study.image, study.labels.array
    print(f"unseen study: {study.case_id}", file=sys.stderr)
    prediction = predict(base, image)
    axis = plane_array_axis(image.geometry, Plane.SAGITTAL)
    others = tuple(a for a in range(3) if a != axis)
    with_body = np.flatnonzero((truth == VERTEBRAL_BODY).any(axis=others))
    chosen = [int(with_body[len(with_body) * q // 4]) for q in (1, 2, 3)]
    corrected = prediction.copy()
    for index in chosen:
        sl = take(axis, index)
        region, gt, fixed_slice = truth[sl] != IGNORE, truth[sl], corrected[sl]
        fixed_slice[region & (gt == VERTEBRAL_BODY)] = VERTEBRAL_BODY
        fixed_slice[region & (gt != VERTEBRAL_BODY) & (fixed_slice == VERTEBRAL_BODY)] = 0
    twins = _twin_slices(image.array, axis, chosen)
    if args.twins:  # the Interpolate widget's copies of each painted slice to its resampled twins
        copies, _ = copy_within_runs(
            corrected, axis, chosen, resampled_runs(image.array, axis), values=[VERTEBRAL_BODY]
        )
        copies.apply(corrected)
    # The stand-in annotator only knows the vertebral bodies (no disc/canal truth in VB1): it vouches for them alone.
    pair = CorrectionPair(
        image,
        image.with_array(corrected),
        image.with_array(prediction),
        known_classes={VERTEBRAL_BODY},
        name=study.case_id,
    )
    result, stamps = run(
        finetune(base_path, [pair], config, reference_cases=references, fixed_validation=fixed), "unseen"
    )
    after_prediction = predict(LoadedModel(result.network, result.metadata), image)
    keep = truth != IGNORE
    for index in chosen + twins:  # the twins too: with --twins they hold copies, not the model's result
        keep[take(axis, index)] = False
    before = dice_score((prediction == VERTEBRAL_BODY) & keep, (truth == VERTEBRAL_BODY) & keep)
    after = dice_score((after_prediction == VERTEBRAL_BODY) & keep, (truth == VERTEBRAL_BODY) & keep)
    name = f"unseen study {study.case_id}"
    note = (
        f"corrected sagittal slices {chosen}{' copied to their resampled twins' if args.twins else ''}; Dice on "
        f"the other {int(keep.any(axis=others).sum())} labelled slices (twins {twins} excluded)"
    )
    rows = [row(name, "vertebral body Dice, other slices", before, after, ">= +5 points", note)]
    return rows + forgetting_rows(name, result), stamps


def _twin_slices(image: np.ndarray, axis: int, chosen: list[int]) -> list[int]:
    """The slices resampled from the same acquired slices as the ``chosen`` ones (none on a native study)."""
    runs = [run for run in resampled_runs(image, axis) if any(c in run for c in chosen)]
    return sorted({int(i) for run in runs for i in run} - set(chosen))


def unseen_kind(args, base, base_path, fixed, references, config) -> list[dict]:
    """A study of a kind the base never saw: the cervical T2 study (other anatomy, site, sequence,
    PSR storage), on which the base finds nothing.  The annotator paints the spinal cord as a new
    class on three axial slices (at the quartiles of the cord's superior-inferior extent); cord
    Dice is measured on every other axial slice of the cord."""
    from napari_spineseg.io import read_volume

    folder = Path(args.data).parent / "spinal-cord-t2"
    image = read_volume(folder / "t2.nii.gz")
    cord = read_volume(folder / "t2_seg-manual.nii.gz").array > 0
    prediction = predict(base, image)
    axis = plane_array_axis(image.geometry, Plane.AXIAL)
    others = tuple(a for a in range(3) if a != axis)
    with_cord = np.flatnonzero(cord.any(axis=others))
    chosen = [int(with_cord[len(with_cord) * q // 4]) for q in (1, 2, 3)]
    corrected = prediction.copy()
    for index in chosen:
        sl = take(axis, index)
        corrected[sl][cord[sl]] = CORD
    pair = CorrectionPair(
        image, image.with_array(corrected), image.with_array(prediction), known_classes={CORD}, name="cervical-t2"
    )
    cord_config = dataclasses.replace(config, class_names={CORD: "spinal cord"})
    result, _ = run(
        finetune(base_path, [pair], cord_config, reference_cases=references, fixed_validation=fixed), "cervical"
    )
    after_prediction = predict(LoadedModel(result.network, result.metadata), image)
    keep = np.zeros(cord.shape, dtype=bool)
    keep[take(axis, slice(int(with_cord[0]), int(with_cord[-1]) + 1))] = True
    for index in chosen:
        keep[take(axis, index)] = False
    before = dice_score((prediction == CORD) & keep, cord & keep)
    after = dice_score((after_prediction == CORD) & keep, cord & keep)
    name = "unseen kind: cervical T2"
    note = (
        f"spinal cord painted as new class {CORD} on axial slices {chosen}; Dice on the other "
        f"{len(with_cord) - len(chosen)} axial slices of the cord"
    )
    rows = [row(name, "spinal cord Dice, other slices", before, after, ">= +5 points", note)]
    return rows + forgetting_rows(name, result)


def simulated_lesions(args, base, base_path, fixed, references, config) -> list[dict]:
    trained = set(base.metadata.training.get("train_cases") or [])
    candidates = [c for c in LESION_CASES if c not in trained and c not in FIXED] or LESION_CASES
    (case,) = load_lumbar_dataset(args.data, ("VB3",), cases=[candidates[0]])
    rng = np.random.default_rng(args.seed)
    image, labels, first = simulate_hemangioma(case.image, case.labels, rng, diameter_mm=(10.0, 16.0))
    spacing = np.asarray(image.geometry.spacing_zyx)
    for _ in range(10):
        image2, labels2, second = simulate_hemangioma(image, labels, rng, diameter_mm=(10.0, 16.0))
        if np.linalg.norm((np.subtract(second.centre_index, first.centre_index)) * spacing) > 20.0:
            break
    image, labels = image2, labels2
    truth = labels.array
    print(f"simulated lesions in {case.case_id}: {first} / {second}", file=sys.stderr)
    prediction = predict(base, image)
    axis = plane_array_axis(image.geometry, Plane.SAGITTAL)
    centre = first.centre_index[axis]
    painted = [centre - 1, centre, centre + 1]
    corrected = prediction.copy()
    for index in painted:
        sl = take(axis, index)
        gt, fixed_slice = truth[sl], corrected[sl]
        wrong = (fixed_slice == LESION) & (gt != LESION)
        fixed_slice[wrong] = np.where(gt[wrong] == VERTEBRAL_BODY, VERTEBRAL_BODY, 0)
        fixed_slice[gt == LESION] = LESION
    pair = CorrectionPair(
        image,
        image.with_array(corrected),
        image.with_array(prediction),
        known_classes={LESION},
        name=f"{case.case_id}+sim",
    )
    lesion_config = dataclasses.replace(config, class_names={LESION: "lesion (simulated)"})
    result, _ = run(
        finetune(base_path, [pair], lesion_config, reference_cases=references, fixed_validation=fixed), "lesion"
    )
    after_prediction = predict(LoadedModel(result.network, result.metadata), image)
    keep = np.ones(truth.shape, dtype=bool)
    for index in painted:
        keep[take(axis, index)] = False
    second_box = np.zeros(truth.shape, dtype=bool)
    half = (np.ceil(np.asarray(second.radii_mm) / spacing) + 3).astype(int)
    second_box[tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(second.centre_index, half))] = True
    name = f"SIMULATED lesions in {case.case_id}"
    note = f"label 4 painted on sagittal slices {painted} of lesion 1 only; simulated hemangiomas, not real lesions"
    rows = []
    for label, region in (("lesion Dice, other slices", keep), ("lesion Dice, unpainted lesion 2", second_box & keep)):
        before = dice_score((prediction == LESION) & region, (truth == LESION) & region)
        after = dice_score((after_prediction == LESION) & region, (truth == LESION) & region)
        rows.append(row(name, label, before, after, "", note))
    region = (truth != IGNORE) & keep
    body = [
        dice_score((p == VERTEBRAL_BODY) & region, (truth == VERTEBRAL_BODY) & region)
        for p in (prediction, after_prediction)
    ]
    rows.append(row(name, "vertebral body Dice, other slices", *body, "", "lesion voxels count as not-body"))
    rows.append(
        row(name, "new class", None, None, "", ", ".join(f"{c.value}={c.name}" for c in result.new_classes) or "none")
    )
    return rows + forgetting_rows(name, result)


# ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model (name or .safetensors); default spineseg-default or bootstrap")
    parser.add_argument("--data", default=str(DATA), help="lumbar-mri folder")
    parser.add_argument("--steps", type=int, default=200)
    defaults = FinetuneConfig()
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--bootstrap-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 steps, for a smoke run")
    parser.add_argument(
        "--twins", action="store_true", help="unseen study: copy each corrected slice to its resampled twins first"
    )
    parser.add_argument("--skip-lesion", action="store_true", help="skip the simulated-lesion experiment")
    parser.add_argument("--only-lesion", action="store_true", help="only the simulated-lesion experiment")
    parser.add_argument("--skip-cervical", action="store_true", help="skip the cervical (unseen kind) experiment")
    parser.add_argument("--only-cervical", action="store_true", help="only the cervical (unseen kind) experiment")
    parser.add_argument("--replay-fraction", type=float, default=defaults.replay_fraction)
    parser.add_argument("--distill-weight", type=float, default=defaults.distill_weight)
    parser.add_argument("--val-every", type=int, default=defaults.val_every, help="steps between evaluations")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other FinetuneConfig field, e.g. l2sp_weight=0.1",
    )
    parser.add_argument("--output", help="CSV file (default: results/finetune.csv or finetune-lesion.csv)")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = json.loads(value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = min(args.steps, 20)
    base_path, source = resolve_base(args)
    base = load_model(base_path)
    print(f"base: {base.metadata.name} [{source}] {base_path}", file=sys.stderr)
    recorded = base.metadata.training.get("fixed_validation")
    fixed = None if recorded else load_lumbar_dataset(args.data, ("VB3", "IVD"), cases=FIXED)
    references = load_lumbar_dataset(args.data, ("VB3", "IVD"), cases=REFERENCES)
    config = FinetuneConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=8,
        crop_size=256,
        val_every=min(args.val_every, args.steps),
        replay_fraction=args.replay_fraction,
        distill_weight=args.distill_weight,
        num_threads=args.threads,
        **overrides,
    )

    rows, stamps = [], []
    if args.only_cervical:
        args.only_lesion = args.skip_lesion = True
    if not args.only_lesion:
        rows, stamps = unseen_study(args, base, base_path, fixed, references, config)
    per_step = float(np.median(np.diff(stamps))) if len(stamps) > 2 else float("nan")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    speed_note = (
        f"unet base16 depth4 ctx1, crop 256, batch 8, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} during the run"
    )
    speed = [
        row("speed", "fine-tune steps/s", None, 1.0 / per_step, ">= 1.33 (200 steps <= 2.5 min)", speed_note),
        row("speed", "seconds for 200 steps", None, 200 * per_step, "<= 150", speed_note),
    ]
    if args.only_cervical or not (args.skip_cervical or args.only_lesion):
        rows += unseen_kind(args, base, base_path, fixed, references, config)
    if not args.skip_lesion:
        rows += simulated_lesions(args, base, base_path, fixed, references, config)
    rows = rows if args.only_lesion else speed + rows
    for r in rows:
        r["base"] = f"{base.metadata.name} ({source})"
        r["steps"] = args.steps
        r["lr"] = args.lr
        r["replay_fraction"] = args.replay_fraction
        r["distill_weight"] = args.distill_weight
        r["config"] = json.dumps({k: v for k, v in config.to_dict().items() if k in CONFIG_KEYS})
    print(
        f"\nbase model: {base.metadata.name} [{source}]; {args.steps} steps, lr {args.lr}, "
        f"replay {args.replay_fraction}, distillation {args.distill_weight}"
    )
    print(f"{'experiment':34s} {'metric':36s} {'before':>8s} {'after':>8s} {'change':>8s}  target")
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"  # noqa: E731
        change = "" if r["change_points"] is None else f"{r['change_points']:+.1f}"
        print(
            f"{r['experiment'][:34]:34s} {r['metric'][:36]:36s} {fmt(r['before']):>8s} {fmt(r['after']):>8s} "
            f"{change:>8s}  {r['target'] or (r['notes'] if r['metric'] == 'new class' else '')}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = (
        Path(args.output)
        if args.output
        else RESULTS
        / (
            "finetune-cervical.csv"
            if args.only_cervical
            else "finetune-lesion.csv"
            if args.only_lesion
            else "finetune.csv"
        )
    )
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
