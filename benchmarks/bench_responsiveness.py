"""Viewer responsiveness while the widgets work: the longest event-loop stall (goal < 100 ms).

Run: ``.venv/bin/python benchmarks/bench_responsiveness.py [--repeats 3]`` (needs ``xvfb-run``).
Runs the widget tests that probe the event loop (a 10 ms timer, CPU waits left out) with the
strict limit ``SPINESEG_STALL_LIMIT_S=0.1``, prints every measured stall and the minimum over
the repeats per phase, and writes ``benchmarks/results/responsiveness.csv``.  The unit tests
themselves only guard against a frozen viewer (0.5 s): stall times depend on the CPU, its load
and napari's version (napari's own append of one image layer takes 50-190 ms).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TESTS = "threaded_segmentation or finetune_is_responsive"
STALL = re.compile(r"^(?P<phase>[^:]+(?:, [^:]+)?): longest event-loop stall (?P<ms>\d+) ms")
BASELINE = re.compile(r"^napari's own append of a hidden image layer: (?P<ms>\d+) ms")


def run_once() -> list[tuple[str, float]]:
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:randomly", "tests/test_widgets.py", "-k", TESTS]
    if shutil.which("xvfb-run"):
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "env", "QT_QPA_PLATFORM=xcb", *command]
    env = {**os.environ, "SPINESEG_STALL_LIMIT_S": "0.1", "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True).stdout
    found = []
    for line in output.splitlines():
        if match := STALL.match(line.strip()):
            found.append((match["phase"], float(match["ms"])))
        elif match := BASELINE.match(line.strip()):
            found.append(("napari's own layer append (reference)", float(match["ms"])))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    measured: dict[str, list[float]] = {}
    for _ in range(repeats):
        for phase, ms in run_once():
            measured.setdefault(phase, []).append(ms)
    if not measured:
        print("no stall measured (no display? see the widget tests)")
        return 1
    load = os.getloadavg()[0]
    print(f"\n{'phase':44s} {'min ms':>7s} {'max ms':>7s}  goal   (load average {load:.1f})")
    rows = []
    for phase, values in measured.items():
        goal = "" if "reference" in phase else "< 100"
        print(f"{phase:44s} {min(values):7.0f} {max(values):7.0f}  {goal}")
        rows.append({"phase": phase, "min_ms": min(values), "max_ms": max(values), "runs": len(values), "goal": goal})
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "responsiveness.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
