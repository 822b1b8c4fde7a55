"""The interface every runtime shares, and the input checks they all run (numpy only)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.outputs import primary_output


@dataclass(frozen=True)
class InputSpec:
    """What a runtime accepts: one NCHW image batch within validated ranges."""

    name: str = "pixel_values"
    dtype: str = "float32"
    channels: int = 3
    batch: tuple[int, int] = (1, 64)
    height: tuple[int, int] = (1, 1 << 16)
    width: tuple[int, int] = (1, 1 << 16)
    multiple_of: int = 16

    @classmethod
    def from_metadata(cls, metadata: ArtifactMetadata) -> InputSpec:
        first = metadata.inputs[0]
        rng = metadata.shape_range
        return cls(
            name=first.name, dtype=first.dtype, channels=int(metadata.model_config.get("in_channels", 3)),
            batch=tuple(rng.batch), height=tuple(rng.height), width=tuple(rng.width),
            multiple_of=metadata.stride,
        )


def validate_shape(spec: InputSpec, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming the offending value if an input of ``shape`` does not fit ``spec``."""
    if len(shape) != 4:
        raise ValueError(
            f"{spec.name} must have 4 dimensions [batch, {spec.channels}, height, width], got shape {tuple(shape)}"
        )
    batch, channels, height, width = (int(v) for v in shape)
    if channels != spec.channels:
        raise ValueError(f"{spec.name} must have {spec.channels} channels, got {channels} (shape {tuple(shape)})")
    if not spec.batch[0] <= batch <= spec.batch[1]:
        raise ValueError(f"batch size {batch} is outside the validated range {spec.batch[0]}..{spec.batch[1]}")
    for axis, size, (low, high) in (("height", height, spec.height), ("width", width, spec.width)):
        if size % spec.multiple_of:
            raise ValueError(f"{axis} {size} is not a multiple of the patch stride {spec.multiple_of}")
        if not low <= size <= high:
            raise ValueError(f"{axis} {size} is outside the validated range {low}..{high}")


def validate_input(spec: InputSpec, pixel_values: np.ndarray, check_finite: bool = False) -> None:
    """Raise ``ValueError`` naming the offending value if ``pixel_values`` does not fit ``spec``."""
    if not isinstance(pixel_values, np.ndarray):
        raise ValueError(f"{spec.name} must be a numpy.ndarray, got {type(pixel_values).__name__}")
    if pixel_values.ndim == 4 and pixel_values.dtype != np.dtype(spec.dtype):
        raise ValueError(f"{spec.name} must have dtype {spec.dtype}, got {pixel_values.dtype}")
    validate_shape(spec, pixel_values.shape)
    if check_finite and not np.isfinite(pixel_values).all():
        bad = int(np.size(pixel_values) - np.isfinite(pixel_values).sum())
        raise ValueError(f"{spec.name} contains {bad} NaN or Inf values")


class Runtime(abc.ABC):
    """A loaded model: call it with ``[N, 3, H, W]`` float pixels, get its primary output: ``[N,
    num_classes]`` logits for a classifier, else the image embedding (:attr:`output_name`);
    :meth:`run_outputs` returns every output (:attr:`output_names`) by name.

    Subclasses implement :meth:`_run`, which receives inputs already checked against
    :attr:`input_spec`, and :meth:`close`.
    """

    input_spec: InputSpec
    metadata: ArtifactMetadata | None = None
    check_finite: bool = False
    # The artifact's outputs (vitdeploy.outputs names) and the one a call returns.
    output_names: Sequence[str] = ("logits",)
    output_name: str = "logits"

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        validate_input(self.input_spec, pixel_values, self.check_finite)
        return self._run(pixel_values)

    @abc.abstractmethod
    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        """Run the backend on validated input and return the primary output (:attr:`output_name`)."""

    def run_outputs(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Every output the artifact has, by name (a runtime with one output: that one)."""
        return {self.output_name: self(pixel_values)}

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the runtime holds; calling it twice is harmless."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class GraphRuntime(Runtime):
    """A runtime of an ONNX graph with named outputs (onnxruntime, OpenVINO): subclasses implement
    :meth:`_outputs` for a list of output names and set :attr:`output_names` (with
    :meth:`_set_outputs`); the call and :meth:`run_outputs` come from it."""

    def _set_outputs(self, names: list[str]) -> None:
        """Record the graph's output names and pick the primary one (logits, else the embedding)."""
        self.output_names = list(names)
        self.output_name = primary_output(self.output_names)

    @abc.abstractmethod
    def _outputs(self, pixel_values: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The named graph outputs for validated input, as float32, in the order of ``names``."""

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._outputs(pixel_values, [self.output_name])[0]

    def run_outputs(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph output (:attr:`output_names`) by name, as float32."""
        validate_input(self.input_spec, pixel_values, self.check_finite)
        return dict(zip(self.output_names, self._outputs(pixel_values, self.output_names), strict=True))
