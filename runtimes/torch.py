"""The eager PyTorch reference behind the common runtime interface.

torch is imported when a :class:`TorchRuntime` is created, never when this module is imported.

Thread safety: calls are serialised by a lock, so one runtime may be shared between threads
(torch eager inference on a shared module is not documented as thread-safe, and
``torch.compile`` recompilation certainly is not).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.constants import (
    DEFAULT_FP32_OPS,
    INPUT_NAME,
    LOW_FLOAT_PRECISIONS,
    TORCH_PRECISIONS,
)
from vitdeploy.metadata import ArtifactMetadata, ShapeRange, TensorInfo
from vitdeploy.parity import Reference, Tolerance, tolerance_for

from .base import InputSpec, Runtime, validate_input

DEVICES = ("cpu", "cuda")


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
            from vitdeploy.checkpoints import resolve_source

            # The same seeded random weights export gets from the name; callers warn about them themselves.
            return resolve_source(str(source), log=lambda line: None).model
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

    Inputs are float32 ``[N, C, H, W]`` for every precision (cast inside); outputs come back
    float32. ``outputs`` names what :meth:`run_outputs` returns (:mod:`vitdeploy.outputs`; default
    the model's :func:`~vitdeploy.outputs.default_outputs`); a call returns the primary one (logits, else the embedding).
    ``batch``/``height``/``width`` are the accepted inclusive ranges; sizes default to half to
    twice the model's native size. ``device="cuda"`` and ``compile=True`` follow
    PyTorch's documented API but the CUDA path has not been run here.
    """

    def __init__(
        self,
        source: Any,
        precision: str = "fp32",
        device: str = "cpu",
        compile: bool = False,
        fp32_ops: Iterable[str] = DEFAULT_FP32_OPS,
        batch: tuple[int, int] = (1, 64),
        height: tuple[int, int] | None = None,
        width: tuple[int, int] | None = None,
        check_finite: bool = False,
        fused_attention: bool | None = None,
        outputs: Iterable[str] | None = None,
    ) -> None:
        import torch

        from vitdeploy.model import prepare_model
        from vitdeploy.outputs import (
            check_outputs,
            default_outputs,
            output_shape,
            primary_output,
        )

        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {list(TORCH_PRECISIONS)}")
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise ValueError(f"device {device!r} is not one of {list(DEVICES)} (or 'cuda:N')")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")

        model = _load_source(source)
        self.source = source if not hasattr(source, "config") else f"<model {model.config.provenance.name}>"
        fp32_ops = sorted(set(fp32_ops)) if precision != "fp32" else []
        model = prepare_model(model, precision, fp32_ops, fused_attention=fused_attention, device=device)

        config = model.config
        default = config.default_size_range()
        shape_range = ShapeRange(batch=tuple(batch), height=tuple(height or default), width=tuple(width or default))

        self.model = model
        self.precision = precision
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.check_finite = bool(check_finite)
        names = tuple(outputs) if outputs is not None else default_outputs(config)
        self.output_names = list(check_outputs(names, config))
        self.output_name = primary_output(self.output_names)
        outputs = [TensorInfo(name, "float32", output_shape(name, config)) for name in self.output_names]
        self.metadata = ArtifactMetadata(
            model_config=config.to_dict(),
            preprocessing=config.preprocessing.at(config.image_size),
            inputs=[TensorInfo(INPUT_NAME, "float32", ["batch", config.in_channels, "height", "width"])],
            outputs=outputs,
            shape_range=shape_range,
            precision=precision,
            fp32_ops=list(fp32_ops),
            source=str(self.source),
            vitdeploy_version=_version(),
            labels=list(config.provenance.labels) if config.provenance.labels else None,
        )
        self.input_spec = InputSpec.from_metadata(self.metadata)
        self._forward = torch.compile(model, dynamic=True) if compile else model
        self._lock = threading.Lock()
        self._torch = torch
        self._closed = False

    def _outputs(self, pixel_values: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("TorchRuntime is closed; create a new runtime to run it again")
        torch = self._torch
        with self._lock, torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(pixel_values))
            inputs = inputs.to(device=self.device, dtype=self.dtype, non_blocking=True)
            if names == ["logits"]:
                values = {"logits": self._forward(inputs)}  # forward() = logits, compiled when asked
            else:
                values = self.model.forward_outputs(inputs, names)
            return {name: values[name].float().cpu().numpy() for name in names}

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._outputs(pixel_values, [self.output_name])[self.output_name]

    def run_outputs(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Every output in :attr:`output_names`, by name, as float32."""
        validate_input(self.input_spec, pixel_values, self.check_finite)
        return self._outputs(pixel_values, self.output_names)

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


def eager_references(
    model: Any,
    precision: str,
    fp32_ops: Iterable[str] = DEFAULT_FP32_OPS,
    shape_range: ShapeRange | None = None,
    device: str = "cpu",
    max_rel_error: float | None = None,
    min_cosine: float | None = None,
    outputs: Iterable[str] | None = None,
) -> list[Reference]:
    """The eager references an artifact of ``precision`` is judged against, with their tolerances.

    The one factory export validation, ``verify`` and ``deploy`` share: an fp32 artifact gets
    the eager fp32 model; a reduced float precision (fp16, bf16) also gets the eager model in
    that precision under the graph's policy (``fp32_ops`` in fp32, explicit attention: like for
    like) besides the eager fp32 model (what the precision costs); a quantized artifact (int8,
    fp8) is judged against the eager fp32 model alone, with its precision's gate. ``shape_range`` bounds what the references
    accept (default: the model's own); ``max_rel_error``/``min_cosine`` override the tolerances;
    ``outputs`` are what the references return (the artifact's outputs).
    """
    def tolerance(against_fp32: bool) -> Tolerance:
        tol = tolerance_for(precision, against_fp32)
        if max_rel_error is not None:
            tol = replace(tol, max_rel_error=max_rel_error)
        if min_cosine is not None:
            tol = replace(tol, min_cosine=min_cosine)
        return tol

    common: dict[str, Any] = {"outputs": tuple(outputs) if outputs is not None else None}
    if shape_range is not None:
        common.update(batch=shape_range.batch, height=shape_range.height, width=shape_range.width)
    references = []
    if precision in LOW_FLOAT_PRECISIONS:
        ops = sorted(set(fp32_ops))
        low = TorchRuntime(model, precision=precision, device=device, fp32_ops=ops, fused_attention=False, **common)
        references.append(Reference(f"eager {precision} (fp32 ops: {','.join(ops) or 'none'})", low, tolerance(False)))
    fp32 = TorchRuntime(model, precision="fp32", device=device, **common)
    references.append(Reference("eager fp32", fp32, tolerance(True)))
    return references
