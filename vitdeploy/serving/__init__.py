"""Serving with NVIDIA Triton Inference Server: repository writer, server process, client (no torch).

- :func:`write_repository` (``vitdeploy triton``): Triton models from ONNX files and engines.
- :class:`TritonServer` (``vitdeploy serve``): runs ``tritonserver`` on a repository.
- :class:`TritonClient` (``vitdeploy predict --server``): preprocess per the model's parameters,
  call it over HTTP or gRPC.

The client needs ``tritonclient`` and the bundled server ``nvidia-pytriton``: ``pip install
'vitdeploy[cpu,serve]'``. They are imported only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "write_repository": "vitdeploy.serving.repository",
    "RepositoryOptions": "vitdeploy.serving.repository",
    "ModelEntry": "vitdeploy.serving.repository",
    "TritonServer": "vitdeploy.serving.server",
    "ServeOptions": "vitdeploy.serving.server",
    "ServeError": "vitdeploy.serving.server",
    "ModelLoadError": "vitdeploy.serving.server",
    "TritonClient": "vitdeploy.serving.client",
    "ServedModel": "vitdeploy.serving.client",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitdeploy.serving' has no attribute {name!r}")
