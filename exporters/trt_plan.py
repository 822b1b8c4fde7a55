"""Everything ``vitdeploy build`` decides before TensorRT is touched (pure Python + onnx, no torch).

Reads the ONNX file's self-description (:class:`~vitdeploy.metadata.ArtifactMetadata`),
turns ``--batch``/``--resolution``/``--profile``/``--min-shape``… into optimization profiles,
validates them against what the file was validated for, decides whether the fp32 graph must
be converted to fp16 first (precision lives in the graph: TensorRT ≥ 10.12
deprecates and 11.0 removes ``BuilderFlag.FP16``), and renders the equivalent ``trtexec``
command (flags as listed by ``trtexec --help``, samples/common/sampleOptions.cpp in
NVIDIA/TensorRT).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from vitdeploy.config import snap_to_stride
from vitdeploy.engine_manifest import (
    HARDWARE_COMPATIBILITY_LEVELS,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    OptimizationProfile,
    format_shape,
    layers_path_for,
    manifest_path_for,
    parse_shape,
    validate_profiles,
)
from vitdeploy.metadata import PREFIX, ArtifactMetadata, DeployableRange

# --softmax: "graph" builds the graph as it is; "fp16" computes softmax in fp16 (the Cast→Softmax(fp32)→Cast
# islands removed), leaving its precision to TensorRT's fused attention kernel (see exporters/trt_attention.py).
SOFTMAX_CHOICES = ("graph", "fp16")
MAX_OPTIMIZATION_LEVEL = 5  # IBuilderConfig.builder_optimization_level: 0..5, TensorRT's default 3
TRTEXEC_HARDWARE_COMPAT = {"none": "none", "ampere+": "ampere+", "same-compute-capability": "sameComputeCapability"}
_SIZE_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}  # bare numbers are MiB, as trtexec


def parse_size(text: str, what: str = "workspace") -> int:
    """``"4G"``, ``"512M"``, ``"1024"`` (MiB, as ``trtexec --memPoolSize``) → bytes."""
    cleaned = str(text).strip().lower().removesuffix("ib").removesuffix("i")
    unit = cleaned[-1] if cleaned and cleaned[-1] in "bkmg" else ""
    number = cleaned[: len(cleaned) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a size like 4G, 512M or 1024 (MiB)") from None
    if value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return int(value * _SIZE_UNITS[unit])


@dataclass
class BuildOptions:
    """Builder settings besides shapes. ``precision=None`` keeps the graph's precision.

    ``softmax="fp16"`` (fp16 engines only) rewrites the graph so softmax runs in fp16 inside
    attention, parity-checks the rewrite against the graph on onnxruntime, then builds from it.
    ``detailed_profiling`` builds with ``ProfilingVerbosity.DETAILED`` so the engine inspector
    reports each layer's type and tactic (whether attention was fused). ``beyond_validated``
    lets profiles reach the file's declared range instead of the validated one (warned, and
    recorded in the manifest's build options).
    """

    precision: str | None = None
    workspace: int | None = None
    optimization_level: int | None = None
    timing_cache: str | None = None
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    verbose: bool = False
    tf32: bool = True
    softmax: str = "graph"
    detailed_profiling: bool = True
    beyond_validated: bool = False

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.softmax not in SOFTMAX_CHOICES:
            raise ValueError(f"softmax {self.softmax!r} is not one of {SOFTMAX_CHOICES}")
        if self.workspace is not None and self.workspace <= 0:
            raise ValueError(f"workspace {self.workspace} must be a positive number of bytes")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= MAX_OPTIMIZATION_LEVEL:
            raise ValueError(
                f"builder optimization level {self.optimization_level} is outside 0..{MAX_OPTIMIZATION_LEVEL}"
            )
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY_LEVELS:
            raise ValueError(
                f"hardware compatibility {self.hardware_compatibility!r} is not one of {HARDWARE_COMPATIBILITY_LEVELS}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "strongly_typed": True,
            "workspace_bytes": self.workspace,
            "builder_optimization_level": self.optimization_level,
            "timing_cache": self.timing_cache,
            "hardware_compatibility": self.hardware_compatibility,
            "version_compatible": self.version_compatible,
            "tf32": self.tf32,
            "verbose": self.verbose,
            "softmax": self.softmax,
            "profiling_verbosity": "detailed" if self.detailed_profiling else "layer_names_only",
            "beyond_validated": self.beyond_validated,
        }


@dataclass
class OnnxInfo:
    """What the build needs to know about the ONNX file."""

    path: Path
    input_name: str
    input_shape: list[int | str]
    output_names: list[str]
    precision: str
    opset: int | None
    metadata: ArtifactMetadata | None = None

    @property
    def channels(self) -> int | None:
        if self.metadata is not None:
            return int(self.metadata.model_config.get("in_channels", 3))
        dim = self.input_shape[1] if len(self.input_shape) > 1 else None
        return dim if isinstance(dim, int) else None

    @property
    def stride(self) -> int | None:
        return self.metadata.stride if self.metadata is not None else None


_QUANTIZED_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8"}


def _quantized_type(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> int | None:
    """The element type a QuantizeLinear produces: ``output_dtype`` (opset 21), else its zero point's, else uint8."""
    for attribute in node.attribute:
        if attribute.name == "output_dtype" and attribute.i:
            return int(attribute.i)
    if len(node.input) > 2 and node.input[2] in initializers:
        return int(initializers[node.input[2]].data_type)
    return onnx.TensorProto.UINT8 if len(node.input) <= 2 or not node.input[2] else None


def quantized_precision(model: onnx.ModelProto) -> str | None:
    """``"int8"``/``"fp8"`` for a Q/DQ graph (by what its QuantizeLinear nodes produce), ``None`` for a float graph.

    A graph that quantizes to both counts as the type most of its QuantizeLinear nodes produce.
    ``ValueError`` for a quantized type TensorRT's strongly typed networks do not take (uint8, FP8 E5M2 ...).
    """
    initializers = {t.name: t for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        element = _quantized_type(node, initializers)
        if element is None:
            continue  # zero point computed in the graph: its type is not visible without inference
        if element not in _QUANTIZED_TYPES:
            name = onnx.TensorProto.DataType.Name(element)
            raise ValueError(f"QuantizeLinear {node.name or node.output[0]!r} produces {name}; TensorRT takes "
                             "INT8 (symmetric) and FLOAT8E4M3FN quantization only")
        precision = _QUANTIZED_TYPES[element]
        counts[precision] = counts.get(precision, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda p: (counts[p], p == "fp8"))


def graph_precision(model: onnx.ModelProto) -> str:
    """``"int8"``/``"fp8"`` for Q/DQ graphs; else ``"fp16"`` if most floating-point weight bytes are half, else ``"fp32"``."""
    quantized = quantized_precision(model)
    if quantized is not None:
        return quantized
    counts = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for tensor in model.graph.initializer:
        if tensor.data_type in counts:
            size = 1
            for dim in tensor.dims:
                size *= dim
            counts[tensor.data_type] += size * (2 if tensor.data_type == onnx.TensorProto.FLOAT16 else 4)
    return "fp16" if counts[onnx.TensorProto.FLOAT16] > counts[onnx.TensorProto.FLOAT] else "fp32"


def read_onnx_info(path: str | os.PathLike[str]) -> OnnxInfo:
    """Read IO, precision and vitdeploy metadata of an ONNX file (external data is not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, which is not a ValueError
        raise ValueError(f"{path} is not an ONNX model: {error}") from None
    props = {p.key: p.value for p in model.metadata_props}
    metadata = ArtifactMetadata.from_props(props) if any(k.startswith(PREFIX) for k in props) else None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{path} has {len(inputs)} graph inputs {[v.name for v in inputs]}; vitdeploy builds one-input models")
    dims = inputs[0].type.tensor_type.shape.dim
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    precision = graph_precision(model) if metadata is None or metadata.precision not in PRECISIONS else metadata.precision
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxInfo(path, inputs[0].name, shape, [o.name for o in model.graph.output], precision, opset, metadata)


def profile_range(info: OnnxInfo, beyond_validated: bool = False) -> DeployableRange | None:
    """The range profiles may span: the validated one (the declared one with ``beyond_validated``,
    see :meth:`~vitdeploy.metadata.ArtifactMetadata.deployable_range`); ``None`` without metadata."""
    if info.metadata is None:
        return None
    return info.metadata.deployable_range(beyond_validated, info.path.name)


def default_ranges(info: OnnxInfo, beyond_validated: bool = False) -> dict[str, tuple[int, int, int]]:
    """Profile axes from the artifact metadata: min/max = the validated range; opt = batch min, native size.

    The rule (stated in ``vitdeploy build --help``): opt batch is the smallest validated batch
    (1 by default, the latency case) and opt height/width is the model's native
    ``image_size`` clamped into the validated range. ``beyond_validated``: the declared range.
    """
    allowed = profile_range(info, beyond_validated)
    if allowed is None:
        raise ValueError(
            f"{info.path} carries no vitdeploy metadata, so no default profile can be derived; pass "
            "--min-shape/--opt-shape/--max-shape (or --batch and --resolution)"
        )
    rng = allowed.shape_range
    native = int(info.metadata.model_config.get("image_size", rng.height[0]))
    stride = info.metadata.stride
    return {
        "batch": (rng.batch[0], rng.batch[0], rng.batch[1]),
        "height": (rng.height[0], snap_to_stride(native, *rng.height, stride), rng.height[1]),
        "width": (rng.width[0], snap_to_stride(native, *rng.width, stride), rng.width[1]),
    }


def profile_from_ranges(info: OnnxInfo, batch: tuple[int, int, int], height: tuple[int, int, int],
                        width: tuple[int, int, int]) -> OptimizationProfile:
    """One NCHW profile from per-axis (min, opt, max)."""
    channels = info.channels or 3
    shapes = [(batch[i], channels, height[i], width[i]) for i in range(3)]
    return OptimizationProfile(info.input_name, *shapes)


def _parse_triple(text: str, what: str) -> tuple[int, int, int]:
    pieces = text.split(":")
    if len(pieces) == 1:
        pieces *= 3
    if len(pieces) != 3:
        raise ValueError(f"{what} {text!r} is not N or MIN:OPT:MAX")
    try:
        values = tuple(int(p) for p in pieces)
    except ValueError:
        raise ValueError(f"{what} {text!r} must contain integers") from None
    return values  # type: ignore[return-value]


def parse_profile_spec(text: str, info: OnnxInfo, defaults: dict[str, tuple[int, int, int]] | None) -> OptimizationProfile:
    """``--profile`` value → profile.

    Either axes, ``batch=1:8:32,resolution=224:224:384`` (also ``res``, ``height``, ``width``;
    each ``N`` or ``MIN:OPT:MAX``, missing axes from ``defaults``), or full shapes,
    ``min=1x3x224x224,opt=8x3x224x224,max=32x3x224x224``.
    """
    items: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--profile {text!r}: {part!r} is not key=value")
        key = {"res": "resolution", "bs": "batch"}.get(key.strip().lower(), key.strip().lower())
        if key in items:
            raise ValueError(f"--profile {text!r} names {key!r} twice")
        items[key] = value.strip()
    shape_keys, axis_keys = {"min", "opt", "max"}, {"batch", "resolution", "height", "width"}
    unknown = set(items) - shape_keys - axis_keys
    if unknown:
        raise ValueError(f"--profile {text!r}: unknown key(s) {sorted(unknown)}; use batch, resolution, height, width "
                         "or min, opt, max")
    if set(items) & shape_keys:
        if set(items) != shape_keys:
            raise ValueError(f"--profile {text!r}: give all of min, opt and max shapes, and no axis keys")
        shapes = [parse_shape(items[k], f"--profile {k}") for k in ("min", "opt", "max")]
        return OptimizationProfile(info.input_name, *shapes)
    if "resolution" in items and ({"height", "width"} & set(items)):
        raise ValueError(f"--profile {text!r}: use resolution or height/width, not both")
    axes = dict(defaults or {})
    if "batch" in items:
        axes["batch"] = _parse_triple(items["batch"], "--profile batch")
    if "resolution" in items:
        axes["height"] = axes["width"] = _parse_triple(items["resolution"], "--profile resolution")
    for axis in ("height", "width"):
        if axis in items:
            axes[axis] = _parse_triple(items[axis], f"--profile {axis}")
    missing = [a for a in ("batch", "height", "width") if a not in axes]
    if missing:
        raise ValueError(f"--profile {text!r} leaves {missing} unset and the ONNX file has no metadata to default them")
    return profile_from_ranges(info, axes["batch"], axes["height"], axes["width"])


def make_profiles(
    info: OnnxInfo,
    *,
    batch: tuple[int, int, int] | None = None,
    resolution: tuple[int, int, int] | None = None,
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    profile_specs: list[str] | tuple[str, ...] = (),
    beyond_validated: bool = False,
) -> list[OptimizationProfile]:
    """Profiles from the command line, defaulting from the artifact metadata; validated.

    ``--batch``/``--resolution`` set those axes for every profile (and ``--profile`` specs
    override them per profile); explicit ``--min/opt/max-shape`` make a single profile. Every
    profile stays inside the validated range, or the declared one with ``beyond_validated``.
    """
    explicit = [s for s in (min_shape, opt_shape, max_shape) if s is not None]
    if explicit and len(explicit) != 3:
        raise ValueError("give all three of --min-shape, --opt-shape and --max-shape, or none")
    if explicit and profile_specs:
        raise ValueError("--min-shape/--opt-shape/--max-shape and --profile are exclusive; use --profile min=...,opt=...,max=...")
    if explicit and (batch or resolution):
        raise ValueError("--min-shape/--opt-shape/--max-shape already fix every axis; drop --batch/--resolution")
    defaults: dict[str, tuple[int, int, int]] | None
    try:
        defaults = default_ranges(info, beyond_validated)
    except ValueError:
        if not explicit and not profile_specs and not (batch and resolution):
            raise
        defaults = None
    if batch:
        defaults = {**(defaults or {}), "batch": tuple(batch)}
    if resolution:
        defaults = {**(defaults or {}), "height": tuple(resolution), "width": tuple(resolution)}
    if explicit:
        shapes = [parse_shape(s, flag) for s, flag in zip(explicit, ("--min-shape", "--opt-shape", "--max-shape"), strict=True)]
        profiles = [OptimizationProfile(info.input_name, *shapes)]
    elif profile_specs:
        profiles = [parse_profile_spec(spec, info, defaults) for spec in profile_specs]
    else:
        assert defaults is not None
        profiles = [profile_from_ranges(info, defaults["batch"], defaults["height"], defaults["width"])]
    allowed = profile_range(info, beyond_validated)
    try:
        validate_profiles(profiles, channels=info.channels, multiple_of=info.stride,
                          shape_range=allowed.shape_range if allowed is not None else None,
                          range_name="the ONNX file was validated on" if allowed is None or
                          allowed.source == "validated" else "the ONNX file declares")
    except ValueError as error:
        if allowed is None or allowed.source != "validated":
            raise
        try:  # inside the declared range: say how to build beyond the validated one
            validate_profiles(profiles, shape_range=info.metadata.shape_range, range_name="the ONNX file declares")
        except ValueError:
            raise error from None
        raise ValueError(f"{error}; --beyond-validated builds up to the declared range "
                         f"({info.metadata.shape_range.describe()}), warned and recorded") from None
    return profiles


@dataclass
class BuildPlan:
    """A validated build: which graph, which profiles, which options, where the engine goes."""

    onnx: OnnxInfo
    engine_path: Path
    profiles: list[OptimizationProfile]
    options: BuildOptions = field(default_factory=BuildOptions)

    @property
    def range_warning(self) -> str | None:
        """Why the profiles may leave the validated range (``--beyond-validated``, or a file never
        validated); ``None`` when they stay inside it."""
        allowed = profile_range(self.onnx, self.options.beyond_validated)
        return allowed.warning if allowed is not None else None

    @property
    def precision(self) -> str:
        """The engine's precision: the requested one, else the graph's."""
        return self.options.precision or self.onnx.precision

    @property
    def convert_to_fp16(self) -> bool:
        """An fp16 engine was asked for an fp32 graph: convert the graph first (strong typing)."""
        return self.precision == "fp16" and self.onnx.precision == "fp32"

    @property
    def rewrites_softmax(self) -> bool:
        """Softmax is to run in fp16 (``--softmax fp16``): the graph is rewritten and parity-checked first."""
        return self.options.softmax == "fp16"

    @property
    def rewrites_graph(self) -> bool:
        """The engine is built from a rewritten copy of the ONNX file, not from the file itself."""
        return self.convert_to_fp16 or self.rewrites_softmax

    @property
    def layers_path(self) -> Path:
        """Where the engine inspector's layer list goes: ``<engine>.layers.json``."""
        return layers_path_for(self.engine_path)

    @property
    def manifest_path(self) -> Path:
        return manifest_path_for(self.engine_path)

    @property
    def fp16_onnx_path(self) -> Path:
        """Where ``--print-trtexec`` writes the rewritten graph (fp16 conversion, fp16 softmax): beside the engine."""
        suffix = ".fp16.onnx" if not self.rewrites_softmax else ".fp16-softmax.onnx"
        return self.engine_path.with_name(self.engine_path.stem + suffix)


def plan_build(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str] | None = None,
    *,
    options: BuildOptions | None = None,
    **profile_args: Any,
) -> BuildPlan:
    """Read ``onnx_path``, make and validate the profiles (:func:`make_profiles` arguments), check precision."""
    info = read_onnx_info(onnx_path)
    options = options or BuildOptions()
    check_precision_request(info, options)
    engine = Path(engine_path) if engine_path is not None else info.path.with_suffix(".engine")
    if engine.suffix.lower() == ".onnx" or engine.resolve() == info.path.resolve():
        raise ValueError(f"output {engine} would overwrite the ONNX input; name the engine e.g. {info.path.stem}.engine")
    profiles = make_profiles(info, beyond_validated=options.beyond_validated, **profile_args)
    return BuildPlan(info, engine, profiles, options)


def check_precision_request(info: OnnxInfo, options: BuildOptions) -> None:
    """``ValueError`` unless the requested engine precision can come from this graph (strong typing).

    The engine's precision is the graph's: only fp32 → fp16 is a conversion vitdeploy makes;
    int8/fp8 engines need a Q/DQ graph of that type, and a Q/DQ graph builds only as itself.
    """
    wanted, graph = options.precision, info.precision
    if wanted is not None and wanted != graph and not (wanted == "fp16" and graph == "fp32"):
        if wanted in QUANTIZED_PRECISIONS:
            how = f"quantize it first (vitdeploy export --precision {wanted})"
        elif graph in QUANTIZED_PRECISIONS:
            how = f"build it as {graph}, or build from the float graph it was quantized from"
        else:
            how = f"export with --precision {wanted}"
        raise ValueError(f"{info.path} is a {graph} graph and a strongly typed engine has the graph's precision, "
                         f"so a {wanted} engine cannot be built from it: {how}")
    effective = wanted or graph
    if options.softmax == "fp16" and effective != "fp16":
        raise ValueError(f"--softmax fp16 applies to fp16 engines; {info.path} builds a {effective} engine")


def _trtexec_size(nbytes: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


def trtexec_command(plan: BuildPlan, onnx_path: str | os.PathLike[str] | None = None) -> list[str]:
    """The ``trtexec`` invocation that builds the same engine (argv list; see :func:`format_command`).

    ``--stronglyTyped`` is required on TensorRT 10.x and a no-op on 11.x (int8/fp8 come from the
    graph's Q/DQ, never from ``--int8``/``--fp8``); ``--skipInference`` stops after the build.
    Several profiles use ``--profile=N`` before each shape triple. With detailed profiling,
    ``--profilingVerbosity=detailed --exportLayerInfo=<engine>.layers.json`` writes the layer list
    ``vitdeploy inspect`` reads.
    """
    options = plan.options
    argv = ["trtexec", f"--onnx={onnx_path or plan.onnx.path}", f"--saveEngine={plan.engine_path}", "--stronglyTyped"]
    for index, profile in enumerate(plan.profiles):
        if len(plan.profiles) > 1:
            argv.append(f"--profile={index}")
        for flag, shape in (("minShapes", profile.min), ("optShapes", profile.opt), ("maxShapes", profile.max)):
            argv.append(f"--{flag}={profile.input}:{format_shape(shape)}")
    if options.workspace:
        argv.append(f"--memPoolSize=workspace:{_trtexec_size(options.workspace)}")
    if options.optimization_level is not None:
        argv.append(f"--builderOptimizationLevel={options.optimization_level}")
    if options.timing_cache:
        argv.append(f"--timingCacheFile={options.timing_cache}")
    if options.hardware_compatibility != "none":
        argv.append(f"--hardwareCompatibilityLevel={TRTEXEC_HARDWARE_COMPAT[options.hardware_compatibility]}")
    if options.version_compatible:
        argv.append("--versionCompatible")
    if not options.tf32:
        argv.append("--noTF32")
    if options.detailed_profiling:
        argv += ["--profilingVerbosity=detailed", f"--exportLayerInfo={plan.layers_path}"]
    if options.verbose:
        argv.append("--verbose")
    argv.append("--skipInference")
    return argv


def format_command(argv: list[str]) -> str:
    """Shell-quoted command line."""
    return shlex.join(argv)
