"""The eager PyTorch reference behind the common runtime interface.

torch is imported when a :class:`TorchRuntime` is created, never when this module is imported.

Thread safety: calls are serialised by a lock, so one runtime may be shared between threads
(torch eager inference on a shared module is not documented as thread-safe, and
``torch.compile`` recompilation certainly is not).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.metadata import ArtifactMetadata, Preprocessing, ShapeRange, TensorInfo

from .base import InputSpec, Runtime

PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")


def default_size_range(image_size: int, stride: int) -> tuple[int, int]:
    """Half to twice the native size, both rounded inward to multiples of ``stride``."""
    low = max(stride, -(-image_size // 2 // stride) * stride)
    high = max(low, (2 * image_size) // stride * stride)
    return low, high


def _load_source(source: Any) -> Any:
    """A ``VisionTransformer`` from a model object, a checkpoint file/folder or a variant name."""
    from vitdeploy.model import VisionTransformer

    if isinstance(source, VisionTransformer):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            from vitdeploy.checkpoints import load_model

            return load_model(path)
        from vitdeploy.variants import VARIANTS

        if str(source) in VARIANTS:
            from vitdeploy.model import create_model

            return create_model(str(source))
        raise FileNotFoundError(
            f"{str(source)!r} is neither an existing checkpoint file/folder nor a known variant name "
            "(see `vitdeploy.list_variants()`)"
        )
    raise ValueError(
        f"TorchRuntime needs a VisionTransformer, a checkpoint path or a variant name, got {type(source).__name__}"
    )


class TorchRuntime(Runtime):
    """Eager PyTorch inference with the same interface (and input checks) as the exported runtimes.

    ``source`` is a ``VisionTransformer``, a checkpoint file/folder (loaded with
    ``vitdeploy.load_model``) or a registry variant name (random weights). With
    ``precision="fp16"``/``"bf16"`` a copy of the model is cast and given
    ``set_precision_policy(fp32_ops, fused_attention=False)``: the same ops-in-fp32 policy and
    explicit attention the fp16 ONNX graph follows, so parity compares like with like. The
    model passed in is never modified (it is copied when it must be cast or moved).

    Inputs are float32 ``[N, C, H, W]`` for every precision (cast inside); logits come back
    float32. ``batch``/``height``/``width`` are the accepted inclusive ranges; sizes default to
    half to twice the model's native size. ``device="cuda"`` and ``compile=True`` follow
    PyTorch's documented API but the CUDA path has not been run here.
    """

    def __init__(
        self,
        source: Any,
        precision: str = "fp32",
        device: str = "cpu",
        compile: bool = False,
        fp32_ops: Iterable[str] = ("LayerNormalization", "Softmax"),
        batch: tuple[int, int] = (1, 64),
        height: tuple[int, int] | None = None,
        width: tuple[int, int] | None = None,
        check_finite: bool = False,
    ) -> None:
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise ValueError(f"device {device!r} is not one of {list(DEVICES)} (or 'cuda:N')")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")

        model = _load_source(source)
        self.source = source if not hasattr(source, "config") else f"<model {model.config.name}>"
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        fp32_ops = sorted(set(fp32_ops)) if precision != "fp32" else []
        param = next(model.parameters())
        if param.dtype != dtype or param.device != torch.device(device) or precision != "fp32" or model.training:
            model = copy.deepcopy(model)
        model = model.to(device=device, dtype=dtype).eval()
        if precision != "fp32":
            model.set_precision_policy(set(fp32_ops), fused_attention=False)

        config = model.config
        stride = config.stride
        default = default_size_range(config.image_size, stride)
        shape_range = ShapeRange(batch=tuple(batch), height=tuple(height or default), width=tuple(width or default))

        self.model = model
        self.precision = precision
        self.device = torch.device(device)
        self.dtype = dtype
        self.check_finite = bool(check_finite)
        self.metadata = ArtifactMetadata(
            model_config=config.to_dict(),
            preprocessing=Preprocessing.for_model(
                config.image_size, config.crop_pct, config.mean, config.std, config.interpolation
            ),
            inputs=[TensorInfo("pixel_values", "float32", ["batch", config.in_channels, "height", "width"])],
            outputs=[TensorInfo("logits", "float32", ["batch", config.num_classes])],
            shape_range=shape_range,
            precision=precision,
            fp32_ops=list(fp32_ops),
            source=str(self.source),
            vitdeploy_version=_version(),
            labels=list(config.labels) if config.labels else None,
        )
        self.input_spec = InputSpec.from_metadata(self.metadata)
        self._forward = torch.compile(model, dynamic=True) if compile else model
        self._lock = threading.Lock()
        self._torch = torch
        self._closed = False

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("TorchRuntime is closed; create a new runtime to run it again")
        torch = self._torch
        with self._lock, torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(pixel_values))
            inputs = inputs.to(device=self.device, dtype=self.dtype, non_blocking=True)
            logits = self._forward(inputs)
            return logits.float().cpu().numpy()

    def close(self) -> None:
        """Drop the model (and free its device memory); later calls raise ``RuntimeError``."""
        if self._closed:
            return
        self._closed = True
        self.model = None
        self._forward = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return f"TorchRuntime({self.source!r}, precision={self.precision!r}, device={str(self.device)!r})"


def _version() -> str:
    from vitdeploy import __version__

    return __version__
