"""The candidates ``tune`` weighs, and the artifacts they run.

A candidate is a backend, an artifact (``graph``: fp32, int8 full-range or 7-bit, fp8) and a precision
hint; :func:`candidate_list` says which this CPU can run. :func:`find_artifacts` reads an export
folder; :func:`ensure_int8_forms` quantizes the int8 forms it lacks; :func:`export_for_tune` makes
the folder from a model as ``deploy`` does.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.calibration import DEFAULT_CALIBRATION_SIZE
from vitdeploy.tune_manifest import Candidate

Log = Callable[[str], None]


def _candidate(name: str, backend: str, graph: str, precision: str, description: str,
               options: dict[str, Any] | None = None, reason: str | None = None) -> Candidate:
    return Candidate(name, backend, graph, precision, description, "ok" if reason is None else "unavailable",
                     reason=reason, options=dict(options or {}))


def candidate_list(flags: frozenset[str], onnxruntime: bool = True, openvino: bool = True) -> list[Candidate]:
    """Every CPU candidate, in a fixed order: status ``ok`` where it can run on a CPU with ``flags``,
    else ``unavailable`` with the reason. ``onnxruntime``/``openvino``: whether those are installed.
    """
    from vitdeploy.cpu_features import BF16_FLAGS, INT8_DOT_FLAGS

    no_ort = None if onnxruntime else "onnxruntime is not installed (pip install 'vitdeploy[cpu]')"
    no_ov = None if openvino else "openvino is not installed (pip install 'vitdeploy[openvino]')"
    bf16 = bool(flags & set(BF16_FLAGS))
    no_bf16 = None if bf16 else f"this CPU has no bf16 arithmetic ({'/'.join(BF16_FLAGS)} not in /proc/cpuinfo)"
    dot = sorted(flags & set(INT8_DOT_FLAGS))
    int8_note = f"int8 dot products: {', '.join(dot)}" if dot else "no VNNI/AMX: int8 sums saturate at 16 bits"
    f32 = {"inference_precision": "f32"}
    return [
        _candidate("ort-fp32", "onnxruntime", "fp32", "fp32", "onnxruntime, fp32 graph (fused CPU variant)",
                  reason=no_ort),
        _candidate("ort-int8", "onnxruntime", "int8", "int8", f"onnxruntime, int8 Q/DQ, full-range weights ({int8_note})",
                  reason=no_ort),
        _candidate("ort-int8-7bit", "onnxruntime", "int8-7bit", "int8", "onnxruntime, int8 Q/DQ, 7-bit weights",
                  reason=no_ort),
        _candidate("ort-fp8", "onnxruntime", "fp8", "fp8", "onnxruntime, fp8 E4M3 Q/DQ",
                  reason="no fp8 kernel in onnxruntime's CPU provider: it runs fp8 Q/DQ as an emulation (values "
                         "rounded to E4M3, matmuls in fp32), never faster than fp32; fp8 is for TensorRT on Ada/Hopper"),
        _candidate("openvino-fp32", "openvino", "fp32", "fp32", "OpenVINO, fp32 graph at f32", f32, no_ov),
        _candidate("openvino-bf16", "openvino", "fp32", "bf16", "OpenVINO, fp32 graph at bf16 inference precision",
                  {"inference_precision": "bf16"}, no_ov or no_bf16),
        _candidate("openvino-int8", "openvino", "int8", "int8", f"OpenVINO, int8 Q/DQ, full-range weights, f32 elsewhere "
                  f"({int8_note})", f32, no_ov),
        _candidate("openvino-int8-bf16", "openvino", "int8", "int8", "OpenVINO, int8 Q/DQ, full-range weights, bf16 "
                  "elsewhere", {"inference_precision": "bf16"}, no_ov or no_bf16),
        _candidate("openvino-int8-7bit", "openvino", "int8-7bit", "int8", "OpenVINO, int8 Q/DQ, 7-bit weights, f32 "
                  "elsewhere", f32, no_ov),
        # The same int8 file compiled for each input shape on first use (a server of one batch and size).
        _candidate("openvino-int8-per-shape", "openvino", "int8", "int8", "OpenVINO, int8 Q/DQ, full-range weights, "
                  "f32 elsewhere, compiled per input shape", {**f32, "compile_per_shape": True}, no_ov),
        _candidate("openvino-int8-bf16-per-shape", "openvino", "int8", "int8", "OpenVINO, int8 Q/DQ, full-range "
                  "weights, bf16 elsewhere, compiled per input shape",
                  {"inference_precision": "bf16", "compile_per_shape": True}, no_ov or no_bf16),
    ]


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def find_artifacts(folder: str | Path) -> dict[str, Path]:
    """The portable ONNX files of ``folder`` by graph kind (``fp32``, ``int8``, ``int8-7bit``, ``fp8``),
    read from their metadata (the ``.cpu.onnx`` variants are found by ``OrtRuntime`` itself)."""
    from vitdeploy.metadata import CPU_VARIANT, quantization_record, read_onnx_metadata

    found: dict[str, Path] = {}
    for path in sorted(Path(folder).glob("*.onnx")):
        try:
            metadata = read_onnx_metadata(path)
        except Exception:  # noqa: BLE001 - a foreign ONNX file is not a candidate
            continue
        if metadata.target == CPU_VARIANT or metadata.precision not in ("fp32", "int8", "fp8"):
            continue
        graph = metadata.precision
        if graph == "int8":
            graph = "int8-7bit" if (quantization_record(metadata) or {}).get("reduce_range") else "int8"
        found.setdefault(graph, path)
    return found


def ensure_int8_forms(folder: Path, artifacts: dict[str, Path], wanted: set[str], calibration: str | None,
                      calibration_size: int, log: Log) -> dict[str, str]:
    """Quantize the fp32 file into each int8 form in ``wanted`` that ``artifacts`` lacks (validated
    against the fp32 graph, written into ``folder``); returns ``{graph: why not}`` for those that failed."""
    from vitdeploy.exporters.artifact_set import INT8_FORMS, ArtifactSetPlan, build_artifact
    from vitdeploy.exporters.onnx_export import ExportValidationError

    failed: dict[str, str] = {}
    fp32 = artifacts["fp32"]
    stem = fp32.stem[:-len("-fp32")] if fp32.stem.endswith("-fp32") else fp32.stem
    plan = ArtifactSetPlan(stem, graphs=("fp32", *INT8_FORMS), validation_max_batch=1, quantize_from_fp32=True,
                           calibration=calibration, calibration_size=calibration_size)
    for graph in sorted(wanted - set(artifacts)):
        if graph not in INT8_FORMS:
            continue
        target = plan.path(folder, graph)
        weights = "7-bit" if plan.quantize_options(graph).reduce_range else "full-range"
        log(f"quantizing {fp32.name} -> {target.name} ({weights} int8 weights, calibration: "
            f"{calibration or 'bundled photos + crops'})")
        try:
            build_artifact(None, plan, graph, folder, fp32=fp32)
            artifacts[graph] = target
        except ExportValidationError as error:
            failed[graph] = f"its quantized graph failed the int8 gate: {'; '.join(error.report.failures[:2])}"
    return failed


def export_for_tune(model: Any, folder: Path, name: str, batch: tuple[int, int], source: str = "",
                    source_sha256: str = "", calibration: str | None = None, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
                    log: Log | None = None) -> dict[str, Path]:
    """Export ``model`` into ``folder`` as deploy does: fp32 with its onnxruntime-CPU variant, and the
    int8 file quantized from it (one trace), each validated against the eager model; files
    of this source already in the folder (same ``source_sha256``) are reused."""
    from vitdeploy.exporters.artifact_set import ArtifactSetPlan, build_artifact
    from vitdeploy.metadata import read_onnx_metadata

    say = log or (lambda message: None)
    plan = ArtifactSetPlan(name, graphs=("fp32", "int8"), batch=batch, validation_max_batch=4, quantize_from_fp32=True,
                           calibration=calibration, calibration_size=calibration_size, source=source,
                           source_sha256=source_sha256)
    artifacts = find_artifacts(folder) if folder.is_dir() else {}
    folder.mkdir(parents=True, exist_ok=True)
    for precision in plan.graphs:
        existing = artifacts.get(precision)
        if existing is not None and source_sha256 and read_onnx_metadata(existing).source_sha256 == source_sha256:
            say(f"reusing {existing.name} (exported from this source)")
            continue
        path = plan.path(folder, precision)
        say(f"exporting {path.name} (validated against the eager model)")
        build_artifact(model, plan, precision, folder, progress=say, fp32=artifacts.get("fp32"))
        artifacts[precision] = path
    return artifacts


def open_runtime(candidate: Candidate, path: Path, threads: int) -> tuple[Any, list[str]]:
    """The candidate's runtime in latency mode, and the warnings it raised (as notes)."""
    from vitdeploy.runtimes import OpenVINORuntime, OrtRuntime

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if candidate.backend == "onnxruntime":
            runtime = OrtRuntime(path, intra_op_threads=threads, inter_op_threads=1)
        else:
            runtime = OpenVINORuntime(path, threads=threads, **candidate.options)
    return runtime, [" ".join(str(w.message).split()) for w in caught]


def throughput_runner(candidate: Candidate, path: Path, pixels: np.ndarray, threads: int, calls: int) -> Any:
    from vitdeploy.benchmarks.throughput import onnxruntime_parallel, openvino_throughput

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already noted by the latency-mode runtime
        if candidate.backend == "onnxruntime":
            return onnxruntime_parallel(path, pixels, threads, calls)
        return openvino_throughput(path, pixels, threads, calls,
                                   inference_precision=candidate.options.get("inference_precision", "f32"),
                                   compile_per_shape=candidate.options.get("compile_per_shape", False))
