"""Artifacts a benchmark needs: ONNX exports (validated, as a user's are, at batch 1) and TensorRT engines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitdeploy.benchmarks.models import Sweep


def artifact_plan(name: str, sweep: Sweep, source: str = "", quantize_from_fp32: bool = False) -> Any:
    """The benchmark's artifact set of a model: every graph accepting every shape of ``sweep``, named
    ``<name>-<graph>.onnx``, validated like any export (int8 as :data:`~vitdeploy.exporters.artifact_set.INT8_POLICY`
    says).

    Validated, because only a validated fp32 export carries the onnxruntime-CPU variant that
    ``OrtRuntime`` runs on CPU: the benchmark times what a user of the file runs. Validation
    batches stay at 1 to keep it cheap (the sweep's sizes are all covered). ``quantize_from_fp32``: the
    int8 file is quantized from the fp32 export (one trace), validated against the eager model.
    """
    from vitdeploy.exporters.artifact_set import GRAPHS, ArtifactSetPlan

    return ArtifactSetPlan(name, graphs=GRAPHS, batch=sweep.batch_range, height=sweep.height_range,
                           width=sweep.width_range, validation_max_batch=1, quantize_from_fp32=quantize_from_fp32,
                           source=source)


def engine_profiles(sweep: Sweep) -> list[str]:
    """``--profile`` specs for a sweep: a latency profile (small batches, optimum at the smallest batch
    and size) and, when the sweep goes past batch 8, a throughput profile (optimum at its largest batch
    and size). The runtime picks the profile whose optimum is nearest each shape.
    """
    low_b, high_b = sweep.batch_range
    low_h, high_h = sweep.height_range
    if high_b <= 8:
        return [f"batch={low_b}:{low_b}:{high_b},resolution={low_h}:{low_h}:{high_h}"]
    return [f"batch={low_b}:{low_b}:8,resolution={low_h}:{low_h}:{high_h}",
            f"batch={low_b}:{high_b}:{high_b},resolution={low_h}:{high_h}:{high_h}"]


def build_engine_for_bench(onnx_path: Path, engine_path: Path, sweep: Sweep,
                           log: Callable[[str], None] | None = None) -> Path:
    """Build a TensorRT engine whose profiles (:func:`engine_profiles`) cover the sweep."""
    from vitdeploy.exporters.tensorrt_build import run_build
    from vitdeploy.exporters.trt_plan import BuildOptions, plan_build

    low_h, high_h = sweep.height_range
    low_w, high_w = sweep.width_range
    if (low_h, high_h) != (low_w, high_w):
        raise ValueError(f"engines for non-square sweeps are not supported here (height {low_h}..{high_h}, "
                         f"width {low_w}..{high_w}); build one with `vitdeploy build`")
    # A timing engine: the sweep's batches go past the export's validation (batch 1), on purpose and recorded.
    options = BuildOptions(timing_cache=str(engine_path.with_name("tensorrt.timing-cache")), beyond_validated=True)
    plan = plan_build(onnx_path, engine_path, options=options, profile_specs=engine_profiles(sweep))
    if _reusable(plan):
        if log is not None:
            log(f"reusing {engine_path} (built from this ONNX file with these profiles)")
        return engine_path
    run_build(plan, show_progress=False, log=log or (lambda message: None))
    return engine_path


def _reusable(plan: Any) -> bool:
    """An engine already at the plan's path, built from the same ONNX bytes with the same profiles."""
    from vitdeploy.engine_manifest import EngineManifest
    from vitdeploy.files import sha256_file

    if not plan.engine_path.is_file() or not plan.manifest_path.is_file():
        return False
    try:
        manifest = EngineManifest.read(plan.manifest_path)
    except (OSError, ValueError):
        return False
    return (manifest.onnx_sha256 == sha256_file(plan.onnx.path)
            and manifest.engine_sha256 == sha256_file(plan.engine_path)
            and [p.to_dict() for p in manifest.profiles] == [p.to_dict() for p in plan.profiles])
