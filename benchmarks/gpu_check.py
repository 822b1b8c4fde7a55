"""The device check's Python steps (``benchmarks/gpu_check.sh`` runs them): environment, parity, peaks, TensorRT.

``python -m vitdeploy.benchmarks.gpu_check STEP --out DIR [--dry-run]`` with STEP one of

- ``environment``: :func:`~vitdeploy.benchmarks.environment.capture_environment`, torch/CUDA facts,
  ``nvidia-smi`` → ``environment.json``;
- ``parity``: (in a dry run it first saves its tiny model for the bench step) the torch runtime on CUDA in fp32, fp16 and bf16 (the precision policy: LayerNorm and
  softmax in fp32) against CPU eager on the bundled photos at three shapes, with the project's
  tolerances (:func:`~vitdeploy.runtimes.torch.eager_references`) → ``parity.json``; TF32 is off
  for fp32 (cuDNN's TF32 convolution default would otherwise round the patch embedding);
- ``peaks``: dense matmul peaks (fp32 without TF32, fp16, bf16) → ``peaks.json``;
- ``tensorrt``: where ``import tensorrt`` works, the GPU test file and a TensorRT fp16 bench point;
  elsewhere ``tensorrt.json`` says it was not run and why.

``--dry-run`` runs every step on the CPU with a tiny model in seconds (the test suite does), so
the script is known to work before a GPU is lent. Exit status 1 means a check failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vitdeploy.files import atomic_write_json

PARITY_MODEL = "vit_small_patch16_224"
PARITY_SHAPES = [(1, 224, 224), (4, 384, 384), (2, 160, 288)]  # batch, height, width; 288/160: non-square
DRY_MODEL = "vit_tiny_patch16_224"
DRY_DEPTH = 2  # the dry run's model: vit_tiny with 2 blocks, saved as DRY_CHECKPOINT for the bench step
DRY_CHECKPOINT = "dry-run-model.safetensors"
DRY_SHAPES = [(1, 32, 32), (2, 48, 48), (1, 32, 64)]
PRECISIONS = ("fp32", "fp16", "bf16")


def _write(out: Path, name: str, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    atomic_write_json(path, data)
    return path


def environment(out: Path, dry_run: bool) -> int:
    """Machine, versions, torch/CUDA facts and nvidia-smi."""
    import torch

    from vitdeploy.benchmarks.environment import capture_environment

    data = capture_environment(command=" ".join(sys.argv))
    data["torch_cuda"] = {"available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                          "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        data["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        data["nvidia_smi"] = f"not available: {error}"
    data["dry_run"] = dry_run
    _write(out, "environment.json", data)
    print(f"environment: {data['cpu']['model']}; GPUs {data['torch_cuda']['devices'] or 'none'}")
    return 0


def parity(out: Path, dry_run: bool) -> int:
    """The torch runtime on the device vs CPU eager, in each precision, on the bundled photos."""
    import torch

    from vitdeploy.metadata import ShapeRange
    from vitdeploy.model import create_model
    from vitdeploy.parity import InputFactory, verify
    from vitdeploy.runtimes.torch import TorchRuntime, eager_references

    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        _write(out, "parity.json", {"status": "not run", "reason": "torch.cuda.is_available() is False"})
        print("parity: not run (no CUDA device visible to torch)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 on the device, like the CPU reference
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    name, shapes = (DRY_MODEL, DRY_SHAPES) if dry_run else (PARITY_MODEL, PARITY_SHAPES)
    model = create_model(name, **({"depth": DRY_DEPTH} if dry_run else {}))  # random weights, seeded
    if dry_run:
        from vitdeploy.checkpoints.native import save_model

        save_model(model, out / DRY_CHECKPOINT)  # what the dry run's bench step times
    inputs = InputFactory(TorchRuntime(model).metadata.preprocessing)
    results: dict[str, Any] = {"model": name, "device": device, "reference": "eager on CPU", "shapes": shapes,
                               "random_weights": True, "precisions": {}}
    passed = True
    for precision in PRECISIONS:
        start = time.perf_counter()
        candidate = TorchRuntime(model, precision=precision, device=device, batch=(1, 8),
                                 height=(32, 448), width=(32, 448))
        references = eager_references(model, precision, device="cpu",
                                      shape_range=ShapeRange(batch=(1, 8), height=(32, 448), width=(32, 448)))
        report = verify(candidate, references, shapes, inputs, candidate_name=f"torch {device} {precision}")
        candidate.close()
        results["precisions"][precision] = {**report.to_dict(), "seconds": round(time.perf_counter() - start, 2)}
        passed &= report.passed
        worst = report.worst()
        print(f"parity {precision}: {'passed' if report.passed else 'FAILED'} (worst rel-max "
              f"{worst.get('rel_max_error', float('nan')):.2e}, min cosine {worst.get('min_cosine', float('nan')):.6f})")
    results["passed"] = passed
    _write(out, "parity.json", results)
    return 0 if passed else 1


def peaks(out: Path, dry_run: bool) -> int:
    """Dense matmul peaks per precision (CUDA events on the device; the CPU in a dry run)."""
    import torch

    from vitdeploy.benchmarks.peaks import measure_matmul_peak

    device, size, seconds = ("cpu", 256, 0.05) if dry_run else ("cuda", 8192, 1.0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the true fp32 peak
    measured = []
    for precision in PRECISIONS if not dry_run else ("fp32",):
        peak = measure_matmul_peak(device, precision, threads=torch.get_num_threads(), size=size, seconds=seconds)
        measured.append(peak.to_dict())
        print(f"peak {device} {precision}: {peak.gflops:.1f} GFLOP/s ({peak.method})")
    _write(out, "peaks.json", {"peaks": measured, "dry_run": dry_run})
    return 0


def tensorrt(out: Path, dry_run: bool) -> int:
    """TensorRT's GPU tests and one bench point where ``import tensorrt`` works; else a "not run" record."""
    try:
        import tensorrt as trt
    except Exception as error:  # ImportError, or OSError when libnvinfer is missing
        reason = f"tensorrt is not importable here ({type(error).__name__}: {error})"
        _write(out, "tensorrt.json", {"status": "not run", "reason": reason})
        print(f"tensorrt: not run: {reason}")
        return 0
    record: dict[str, Any] = {"status": "run", "tensorrt": trt.__version__, "steps": {}}
    commands = {
        "pytest_gpu": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests/test_tensorrt_gpu.py",
                       "-p", "no:cacheprovider", "-o", "addopts=",  # one process: no xdist workers on the GPU
                       "--junitxml", str(out / "pytest-tensorrt.xml")],
        "bench": [sys.executable, "-m", "vitdeploy", "bench", "vit_base_patch16_224", "--device", "cuda",
                  "--runtime", "tensorrt-fp16", "--batch", "1,32", "--resolution", "224", "--time-budget", "0.3",
                  "--no-plots", "-o", str(out / "bench-tensorrt"), "--cache-dir", str(out / "artifacts")],
    }
    failed = False
    for name, command in commands.items():
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        record["steps"][name] = {"command": command, "exit": result.returncode,
                                 "seconds": round(time.perf_counter() - start, 1),
                                 "tail": (result.stdout + result.stderr)[-4000:]}
        failed |= result.returncode != 0
        print(f"tensorrt {name}: exit {result.returncode}")
    _write(out, "tensorrt.json", record)
    return 1 if failed else 0


STEPS = {"environment": environment, "parity": parity, "peaks": peaks, "tensorrt": tensorrt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitdeploy.benchmarks.gpu_check",
                                     description="One step of the GPU device check (see benchmarks/gpu_check.sh).")
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with a tiny model, in seconds")
    args = parser.parse_args(argv)
    return STEPS[args.step](Path(args.out), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
