"""Stage 3, ONNX and TensorRT: export and validate, transform graphs, pre-flight and build engines.

Small steps, each usable alone (load → export → transform → check → build):

- :func:`export_onnx` (:class:`ExportOptions`): a ``VisionTransformer`` to a validated ONNX file
  with dynamic batch and resolution, and its validated onnxruntime-CPU variant;
  :func:`validate_onnx` compares any ONNX file with the eager model.
- graph transforms, ONNX → ONNX: :func:`convert_to_fp16` / :func:`keep_ops_in_fp32` (fp16 with
  LayerNorm and softmax in fp32), :func:`fuse_for_cpu` / :func:`cpu_variant` (onnxruntime
  contrib ops), :func:`quantize_model` (calibrated int8/fp8 Q/DQ) and :func:`quantize_onnx` (an
  fp32 file to a validated quantized file); they share :mod:`vitdeploy.exporters.graph`.
- TensorRT: :func:`check_onnx` (pre-flight, no TensorRT needed), :func:`plan_build` and
  :func:`trtexec_command` (pure), :func:`run_build` (needs TensorRT and a GPU).

Names load on first use, so importing this package costs only what is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "ExportOptions": "onnx_export", "ExportResult": "onnx_export", "ExportError": "onnx_export",
    "ExportValidationError": "onnx_export", "export_onnx": "onnx_export",
    "validate_onnx": "validation",
    "convert_to_fp16": "fp16", "keep_ops_in_fp32": "fp16",
    "fuse_for_cpu": "ort_fusion", "cpu_variant": "ort_fusion",
    "QuantizeOptions": "quantize", "quantize_model": "quantize", "quantize_onnx": "quantize_onnx",
    "check_onnx": "trt_support",
    "BuildOptions": "trt_plan", "plan_build": "trt_plan", "trtexec_command": "trt_plan",
    "run_build": "tensorrt_build",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"vitdeploy.exporters.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vitdeploy.exporters' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
