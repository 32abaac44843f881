"""Annotator effort, measured: a simulated annotator corrects slices and the tool helps.

Run: ``.venv/bin/python benchmarks/bench_annotator.py [--cases VB3-01,IVD-11] [--rounds 10] [--quick]``;
prints a table and writes ``benchmarks/results/annotator.csv`` and ``annotator.png``.

For each patient-held-out study (the bundled model's validation patients, never trained on):

1. the starting segmentation is the bundled model's prediction, with its entropy uncertainty map
   (cached under ``--cache``: tens of seconds per study on CPU);
2. each round the annotator takes one sagittal slice, chosen by a *picker*:
   ``uncertain`` — the tool's proposal today, the Review widget's "next most uncertain slice"
   (slices ranked by mean uncertainty, painted ones skipped); ``uncertain-spread`` — a proposal
   that damps the uncertainty of slices near painted ones (their neighbours get interpolated);
   ``uncertain-runs`` — the spread-out proposal restricted to slices resampled from the same
   acquired slices, one per run (:func:`napari_spineseg.resampled.resampled_runs`; the plain
   spread-out proposal on a study at its acquired resolution; the Review widget's proposal on
   such a study takes one slice per run too); ``worst`` — the control, the slice with the most
   wrong voxels of the labelled structure now (an oracle no annotator has);
3. the annotator paints the truth of the labelled structure (vertebral bodies in VB cases, discs
   in IVD cases) on that slice, inside the labelled superior–inferior span (the only place the
   truth is known), and the *strategy* helps;
4. after each round: whole-study Dice of that structure inside the labelled span, slices and
   voxels painted so far.

Strategies: ``paint-only`` (no help), ``interpolation`` (shape-based between consecutive painted
slices, :mod:`napari_spineseg.interpolation`) and ``interpolation+model`` (the same, blended into
the model's own shapes with distance from the painted slices: what the dock widget does on a
Segment result); ``same-source+interpolation+model`` (on a study resampled from thick slices, each
painted slice is first copied to the slices resampled from the same acquired slices, then
interpolation+model: what the Interpolate widget does when the study's image shows the
resampling, :mod:`napari_spineseg.resampled`); ``adaptation`` ("Apply my corrections to this study":
:mod:`napari_spineseg.adaptation`, a short run of the fine-tuning engine on the painted slices,
then re-segmentation of the unpainted voxels), ``adaptation+interpolation`` (adaptation, then
interpolation+model on its result) and ``fine-tuning`` (the Fine-tune widget's run: replay,
distillation, slow encoder, ``FINETUNE_STEPS`` steps, no fixed-set selection; then
re-segmentation).  The last three (:data:`SLOW`) train a network every round: ``--slow-rounds``
(default 5) limits them.  Adding a strategy is one function in :data:`STRATEGIES`.

``--quick``: a small phantom, 3 rounds, every strategy and picker (the slow ones: the worst-slice
picker, 2 rounds, 3 steps) — about a minute (tests/test_annotator_bench.py).

Last full run (VB3-01/02/04/05 bodies, IVD-11 discs; mean whole-study Dice, model alone 0.885):
after 10 painted slices, paint-only 0.910 (Review widget's picker) / 0.904 (spread) / 0.917 (oracle);
interpolation+model 0.914 / 0.927 / 0.941; pure interpolation 0.915 / 0.925 / 0.951 but it falls
to 0.52 on the way (two far-apart slices).  Interpolation+model with the spread proposal reaches
paint-only's 10-slice Dice (same picker) after 4 slices.  0.95 after <= 5 slices is not reached
by interpolation: the model's errors (mostly missed voxels: 2.4x more false negatives than
false positives on VB3-01) lie on every sagittal slice, and copying corrections sideways fixes
only the painted slices' neighbours — the study adaptation / fine-tuning strategies must do the rest.

Same-source copies (``results/annotator-same-source.csv``/``.png``, model v5, model alone 0.891):
the lumbar studies were resampled from ~4 mm sagittal slices, so a slice painted inside a run of
resampled slices also holds for the run's 1-2 other slices.  After 5 / 10 painted slices:
paint-only 0.901 / 0.909; interpolation+model 0.910 / 0.931 (spread-out proposal) and 0.918 /
0.943 (one proposal per run); same-source+interpolation+model 0.916 / 0.941 and **0.931 /
0.957** (one proposal per run: 0.95 after 9 slices; painting-only's 10-slice Dice after 3).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from results_csv import write_csv

from napari_spineseg.augment import IGNORE
from napari_spineseg.interpolation import interpolate_between_slices, next_slice_to_paint
from napari_spineseg.metrics import dice_score
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.review import uncertain_slices

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lumbar-mri"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-spineseg-bench" / "annotator"
DEFAULT_CASES = (
    "VB3-01",
    "VB3-02",
    "VB3-04",
    "VB3-05",
    "IVD-11",
)  # validation patients of the bundled model (held out of training)
REACH = 3.0  # interpolation+model: slices over which the corrections outweigh the model
SPREAD = 4.0  # uncertain-spread: slices around a painted one whose uncertainty counts less
FIELDS = ("case", "strategy", "picker", "round", "slice", "slices_painted", "voxels_painted", "dice", "help_s")


@dataclass
class Study:
    """One study as the simulated annotator sees it."""

    case: str
    truth: np.ndarray  # the labelled structure's value, 0 elsewhere, IGNORE outside the labelled span
    value: int  # the labelled structure (1 bodies, 2 discs)
    prediction: np.ndarray  # the model's label map (all classes)
    uncertainty: np.ndarray  # the model's uncertainty map (0..1)
    axis: int  # array axis along which sagittal slices are stacked
    image: Any = None  # the study's image Volume (adaptation and fine-tuning re-segment it)
    model: str = "spineseg-default"

    @property
    def span(self) -> np.ndarray:
        return self.truth != IGNORE


@dataclass
class State:
    """The annotator's label map and what was painted so far."""

    labels: np.ndarray
    painted: np.ndarray  # voxels the annotator changed (never overwritten by help)
    slices: list[int] = field(default_factory=list)  # painted slices, in painting order
    voxels: int = 0  # voxels painted so far


# ------------------------------------------------------------------------------------------------
# Strategies: how the tool helps after each painted slice.  One function each: (study, state) -> None,
# editing ``state.labels`` in place and never touching ``state.painted`` voxels.
# ------------------------------------------------------------------------------------------------
def paint_only(study: Study, state: State) -> None:
    """No help: the annotator's painting is all there is."""


def interpolation(study: Study, state: State) -> None:
    """Shape-based interpolation of the labelled structure between consecutive painted slices."""
    change = interpolate_between_slices(
        state.labels, study.axis, slices=state.slices, painted=state.painted, values=[study.value]
    )
    change.apply(state.labels)


def interpolation_model(study: Study, state: State) -> None:
    """Interpolation near the painted slices, the model's own shape far from them (reach 3 slices)."""
    _interpolate_with_prior(study, state, study.prediction)


def _interpolate_with_prior(study: Study, state: State, prior: np.ndarray) -> None:
    """Fill between the painted slices, ``prior``'s shape beyond ``REACH`` slices from them."""
    change = interpolate_between_slices(
        state.labels,
        study.axis,
        slices=state.slices,
        painted=state.painted,
        values=[study.value],
        prior=prior,
        reach=REACH,
    )
    change.apply(state.labels)


def same_source_interpolation_model(study: Study, state: State) -> None:
    """On a study resampled from thick slices, each painted slice is first copied to the slices
    resampled from the same acquired slices (:mod:`napari_spineseg.resampled`), then
    interpolation+model runs between all of them."""
    from napari_spineseg.resampled import fill_from_corrections

    change, _ = fill_from_corrections(
        state.labels,
        study.axis,
        state.painted,
        image=study.image.array if study.image is not None else None,
        prior=study.prediction,
        values=[study.value],
        reach=REACH,
        slices=state.slices,
    )
    change.apply(state.labels)


ADAPT_STEPS: int | None = None  # None: AdaptConfig's default (--quick: 3)
FINETUNE_STEPS = 40  # the fine-tuning strategy's steps (the CLI default is 200: too slow per round; --quick: 3)
REFERENCES = ("VB3-06", "IVD-20")  # fine-tuning strategy: replayed training cases of the bundled model


@lru_cache(maxsize=2)
def _loaded(model: str):
    from napari_spineseg.modelfile import load_model

    return load_model(model)


def _resegment(study: Study, state: State, network_model) -> None:
    """Re-segment the study with ``network_model`` (a LoadedModel); painted voxels kept."""
    from napari_spineseg.inference import Predictor, SegmentationSettings

    predictor = Predictor(SegmentationSettings())
    predictor.load(network_model)
    predicted = predictor.predict(study.image).labels.array
    state.labels[...] = np.where(state.painted, state.labels, predicted.astype(state.labels.dtype))


def adaptation(study: Study, state: State) -> None:
    """ "Apply my corrections to this study": a short adaptation to the painted slices, then
    re-segmentation of the unpainted voxels (:mod:`napari_spineseg.adaptation`)."""
    from napari_spineseg.adaptation import AdaptConfig, run_adaptation

    config = AdaptConfig(num_threads=1) if ADAPT_STEPS is None else AdaptConfig(steps=ADAPT_STEPS, num_threads=1)
    result = run_adaptation(_loaded(study.model), study.image, state.labels, state.painted, config)
    result.change.apply(state.labels)


def adaptation_interpolation(study: Study, state: State) -> None:
    """Adaptation, then interpolation+model between the painted slices on top of its result."""
    adaptation(study, state)
    _interpolate_with_prior(study, state, state.labels.copy())


@lru_cache(maxsize=1)
def _references(data: str) -> tuple:
    from napari_spineseg.training.data import load_lumbar_dataset

    return tuple(load_lumbar_dataset(Path(data), ("VB3", "IVD"), cases=list(REFERENCES)))


def finetuning(study: Study, state: State) -> None:
    """The Fine-tune widget's run (replay, distillation, slow encoder; FINETUNE_STEPS steps, no
    fixed-set selection) on the painted slices, then re-segmentation of the unpainted voxels."""
    from napari_spineseg.training.finetune import CorrectionPair, FinetuneConfig, run_finetune
    from napari_spineseg.volume import Volume

    geometry = study.image.geometry
    pair = CorrectionPair(
        study.image,
        Volume(state.labels.astype(np.uint8), geometry),
        reviewed_slices={"sagittal": list(state.slices)},
        name=study.case,
    )
    config = FinetuneConfig(
        steps=FINETUNE_STEPS,
        val_every=FINETUNE_STEPS,
        select_by_validation=False,
        num_threads=1,
        replace_fixed_validation=True,
    )
    references = _references(str(DATA)) if DATA.is_dir() and not study.case.startswith("phantom") else ()
    result = run_finetune(_loaded(study.model), [pair], config, reference_cases=references, fixed_validation=[])
    from napari_spineseg.modelfile import LoadedModel

    _resegment(study, state, LoadedModel(result.network, _loaded(study.model).metadata, None))


STRATEGIES: dict[str, Callable[[Study, State], None]] = {
    "paint-only": paint_only,
    "interpolation": interpolation,
    "interpolation+model": interpolation_model,
    "same-source+interpolation+model": same_source_interpolation_model,
    "adaptation": adaptation,
    "adaptation+interpolation": adaptation_interpolation,
    "fine-tuning": finetuning,
}
SLOW = {"adaptation", "adaptation+interpolation", "fine-tuning"}  # a network trained every round


# ------------------------------------------------------------------------------------------------
# Pickers: which slice the annotator corrects next.  (study, state) -> slice index or None.
# ------------------------------------------------------------------------------------------------
def _take(axis: int, index: int) -> tuple:
    key: list = [slice(None)] * 3
    key[axis] = index
    return tuple(key)


def _other_axes(axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(3) if a != axis)


def pick_uncertain(study: Study, state: State) -> int | None:
    """The Review widget's proposal: next slice by decreasing mean uncertainty, painted ones skipped."""
    for index in uncertain_slices(study.uncertainty, study.axis):
        if int(index) not in state.slices:
            return int(index)
    return None


def pick_uncertain_spread(study: Study, state: State) -> int | None:
    """A proposal that spreads out (:func:`~napari_spineseg.interpolation.next_slice_to_paint`)."""
    return next_slice_to_paint(study.uncertainty, study.axis, state.slices, spread=SPREAD)


def pick_worst(study: Study, state: State) -> int | None:
    """Control (an oracle): the slice with the most wrong voxels of the structure inside the span."""
    wrong = ((state.labels == study.value) != (study.truth == study.value)) & study.span
    counts = np.count_nonzero(wrong, axis=_other_axes(study.axis))
    counts[state.slices] = -1
    best = int(np.argmax(counts))
    return best if counts[best] > 0 else None


def pick_uncertain_runs(study: Study, state: State) -> int | None:
    """Spread-out proposal among the slices resampled from the same acquired slices (one per run);
    the plain spread-out proposal on a study at its acquired resolution."""
    from napari_spineseg.resampled import resampled_runs

    runs = resampled_runs(study.image.array, study.axis) if study.image is not None else []
    return next_slice_to_paint(study.uncertainty, study.axis, state.slices, spread=SPREAD, runs=runs)


PICKERS: dict[str, Callable[[Study, State], int | None]] = {
    "uncertain": pick_uncertain,
    "uncertain-spread": pick_uncertain_spread,
    "uncertain-runs": pick_uncertain_runs,
    "worst": pick_worst,
}


# ------------------------------------------------------------------------------------------------
def paint(study: Study, state: State, index: int) -> None:
    """The annotator paints the truth of the structure on slice ``index`` (inside the labelled span)."""
    key = _take(study.axis, index)
    labels, truth, span = state.labels[key], study.truth[key], study.span[key]
    target = labels.copy()
    target[span & (truth == study.value)] = study.value
    target[span & (truth != study.value) & (labels == study.value)] = 0
    changed = target != labels
    labels[...] = target  # a view: writes state.labels
    state.painted[key] |= changed
    state.slices.append(index)
    state.voxels += int(changed.sum())


def dice(study: Study, labels: np.ndarray) -> float:
    span = study.span
    return dice_score((labels == study.value) & span, (study.truth == study.value) & span)


def simulate(study: Study, strategy: str, picker: str, rounds: int) -> list[dict]:
    """Rows of one annotator session: round 0 is the model alone."""
    state = State(study.prediction.copy(), np.zeros(study.prediction.shape, bool))
    rows = [_row(study, strategy, picker, 0, None, state, 0.0)]
    for round_ in range(1, rounds + 1):
        index = PICKERS[picker](study, state)
        if index is None:
            break
        paint(study, state, index)
        start = time.perf_counter()
        STRATEGIES[strategy](study, state)
        rows.append(_row(study, strategy, picker, round_, index, state, time.perf_counter() - start))
    return rows


def _row(study: Study, strategy: str, picker: str, round_: int, index, state: State, seconds: float) -> dict:
    return {
        "case": study.case,
        "strategy": strategy,
        "picker": picker,
        "round": round_,
        "slice": "" if index is None else index,
        "slices_painted": len(state.slices),
        "voxels_painted": state.voxels,
        "dice": round(dice(study, state.labels), 4),
        "help_s": round(seconds, 3),
    }


# ------------------------------------------------------------------------------------------------
# Studies
# ------------------------------------------------------------------------------------------------
def _model_key(model: str) -> str:
    from napari_spineseg.modelfile import resolve_model

    path = Path(resolve_model(model))
    stat = path.stat()
    return hashlib.sha1(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]


def predict_cached(image, key: str, model: str, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The model's labels and entropy uncertainty for ``image`` (read from / saved to ``cache``)."""
    from napari_spineseg.inference import Predictor, SegmentationSettings

    path = None if cache is None else cache / f"{key}-{_model_key(model)}.npz"
    if path is not None and path.is_file():
        with np.load(path) as saved:
            return saved["labels"], saved["uncertainty"].astype(np.float32)
    start = time.perf_counter()
    predictor = Predictor(SegmentationSettings(uncertainty="entropy"))
    predictor.load(model)
    result = predictor.predict(image)
    print(f"  [{key}] model prediction {time.perf_counter() - start:.0f} s", file=sys.stderr)
    labels, uncertainty = result.labels.array, result.uncertainty.array
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp.npz")
        np.savez_compressed(partial, labels=labels, uncertainty=uncertainty.astype(np.float16))
        partial.replace(path)
    return labels, uncertainty


def real_study(case_id: str, data: Path, model: str, cache: Path | None) -> Study:
    from napari_spineseg.training.data import LUMBAR_DATASETS, load_lumbar_dataset

    dataset = case_id.split("-")[0]
    (case,) = load_lumbar_dataset(data, (dataset,), cases=[case_id])
    labels, uncertainty = predict_cached(case.image, case_id, model, cache)
    axis = plane_array_axis(case.image.geometry, Plane.SAGITTAL)
    return Study(case_id, case.labels.array, LUMBAR_DATASETS[dataset][0], labels, uncertainty, axis, case.image, model)


def quick_study(model: str, cache: Path | None) -> Study:
    """A small phantom (vertebral bodies labelled, everything else unknown) — seconds."""
    from napari_spineseg.phantom import make_phantom
    from napari_spineseg.schema import VERTEBRAL_BODY

    phantom = make_phantom(size=(96, 96, 20), spacing=(2.0, 2.0, 2.5), lesions=0, seed=11)
    bodies = phantom.labels.array == VERTEBRAL_BODY
    truth = np.where(bodies, np.uint8(VERTEBRAL_BODY), np.uint8(0))
    si_axis = plane_array_axis(phantom.labels.geometry, Plane.AXIAL)
    rows = np.flatnonzero(bodies.any(axis=_other_axes(si_axis)))
    outside = np.ones(truth.shape, bool)
    outside[_take(si_axis, slice(int(rows[0]), int(rows[-1]) + 1))] = False
    truth[outside] = IGNORE
    labels, uncertainty = predict_cached(phantom.image, "phantom-quick", model, cache)
    axis = plane_array_axis(phantom.labels.geometry, Plane.SAGITTAL)
    return Study("phantom-quick", truth, VERTEBRAL_BODY, labels, uncertainty, axis, phantom.image, model)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def mean_curves(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Mean Dice over cases per (strategy, picker) after 0, 1, 2, ... painted slices."""
    curves: dict[tuple[str, str], list[float]] = {}
    for key in sorted({(r["strategy"], r["picker"]) for r in rows}):
        per_case: dict[str, list[float]] = {}
        for r in rows:
            if (r["strategy"], r["picker"]) == key:
                per_case.setdefault(r["case"], []).append(float(r["dice"]))
        n = min(len(v) for v in per_case.values())
        curves[key] = [float(np.mean([v[i] for v in per_case.values()])) for i in range(n)]
    return curves


FLOOR = 0.8  # the plots' lower Dice limit (the CSV has every value)
TITLES = {
    "uncertain": "most uncertain (Review widget today)",
    "uncertain-spread": "most uncertain, spread out",
    "uncertain-runs": "most uncertain, one per acquired slice",
    "worst": "worst slice (oracle control)",
}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pickers = [p for p in PICKERS if any(r["picker"] == p for r in rows)]
    cases = sorted({r["case"] for r in rows})
    colours = {
        "paint-only": "tab:gray",
        "interpolation": "tab:blue",
        "interpolation+model": "tab:green",
        "adaptation": "tab:orange",
        "adaptation+interpolation": "tab:red",
        "fine-tuning": "tab:purple",
    }
    fig, axes = plt.subplots(1, len(pickers), figsize=(5.5 * len(pickers), 4.2), sharey=True, squeeze=False)
    for ax, picker in zip(axes[0], pickers):
        for strategy in [s for s in STRATEGIES if any(r["strategy"] == s and r["picker"] == picker for r in rows)]:
            colour = colours.get(strategy)
            for case in cases:
                own = [r for r in rows if (r["strategy"], r["picker"], r["case"]) == (strategy, picker, case)]
                ax.plot([r["slices_painted"] for r in own], [r["dice"] for r in own], color=colour, alpha=0.3, lw=1)
            mean = mean_curves(rows).get((strategy, picker), [])
            ax.plot(range(len(mean)), mean, color=colour, lw=2.5, marker="o", ms=3, label=f"{strategy} (mean)")
        ax.axhline(0.95, color="tab:red", ls="--", lw=1, label="target 0.95")
        title = f"slice picked: {TITLES.get(picker, picker)}"
        low = min(float(r["dice"]) for r in rows if r["picker"] == picker)
        if low < FLOOR:
            title += f"\n(curves dip below {FLOOR}: lowest {low:.2f})"
        ax.set_title(title, fontsize=10)
        ax.set_ylim(FLOOR, 1.0)
        ax.set_xlabel("sagittal slices painted")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("whole-study Dice, labelled span")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Simulated annotator ({', '.join(cases)}; thin lines: single studies)", fontsize=10)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    partial.replace(path)


def _first_reaching(curve: list[float], level: float) -> int | None:
    return next((i for i, d in enumerate(curve) if d >= level), None)


def summary(rows: list[dict]) -> str:
    """Mean curves, when each reaches 0.95, and slices saved against painting only (same picker)."""
    curves = mean_curves(rows)
    lines = [
        "mean Dice after 0, 1, 2, ... painted slices; '0.95 at': slices to reach 0.95;",
        "'paint-only level at': slices to reach the Dice painting only has after all its slices",
    ]
    for (strategy, picker), curve in curves.items():
        text = " ".join(f"{d:.3f}" for d in curve)
        target = _first_reaching(curve, 0.95)
        line = f"{strategy:>19} {picker:>16}: {text}  0.95 at {'-' if target is None else target}"
        baseline = curves.get(("paint-only", picker))
        if baseline and strategy != "paint-only":
            same = _first_reaching(curve, baseline[-1])
            line += f"; paint-only level at {'-' if same is None else same} of {len(baseline) - 1}"
        lines.append(line)
    return "\n".join(lines)


def run(
    studies: list[Study],
    rounds: int,
    strategies: list[str] | None = None,
    pickers: list[str] | None = None,
    slow_rounds: int | None = None,
    slow_pickers: list[str] | None = None,
) -> list[dict]:
    """Every (study, picker, strategy) session; strategies in :data:`SLOW` stop after ``slow_rounds``
    and run with ``slow_pickers`` only (default: every picker)."""
    rows: list[dict] = []
    for study in studies:
        for picker in pickers or PICKERS:
            for strategy in strategies or STRATEGIES:
                if strategy in SLOW and slow_pickers is not None and picker not in slow_pickers:
                    continue
                limit = rounds if strategy not in SLOW or slow_rounds is None else min(rounds, slow_rounds)
                rows.extend(simulate(study, strategy, picker, limit))
                print(f"  {study.case} {picker} {strategy}: {rows[-1]['dice']}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated lumbar case ids")
    parser.add_argument("--rounds", type=int, default=10, help="slices the annotator paints per session")
    parser.add_argument("--model", default="spineseg-default")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=CACHE, help="model predictions are kept here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for annotator.csv and annotator.png")
    parser.add_argument("--quick", action="store_true", help="a small phantom, 3 rounds (seconds)")
    parser.add_argument("--strategies", default="", help=f"comma-separated subset of {', '.join(STRATEGIES)}")
    parser.add_argument("--pickers", default="", help=f"comma-separated subset of {', '.join(PICKERS)}")
    parser.add_argument(
        "--slow-rounds", type=int, default=5, help="rounds of the strategies that train a network (each: ~1 min on CPU)"
    )
    parser.add_argument("--name", default="annotator", help="stem of the CSV and PNG written under --out")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] or None
    pickers = [p.strip() for p in args.pickers.split(",") if p.strip()] or None
    unknown = sorted(set(strategies or ()) - set(STRATEGIES)) + sorted(set(pickers or ()) - set(PICKERS))
    if unknown:
        parser.error(f"unknown strategy or picker: {', '.join(unknown)}")
    global ADAPT_STEPS, FINETUNE_STEPS
    if args.quick:
        studies, rounds = [quick_study(args.model, args.cache)], min(args.rounds, 3)
        ADAPT_STEPS, FINETUNE_STEPS, args.slow_rounds = 3, 3, min(args.slow_rounds, 2)
        slow_pickers = ["worst"]
    else:
        slow_pickers = None
        studies = [real_study(c.strip(), args.data, args.model, args.cache) for c in args.cases.split(",") if c]
        rounds = args.rounds
    rows = run(studies, rounds, strategies, pickers, args.slow_rounds, slow_pickers)
    write_csv(rows, args.out / f"{args.name}.csv", fieldnames=FIELDS)
    plot(rows, args.out / f"{args.name}.png")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
