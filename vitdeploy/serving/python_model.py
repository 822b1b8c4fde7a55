"""Triton Python-backend model that serves a vitdeploy ONNX artifact with vitdeploy's own runtime.

``vitdeploy triton`` copies this file as ``<model>/1/model.py``; Triton's Python backend imports
it inside its stub process and calls :class:`TritonPythonModel`. The server's Python must have
``vitdeploy[cpu]`` installed. The artifact is the file named by the ``vitdeploy.artifact``
model parameter; :class:`~vitdeploy.runtimes.onnxruntime.OrtRuntime` runs the validated
``.cpu.onnx`` variant beside it when there is one.

Triton's dynamic batcher hands ``execute`` several requests at once (only requests of one
shape are batched together); they are run as one batch per shape and every output is split
back. A request that does not fit the artifact (size not a multiple of the patch, outside the
validated range) gets an error response naming the value; the others in the batch still run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.constants import INPUT_NAME
from vitdeploy.runtimes import load, validate_input

ARTIFACT_PARAMETER = "vitdeploy.artifact"
THREADS_PARAMETER = "vitdeploy.intra_op_threads"


class TritonPythonModel:
    """The model class Triton's Python backend looks up by name."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the artifact named in the model config's parameters."""
        # Only importable inside Triton's stub process, hence imported here.
        self.pb = importlib.import_module("triton_python_backend_utils")
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if ARTIFACT_PARAMETER not in parameters:
            raise ValueError(f"model config of {config.get('name')!r} has no {ARTIFACT_PARAMETER!r} parameter")
        artifact = Path(args["model_repository"]) / args["model_version"] / parameters[ARTIFACT_PARAMETER]
        options: dict[str, Any] = {}
        if THREADS_PARAMETER in parameters:
            options["intra_op_threads"] = int(parameters[THREADS_PARAMETER])
        self.runtime = load(artifact, **options)
        self.output_names = [output["name"] for output in config["output"]]

    def _error(self, message: str) -> Any:
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order: every output of the model config, or an error naming what is wrong."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            tensor = self.pb.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                responses[index] = self._error(f"the request has no {INPUT_NAME!r} input")
                continue
            pixels = tensor.as_numpy()
            try:
                validate_input(self.runtime.input_spec, pixels)
            except ValueError as error:
                responses[index] = self._error(str(error))
                continue
            groups.setdefault(tuple(pixels.shape[1:]), []).append((index, pixels))
        for members in groups.values():
            batch = np.concatenate([pixels for _, pixels in members]) if len(members) > 1 else members[0][1]
            try:
                outputs = self.runtime.run_outputs(batch)
            except Exception as error:  # noqa: BLE001 - every request must get a response, never a dead stub
                for index, _ in members:
                    responses[index] = self._error(f"inference failed: {error}")
                continue
            start = 0
            for index, pixels in members:
                stop = start + pixels.shape[0]
                tensors = [self.pb.Tensor(name, np.ascontiguousarray(outputs[name][start:stop]))
                           for name in self.output_names]
                responses[index] = self.pb.InferenceResponse(output_tensors=tensors)
                start = stop
        return responses

    def finalize(self) -> None:
        """Release the runtime when Triton unloads the model."""
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()
