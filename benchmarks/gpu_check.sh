#!/usr/bin/env bash
# GPU check of issue #21, for a session that HAS a CUDA machine (torch + CUDA; SimpleITK and napari
# are not needed).  Run from the repository root; writes CSVs and logs under $OUT (default
# benchmarks/output/gpu).  About 5-8 minutes on an H200; each step has its own time limit.
#
# Before (on the CPU machine, which has SimpleITK and the data):
#   .venv/bin/python scripts/pack_training_data.py -o benchmarks/output/cases.npz --margin-mm 25   # ~49 MiB
# The package imports monai (models/unet.py), scipy, safetensors and tqdm; when the GPU machine lacks
# them (it cannot reach a registry), install them beside the cases and carry them too:
#   .venv/bin/pip install --no-deps --target benchmarks/output/pydeps monai safetensors tqdm
# Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600,
#       carry=["benchmarks/output/cases.npz", "benchmarks/output/pydeps"])
# and commit the CSVs (benchmarks/results/inference_gpu.csv, training_gpu.csv) with the machine named.
#
# Steps: (1) what the machine is and which packages it has; (2) inference rows: the bundled default
# model on a phantom scaled to 224x224x77, 320x320x200 and 512^3, host path against the device-resident path, seconds with and without
# post-processing, slices/s, peak device memory, label agreement; (3) training samples/s of the
# default recipe from the packed cases, 0 workers against auto (min(12, cores - 2)).
set -uo pipefail
OUT=${OUT:-benchmarks/output/gpu}
PY=${PYTHON:-python}
CASES=${CASES:-benchmarks/output/cases.npz}
mkdir -p "$OUT"
PYDEPS="$PWD/benchmarks/output/pydeps"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$PYDEPS" ] && export PYTHONPATH="$PYTHONPATH:$PYDEPS"  # after the machine's own packages
export PYTHONUNBUFFERED=1

{
  date -u
  nproc
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  for module in numpy scipy safetensors monai tqdm SimpleITK napari; do
    $PY -c "import $module; print('$module', getattr($module, '__version__', 'present'))" 2>/dev/null \
      || echo "$module missing"
  done
} 2>&1 | tee "$OUT/machine.txt"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA here: nothing to measure" | tee -a "$OUT/machine.txt"
  exit 2
fi

# (2) inference rows (GPU only)
timeout 330 $PY benchmarks/bench_inference.py --gpu-only --gpu-out "$OUT/inference_gpu.csv" 2>&1 \
  | tee "$OUT/inference_gpu.log"
echo "inference rc ${PIPESTATUS[0]}" | tee -a "$OUT/inference_gpu.log"

# (3) training samples/s from the packed cases (no SimpleITK needed)
if [ -f "$CASES" ]; then
  timeout 200 $PY benchmarks/bench_training.py --data "$CASES" --workers 0,auto --steps 60 --warmup 10 \
    --device cuda --out "$OUT/training_gpu.csv" 2>&1 | tee "$OUT/training_gpu.log"
  echo "training rc ${PIPESTATUS[0]}" | tee -a "$OUT/training_gpu.log"
else
  echo "no $CASES: training rows skipped (pack it first, see the top of this script)" | tee "$OUT/training_gpu.log"
fi
ls -la "$OUT"
