"""Inference benchmarks: throughput per architecture and precision, three-plane study times,
peak memory on a 512³ study, and MONAI's SliceInferer (fp32) on the same network as the peer.

Run: ``.venv/bin/python benchmarks/bench_inference.py [--quick]``; prints tables and writes
``benchmarks/results/inference.csv``.  With CUDA present the GPU rows come first (``--gpu-only``:
nothing else; written to ``--gpu-out``): the bundled default model on a phantom study scaled to
224×224×77, 320×320×200 and 512³, host path against the device-resident path, seconds with and
without post-processing, slices/s, peak device memory and the two paths' label agreement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from results_csv import write_csv

from napari_spineseg.inference import Predictor, SegmentationSettings, cpu_supports_bf16
from napari_spineseg.modelfile import LoadedModel, ModelMetadata
from napari_spineseg.models import build_model
from napari_spineseg.models.fused import fuse_for_inference
from napari_spineseg.volume import Volume

RESULTS = Path(__file__).parent / "results"
PIR = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
DEFAULT_ARCH = ("unet", {"base": 16, "depth": 4})
ARCHITECTURES = [
    ("unet", {"base": 16, "depth": 4}),
    ("unet-leaky", {"base": 16, "depth": 4}),
    ("attention-unet", {"base": 16, "depth": 4}),
    ("resunet", {"base": 16, "depth": 4}),
    ("vgg19-unet", {}),
    ("fcn-resnet50", {}),
    ("penn", {}),
]


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def matmul_ceiling(precision: str, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul: the machine's practical ceiling for this precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_batch(network: torch.nn.Module, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(batch)
    return float(counter.get_total_flops())


def slice_throughput(
    name: str, kwargs: dict, precision: str, fused: bool = True, batch: int = 8, size: int = 256
) -> dict:
    """Slices/s of one architecture, run as the Predictor runs it (``fused``: the inference copy)."""
    network = build_model(name, in_channels=3, num_classes=5, **kwargs).eval()
    x = torch.randn(batch, 3, size, size)
    flops = flops_per_batch(network, torch.randn(1, 3, size, size)) * batch
    params = _params(network)
    if fused:
        network = fuse_for_inference(network, torch.bfloat16 if precision == "bf16" else torch.float32)
    if precision == "bf16":
        network = network.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(precision):
        network(x)
        repeats, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0 or repeats < 2:
            network(x)
            repeats += 1
    seconds = (time.perf_counter() - start) / repeats
    return {"slices_per_s": batch / seconds, "gflops": flops / seconds / 1e9, "params_m": params}


def _params(network: torch.nn.Module) -> float:
    return sum(p.numel() for p in network.parameters()) / 1e6


def default_model(pixel_spacing: float | None = 1.0) -> LoadedModel:
    name, kwargs = DEFAULT_ARCH
    network = build_model(name, in_channels=3, num_classes=5, **kwargs).eval()
    metadata = ModelMetadata(
        "bench", name, network.arch_kwargs, context_slices=1, preprocess={"pixel_spacing_mm": pixel_spacing}
    )
    return LoadedModel(network, metadata)


def study(shape_zyx: tuple[int, int, int], spacing: float = 1.0) -> Volume:
    rng = np.random.default_rng(0)
    return Volume.from_array(
        rng.random(shape_zyx, dtype=np.float32) * 500, spacing=(spacing,) * 3, direction=PIR, name="bench"
    )


def three_plane_seconds(shape_zyx: tuple[int, int, int], precision: str, repeats: int = 2) -> float:
    predictor = Predictor(SegmentationSettings(precision=precision, batch_size=16, postprocess=False))
    predictor.load(default_model())
    volume = study(shape_zyx)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(volume)
        best = min(best, time.perf_counter() - start)
    return best


def monai_slice_inferer_seconds(shape_zyx: tuple[int, int, int]) -> float:
    """The peer: MONAI SliceInferer (fp32, one plane at a time, summed), same network, 1 channel."""
    from monai.inferers import SliceInferer

    name, kwargs = DEFAULT_ARCH
    network = build_model(name, in_channels=1, num_classes=5, **kwargs).eval()
    volume = torch.from_numpy(study(shape_zyx).array)[None, None]
    start = time.perf_counter()
    with torch.inference_mode():
        for spatial_dim in range(3):
            roi = [s for i, s in enumerate(volume.shape[2:]) if i != spatial_dim]
            inferer = SliceInferer(roi_size=roi, sw_batch_size=16, spatial_dim=spatial_dim, progress=False)
            inferer(volume, network)
    return time.perf_counter() - start


def peak_rss_512(precision: str) -> float:
    """Peak RSS (GB) of a separate process segmenting a 512³ study."""
    code = (
        f"import resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "from bench_inference import *;"
        f"p = Predictor(SegmentationSettings(precision={precision!r}, batch_size=8, postprocess=False));"
        "p.load(default_model()); p.predict(study((512, 512, 512)));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024 / 1024


GPU_SHAPES = [(77, 224, 224), (200, 320, 320), (512, 512, 512)]


def phantom_study(shape_zyx: tuple[int, int, int]) -> Volume:
    """The default phantom (224×224×77) scaled trilinearly to ``shape_zyx`` over the same field of view."""
    import torch.nn.functional as F

    from napari_spineseg.phantom import make_phantom

    image = make_phantom(seed=0).image
    scale = [a / b for a, b in zip(image.shape, shape_zyx)]
    spacing_xyz = tuple(s * f for s, f in zip(image.spacing, scale[::-1]))
    source = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None, None]
    if tuple(shape_zyx) != tuple(image.shape):
        source = F.interpolate(source, size=shape_zyx, mode="trilinear", align_corners=False)
    return Volume.from_array(source[0, 0].numpy(), spacing=spacing_xyz, direction=image.direction, name="phantom")


def device_rows(device: str, shapes, precision: str = "auto") -> list[dict]:
    """Host path against the device-resident path on ``device`` (the bundled default model): the best
    of two runs (one for studies over 10 M voxels), after a warm-up run of each path."""
    from napari_spineseg.modelfile import load_model

    model = load_model("spineseg-default")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    rows = []
    print(f"\n{name}: {'study':13s} {'path':8s} {'s +post':>8s} {'s':>7s} {'slices/s':>9s} {'peak GB':>8s} agree")
    warm_up = phantom_study(shapes[0])
    for resident in (False, True):
        predictor = Predictor(SegmentationSettings(device=device, precision=precision, resident=resident))
        predictor.load(model)
        predictor.predict(warm_up)
    for shape in shapes:
        volume = phantom_study(shape)
        label = "x".join(str(s) for s in shape[::-1])
        repeats = 2 if np.prod(shape) < 10_000_000 else 1
        labels = {}
        for resident in (False, True):
            timed = {}
            for post in (True, False):
                predictor = Predictor(SegmentationSettings(device=device, precision=precision, resident=resident))
                predictor.settings.postprocess = post
                predictor.load(model)
                best = float("inf")
                for _ in range(repeats):
                    _synchronise(device, reset=True)
                    start = time.perf_counter()
                    result = predictor.predict(volume)
                    _synchronise(device)
                    best = min(best, time.perf_counter() - start)
                timed[post] = best
                if post:
                    labels[resident] = result.labels.array
            peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else float("nan")
            row = {
                "kind": "device",
                "device": name,
                "path": "resident" if resident else "host",
                "precision": predictor.precision,
                "shape": label,
                "seconds_post": timed[True],
                "seconds": timed[False],
                "slices_per_s": sum(shape) / timed[False],
                "peak_device_gb": peak,
            }
            if resident:
                row["agreement"] = float((labels[True] == labels[False]).mean())
            rows.append(row)
            print(
                f"{name}: {label:13s} {row['path']:8s} {row['seconds_post']:8.2f} {row['seconds']:7.2f}"
                f" {row['slices_per_s']:9.0f} {peak:8.2f} {row.get('agreement', '')}"
            )
    return rows


def _synchronise(device: str, reset: bool = False) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def write_rows(rows: list[dict], path: Path) -> None:
    write_csv(rows, path, fieldnames=sorted({k for row in rows for k in row}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="default network only, skip 320x320x200 and 512^3")
    parser.add_argument("--gpu-only", action="store_true", help="only the device rows (CUDA, or --device)")
    parser.add_argument("--device", default=None, help="device of the device rows (default: cuda when present)")
    parser.add_argument("--shapes", default=None, help="device rows' studies, e.g. 224x224x77,512x512x512")
    parser.add_argument("--gpu-out", default=str(RESULTS / "inference_gpu.csv"))
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is not None:
        shapes = GPU_SHAPES
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split("x"))[::-1] for s in args.shapes.split(",")]
        write_rows(device_rows(device, shapes), Path(args.gpu_out))
    if args.gpu_only:
        return
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    rows = []
    ceilings = {p: matmul_ceiling(p) for p in precisions}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bf16 native: {cpu_supports_bf16()}")
    print("matmul ceiling GFLOP/s: " + ", ".join(f"{p} {v:.0f}" for p, v in ceilings.items()))
    print(
        f"\n{'architecture':16s} {'prec':5s} {'layers':6s} {'params M':>8s} {'slices/s @256²':>15s}"
        f" {'GFLOP/s':>8s} {'% ceiling':>9s}"
    )
    for name, kwargs in ARCHITECTURES[:1] if args.quick else ARCHITECTURES:
        for precision in precisions:
            # "plain" = the network as trained; "fused" = the inference copy the Predictor runs
            for layers in ("plain", "fused") if name == DEFAULT_ARCH[0] else ("fused",):
                r = slice_throughput(name, kwargs, precision, fused=layers == "fused")
                share = 100 * r["gflops"] / ceilings[precision]
                speed = f"{r['params_m']:8.2f} {r['slices_per_s']:15.1f} {r['gflops']:8.1f} {share:8.0f}%"
                print(f"{name:16s} {precision:5s} {layers:6s} {speed}")
                rows.append(
                    {
                        "kind": "throughput",
                        "architecture": name,
                        "precision": precision,
                        "layers": layers,
                        **r,
                        "ceiling": ceilings[precision],
                    }
                )
    print(f"\n{'study':14s} {'prec':5s} {'3 planes s':>10s}")
    shapes = [(77, 224, 224)] if args.quick else [(77, 224, 224), (200, 320, 320)]
    for shape in shapes:
        for precision in precisions:
            seconds = three_plane_seconds(shape, precision)
            label = "x".join(str(s) for s in shape[::-1])
            print(f"{label:14s} {precision:5s} {seconds:10.2f}")
            rows.append(
                {
                    "kind": "study",
                    "architecture": DEFAULT_ARCH[0],
                    "precision": precision,
                    "shape": label,
                    "seconds": seconds,
                }
            )
    peer = monai_slice_inferer_seconds((77, 224, 224))
    ours = min(r["seconds"] for r in rows if r.get("shape") == "224x224x77")
    print(
        f"\nMONAI SliceInferer fp32 (peer), 224x224x77, 3 planes: {peer:.2f} s; ours {ours:.2f} s ({peer / ours:.1f}x)"
    )
    rows.append(
        {
            "kind": "peer",
            "architecture": "monai-sliceinferer",
            "precision": "fp32",
            "shape": "224x224x77",
            "seconds": peer,
        }
    )
    if not args.quick:
        for precision in precisions[-1:]:
            gb = peak_rss_512(precision)
            print(f"512^3 three planes, {precision}: peak RSS {gb:.2f} GB")
            rows.append({"kind": "memory", "precision": precision, "shape": "512x512x512", "peak_rss_gb": gb})
    write_rows(rows, RESULTS / "inference.csv")
    (RESULTS / "inference.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
