"""Artifacts for the serving tests: the tiny ViT exported once, with labels and its CPU variant.

The portable graph comes from the real exporter (``trt_artifacts.tiny_onnx``, exporter validation
skipped: the exporter's own tests cover it, and a validated export costs most of a minute on 2
cores). The onnxruntime-CPU variant is then written beside it the way ``export_onnx`` does
(``ort_fusion.cpu_variant`` + the sha256 in the portable file's ``variants``), so the python-backend
model ships and runs it exactly as it would a validated export. Serving tests compare the server's
answers with the direct runtime on these same files.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import onnx

LABELS = [f"class_{index}" for index in range(10)]
REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def tiny_served_onnx() -> Path:
    """``tiny.onnx`` (labels in its metadata) and ``tiny.cpu.onnx`` in a fresh folder; built once per session."""
    from trt_artifacts import tiny_onnx

    from vitdeploy.exporters.graph import set_metadata
    from vitdeploy.exporters.ort_fusion import cpu_variant
    from vitdeploy.metadata import CPU_VARIANT, read_onnx_metadata

    folder = Path(tempfile.mkdtemp(prefix="vitdeploy-serving-tests-"))
    target = folder / "tiny.onnx"
    shutil.copy(tiny_onnx(), target)
    metadata = read_onnx_metadata(target)
    metadata.labels = list(LABELS)
    proto = onnx.load(str(target))
    fused, fused_metadata = cpu_variant(proto, metadata)
    set_metadata(fused, fused_metadata.to_props())
    variant_bytes = fused.SerializeToString()
    (folder / "tiny.cpu.onnx").write_bytes(variant_bytes)
    metadata.variants = {CPU_VARIANT: {"file": "tiny.cpu.onnx", "sha256": hashlib.sha256(variant_bytes).hexdigest()}}
    set_metadata(proto, metadata.to_props())
    target.write_bytes(proto.SerializeToString())
    return target


def serve_python() -> Path | None:
    """The torch-free serve venv's Python: ``$VITDEPLOY_SERVE_PYTHON`` or ``.venv-serve/bin/python``."""
    configured = os.environ.get("VITDEPLOY_SERVE_PYTHON")
    candidate = Path(configured) if configured else REPO_ROOT / ".venv-serve" / "bin" / "python"
    return candidate if candidate.is_file() else None


SERVE_VENV_REASON = (
    "no torch-free serve venv: .ci/run builds it (/usr/bin/python3.11 -m venv .venv-serve && "
    ".venv-serve/bin/pip install '.[cpu,serve]') and exports VITDEPLOY_SERVE_PYTHON"
)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
            ports.append(probe.getsockname()[1])
    finally:
        for probe in sockets:
            probe.close()
    return ports
