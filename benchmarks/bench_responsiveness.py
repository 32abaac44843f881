"""Viewer responsiveness while the widgets work: the longest event-loop stall (goal < 100 ms).

Run: ``.venv/bin/python benchmarks/bench_responsiveness.py [--repeats 3] [--only interpolation,adaptation]``
(needs ``xvfb-run``).  Runs the widget tests that probe the event loop (a 10 ms timer, CPU waits
left out) with the strict limit ``SPINESEG_STALL_LIMIT_S=0.1``, prints every measured stall and
the minimum over the repeats per phase, and writes ``benchmarks/results/responsiveness.csv``
(``--only``: just those groups' rows are measured and replaced; the other rows stay).  The unit
tests themselves only guard against a frozen viewer (0.5 s): stall times depend on the CPU, its
load and napari's version (napari's own append of one image layer takes 50-190 ms).

Groups: segment (segmentation adding and replacing its layers), finetune, interpolation (preview,
apply), adaptation ("Apply my corrections to this study": while adapting, the apply at the end),
levels (Levels up/down).
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
#: group -> (test file, pytest -k expression)
GROUPS = {
    "segment": ("tests/test_widgets.py", "threaded_segmentation"),
    "finetune": ("tests/test_widgets.py", "finetune_is_responsive"),
    "interpolation": ("tests/test_responsiveness_actions.py", "interpolation"),
    "adaptation": ("tests/test_responsiveness_actions.py", "corrections"),
    "levels": ("tests/test_responsiveness_actions.py", "levels"),
}
STALL = re.compile(r"^(?P<phase>[^:]+(?:, [^:]+)?): longest event-loop stall (?P<ms>\d+) ms")
BASELINE = re.compile(r"^napari's own append of a hidden image layer: (?P<ms>\d+) ms")
FIELDS = ["phase", "min_ms", "max_ms", "runs", "goal", "notes"]


def run_once(groups: list[str]) -> list[tuple[str, float]]:
    found = []
    for test_file in dict.fromkeys(GROUPS[g][0] for g in groups):
        selection = " or ".join(GROUPS[g][1] for g in groups if GROUPS[g][0] == test_file)
        command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:randomly", test_file, "-k", selection]
        if shutil.which("xvfb-run"):
            command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "env", "QT_QPA_PLATFORM=xcb", *command]
        env = {**os.environ, "SPINESEG_STALL_LIMIT_S": "0.1", "OMP_NUM_THREADS": "1"}
        output = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True).stdout
        for line in output.splitlines():
            if match := STALL.match(line.strip()):
                found.append((match["phase"], float(match["ms"])))
            elif match := BASELINE.match(line.strip()):
                found.append(("napari's own layer append (reference)", float(match["ms"])))
    return found


def write_rows(rows: list[dict], path: Path) -> None:
    """Replace the rows of the measured phases in ``path`` (others kept, in their order); temp file, then rename."""
    kept: list[dict] = []
    if path.exists():
        with path.open(newline="") as handle:
            kept = [{k: row.get(k, "") or "" for k in FIELDS} for row in csv.DictReader(handle)]
    new = {row["phase"]: row for row in rows}
    merged = [new.pop(row["phase"], row) for row in kept] + list(new.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(merged)
    partial.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--note", default="", help="added to each measured row's notes (e.g. the machine's load)")
    args = parser.parse_args()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        print(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
        return 2
    repeats = 1 if args.quick else args.repeats
    measured: dict[str, list[float]] = {}
    loads = []
    for _ in range(repeats):
        loads.append(os.getloadavg()[0])
        for phase, ms in run_once(groups):
            measured.setdefault(phase, []).append(ms)
    if not measured:
        print("no stall measured (no display? see the widget tests)")
        return 1
    load = max([*loads, os.getloadavg()[0]])
    note = f"load average up to {load:.1f} on {os.cpu_count()} cores" + (f"; {args.note}" if args.note else "")
    print(f"\n{'phase':44s} {'min ms':>7s} {'max ms':>7s}  goal   ({note})")
    rows = []
    for phase, values in measured.items():
        goal = "" if "reference" in phase else "< 100"
        print(f"{phase:44s} {min(values):7.0f} {max(values):7.0f}  {goal}")
        rows.append(
            {"phase": phase, "min_ms": min(values), "max_ms": max(values), "runs": len(values), "goal": goal}
            | {"notes": note}
        )
    write_rows(rows, RESULTS / "responsiveness.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
