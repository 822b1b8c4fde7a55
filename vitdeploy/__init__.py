"""vitdeploy: Vision Transformer checkpoints to fast, verified inference artifacts.

Importing :mod:`vitdeploy` does not import torch, so that :mod:`vitdeploy.runtimes` can be
embedded with numpy and onnxruntime alone; the torch-backed entry points load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ViTConfig": "vitdeploy.config",
    "HybridConfig": "vitdeploy.config",
    "list_variants": "vitdeploy.variants",
    "VisionTransformer": "vitdeploy.model",
    "create_model": "vitdeploy.model",
    "load_model": "vitdeploy.checkpoints",
    "save_model": "vitdeploy.checkpoints",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitdeploy' has no attribute {name!r}")
