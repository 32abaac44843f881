"""Does a painted class transfer to the next study?  SIMULATED lesions, patient-held-out (issue #17).

Run: ``.venv/bin/python benchmarks/bench_lesion_transfer.py [--base MODEL] [--quick] [--seed N]``;
prints a table and writes ``benchmarks/results/lesion-transfer.csv`` (every row SIMULATED).

Three studies the base model never trained on (held out of ``spineseg-default``'s training):
A = VB3-02, B = VB3-04, C = VB3-05, each with three hemangioma-like lesions planted in three
different vertebral bodies (:mod:`napari_spineseg.lesion_sim`; one random generator per study).

* **Round 1**: label 4 is painted on ONE sagittal slice through each of A's lesion centres (the
  lesion's truth on that slice; wrongly predicted lesion voxels there are repaired too), the base
  is fine-tuned (default :class:`FinetuneConfig`, 200 steps) and the studies re-segmented: lesion
  Dice on A's other slices, on B and on C (neither painted); fixed-set Dice per class before/after.
* **Round 2**: C's lesions are painted the same way on the round-1 model's prediction; the
  round-1 model, saved as a user would (with its replay set of A's painted slices beside it), is
  fine-tuned on C's pair, A's painted slices replayed from that set: lesion Dice on B (never
  painted), A's and C's other slices; forgetting against the original base.
* **Round 1, whole map**: round 1 with A's corrected labels given without the prediction (what
  ``spineseg finetune --image A --labels corrected`` without ``--prediction``/``--slices`` does):
  the whole map is trusted, except that a map holding a new class is trusted only on the slices
  the class was painted on.

Diagnostics (``P(lesion)``): the fused lesion probability (mean of the planes, before
post-processing) on B, its maximum inside B's lesions and its 99.9th percentile outside them.
Targets (issue #17): B ≥ 0.50 after round 1, ≥ 0.65 after round 2, no class forgets > 1 point.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import (
    CONFIG_KEYS,
    DATA,
    FIXED,
    REFERENCES,
    RESULTS,
    predict,
    resolve_base,
    row,
    run,
    take,
)

from napari_spineseg.errors import InputError
from napari_spineseg.inference import Predictor, SegmentationSettings
from napari_spineseg.lesion_sim import simulate_hemangioma
from napari_spineseg.metrics import dice_score
from napari_spineseg.modelfile import LoadedModel, load_model
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.schema import LESION, VERTEBRAL_BODY
from napari_spineseg.training.data import load_lumbar_dataset
from napari_spineseg.training.finetune import CorrectionPair, FinetuneConfig, finetune, save_finetuned

STUDIES = {"A": "VB3-02", "B": "VB3-04", "C": "VB3-05"}
SIM = "SIMULATED"
TARGETS = {"round 1": ">= 0.50", "round 2": ">= 0.65", "round 1, whole map": ">= 0.50"}  # lesion Dice on B


@dataclasses.dataclass
class Study:
    key: str
    case_id: str
    image: object  # Volume with the planted lesions
    truth: np.ndarray
    lesions: list
    axis: int  # sagittal array axis

    @property
    def painted_slices(self) -> list[int]:
        return sorted({int(lesion.centre_index[self.axis]) for lesion in self.lesions})


STUDY_OBJECTS: dict[str, Study] = {}  # "A", "B", "C" with their planted lesions (filled by main)


def plant(case, rng: np.random.Generator, count: int = 3) -> Study:
    """``count`` lesions in ``count`` different vertebral bodies of ``case``."""
    image, labels = case.image, case.labels
    bodies, n = ndimage.label(labels.array == VERTEBRAL_BODY)
    sizes = ndimage.sum_labels(np.ones_like(bodies), bodies, index=np.arange(1, n + 1))
    candidates = [int(i) + 1 for i in np.flatnonzero(sizes > 0.2 * sizes.max())]
    lesions = []
    for component in rng.permutation(candidates):
        try:
            image, labels, lesion = simulate_hemangioma(
                image, labels, rng, diameter_mm=(10.0, 16.0), component=int(component)
            )
        except InputError:
            continue
        lesions.append(lesion)
        if len(lesions) == count:
            break
    axis = plane_array_axis(image.geometry, Plane.SAGITTAL)
    return Study("", case.case_id, image, labels.array, lesions, axis)


def painted_pair(study: Study, prediction: np.ndarray) -> CorrectionPair:
    """Label 4 painted on one sagittal slice through each lesion centre of ``study``."""
    corrected = prediction.copy()
    for index in study.painted_slices:
        sl = take(study.axis, index)
        gt, fixed_slice = study.truth[sl], corrected[sl]
        wrong = (fixed_slice == LESION) & (gt != LESION)
        fixed_slice[wrong] = np.where(gt[wrong] == VERTEBRAL_BODY, VERTEBRAL_BODY, 0)
        fixed_slice[gt == LESION] = LESION
    return CorrectionPair(
        study.image,
        study.image.with_array(corrected),
        study.image.with_array(prediction),
        known_classes={LESION},
        name=f"{study.case_id}+sim",
    )


class ProbabilityPredictor(Predictor):
    """A predictor that also keeps the fused lesion probability (host path, study array order)."""

    def _segment_host(self, study, *args, **kwargs):
        self._study = study
        return (yield from super()._segment_host(study, *args, **kwargs))

    def _fuse(self, accumulator, total_weight, *args, **kwargs):
        index = list(self._require_model().metadata.class_values).index(LESION) - 1
        canonical = accumulator[..., index].astype(np.float32) / np.float32(total_weight)
        self.lesion_probability = self._study.to_original(canonical)
        return super()._fuse(accumulator, total_weight, *args, **kwargs)


def lesion_probability(model, image) -> np.ndarray:
    if LESION not in model.metadata.class_values:
        return np.zeros(image.shape, np.float32)
    predictor = ProbabilityPredictor(SegmentationSettings(postprocess=False, resident=False))
    predictor.load(model)
    predictor.predict(image)
    return predictor.lesion_probability


def lesion_dice(prediction: np.ndarray, study: Study, skip_painted: bool) -> float:
    keep = np.ones(study.truth.shape, dtype=bool)
    if skip_painted:
        for index in study.painted_slices:
            keep[take(study.axis, index)] = False
    return dice_score((prediction == LESION) & keep, (study.truth == LESION) & keep)


def measure(model, studies: dict[str, Study], painted: set[str]) -> dict[str, float]:
    """Lesion Dice per study (painted ones on their other slices) and P(lesion) on B."""
    out = {}
    for key, study in studies.items():
        out[key] = lesion_dice(predict(model, study.image), study, key in painted)
    probability = lesion_probability(model, studies["B"].image)
    inside = studies["B"].truth == LESION
    out["B_p_in"] = float(probability[inside].max())
    out["B_p_in_median"] = float(np.median(probability[inside]))
    out["B_p_out"] = float(np.quantile(probability[~inside], 0.999))
    return out


def studies_rows(name, before, after, painted, notes) -> list[dict]:
    rows = []
    for key, study in STUDY_OBJECTS.items():
        where = "other slices" if key in painted else "never painted" if key == "B" else "not painted yet"
        metric = f"lesion Dice, {key}={study.case_id} ({where})"
        target = {"B": TARGETS.get(name, "")}.get(key, "")
        rows.append(row(f"{SIM} {name}", metric, before[key], after[key], target, notes))
    for metric, key in (
        ("B: max P(lesion) in lesions", "B_p_in"),
        ("B: median P(lesion) in lesions", "B_p_in_median"),
        ("B: 99.9% P(lesion) outside", "B_p_out"),
    ):
        rows.append(row(f"{SIM} {name}", metric, before[key], after[key], "", "fused planes, no post-processing"))
    return rows


def fixed_rows(name: str, before: dict, after: dict, note: str) -> list[dict]:
    return [
        row(f"{SIM} {name}", f"fixed-set Dice: {cls}", before[cls], after[cls], "loss <= 1 point", note)
        for cls in before
        if cls in after
    ]


# ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model (name or .safetensors); default spineseg-default or bootstrap")
    parser.add_argument("--data", default=str(DATA), help="lumbar-mri folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--bootstrap-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="lesion placement (study k: seed * 10 + k)")
    parser.add_argument("--quick", action="store_true", help="20 steps, round 1 only (no whole map): a smoke run")
    parser.add_argument("--rounds", type=int, default=2, choices=(1, 2))
    parser.add_argument(
        "--no-whole-map", dest="whole_map", action="store_false", help="skip round 1 with A as a whole label map"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a FinetuneConfig field")
    parser.add_argument("--output", help="CSV file (default: results/lesion-transfer.csv)")
    args = parser.parse_args()
    overrides = {k.strip(): json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    if args.quick:
        args.steps, args.rounds, args.whole_map = min(args.steps, 20), 1, False
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base_path, source = resolve_base(args)
    base = load_model(base_path)
    trained = set(base.metadata.training.get("train_cases") or [])
    leaked = [c for c in STUDIES.values() if c in trained]
    if leaked:
        raise SystemExit(f"studies {leaked} were used to train {base.metadata.name}: not held out")
    print(f"base: {base.metadata.name} [{source}] {base_path}", file=sys.stderr)
    recorded = base.metadata.training.get("fixed_validation")
    fixed = None if recorded else load_lumbar_dataset(args.data, ("VB3", "IVD"), cases=FIXED)
    references = load_lumbar_dataset(args.data, ("VB3", "IVD"), cases=REFERENCES)
    cases = {c.case_id: c for c in load_lumbar_dataset(args.data, ("VB3",), cases=list(STUDIES.values()))}
    for k, (key, case_id) in enumerate(STUDIES.items()):
        study = plant(cases[case_id], np.random.default_rng(args.seed * 10 + k))
        study.key = key
        STUDY_OBJECTS[key] = study
        print(f"{key}={case_id}: {len(study.lesions)} lesions, painted sagittal slices {study.painted_slices}")
    config = FinetuneConfig(
        steps=args.steps,
        batch_size=8,
        crop_size=256,
        val_every=min(FinetuneConfig().val_every, args.steps),
        num_threads=args.threads,
        class_names={LESION: "lesion (simulated)"},
        **overrides,
    )
    studies = STUDY_OBJECTS
    base_scores = measure(base, studies, painted=set())
    pair_a = painted_pair(studies["A"], predict(base, studies["A"].image))
    tune = lambda model, pairs, label: run(  # noqa: E731
        finetune(model, pairs, config, reference_cases=references, fixed_validation=fixed), label
    )[0]
    result1 = tune(base_path, [pair_a], "r1")
    model1 = LoadedModel(result1.network, result1.metadata)
    scores1 = measure(model1, studies, painted={"A"})
    a_slices = f"A={studies['A'].case_id} slices {studies['A'].painted_slices}"
    note1 = f"painted: {a_slices}; {args.steps} steps; seed {args.seed}"
    rows = studies_rows("round 1", base_scores, scores1, {"A"}, note1)
    rows += fixed_rows("round 1", result1.before["fixed_validation"], result1.after["fixed_validation"], note1)
    if args.rounds == 2:
        pair_c = painted_pair(studies["C"], predict(model1, studies["C"].image))
        with tempfile.TemporaryDirectory() as folder:  # saved as a user would: the replay set goes beside it
            path1 = save_finetuned(result1, Path(folder) / "round1.safetensors")
            result2 = tune(path1, [pair_c], "r2")  # A's painted slices come back from round1.replay.npz
        scores2 = measure(LoadedModel(result2.network, result2.metadata), studies, painted={"A", "C"})
        replayed = ", ".join((result2.metadata.training.get("replayed") or {}).get("studies") or []) or "nothing"
        note2 = f"painted: C={studies['C'].case_id} slices {studies['C'].painted_slices}; replay set: {replayed}"
        rows += studies_rows("round 2", scores1, scores2, {"A", "C"}, note2)
        before, after = result1.before["fixed_validation"], result2.after["fixed_validation"]
        rows += fixed_rows("round 2", before, after, note2 + " (vs base)")
    if args.whole_map:
        # `spineseg finetune --image A --labels corrected` without --prediction/--slices: a whole map
        whole = dataclasses.replace(pair_a, prediction=None, known_classes=None)
        result = tune(base_path, [whole], "whole")
        scores = measure(LoadedModel(result.network, result.metadata), studies, painted={"A"})
        trusted = result.metadata.training["pair_details"][0]["trusted_slices"] or "the whole map"
        note = f"{a_slices} given as a whole label map (no prediction, no reviewed slices); trusted: {trusted}"
        rows += studies_rows("round 1, whole map", base_scores, scores, {"A"}, note)
        rows += fixed_rows(
            "round 1, whole map", result.before["fixed_validation"], result.after["fixed_validation"], note
        )
    report(rows, args, base, source, config, started)
    return 0


def report(rows, args, base, source, config, started) -> None:
    settings = json.dumps({k: v for k, v in config.to_dict().items() if k in CONFIG_KEYS or k.startswith("new_class")})
    for r in rows:
        r.update(base=f"{base.metadata.name} ({source})", steps=args.steps, seed=args.seed, config=settings)
    print(f"\nbase model: {base.metadata.name} [{source}]; {args.steps} steps; seed {args.seed}; {SIM} lesions")
    print(f"{'experiment':30s} {'metric':40s} {'before':>8s} {'after':>8s} {'change':>8s}  target")
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        change = "" if r["change_points"] is None else f"{r['change_points']:+.1f}"
        print(
            f"{r['experiment'][:30]:30s} {r['metric'][:40]:40s} {fmt(r['before']):>8s} {fmt(r['after']):>8s} "
            f"{change:>8s}  {r['target']}"
        )
    out = Path(args.output) if args.output else RESULTS / "lesion-transfer.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, out)
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
