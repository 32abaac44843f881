"""Kill -9 fault injection shared by ``tests/test_faults.py`` and ``benchmarks/bench_faults.py``.

A scenario starts a real process that writes files (``spineseg segment``, ``spineseg train``, or a
loop of ``write_labels`` / ``save_model`` calls alternating two contents), kills it with SIGKILL at a
random moment around its writes, and classifies every target file:

* ``old``: byte-identical to the complete file that was there before the process started;
* ``new``: a complete new file (byte-identical to a reference write, or loading and passing its
  own integrity checks where the content legitimately varies, e.g. a training checkpoint);
* ``absent``: not written yet (only for files that did not exist before);
* ``corrupt``: anything else (the property: never).

Half of the kills are timed blind (a random delay across the calibrated run), half are triggered
when a temporary file of an atomic write appears (plus a random delay up to the measured write
time), so that many land in the middle of a write.  Temporary files left by a kill are counted
(``leftovers``); they are always dot-files named ``.<target>.<pid>.<random>.part<suffix>`` that no
reader lists, and the next write of that target removes them once stale.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEMP_NAME = re.compile(r"^\..+\.part(\.[A-Za-z.]+)?$|^\..+\.(mhd|nhdr)\.[^.]+$")

_LABELS_LOOP = r"""
import sys
import numpy as np
from napari_spineseg.io import write_labels
from napari_spineseg.volume import Volume
path, shape = sys.argv[1], tuple(int(v) for v in sys.argv[2].split(","))
rng = np.random.default_rng(0)
contents = [Volume.from_array(rng.integers(0, 5, shape).astype(np.uint8)),
            Volume.from_array(rng.integers(0, 5, shape).astype(np.uint8))]
if len(sys.argv) > 3:  # the calibration run writes the two references first
    write_labels(contents[0], sys.argv[3])
    write_labels(contents[1], sys.argv[4])
print("ready", flush=True)
i = 0
while True:
    write_labels(contents[i % 2], path)
    i += 1
"""

_MODEL_LOOP = r"""
import sys
import torch
from napari_spineseg.modelfile import ModelMetadata, save_model
from napari_spineseg.models import build_model
torch.set_num_threads(1)
path, base = sys.argv[1], int(sys.argv[2])
networks = []
for seed in (1, 2):
    torch.manual_seed(seed)
    networks.append(build_model("unet", in_channels=1, num_classes=5, base=base, depth=3))
def meta(net, name):
    return ModelMetadata(name, "unet", net.arch_kwargs, training={"saved": "fixed"})
if len(sys.argv) > 3:  # the calibration run writes the two references first
    save_model(networks[0], meta(networks[0], "a"), sys.argv[3])
    save_model(networks[1], meta(networks[1], "b"), sys.argv[4])
print("ready", flush=True)
i = 0
while True:
    save_model(networks[i % 2], meta(networks[i % 2], "ab"[i % 2]), path)
    i += 1
"""


def _python() -> str:
    return sys.executable


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


@dataclass
class Trial:
    scenario: str
    mode: str  # "blind" or "on-temp" (during the k-th write, k random)
    delay: float  # seconds after start (blind) or after the temporary file appeared (on-temp)
    killed: bool  # False when the process had already finished
    files: dict[str, str] = field(default_factory=dict)  # target name -> old/new/absent/corrupt
    leftovers: list[str] = field(default_factory=list)
    mid_write: bool = False  # a temporary file existed at the moment of the kill
    seconds: float = 0.0


@dataclass
class Scenario:
    """How to start a writer, which files to watch and how to judge them."""

    name: str
    argv: list[str]
    env: dict[str, str]
    folder: Path  # where the targets (and their temporary files) live
    targets: list[Path]
    old: dict[Path, bytes | None]  # content restored before each trial (None: absent)
    is_new: Callable[[Path, bytes], bool]
    ready_line: bool = False  # the process prints "ready" once imports are done
    blind_window: tuple[float, float] = (0.0, 1.0)  # seconds after start / after "ready"
    write_seconds: float = 0.2  # typical duration of one write (for on-temp kills)
    writes: int = 1  # writes seen in the calibration run (on-temp kills pick one of them)

    def restore(self) -> None:
        for entry in list(self.folder.iterdir()):
            if entry.name.startswith("."):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for path, content in self.old.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)

    def judge(self, path: Path) -> str:
        old = self.old.get(path)
        if not path.exists():
            return "absent" if old is None else "corrupt"
        data = path.read_bytes()
        if old is not None and data == old:
            return "old"
        return "new" if self.is_new(path, data) else "corrupt"


def _temporaries(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if TEMP_NAME.match(e.name))
    except OSError:
        return []


def _start(scenario: Scenario) -> tuple[subprocess.Popen, float]:
    process = subprocess.Popen(
        scenario.argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if scenario.ready_line else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=scenario.env,
        cwd=str(scenario.folder),
        start_new_session=True,
    )
    origin = time.monotonic()
    if scenario.ready_line:
        assert process.stdout is not None
        if b"ready" not in process.stdout.readline():
            os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"{scenario.name}: the writer did not start")
        origin = time.monotonic()
    return process, origin


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    if process.stdout is not None:
        process.stdout.close()


def calibrate(scenario: Scenario, seconds: float = 2.0, extra: list[str] | None = None) -> Scenario:
    """Watch one uninterrupted run (loops: ``seconds`` of it) to time the writes and set the kill windows.

    The run also produces the references: ``extra`` arguments make a loop write its two contents
    first; a one-shot command leaves its complete outputs.
    """
    scenario.restore()
    argv = scenario.argv
    scenario.argv = [*argv, *(extra or [])]
    try:
        process, origin = _start(scenario)
    finally:
        scenario.argv = argv
    episodes: list[list[float]] = []
    try:
        while process.poll() is None and (not scenario.ready_line or time.monotonic() - origin < seconds):
            now = time.monotonic() - origin
            if _temporaries(scenario.folder):
                if episodes and now - episodes[-1][1] < 0.003:
                    episodes[-1][1] = now
                else:
                    episodes.append([now, now])
            time.sleep(0.0005)
        end = time.monotonic() - origin
    finally:
        _stop(process)
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{scenario.name}: the uninterrupted run failed ({process.returncode})")
    if not episodes:
        raise RuntimeError(f"{scenario.name}: no write was seen while calibrating")
    spans = sorted(b - a for a, b in episodes)
    scenario.write_seconds = max(0.005, spans[len(spans) // 2])
    scenario.writes = min(len(episodes), 4) if scenario.ready_line else len(episodes)
    if scenario.ready_line:  # a loop: kill within the first few writes
        scenario.blind_window = (0.0, min(seconds, episodes[0][1] + 4 * (episodes[0][1] + 0.01)))
    else:  # one run: from half-way to the first write until the process ends
        scenario.blind_window = (0.5 * episodes[0][0], end + 0.05)
    return scenario


def run_trial(scenario: Scenario, rng: random.Random, mode: str | None = None) -> Trial:
    """Start the writer, SIGKILL it at a random moment, judge every target file."""
    scenario.restore()
    mode = mode or rng.choice(["blind", "on-temp"])
    started = time.monotonic()
    process, origin = _start(scenario)
    try:
        if mode == "blind":
            delay = rng.uniform(*scenario.blind_window)
            while time.monotonic() - origin < delay and process.poll() is None:
                time.sleep(0.002)
        else:
            limit = origin + scenario.blind_window[1] + 30.0
            wanted, seen = rng.randint(1, scenario.writes), set()  # kill during the k-th write
            while len(seen) < wanted and process.poll() is None and time.monotonic() < limit:
                seen.update(_temporaries(scenario.folder))
                time.sleep(0.0005)
            delay = rng.uniform(0.0, 1.2 * scenario.write_seconds)
            until = time.monotonic() + delay
            while time.monotonic() < until and process.poll() is None:
                time.sleep(0.001)
        killed = process.poll() is None
        mid_write = bool(_temporaries(scenario.folder)) if killed else False
    finally:
        _stop(process)
    trial = Trial(scenario.name, mode, round(delay, 4), killed, mid_write=mid_write)
    trial.files = {p.name: scenario.judge(p) for p in scenario.targets}
    trial.leftovers = _temporaries(scenario.folder)
    trial.seconds = time.monotonic() - started
    return trial


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------
def labels_loop(work: Path, shape: tuple[int, int, int] = (32, 128, 128)) -> Scenario:
    """A process writing two label maps alternately over ``labels.nii.gz`` (``write_labels``)."""
    return _loop(work, "write_labels loop", _LABELS_LOOP, "labels.nii.gz", ",".join(map(str, shape)))


def model_loop(work: Path, base: int = 16) -> Scenario:
    """A process saving two models alternately over ``model.safetensors`` (``save_model``)."""
    return _loop(work, "save_model loop", _MODEL_LOOP, "model.safetensors", str(base))


def _loop(work: Path, name: str, script: str, file_name: str, argument: str) -> Scenario:
    folder = work / "files"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    refs = [work / f"a-{file_name}", work / f"b-{file_name}"]
    references: list[bytes] = []
    scenario = Scenario(
        name,
        [_python(), "-c", script, str(target), argument],
        _env(),
        folder,
        [target],
        {},
        lambda path, data: data in references,
        ready_line=True,
    )
    calibrate(scenario, extra=[str(r) for r in refs])
    references += [r.read_bytes() for r in refs]
    scenario.old = {target: references[0]}
    return scenario


def _study(path: Path, shape: tuple[int, int, int]) -> None:
    from scipy import ndimage

    from napari_spineseg.io import write_volume
    from napari_spineseg.volume import Volume

    rng = np.random.default_rng(3)
    array = ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)
    write_volume(Volume.from_array(array, spacing=(1.0, 1.0, 2.0), origin=(-40.0, 10.0, 5.0)), path)


def _tiny_model(path: Path) -> None:
    import torch

    from napari_spineseg.modelfile import ModelMetadata, save_model
    from napari_spineseg.models import build_model

    torch.manual_seed(0)
    network = build_model("unet", in_channels=1, num_classes=5, base=4, depth=2)
    save_model(network, ModelMetadata("tiny", "unet", network.arch_kwargs, training={"saved": "fixed"}), path)


def segment_cli(work: Path, shape: tuple[int, int, int] = (40, 128, 128)) -> Scenario:
    """``spineseg segment`` writing labels and an uncertainty map over the outputs of an earlier run."""
    from napari_spineseg.io import read_volume, write_labels, write_volume

    folder = work / "segment"
    folder.mkdir(parents=True, exist_ok=True)
    study = work / "study.nii.gz"
    _study(study, shape)
    model = work / "tiny.safetensors"
    _tiny_model(model)
    labels, uncertainty = folder / "study_seg.nii.gz", folder / "study_unc.nii.gz"
    argv = [_python(), "-m", "napari_spineseg.cli", "segment", str(study), "-o", str(labels)]
    argv += ["--model", str(model), "--device", "cpu", "--uncertainty", str(uncertainty), "-q", "--overwrite"]
    env = _env({"SPINESEG_MODEL_DIR": str(work / "user-models")})
    new: dict[Path, bytes] = {}
    scenario = Scenario(
        "spineseg segment", argv, env, folder, [labels, uncertainty], {}, lambda path, data: data == new[path]
    )
    calibrate(scenario)  # the uninterrupted run: its outputs are the new content
    new.update({labels: labels.read_bytes(), uncertainty: uncertainty.read_bytes()})
    reference = read_volume(labels)  # the old content: complete files of the same names, other voxels
    write_labels(reference.with_array(np.zeros_like(reference.array)), labels)
    write_volume(read_volume(uncertainty).with_array(np.ones(reference.shape, np.float32)), uncertainty)
    scenario.old = {labels: labels.read_bytes(), uncertainty: uncertainty.read_bytes()}
    return scenario


def train_cli(work: Path, steps: int = 6) -> Scenario:
    """``spineseg train`` on one phantom: best model and resume checkpoint written every 2 steps."""
    folder = work / "train"
    folder.mkdir(parents=True, exist_ok=True)
    model, resume = folder / "model.safetensors", folder / "model.resume.safetensors"
    argv = [_python(), "-m", "napari_spineseg.cli", "train", "--phantoms", "1", "--steps", str(steps)]
    argv += ["--val-every", "2", "--crop", "32", "--batch-size", "1", "--threads", "1", "--device", "cpu"]
    argv += ["-o", str(model), "-q"]
    env = _env({"SPINESEG_MODEL_DIR": str(work / "user-models")})

    def is_new(path: Path, data: bytes) -> bool:
        from napari_spineseg.errors import SpinesegError
        from napari_spineseg.modelfile import load_model
        from napari_spineseg.training.loop import load_resume_state

        try:
            load_model(path) if path == model else load_resume_state(path)
        except SpinesegError:
            return False
        return True

    scenario = Scenario("spineseg train", argv, env, folder, [model, resume], {}, is_new)
    calibrate(scenario)  # leaves a complete model: the old file of every trial; no checkpoint yet
    scenario.old = {model: model.read_bytes(), resume: None}
    return scenario


def summarise(trials: list[Trial]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(t.scenario for t in trials):
        group = [t for t in trials if t.scenario == name]
        states = [s for t in group for s in t.files.values()]
        rows.append(
            {
                "scenario": name,
                "trials": len(group),
                "killed": sum(t.killed for t in group),
                "killed_mid_write": sum(t.mid_write for t in group),
                "files_checked": len(states),
                "old": states.count("old"),
                "new": states.count("new"),
                "absent": states.count("absent"),
                "corrupt": states.count("corrupt"),
                "temp_leftovers": sum(len(t.leftovers) for t in group),
                "mean_s": round(sum(t.seconds for t in group) / max(1, len(group)), 2),
            }
        )
    return rows


def dump(trials: list[Trial]) -> str:
    return "\n".join(json.dumps(t.__dict__) for t in trials)
