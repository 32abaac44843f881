"""Ablation harness for the fine-tuning defaults: the unseen-study experiment of
``bench_finetune.py`` (VB1-07, three corrected sagittal slices, fixed set VB3-01 + IVD-11) with
FinetuneConfig overrides, recording at every evaluation the fixed-set and corrections Dice and,
for analysis only (never used to choose), the held-out test Dice.

    python benchmarks/ablate_finetune.py --name lr3e4 --test-every --set lr=3e-4

Appends one JSON line per run to ``$ABLATION_OUT`` (default /tmp/finetune-ablation.jsonl); the
runs behind ``results/finetune-ablation.csv`` were made with it.
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_finetune as B

from napari_spineseg.augment import IGNORE
from napari_spineseg.metrics import dice_score
from napari_spineseg.modelfile import LoadedModel, load_model, resolve_model
from napari_spineseg.orientation import Plane, plane_array_axis
from napari_spineseg.schema import VERTEBRAL_BODY
from napari_spineseg.training import finetune as F
from napari_spineseg.training import loop as L
from napari_spineseg.training.data import load_lumbar_dataset

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--exp", default="unseen")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--val-every", type=int, default=50)
p.add_argument("--test-every", action="store_true")
p.add_argument("--set", action="append", default=[])
a = p.parse_args()
torch.set_num_threads(1)
overrides = {}
for s in a.set:
    k, v = s.split("=", 1)
    overrides[k] = json.loads(v)
base_path = resolve_model("spineseg-default")
base = load_model(base_path)
fixed = load_lumbar_dataset(B.DATA, ("VB3", "IVD"), cases=B.FIXED)
refs = load_lumbar_dataset(B.DATA, ("VB3", "IVD"), cases=B.REFERENCES)
config = F.FinetuneConfig(
    **{"steps": a.steps, "batch_size": 8, "crop_size": 256, "val_every": a.val_every, "num_threads": 1, **overrides}
)

captured = {}
orig_train = L.train


def train(*args, **kw):
    captured["net"] = kw.get("network")
    return orig_train(*args, **kw)


L.train = train


def snapshot_model(meta):
    net = copy.deepcopy(captured["net"]).cpu()
    F._unfreeze_batchnorm(net)
    F._fuse_new_rows(net)
    net.eval()
    return LoadedModel(net, meta)


t0 = time.time()
out = {"name": a.name, "overrides": overrides, "exp": a.exp}
if a.exp == "unseen":
    trained = set(base.metadata.training.get("train_cases") or [])
    (study,) = load_lumbar_dataset(B.DATA, ("VB1",), cases=["VB1-07"])
    image, truth = study.image, study.labels.array
    pred = B.predict(base, image)
    axis = plane_array_axis(image.geometry, Plane.SAGITTAL)
    others = tuple(x for x in range(3) if x != axis)
    wb = np.flatnonzero((truth == VERTEBRAL_BODY).any(axis=others))
    chosen = [int(wb[len(wb) * q // 4]) for q in (1, 2, 3)]
    corrected = pred.copy()
    for i in chosen:
        sl = B.take(axis, i)
        region, gt, fs = truth[sl] != IGNORE, truth[sl], corrected[sl]
        fs[region & (gt == VERTEBRAL_BODY)] = VERTEBRAL_BODY
        fs[region & (gt != VERTEBRAL_BODY) & (fs == VERTEBRAL_BODY)] = 0
    pair = F.CorrectionPair(
        image, image.with_array(corrected), image.with_array(pred), known_classes={VERTEBRAL_BODY}, name="VB1-07"
    )
    keep = truth != IGNORE
    for i in chosen:
        keep[B.take(axis, i)] = False

    def test(p):
        return dice_score((p == VERTEBRAL_BODY) & keep, (truth == VERTEBRAL_BODY) & keep)

    out["test_before"] = test(pred)
    cfg = config
else:
    raise SystemExit("only unseen here")

gen = F.finetune(base_path, [pair], cfg, reference_cases=refs, fixed_validation=fixed)
traj, stamps = [], []
while True:
    try:
        ev = next(gen)
    except StopIteration as stop:
        res = stop.value
        break
    if ev.kind == "step":
        stamps.append(time.perf_counter())
        if ev.step % 50 == 0:
            print(f"step {ev.step} loss {ev.loss:.3f} t={time.time() - t0:.0f}", file=sys.stderr, flush=True)
    elif ev.kind == "validation":
        rec = {"step": ev.step, **(ev.val_dice or {})}
        if a.test_every and ev.step != a.steps:
            rec["test"] = test(B.predict(snapshot_model(base.metadata), image))
        traj.append(rec)
        print("VAL", json.dumps(rec), file=sys.stderr, flush=True)
after_pred = B.predict(LoadedModel(res.network, res.metadata), image)
out["test_after"] = test(after_pred)
out["gain"] = 100 * (out["test_after"] - out["test_before"])
out["fixed_before"] = res.before["fixed_validation"]
out["fixed_after"] = res.after["fixed_validation"]
out["forget"] = {
    k: round(100 * (res.after["fixed_validation"][k] - v), 2) for k, v in res.before["fixed_validation"].items()
}
out["corr_before"] = res.before["corrections"]
out["corr_after"] = res.after["corrections"]
out["traj"] = traj
out["s_per_step"] = float(np.median(np.diff(stamps)))
out["history_steps"] = [h["step"] for h in res.history]
out["wall"] = time.time() - t0

print(json.dumps(out))
with open(os.environ.get("ABLATION_OUT", "/tmp/finetune-ablation.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")
