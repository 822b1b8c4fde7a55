"""A torch-free client for models that ``vitdeploy triton`` wrote: read the preprocessing, send pixels.

``TritonClient("http://127.0.0.1:8000", "model_python")`` (or ``grpc://host:8001``) reads the
model's config from the server, where the ``vitdeploy.*`` parameters say how to preprocess an
image, which sizes are valid and what the labels are; :meth:`TritonClient.infer` sends an
``[N, 3, H, W]`` batch over HTTP or gRPC (``tritonclient``, the ``serve`` extra) and returns every
output the model has (``logits``, ``pooler_output``, ``patch_tokens`` ...: :mod:`vitdeploy.outputs`),
:meth:`TritonClient.logits` and :meth:`TritonClient.primary` one of them. Every request is one shape: Triton's dynamic batcher only merges requests of the same
shape, so a client that sends mixed resolutions should bucket them itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import import_module
from typing import Any
from urllib.parse import urlparse

import numpy as np

from vitdeploy.constants import INPUT_NAME, LOGITS_NAME
from vitdeploy.metadata import Preprocessing
from vitdeploy.serving.repository import PARAMETER_PREFIX

# Triton data type (config name without TYPE_) -> (numpy dtype, wire name).
DATATYPES = {"FP32": ("float32", "FP32"), "FP16": ("float16", "FP16"), "FP64": ("float64", "FP64")}
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


@dataclass(frozen=True)
class ServedModel:
    """What the server's model config says about one model."""

    name: str
    max_batch_size: int
    input_dtype: str
    outputs: list[str]
    preprocessing: Preprocessing | None
    stride: int | None
    shape_range: dict[str, list[int]] | None
    labels: list[str] | None
    num_classes: int | None

    @property
    def primary_output(self) -> str:
        """The output a vitdeploy runtime returns when called: ``logits``, else the embedding."""
        from vitdeploy.outputs import primary_output

        return primary_output(self.outputs)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ServedModel:
        """Parse a model config as Triton returns it in JSON (HTTP, or gRPC with ``as_json``)."""
        params = {key[len(PARAMETER_PREFIX):]: value.get("string_value", "")
                  for key, value in (config.get("parameters") or {}).items() if key.startswith(PARAMETER_PREFIX)}
        inputs = {entry["name"]: entry for entry in config.get("input", [])}
        if INPUT_NAME not in inputs:
            raise ValueError(f"model {config.get('name')!r} has no {INPUT_NAME!r} input; was it written by "
                             "`vitdeploy triton`?")
        data_type = str(inputs[INPUT_NAME].get("data_type", "TYPE_FP32")).removeprefix("TYPE_")
        if data_type not in DATATYPES:
            raise ValueError(f"model {config.get('name')!r} takes {INPUT_NAME} as {data_type}; expected one of "
                             f"{sorted(DATATYPES)}")
        return cls(
            name=str(config.get("name", "")),
            max_batch_size=int(config.get("max_batch_size", 0)),
            input_dtype=DATATYPES[data_type][0],
            outputs=[entry["name"] for entry in config.get("output", [])],
            preprocessing=Preprocessing(**json.loads(params["preprocessing"])) if "preprocessing" in params else None,
            stride=int(params["stride"]) if "stride" in params else None,
            shape_range=json.loads(params["shape_range"]) if "shape_range" in params else None,
            labels=json.loads(params["labels"]) if "labels" in params else None,
            num_classes=int(params["num_classes"]) if "num_classes" in params else None,
        )


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``http://host:port`` / ``grpc://host:port`` / ``host:port`` → ``(protocol, "host:port")``."""
    parsed = urlparse(url if "://" in url else f"//{url}")
    scheme = protocol or parsed.scheme or "http"
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"server URL {url!r}: protocol {scheme!r} is not http or grpc")
    if not parsed.hostname:
        raise ValueError(f"server URL {url!r} has no host; expected e.g. http://127.0.0.1:8000 or grpc://127.0.0.1:8001")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return scheme, f"{host}:{parsed.port or DEFAULT_PORTS[scheme]}"


class TritonClient:
    """One model on one Triton server, over HTTP or gRPC (``tritonclient``)."""

    def __init__(self, url: str, model: str, protocol: str | None = None, timeout: float = 60.0) -> None:
        self.protocol, self.address = parse_url(url, protocol)
        self.model = model
        self.timeout = float(timeout)
        self._module = import_module(f"tritonclient.{self.protocol}")
        self._utils = import_module("tritonclient.utils")
        if self.protocol == "http":
            self._client = self._module.InferenceServerClient(self.address, connection_timeout=self.timeout,
                                                              network_timeout=self.timeout)
        else:
            self._client = self._module.InferenceServerClient(self.address)
        self._served: ServedModel | None = None

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except self._utils.InferenceServerException as error:
            raise ValueError(f"Triton at {self.protocol}://{self.address} refused {what} for model {self.model!r}: "
                             f"{error.message()}") from None
        except (ConnectionError, OSError) as error:
            raise ValueError(f"no Triton server answers at {self.protocol}://{self.address} ({error})") from None

    def config(self) -> dict[str, Any]:
        """The model config as JSON (same shape over HTTP and gRPC)."""
        if self.protocol == "http":
            return self._call("its config", self._client.get_model_config, self.model)
        return self._call("its config", self._client.get_model_config, self.model, as_json=True)["config"]

    @property
    def served(self) -> ServedModel:
        """The model's :class:`ServedModel` (read once)."""
        if self._served is None:
            self._served = ServedModel.from_config(self.config())
        return self._served

    def ready(self) -> bool:
        """Whether the server reports the model READY."""
        return bool(self._call("a readiness check", self._client.is_model_ready, self.model))

    def infer(self, pixel_values: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Send one ``[N, 3, H, W]`` batch; every requested output (default: all) by name."""
        pixel_values = np.ascontiguousarray(pixel_values)
        datatype = self._utils.np_to_triton_dtype(pixel_values.dtype)
        request = self._module.InferInput(INPUT_NAME, list(pixel_values.shape), datatype)
        request.set_data_from_numpy(pixel_values)
        names = outputs or self.served.outputs
        wanted = [self._module.InferRequestedOutput(name) for name in names]
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._call("the request", self._client.infer, self.model, [request], outputs=wanted, **kwargs)
        return {name: result.as_numpy(name) for name in names}

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """The ``logits`` of one batch as float32 (``ValueError`` for a model without them)."""
        if LOGITS_NAME not in self.served.outputs:
            raise ValueError(f"model {self.model!r} has no {LOGITS_NAME!r} output; it has "
                             f"{', '.join(self.served.outputs)} (use infer() or primary())")
        return np.asarray(self.infer(pixel_values, [LOGITS_NAME])[LOGITS_NAME], dtype=np.float32)

    def primary(self, pixel_values: np.ndarray) -> np.ndarray:
        """The model's primary output (logits, else the image embedding) of one batch as float32."""
        name = self.served.primary_output
        return np.asarray(self.infer(pixel_values, [name])[name], dtype=np.float32)

    def statistics(self) -> dict[str, Any]:
        """Triton's inference statistics of the model (``/v2/models/<model>/stats``) as JSON."""
        if self.protocol == "http":
            return self._call("statistics", self._client.get_inference_statistics, self.model)
        return self._call("statistics", self._client.get_inference_statistics, self.model, as_json=True)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def batch_sizes(statistics: dict[str, Any]) -> dict[int, int]:
    """``{batch size: executions}`` from a statistics answer: the batches the server actually ran."""
    sizes: dict[int, int] = {}
    for model in statistics.get("model_stats", []):
        for entry in model.get("batch_stats", []):
            count = int(entry.get("compute_infer", {}).get("count", 0))
            sizes[int(entry["batch_size"])] = sizes.get(int(entry["batch_size"]), 0) + count
    return sizes
