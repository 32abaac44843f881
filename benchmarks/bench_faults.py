"""Kill -9 the CLI and the writers of label maps / models at random moments: no file may be corrupted.

    .venv/bin/python benchmarks/bench_faults.py                  # 170 trials (~20 min on a busy 2-core machine)
    .venv/bin/python benchmarks/bench_faults.py --trials 0.2     # a fifth of every scenario

Scenarios (``tests/fault_harness.py``): ``spineseg segment`` writing a label map and an
uncertainty map over an earlier run's outputs; ``spineseg train`` writing its best model and resume
checkpoint; processes looping ``write_labels`` and ``save_model`` over one file with two contents.
After each SIGKILL every target file must be the old complete file, a new complete file or (if it
did not exist) absent.  Writes ``benchmarks/results/faults.csv`` (one row per scenario) and
``benchmarks/results/faults-trials.jsonl`` (every trial).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests"))

COUNTS = {"segment": 60, "train": 20, "labels": 50, "model": 50}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=float, default=1.0, help="fraction of the default trial counts")
    parser.add_argument("--scenarios", default=",".join(COUNTS), help="comma-separated: " + ", ".join(COUNTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "faults.csv"))
    args = parser.parse_args()

    import fault_harness as fh

    rng = random.Random(args.seed)
    trials = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="spineseg-faults-") as temp:
        work = Path(temp)
        builders = {
            "segment": fh.segment_cli,
            "train": fh.train_cli,
            "labels": fh.labels_loop,
            "model": fh.model_loop,
        }
        for key in args.scenarios.split(","):
            count = max(1, round(COUNTS[key] * args.trials))
            scenario = builders[key](work / key)
            print(f"{scenario.name}: {count} trials", flush=True)
            for index in range(count):
                trial = fh.run_trial(scenario, rng, mode="blind" if index % 2 else "on-temp")
                trials.append(trial)
                bad = [name for name, state in trial.files.items() if state == "corrupt"]
                if bad:
                    print(f"  CORRUPT after trial {index}: {bad} ({trial})", flush=True)
    rows = fh.summarise(trials)
    header = list(rows[0])
    total = {"scenario": "total", **{k: sum(r[k] for r in rows) for k in header[1:-1]}}
    total["mean_s"] = round(sum(t.seconds for t in trials) / len(trials), 2)
    rows.append(total)
    print()
    print("  ".join(f"{h:>16s}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>16s}" for h in header))
    print(f"\n{time.monotonic() - started:.0f} s wall clock")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    out.with_name("faults-trials.jsonl").write_text(fh.dump(trials) + "\n")
    print(f"wrote {out}")
    return 1 if total["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
