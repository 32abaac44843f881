"""The simulated-annotator benchmark (benchmarks/bench_annotator.py): quick mode and its rules."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_annotator.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # as when run as a script: its sibling modules import
    spec = importlib.util.spec_from_file_location("bench_annotator", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_annotator"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_curves_for_every_strategy_and_picker(bench, tmp_path: Path) -> None:
    assert bench.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]) == 0
    with (tmp_path / "annotator.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"paint-only", "interpolation", "interpolation+model"} <= set(bench.STRATEGIES)
    assert {"adaptation", "adaptation+interpolation", "fine-tuning"} <= bench.SLOW <= set(bench.STRATEGIES)
    fast = set(bench.STRATEGIES) - bench.SLOW  # every picker; the slow ones (a network trained per round): "worst"
    expected = {(s, p) for s in fast for p in bench.PICKERS} | {(s, "worst") for s in bench.SLOW}
    assert {(r["strategy"], r["picker"]) for r in rows} == expected
    for strategy in bench.STRATEGIES:
        own = [r for r in rows if r["strategy"] == strategy and r["picker"] == "worst"]
        assert [int(r["round"]) for r in own] == list(range(len(own))) and len(own) >= 3
        assert [int(r["slices_painted"]) for r in own] == list(range(len(own)))
        voxels = [int(r["voxels_painted"]) for r in own]
        assert voxels[0] == 0 and voxels == sorted(voxels)
        assert all(0.0 <= float(r["dice"]) <= 1.0 for r in own)
    paint_only = [float(r["dice"]) for r in rows if r["strategy"] == "paint-only" and r["picker"] == "worst"]
    assert paint_only[-1] > paint_only[0]  # painting the worst slice always helps
    assert (tmp_path / "annotator.png").stat().st_size > 10_000
    assert list((tmp_path / "cache").glob("phantom-quick-*.npz"))  # the prediction is cached


def _study(bench):
    truth = np.zeros((12, 20, 20), np.uint8)
    truth[:, 5:15, 5:15] = 1
    truth[:, :2] = bench.IGNORE  # outside the labelled span
    prediction = np.zeros_like(truth)
    prediction[:, 6:15, 5:15] = 1  # one row short on every slice
    prediction[:, 0, 0] = 1  # outside the span: the annotator cannot know; never painted
    uncertainty = np.zeros(truth.shape, np.float32)
    uncertainty[[2, 9]] = 1.0
    return bench.Study("toy", truth, 1, prediction, uncertainty, 0)


def test_painting_pickers_and_interpolation_keep_painted_voxels(bench) -> None:
    study = _study(bench)
    state = bench.State(study.prediction.copy(), np.zeros(study.truth.shape, bool))
    assert bench.pick_uncertain(study, state) in (2, 9)
    bench.paint(study, state, 2)
    assert state.voxels == 10 and state.slices == [2] and state.painted[2, 5, 5:15].all()
    assert state.labels[2, 0, 0] == 1  # outside the span: left alone
    assert bench.pick_uncertain(study, state) == 9
    assert bench.pick_uncertain_spread(study, state) == 9
    assert bench.pick_worst(study, state) != 2
    bench.paint(study, state, 9)
    digest = hashlib.sha256(state.labels[state.painted].tobytes()).hexdigest()
    bench.STRATEGIES["interpolation"](study, state)
    assert hashlib.sha256(state.labels[state.painted].tobytes()).hexdigest() == digest
    assert (state.labels[3:9, 5, 5:15] == 1).all()  # filled between the painted slices
    assert bench.dice(study, state.labels) > bench.dice(study, study.prediction)
    state.labels[5, 5:15, 5:15] = 0  # the model-guided fill redraws the slices between as well
    bench.STRATEGIES["interpolation+model"](study, state)
    assert hashlib.sha256(state.labels[state.painted].tobytes()).hexdigest() == digest
    assert (state.labels[3:9, 6:15, 5:15] == 1).all()
    rows = bench.simulate(study, "paint-only", "worst", rounds=50)
    assert rows[-1]["dice"] == 1.0 and len(rows) == 13  # every slice fixed, then nothing is left to pick
