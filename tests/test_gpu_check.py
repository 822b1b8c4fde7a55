"""``benchmarks/gpu_check.sh --dry-run``: every step of the GPU device check, end to end on the CPU.

The real check needs a lent GPU machine; this runs the same script, the same Python steps and the
same ``vitdeploy bench`` call with a 2-block vit_tiny on the CPU, so a broken step shows here first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_dry_run_exercises_every_step(tmp_path) -> None:
    start = time.perf_counter()
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    seconds = time.perf_counter() - start
    log = (tmp_path / "gpu_check.log").read_text()
    assert result.returncode == 0, log[-3000:]
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("environment", "0"), ("parity", "0"), ("peaks", "0"), ("torch-suite", "0"), ("tensorrt", "0")]
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["dry_run"] is True and environment["cpu"]["model"]
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["passed"] and set(parity["precisions"]) == {"fp32", "fp16", "bf16"}
    for report in parity["precisions"].values():
        assert {(c["batch"], c["height"], c["width"]) for c in report["cases"]} == {(1, 32, 32), (2, 48, 48), (1, 32, 64)}
    peaks = json.loads((tmp_path / "peaks.json").read_text())["peaks"]
    assert peaks[0]["gflops"] > 0 and peaks[0]["device"] == "cpu"
    suite = json.loads((tmp_path / "torch-suite" / "results.json").read_text())
    ok = [r for r in suite["records"] if r["status"] == "ok"]
    assert {r["runtime"] for r in ok} == {"torch-eager-fp32", "torch-compile-fp32"} and len(ok) == 4
    assert all(r["timer"] == "perf_counter" for r in ok)  # CPU; on the GPU every runtime records cuda_event
    assert "timer" in (tmp_path / "torch-suite" / "report.md").read_text()
    trt = json.loads((tmp_path / "tensorrt.json").read_text())
    if importlib.util.find_spec("tensorrt") is None:
        assert trt["status"] == "not run" and "not importable" in trt["reason"]
    print(f"dry run took {seconds:.1f} s")
