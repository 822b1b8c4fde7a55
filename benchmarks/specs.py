"""Runtime specifications: what ``--runtime torch-eager-fp16,ort-cuda-fp16,tensorrt-fp16`` means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Backend = Literal["torch", "onnxruntime", "openvino", "tensorrt"]
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
ORT_PROVIDERS = ("cpu", "cuda", "tensorrt")
BASELINE = "torch-eager-fp32"

_BACKEND_ALIASES = {"torch": "torch", "pytorch": "torch", "ort": "onnxruntime", "onnxruntime": "onnxruntime",
                    "tensorrt": "tensorrt", "trt": "tensorrt", "openvino": "openvino", "ov": "openvino"}
_PROVIDER_ALIASES = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "tensorrt", "trt": "tensorrt"}
EXAMPLES = "torch-eager-fp32, torch-eager-fp16, torch-compile-fp16, ort-cpu-fp32, ort-cpu-fp16, ort-cpu-int8, " \
           "openvino-cpu-fp32, openvino-cpu-bf16, openvino-cpu-int8, ort-cuda-fp16, ort-tensorrt-fp16, tensorrt-fp16, " \
           "tensorrt-int8"


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime configuration to benchmark.

    ``device`` is where torch runs (``cpu``/``cuda``); onnxruntime's device follows its provider,
    OpenVINO runs on the CPU and TensorRT always runs on ``cuda``. ``compile`` applies to torch
    only, ``provider`` to onnxruntime only. ``openvino-cpu-bf16`` is the fp32 graph run at bf16
    inference precision; ``*-int8`` runs the int8 Q/DQ graph.
    """

    backend: Backend
    precision: str = "fp32"
    device: str = "cpu"
    provider: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnxruntime", "openvino", "tensorrt"):
            raise ValueError(f"backend {self.backend!r} is not one of torch, onnxruntime, openvino, tensorrt")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.backend == "onnxruntime" and self.provider not in ORT_PROVIDERS:
            raise ValueError(f"onnxruntime provider {self.provider!r} is not one of {list(ORT_PROVIDERS)}")
        if self.backend != "onnxruntime" and self.provider is not None:
            raise ValueError(f"a provider ({self.provider!r}) only applies to onnxruntime, not {self.backend}")
        if self.compile and self.backend != "torch":
            raise ValueError("'compile' only applies to the torch backend")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not 'cpu' or 'cuda'")
        if self.precision == "bf16" and self.backend not in ("torch", "openvino"):
            raise ValueError(f"bf16 is only benchmarked on torch and openvino, not {self.backend}")
        if self.precision in ("int8", "fp8") and self.backend == "torch":
            raise ValueError(f"{self.precision} is a Q/DQ graph precision; torch runs fp32, fp16 and bf16")
        if self.precision == "fp8" and self.backend != "tensorrt":
            raise ValueError("fp8 is only benchmarked as a TensorRT engine (CPUs run it as an emulation)")
        if self.precision == "fp16" and self.backend == "openvino":
            raise ValueError("openvino is benchmarked on fp32 (f32 or bf16 inference precision) and int8 graphs")
        if self.backend == "openvino" and self.device != "cpu":
            raise ValueError("openvino runs on the CPU here")

    @property
    def label(self) -> str:
        """Canonical name, e.g. ``torch-compile-fp16``, ``ort-cuda-fp16``, ``tensorrt-fp16``."""
        if self.backend == "torch":
            return f"torch-{'compile' if self.compile else 'eager'}-{self.precision}"
        if self.backend == "onnxruntime":
            return f"ort-{self.provider}-{self.precision}"
        if self.backend == "openvino":
            return f"openvino-cpu-{self.precision}"
        return f"tensorrt-{self.precision}"

    @property
    def options(self) -> dict[str, Any]:
        if self.backend == "torch":
            return {"compile": self.compile}
        if self.backend == "onnxruntime":
            return {"provider": self.provider}
        if self.backend == "openvino":
            return {"inference_precision": "bf16" if self.precision == "bf16" else "f32"}
        return {}

    @property
    def graph_precision(self) -> str:
        """The precision of the ONNX graph (or engine) this runtime runs: bf16 runs the fp32 graph."""
        return "fp32" if self.precision == "bf16" else self.precision

    @classmethod
    def parse(cls, text: str, device: str = "cpu") -> RuntimeSpec:
        """Parse a label such as ``torch-compile-fp16`` or ``ort-cuda-fp16``; ``device`` is torch's device.

        Tokens after the backend may come in any order; missing ones default to eager,
        fp32, and for onnxruntime the provider matching ``device``.
        """
        tokens = [t for t in text.strip().lower().replace("_", "-").split("-") if t]
        if not tokens or tokens[0] not in _BACKEND_ALIASES:
            raise ValueError(f"runtime {text!r} does not start with torch, ort, openvino or tensorrt; examples: {EXAMPLES}")
        backend = _BACKEND_ALIASES[tokens[0]]
        precision, provider, compile_ = "fp32", None, False
        for token in tokens[1:]:
            if token in PRECISIONS:
                precision = token
            elif backend == "torch" and token in ("eager", "compile", "compiled"):
                compile_ = token != "eager"
            elif backend == "onnxruntime" and token in _PROVIDER_ALIASES:
                provider = _PROVIDER_ALIASES[token]
            elif backend == "openvino" and token == "cpu":
                pass
            else:
                raise ValueError(f"runtime {text!r}: unknown part {token!r}; examples: {EXAMPLES}")
        if backend == "onnxruntime":
            provider = provider or ("cuda" if device == "cuda" else "cpu")
            device = "cpu" if provider == "cpu" else "cuda"
        elif backend == "tensorrt":
            device = "cuda"
        elif backend == "openvino":
            device = "cpu"
        try:
            return cls(backend=backend, precision=precision, device=device, provider=provider, compile=compile_)
        except ValueError as error:
            raise ValueError(f"runtime {text!r}: {error}") from None


def parse_runtimes(text: str | list[str], device: str = "cpu") -> list[RuntimeSpec]:
    """Parse a comma-separated list (or list) of runtime labels; duplicates are dropped, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs: list[RuntimeSpec] = []
    for item in items:
        if item.strip():
            spec = RuntimeSpec.parse(item, device)
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise ValueError(f"no runtimes given; examples: {EXAMPLES}")
    return specs
