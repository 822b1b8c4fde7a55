"""The JSON manifest beside a TensorRT engine, and the optimization-profile logic (pure Python).

An engine file alone says little and is tied to one TensorRT version and one GPU. ``vitdeploy
build`` writes ``model.engine.json`` next to ``model.engine``: TensorRT
version, GPU name and compute capability, precision, optimization profiles, IO tensors,
sha256 of the ONNX file and of the engine, the build options and the artifact metadata of
the ONNX file. :class:`~vitdeploy.runtimes.tensorrt.TensorRTRuntime` reads it *before*
deserializing and refuses an engine that does not match (:func:`check_compatibility`).

Nothing here imports torch, numpy, onnx or tensorrt, so the runtime can use it anywhere.

Compatibility rules follow NVIDIA's "Engine Compatibility" documentation (TensorRT 10.x and
11.x, https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/engine-compatibility.html):
an engine runs only with the TensorRT version that built it unless it was built
version-compatible (``BuilderFlag.VERSION_COMPATIBLE``), in which case a newer runtime of the
same major version (or 11.x for a 10.x engine) may load it; and it runs only on the compute
capability it was built for unless a hardware-compatibility level was set (``ampere+`` covers
compute capability 8.0 and newer).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.files import atomic_write_json
from vitdeploy.metadata import PREFIX, ArtifactMetadata, ShapeRange

MANIFEST_FORMAT = 1
HARDWARE_COMPATIBILITY_LEVELS = ("none", "ampere+", "same-compute-capability")
# Engine precisions = graph precisions: int8 and fp8 come from explicit Q/DQ graphs (strongly typed networks;
# TensorRT 11 removed BuilderFlag.INT8/FP16/FP8, and 10.x must not set them on a strongly typed network).
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
QUANTIZED_PRECISIONS = ("int8", "fp8")
# FP8 (E4M3) kernels exist from Ada/Hopper on (TensorRT support matrix: FP8 on compute capability 8.9 and 9.0+).
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)

Shape = tuple[int, ...]


class EngineMismatchError(ValueError):
    """The engine does not belong to this machine (or to its manifest); rebuild it or force loading."""


def manifest_path_for(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` → ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def format_shape(shape: Shape) -> str:
    """``(1, 3, 224, 224)`` → ``1x3x224x224`` (trtexec's notation)."""
    return "x".join(str(int(d)) for d in shape)


def parse_shape(text: str, what: str = "shape") -> Shape:
    """``1x3x224x224`` (or ``1,3,224,224``) → ``(1, 3, 224, 224)``; raises ``ValueError`` naming ``text``."""
    pieces = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in pieces)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not of the form NxCxHxW with integers") from None
    if any(d <= 0 for d in shape):
        raise ValueError(f"{what} {text!r} must have positive dimensions")
    return shape


@dataclass(frozen=True)
class OptimizationProfile:
    """Minimum, optimum and maximum shape of one input (TensorRT's ``IOptimizationProfile.set_shape``)."""

    input: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            object.__setattr__(self, name, tuple(int(d) for d in getattr(self, name)))

    def check_order(self) -> None:
        """Raise ``ValueError`` unless ranks agree and ``0 < min <= opt <= max`` on every axis."""
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(
                f"profile for {self.input!r} mixes ranks: min {format_shape(self.min)}, "
                f"opt {format_shape(self.opt)}, max {format_shape(self.max)}"
            )
        for axis, (low, best, high) in enumerate(zip(self.min, self.opt, self.max, strict=True)):
            if not 0 < low <= best <= high:
                raise ValueError(
                    f"profile for {self.input!r} axis {axis}: expected 0 < min <= opt <= max, got "
                    f"{low} <= {best} <= {high} (min {format_shape(self.min)}, opt {format_shape(self.opt)}, "
                    f"max {format_shape(self.max)})"
                )

    def contains(self, shape: Shape) -> bool:
        """Whether ``shape`` lies inside ``[min, max]`` on every axis."""
        return len(shape) == len(self.min) and all(
            low <= int(d) <= high for d, low, high in zip(shape, self.min, self.max, strict=True)
        )

    def describe(self) -> str:
        return f"{format_shape(self.min)} .. {format_shape(self.max)} (opt {format_shape(self.opt)})"

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizationProfile:
        return cls(input=data["input"], min=tuple(data["min"]), opt=tuple(data["opt"]), max=tuple(data["max"]))


def validate_profiles(
    profiles: list[OptimizationProfile],
    *,
    channels: int | None = None,
    multiple_of: int | None = None,
    shape_range: ShapeRange | None = None,
    range_name: str = "the ONNX file was validated on",
) -> None:
    """Check NCHW profiles before a build; raise ``ValueError`` naming the first bad value.

    Every profile must be ordered (``min <= opt <= max``), have ``channels`` channels, spatial
    sizes that are multiples of ``multiple_of`` (the patch stride) and stay inside
    ``shape_range`` (what the ONNX file was validated on; ``range_name`` says what it is).
    """
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    for index, profile in enumerate(profiles):
        where = f"profile {index} ({profile.describe()})"
        profile.check_order()
        if len(profile.min) != 4:
            raise ValueError(f"{where}: expected 4-D NCHW shapes, got rank {len(profile.min)}")
        for name in ("min", "opt", "max"):
            batch, chans, height, width = getattr(profile, name)
            if channels is not None and chans != channels:
                raise ValueError(f"{where}: {name} shape has {chans} channels, the model takes {channels}")
            if multiple_of:
                for axis, size in (("height", height), ("width", width)):
                    if size % multiple_of:
                        raise ValueError(
                            f"{where}: {name} {axis} {size} is not a multiple of the patch stride {multiple_of}"
                        )
        if shape_range is not None:
            axes = (("batch", 0, shape_range.batch), ("height", 2, shape_range.height), ("width", 3, shape_range.width))
            for axis, position, (low, high) in axes:
                if profile.min[position] < low or profile.max[position] > high:
                    raise ValueError(
                        f"{where}: {axis} {profile.min[position]}..{profile.max[position]} is outside the range "
                        f"{low}..{high} {range_name}; export with a wider range or narrow the profile"
                    )
    names = {p.input for p in profiles}
    if len(names) != 1:
        raise ValueError(f"all profiles must be for the same input, got {sorted(names)}")


def _profile_cost(profile: OptimizationProfile, shape: Shape) -> tuple[float, int]:
    # Distance to the shape TensorRT tuned for, on a log scale (so batch 2 vs 4 weighs like 128 vs 256),
    # then the volume of the range: a tighter profile usually holds faster kernels.
    distance = sum(abs(math.log(int(d)) - math.log(best)) for d, best in zip(shape, profile.opt, strict=True))
    volume = math.prod(profile.max) - math.prod(profile.min)
    return distance, volume


def select_profile(profiles: list[OptimizationProfile], shape: Shape) -> int:
    """Index of the profile to run ``shape`` with; ``ValueError`` naming the shape if none fits.

    Among the profiles whose ``[min, max]`` contains ``shape``, the one whose ``opt`` is closest
    (sum of absolute log-ratios per axis) wins; ties go to the tighter range, then the lower index.
    """
    shape = tuple(int(d) for d in shape)
    fitting = [i for i, p in enumerate(profiles) if p.contains(shape)]
    if not fitting:
        ranges = "; ".join(f"{i}: {p.describe()}" for i, p in enumerate(profiles))
        raise ValueError(
            f"input shape {format_shape(shape)} fits none of the engine's optimization profiles ({ranges}); "
            "rebuild the engine with a profile that covers it"
        )
    return min(fitting, key=lambda i: (*_profile_cost(profiles[i], shape), i))


def envelope(profiles: list[OptimizationProfile]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Smallest (batch, height, width) ranges covering every NCHW profile."""
    def axis(position: int) -> tuple[int, int]:
        return min(p.min[position] for p in profiles), max(p.max[position] for p in profiles)

    return axis(0), axis(2), axis(3)


@dataclass(frozen=True)
class EngineTensor:
    """One IO tensor of the engine: name, numpy dtype name, shape (-1 for dynamic), ``input``/``output``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineTensor:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]), mode=data["mode"])


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine was built on (or is about to run on)."""

    name: str
    compute_capability: str  # "8.9"

    @property
    def cc(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` → ``(10, 13, 0, 35)``; non-numeric tails are dropped (``"11.0.0rc1"`` → (11, 0, 0))."""
    parts = []
    for piece in str(text).split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    if not parts:
        raise ValueError(f"TensorRT version {text!r} does not start with a number")
    return tuple(parts)


@dataclass
class EngineManifest:
    """Everything ``vitdeploy build`` knows about an engine; written as ``<engine>.json``."""

    engine_file: str
    engine_sha256: str
    engine_bytes: int
    onnx_file: str
    onnx_sha256: str
    tensorrt_version: str
    gpu: GpuInfo
    precision: str
    profiles: list[OptimizationProfile]
    inputs: list[EngineTensor]
    outputs: list[EngineTensor]
    build_options: dict[str, Any] = field(default_factory=dict)
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    build_seconds: float = 0.0
    built_at: str = ""
    vitdeploy_version: str = ""
    converted_to_fp16: bool = False
    metadata: dict[str, Any] | None = None
    transforms: list[dict[str, Any]] = field(default_factory=list)  # graph rewrites made for this build
    layers_file: str | None = None  # the engine inspector's JSON layer list, beside the engine
    attention: dict[str, Any] | None = None  # AttentionFusion.to_dict() from that layer list
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY_LEVELS:
            raise ValueError(
                f"hardware compatibility {self.hardware_compatibility!r} is not one of {HARDWARE_COMPATIBILITY_LEVELS}"
            )

    @property
    def input(self) -> EngineTensor:
        if len(self.inputs) != 1:
            raise ValueError(f"expected one input tensor, the manifest lists {[t.name for t in self.inputs]}")
        return self.inputs[0]

    def artifact_metadata(self) -> ArtifactMetadata | None:
        """The ONNX file's :class:`ArtifactMetadata` (preprocessing, labels ...), if it had one."""
        if not self.metadata:
            return None
        return ArtifactMetadata.from_props({PREFIX + k: json.dumps(v) for k, v in self.metadata.items()})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu"] = asdict(self.gpu)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineManifest:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a missing or unknown field."""
        if int(data.get("format", 0)) > MANIFEST_FORMAT:
            raise ValueError(
                f"engine manifest format {data.get('format')} is newer than this vitdeploy reads ({MANIFEST_FORMAT}); "
                "upgrade vitdeploy"
            )
        known = set(cls.__dataclass_fields__)
        required = {
            name for name, f in cls.__dataclass_fields__.items() if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"engine manifest lacks {missing}; was it written by `vitdeploy build`?")
        data = {k: v for k, v in data.items() if k in known}
        data["gpu"] = GpuInfo(**data["gpu"])
        data["profiles"] = [OptimizationProfile.from_dict(p) for p in data["profiles"]]
        data["inputs"] = [EngineTensor.from_dict(t) for t in data["inputs"]]
        data["outputs"] = [EngineTensor.from_dict(t) for t in data["outputs"]]
        return cls(**data)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write as indented JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EngineManifest:
        """Read ``path``; ``FileNotFoundError``/``ValueError`` name the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"engine manifest {path} not found; engines built by `vitdeploy build` have one beside them "
                "(pass force=True to load an engine without it)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"engine manifest {path} is not valid JSON: {error}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as error:
            raise ValueError(f"engine manifest {path} is malformed: {error!r}") from None


@dataclass(frozen=True)
class Environment:
    """What the loading machine offers: its TensorRT version and GPU."""

    tensorrt_version: str
    gpu: GpuInfo


def _tensorrt_version_problem(built: str, running: str, version_compatible: bool) -> str | None:
    have, want = parse_version(running), parse_version(built)
    if not version_compatible:
        if have[:3] != want[:3]:
            return (
                f"engine was built with TensorRT {built} but TensorRT {running} is installed; "
                "engines only load with the TensorRT version that built them (rebuild it, or build with "
                "--version-compatible)"
            )
        return None
    same_major = have[0] == want[0]
    next_major_allowed = (want[0], have[0]) in {(10, 11), (8, 10)}
    if have < want or not (same_major or next_major_allowed):
        return (
            f"version-compatible engine from TensorRT {built} cannot load with TensorRT {running}; "
            "it needs the same or a newer TensorRT of the same major version (or 11.x for a 10.x engine)"
        )
    return None


def _gpu_problem(manifest: EngineManifest, gpu: GpuInfo) -> str | None:
    built, here = manifest.gpu.cc, gpu.cc
    level = manifest.hardware_compatibility
    if level == "ampere+":
        if here < (8, 0):
            return (
                f"engine was built hardware-compatible for Ampere and newer (compute capability >= 8.0) "
                f"but this GPU ({gpu.name}) has {gpu.compute_capability}"
            )
        return None
    if here != built:
        return (
            f"engine was built for compute capability {manifest.gpu.compute_capability} ({manifest.gpu.name}) "
            f"but this GPU ({gpu.name}) has {gpu.compute_capability}; rebuild it here"
            + ("" if level != "none" else ", or build with --hardware-compat ampere+")
        )
    return None


def check_compatibility(
    manifest: EngineManifest, environment: Environment | None = None, engine_sha256: str | None = None
) -> list[str]:
    """Every reason ``manifest``'s engine should not be loaded here; empty if it may.

    ``engine_sha256`` (of the engine file about to be deserialized) catches a stale or swapped
    engine; ``environment`` catches a foreign TensorRT version or GPU.
    """
    problems = []
    if engine_sha256 is not None and engine_sha256 != manifest.engine_sha256:
        problems.append(
            f"engine file sha256 {engine_sha256[:12]}... does not match the manifest's "
            f"{manifest.engine_sha256[:12]}... (the engine was replaced or corrupted after it was built)"
        )
    if environment is not None:
        version = _tensorrt_version_problem(
            manifest.tensorrt_version, environment.tensorrt_version, manifest.version_compatible
        )
        if version:
            problems.append(version)
        gpu = _gpu_problem(manifest, environment.gpu)
        if gpu:
            problems.append(gpu)
    return problems


# ---------------------------------------------------------------------------------------------
# The engine inspector's layer list, and whether attention was fused

# Fused multi-head-attention kernels carry "mha" (``_gemm_mha_v2``, ``fmha``), "flash" or "attention" in
# their tactic or layer type; NVIDIA's MHA-fusion guidance and its engineers on the tracker
# (NVIDIA/TensorRT#3243, #4167) name kernels "with `_mha` in the profile". Node names from the ONNX
# graph ("/blocks.0/attn/MatMul") must not count, so a layer's name is matched on "mha" alone.
_FUSED_KERNEL = re.compile(r"mha|flash|attention", re.IGNORECASE)
_FUSED_NAME = re.compile(r"(^|[^a-z])f?mha([^a-z]|v\d|$)", re.IGNORECASE)


def parse_layer_information(text: str) -> list[dict[str, Any]]:
    """Layers from ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    DETAILED engines give ``{"Layers": [{"Name", "LayerType", "Inputs", "Outputs", "TacticName", ...}]}``;
    LAYER_NAMES_ONLY engines give ``{"Layers": ["name", ...]}`` (returned as ``{"Name": name}``).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"engine layer information is not JSON: {error}") from None
    layers = data.get("Layers", []) if isinstance(data, dict) else data
    if not isinstance(layers, list):
        raise ValueError(f"engine layer information has no layer list (got {type(layers).__name__})")
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


@dataclass
class AttentionFusion:
    """What the engine's layer list says about attention: fused MHA kernels, leftover softmax layers."""

    layers: int
    fused_attention_layers: int
    softmax_layers: int
    detailed: bool  # the engine was built with ProfilingVerbosity.DETAILED (tactics and types known)
    expected: int | None = None  # attention blocks in the model (its depth), where known
    evidence: list[str] = field(default_factory=list)

    @property
    def fused(self) -> bool | None:
        """True: fused kernels found; False: detailed layer list without any; None: cannot tell."""
        if self.fused_attention_layers:
            return True
        return False if self.detailed else None

    def describe(self) -> str:
        if self.fused is None:
            return (f"unknown ({self.layers} layers; rebuild with detailed profiling verbosity to see tactics)")
        if not self.fused:
            return (f"no: no fused attention kernel among {self.layers} layers "
                    f"({self.softmax_layers} separate softmax layer(s))")
        expected = f" for {self.expected} attention block(s)" if self.expected else ""
        return f"yes: {self.fused_attention_layers} fused attention layer(s){expected} among {self.layers} layers"

    def to_dict(self) -> dict[str, Any]:
        return {"fused": self.fused, "layers": self.layers, "fused_attention_layers": self.fused_attention_layers,
                "softmax_layers": self.softmax_layers, "detailed": self.detailed, "expected": self.expected,
                "evidence": list(self.evidence), "summary": self.describe()}


def attention_fusion(layers: list[dict[str, Any]], expected: int | None = None) -> AttentionFusion:
    """Count fused-attention and separate softmax layers in an engine inspector layer list."""
    fused, softmax, evidence = 0, 0, []
    detailed = any("LayerType" in layer or "TacticName" in layer for layer in layers)
    for layer in layers:
        name = str(layer.get("Name", ""))
        kind = str(layer.get("LayerType", ""))
        tactic = str(layer.get("TacticName", ""))
        if _FUSED_KERNEL.search(kind) or _FUSED_KERNEL.search(tactic) or _FUSED_NAME.search(name):
            fused += 1
            if len(evidence) < 8:
                evidence.append(f"{name} ({kind or '?'}: {tactic or 'no tactic'})")
        elif kind.lower() == "softmax" or (not kind and "softmax" in name.lower()):
            softmax += 1
    return AttentionFusion(len(layers), fused, softmax, detailed, expected, evidence)


def layers_path_for(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` → ``model.engine.layers.json`` (the engine inspector's layer list)."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".layers.json")
