"""Fuzz every reader, the model-file loader and the CLI: count crashes and hangs (target: 0).

    .venv/bin/python benchmarks/bench_fuzz.py                 # 10 500 cases (1 500 per target)
    .venv/bin/python benchmarks/bench_fuzz.py --cases 700     # quick run
    .venv/bin/python benchmarks/bench_fuzz.py --repro mha:123 # re-run one case in this process

The generators are those of ``tests/fuzz_targets.py`` (the hypothesis tests use them too), driven
by a seeded RNG: ``<target>:<seed>`` is a complete repro.  Cases run in worker processes (address
space capped at start + 6 GiB, one torch thread); a case taking more than ``--timeout`` seconds is
a hang (the worker is killed and replaced), a worker dying is a native crash.  Outcomes:

* ok: the input was read / the command succeeded;
* clear: a ``SpinesegError`` with a one-line message (the CLI: status 1 with a one-line
  ``spineseg: error:``, or an argparse usage error);
* unclear: our error type but a multi-line or overlong message (not a crash; should be 0 too);
* crash: any other exception, a patient identifier in output/metadata/messages, or a native crash;
* hang: no result within the timeout.

Writes ``benchmarks/results/fuzz.csv`` (one row per target) and a small text repro per failing case
in ``benchmarks/results/fuzz-crashes/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "tests"))

TARGET_ORDER = ["mha", "mhd", "nifti", "nrrd", "dicom", "dicomgeo", "niftigeo", "model", "cli"]


# ---------------------------------------------------------------------------------------------
# Worker: runs a chunk of seeds of one target, reporting on a private copy of stdout
# ---------------------------------------------------------------------------------------------
def worker(target: str, seeds: list[int]) -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # ITK, GDCM, tqdm and friends print; keep the protocol clean
    os.dup2(devnull, 2)
    import torch

    torch.set_num_threads(1)
    import fuzz_targets as ft

    work = Path(tempfile.mkdtemp(prefix=f"spineseg-fuzz-{target}-"))
    try:
        ft.tiny_model_bytes()  # warm the cache outside the timed cases
        print("READY", file=protocol)
        for seed in seeds:
            draw = ft.RandomDraw(f"{target}:{seed}")
            try:
                case = ft.TARGETS[target](draw, ft.fresh_dir(work / "c"))
            except Exception as error:  # a generator bug, not a finding: report it as such
                print("S", seed, json.dumps([f"generator failed: {error!r}"]), file=protocol)
                print("R", seed, "generror", "0", json.dumps(repr(error)), file=protocol)
                continue
            print("S", seed, json.dumps(case.steps), file=protocol)
            started = time.perf_counter()
            outcome = ft.run_case(case)
            elapsed = time.perf_counter() - started
            print("R", seed, outcome.status, f"{elapsed:.4f}", json.dumps(outcome.detail), file=protocol)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: schedule chunks over worker processes, detect hangs and native crashes
# ---------------------------------------------------------------------------------------------
class Running:
    def __init__(self, target: str, seeds: list[int]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.target = target
        self.pending = list(seeds)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", target, ",".join(map(str, seeds))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=str(ROOT),
            env=env,
            start_new_session=True,
        )
        self.buffer = b""
        self.current: int | None = None
        self.current_steps: list[str] = []
        self.started = time.monotonic()
        self.ready = False

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_parent(args: argparse.Namespace) -> int:
    import fuzz_targets as ft

    targets = [t for t in TARGET_ORDER if t in args.targets.split(",")]
    per_target = max(1, args.cases // len(targets))
    chunks: list[tuple[str, list[int]]] = []
    for target in targets:
        seeds = list(range(args.seed_base, args.seed_base + per_target))
        chunks += [(target, seeds[i : i + args.chunk]) for i in range(0, len(seeds), args.chunk)]
    crash_dir = RESULTS / "fuzz-crashes"
    crash_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    selector = selectors.DefaultSelector()
    running: list[Running] = []
    started = time.monotonic()
    done_cases = 0
    total = per_target * len(targets)
    log = open(RESULTS / "fuzz-cases.log", "w") if args.log_cases else None  # noqa: SIM115

    def record(run: Running, seed: int, status: str, seconds: float, detail: str, steps: list[str]) -> None:
        nonlocal done_cases
        done_cases += 1
        row = counts[run.target]
        row["cases"] += 1
        row[status] += 1
        row["seconds"] += seconds
        row["max_seconds"] = max(row["max_seconds"], seconds)
        if log:
            log.write(f"{run.target}:{seed} {status} {seconds:.3f} {detail[:200]!r}\n")
        if status not in ("ok", "clear"):
            name = crash_dir / f"{run.target}-{seed}-{status}.txt"
            name.write_text(
                f"target {run.target}, seed {seed}: {status} ({seconds:.2f} s)\n"
                f"repro: .venv/bin/python benchmarks/bench_fuzz.py --repro {run.target}:{seed}\n\n"
                "mutations:\n" + "\n".join(f"  {ft.shorten(s)}" for s in steps) + f"\n\n{detail}\n"
            )
            last = ft.shorten(detail).strip().splitlines()[-1][:160] if detail.strip() else ""
            print(f"  {status.upper()}: {run.target}:{seed}: {last}", flush=True)
        if done_cases % 250 == 0:
            rate = done_cases / (time.monotonic() - started)
            print(f"[{done_cases}/{total} cases, {rate:.1f}/s]", flush=True)

    def start(target: str, seeds: list[int]) -> None:
        run = Running(target, seeds)
        selector.register(run.process.stdout, selectors.EVENT_READ, run)
        running.append(run)

    def finish(run: Running) -> None:
        selector.unregister(run.process.stdout)
        running.remove(run)
        run.kill()

    queue = list(chunks)
    while queue or running:
        while queue and len(running) < args.jobs:
            start(*queue.pop(0))
        events = selector.select(timeout=0.5)
        for key, _ in events:
            run: Running = key.data
            data = os.read(run.process.stdout.fileno(), 65536)
            if not data:  # worker exited
                finish(run)
                if run.current is not None:
                    code = run.process.returncode
                    detail = f"worker died (exit status {code}, signal {-code if code and code < 0 else '-'})"
                    record(run, run.current, "crash", time.monotonic() - run.started, detail, run.current_steps)
                    rest = [s for s in run.pending if s != run.current]
                    if rest:
                        queue.insert(0, (run.target, rest))
                elif run.pending:
                    queue.insert(0, (run.target, run.pending))
                continue
            run.buffer += data
            while b"\n" in run.buffer:
                line, run.buffer = run.buffer.split(b"\n", 1)
                parts = line.decode().split(" ", 2)
                if parts[0] == "READY":
                    run.ready = True
                    run.started = time.monotonic()
                elif parts[0] == "S":
                    run.current = int(parts[1])
                    run.current_steps = json.loads(parts[2])
                    run.started = time.monotonic()
                elif parts[0] == "R":
                    seed = int(parts[1])
                    status, seconds, detail = parts[2].split(" ", 2)
                    record(run, seed, status, float(seconds), json.loads(detail), run.current_steps)
                    run.pending.remove(seed)
                    run.current = None
        now = time.monotonic()
        for run in list(running):
            limit = args.timeout if run.ready else args.startup_timeout
            if run.current is not None and now - run.started > limit:
                finish(run)
                record(run, run.current, "hang", now - run.started, f"no result after {limit} s", run.current_steps)
                rest = [s for s in run.pending if s != run.current]
                if rest:
                    queue.insert(0, (run.target, rest))
            elif not run.ready and now - run.started > args.startup_timeout:
                finish(run)
                print(f"worker for {run.target} did not start; retrying", flush=True)
                queue.insert(0, (run.target, run.pending))
    if log:
        log.close()

    statuses = ["ok", "clear", "unclear", "crash", "hang", "generror"]
    rows = []
    for target in targets:
        row = counts[target]
        rows.append(
            {
                "target": target,
                "cases": int(row["cases"]),
                **{s: int(row[s]) for s in statuses},
                "mean_ms": round(1000 * row["seconds"] / max(1, row["cases"]), 1),
                "max_s": round(row["max_seconds"], 2),
            }
        )
    totals = {"target": "total", **{k: sum(r[k] for r in rows) for k in ["cases", *statuses]}}
    totals["mean_ms"] = round(sum(r["mean_ms"] * r["cases"] for r in rows) / max(1, totals["cases"]), 1)
    totals["max_s"] = max((r["max_s"] for r in rows), default=0.0)
    rows.append(totals)
    header = ["target", "cases", *statuses, "mean_ms", "max_s"]
    print()
    print("  ".join(f"{h:>9s}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>9s}" for h in header))
    print(f"\n{time.monotonic() - started:.0f} s wall clock; crash repros in {crash_dir.relative_to(ROOT)}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out}")
    return 1 if totals["crash"] or totals["hang"] else 0


def repro(spec: str) -> int:
    import fuzz_targets as ft

    target, seed = spec.split(":")
    with tempfile.TemporaryDirectory(prefix="spineseg-fuzz-repro-") as temp:
        case = ft.TARGETS[target](ft.RandomDraw(f"{target}:{int(seed)}"), ft.fresh_dir(Path(temp) / "c"))
        print("\n".join(case.steps))
        outcome = ft.run_case(case)
        print(f"\n{outcome.status}: {outcome.detail}")
    return 0 if outcome.status in ("ok", "clear") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_500, help="total cases, split evenly over the targets")
    parser.add_argument("--targets", default=",".join(TARGET_ORDER), help="comma-separated targets")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--chunk", type=int, default=250, help="cases per worker process")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "fuzz.csv"))
    parser.add_argument("--log-cases", action="store_true", help="also write results/fuzz-cases.log")
    parser.add_argument("--repro", metavar="TARGET:SEED", help="run one case in this process and print it")
    parser.add_argument("--worker", nargs=2, metavar=("TARGET", "SEEDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], [int(s) for s in args.worker[1].split(",")])
    if args.repro:
        return repro(args.repro)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
