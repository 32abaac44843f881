"""Run every benchmark and print its tables: ``make benchmarks`` (add ``--quick`` for a short run).

Results are written to ``benchmarks/results/*.csv``; the figures quoted in docs/performance.md
come from these files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_inference.py",
    "bench_finetune.py",
    "bench_lesion_transfer.py",
    "bench_cohort.py",
    "bench_fuzz.py",
    "bench_faults.py",
    "bench_gate.py",
    "bench_responsiveness.py",
]


def main() -> int:
    status = 0
    for name in BENCHMARKS:
        script = HERE / name
        if not script.exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        status |= subprocess.run([sys.executable, str(script), *sys.argv[1:]], cwd=HERE.parent).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
