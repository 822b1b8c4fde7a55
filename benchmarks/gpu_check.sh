#!/usr/bin/env bash
# One-shot GPU check: run every GPU test, the GPU benchmark suite and the default deploy, and keep
# everything in one results folder. For a person with an NVIDIA GPU; nothing here runs in CI.
#
#   pip install -e ".[gpu,dev,bench]"        # tensorrt, cuda-python, onnxruntime-gpu, pytest, matplotlib
#   benchmarks/gpu_check.sh [RESULTS_DIR]    # default: benchmarks/results/gpu-check-<host>-<UTC time>
#
# Steps (each logged with its command, exit status and duration in RESULTS_DIR/steps.tsv):
#   environment  nvidia-smi, Python/TensorRT/cuda-python/torch/onnxruntime versions, pip freeze
#   preflight    stops here, with the reason, unless tensorrt imports and a CUDA device is visible
#   pytest-gpu   python -m pytest -m gpu -v (every GPU test of the suite; junit XML kept)
#   bench        python -m vitdeploy bench --suite gpu -o RESULTS_DIR/bench
#   deploy       python -m vitdeploy deploy (the default model), run inside RESULTS_DIR/deploy
# Exit status: 0 when every step passed, 1 otherwise. Set PYTHON to pick the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu-check-$(hostname -s 2>/dev/null || echo host)-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/deploy"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
printf 'step\texit\tseconds\tcommand\n' > "$OUT/steps.tsv"
status=0

step() {
    local name=$1 start rc
    shift
    echo "=== $name: $*"
    start=$(date +%s)
    "$@"
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$*" >> "$OUT/steps.tsv"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

environment() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "host: $(hostname)"
        echo "git: $(git rev-parse --verify -q HEAD || echo 'no commit') + $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
        if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not installed"; fi
        "$PY" - <<'PYCODE'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), platform.platform())
for name in ("tensorrt", "cuda.bindings", "torch", "onnxruntime", "onnx", "numpy", "vitdeploy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "not importable:", error)
try:
    import torch
    print("torch.cuda", torch.version.cuda, torch.cuda.is_available())
except Exception as error:
    print("torch.cuda not available:", error)
PYCODE
    } > "$OUT/environment.txt" 2>&1
    "$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null
    cat "$OUT/environment.txt"
}

preflight() {
    "$PY" - <<'PYCODE'
import sys
from vitdeploy.runtimes.tensorrt import TensorRTUnavailable, cuda_device_info, import_tensorrt
try:
    trt = import_tensorrt()
    gpu = cuda_device_info(0)
except TensorRTUnavailable as error:
    sys.exit(f"gpu_check: {error}")
print(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability})")
PYCODE
}

deploy() {
    (cd "$OUT/deploy" && "$PY" -m vitdeploy deploy)
}

step environment environment
if ! step preflight preflight; then
    echo "gpu_check: no TensorRT/GPU here; nothing else was run (see $OUT/gpu_check.log)"
    exit 1
fi
step pytest-gpu "$PY" -m pytest -m gpu -v -rs --junitxml "$OUT/pytest-gpu.xml" tests
step bench "$PY" -m vitdeploy bench --suite gpu -o "$OUT/bench"
step deploy deploy

echo
echo "gpu_check: results in $OUT"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
exit "$status"
