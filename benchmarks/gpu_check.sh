#!/usr/bin/env bash
# The device check for a session lent a GPU machine (PyTorch with CUDA, onnxruntime CPU, maybe no TensorRT,
# no network): one call of at most 8 minutes (the step limits add up to 470 s) that writes everything under
# benchmarks/results/gpu/.
#
#   benchmarks/gpu_check.sh [--dry-run] [RESULTS_DIR]     # default RESULTS_DIR: benchmarks/results/gpu
#
# Steps, each with its own time limit (seconds), logged with command, exit status and duration in steps.tsv:
#   environment  (30)   environment.json: CPU, GPU (nvidia-smi), versions, torch CUDA
#   parity       (100)  parity.json: torch runtime on CUDA, fp32/fp16/bf16 under the precision policy, vs CPU
#                       eager on the bundled photos at three shapes (vit_small_patch16_224, random weights)
#   peaks        (30)   peaks.json: dense matmul peaks, fp32 (no TF32), fp16, bf16, CUDA events
#   torch-suite  (220)  torch-suite/: vitdeploy bench, eager fp32/fp16 and torch.compile fp16, ViT-S/16 and
#                       ViT-B/16, batch 1/32/128, 224 and 384, CUDA events on each runtime's own stream
#   tensorrt     (90)   tensorrt.json: where `import tensorrt` works, tests/test_tensorrt_gpu.py and a TensorRT
#                       fp16 bench point; elsewhere "not run" with the reason
# --dry-run runs every step on the CPU with vit_tiny at 32-64 px in under a minute (tests/test_gpu_check.py);
# there torch.compile runs with TORCHDYNAMO_DISABLE=1 (its call path, not the compiler).
# Exit status: 0 when every step passed, 1 otherwise. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: > "$LOG"
printf 'step\texit\tseconds\tcommand\n' > "$OUT/steps.tsv"
status=0

step() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "=== $name: timed out after ${limit}s" | tee -a "$LOG"
    echo "=== $name: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$*" >> "$OUT/steps.tsv"
    [ "$rc" -eq 0 ] || status=1
    return 0
}

CHECK=("$PY" -m vitdeploy.benchmarks.gpu_check --out "$OUT" $DRY)

if [ -n "$DRY" ]; then
    # torch.compile's call path with dynamo switched off: compiling even vit_tiny takes minutes on 2 cores.
    export TORCHDYNAMO_DISABLE=1
    SUITE=("$OUT/dry-run-model.safetensors" --device cpu --runtime torch-eager-fp32,torch-compile-fp32 --batch 1,2
           --resolution 32 --warmup 1 --iterations 2 --no-peak --no-plots)
else
    SUITE=(vit_small_patch16_224 vit_base_patch16_224 --device cuda
           --runtime torch-eager-fp32,torch-eager-fp16,torch-compile-fp16 --batch 1,32,128 --resolution 224,384
           --warmup 5 --time-budget 0.3 --min-iterations 5)
fi

step environment 30 "${CHECK[@]}" environment
step parity 100 "${CHECK[@]}" parity
step peaks 30 "${CHECK[@]}" peaks
if [ -z "$DRY" ] && [ -f "$OUT/peaks.json" ]; then  # the peaks just measured, so bench need not measure them again
    PEAKS=$("$PY" -c 'import json,sys; print(",".join(f"{p["precision"]}={p["gflops"]:.0f}" for p in json.load(open(sys.argv[1]))["peaks"]))' "$OUT/peaks.json")
    [ -n "$PEAKS" ] && SUITE+=(--peak-gflops "$PEAKS")
fi
step torch-suite 220 "$PY" -m vitdeploy bench "${SUITE[@]}" -o "$OUT/torch-suite" --cache-dir "$OUT/artifacts" --quiet
step tensorrt 90 "${CHECK[@]}" tensorrt

echo "gpu_check: results in $OUT" | tee -a "$LOG"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
exit "$status"
