"""Export a ViT to ONNX with dynamic batch, height and width, in fp32, fp16, int8 or fp8, validated before hand-over.

The graph takes ``pixel_values [batch, 3, height, width]`` and returns the outputs asked for
(:mod:`vitdeploy.outputs`; by default ``logits [batch, num_classes]`` for a classifier, the pooled
embedding for a headless backbone), in canonical order, and nothing else. Nothing
in it is tied to one batch or sequence length: the position embeddings are resampled inside
the graph (bicubic ``Resize``, antialias off) to whatever grid the input gives. Attention is
exported in its explicit form, ``MatMul(Q * scale, K^T) -> Softmax -> MatMul(., V)``, the shape
TensorRT's fused multi-head attention recognises; LayerNorm becomes ``LayerNormalization``
(opset >= 17).

fp16 graphs come from the model cast to fp16 with the precision policy applied
(``fp32_ops`` computing in fp32), so the eager model under the same policy is a like-for-like
reference; :func:`vitdeploy.exporters.fp16.keep_ops_in_fp32` then makes sure the listed ops
really run in fp32 in the graph.

int8 and fp8 graphs are the traced fp32 graph quantized on calibration images
(:func:`vitdeploy.exporters.quantize.quantize_model`: explicit Q/DQ, what TensorRT builds INT8/FP8
engines from) and validated against the eager fp32 model with their precision's gate.

The file is written under a temporary name in the target folder, validated with onnxruntime
against the eager model, and only then renamed to its final name, so a crash never leaves a
half-written file under it. Graphs
larger than ``external_data_threshold`` keep their weights in ``<name>.data`` beside the file.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.constants import (
    DEFAULT_FP32_OPS,
    GRAPH_PRECISIONS,
    INPUT_NAME,
    QUANTIZED_PRECISIONS,
    check_precision,
)
from vitdeploy.files import temporary_folder
from vitdeploy.metadata import (
    CLASS_TOKEN_LAST_BLOCK,
    CPU_VARIANT,
    ArtifactMetadata,
    ShapeRange,
    TensorInfo,
)
from vitdeploy.outputs import (
    LAST_HIDDEN_STATE,
    TOKEN_OUTPUTS,
    check_outputs,
    default_outputs,
    output_dims,
    output_shape,
)
from vitdeploy.parity import ParityReport

from .fp16 import keep_ops_in_fp32
from .graph import graph_bytes, opset_version, set_metadata
from .ort_fusion import CPU_VARIANT_PRECISIONS, cpu_variant, unfused_parts

MIN_OPSET = 17
# Protobuf cannot serialise messages of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
Progress = Callable[[str], None]


@functools.cache
def max_opset() -> int:
    """The highest opset this machine can export and validate: what the installed onnx defines and
    the installed onnxruntime loads (probed once with a one-node model; no public API says it)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def loads(version: int) -> bool:
        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        model.ir_version = min(model.ir_version, onnx.IR_VERSION)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any refusal means "not this opset"
            return False
        return True

    highest = onnx.defs.onnx_opset_version()
    while highest > MIN_OPSET and not loads(highest):
        highest -= 1
    return highest


def check_opset(opset: int) -> int:
    """``opset`` if this machine can export and validate it, else ``ValueError`` naming the range."""
    if not MIN_OPSET <= int(opset) <= max_opset():
        raise ValueError(f"opset {opset} is outside {MIN_OPSET}..{max_opset()} (LayerNormalization needs "
                         f">= {MIN_OPSET}; the installed onnx/onnxruntime support up to {max_opset()}; default 18)")
    return int(opset)


class ExportError(RuntimeError):
    """The exporter produced a graph that breaks one of the artifact's guarantees."""


class ExportValidationError(ExportError):
    """The exported graph does not match the eager model within tolerance; carries the report."""

    def __init__(self, report: ParityReport, kept: Path | None = None) -> None:
        self.report = report
        self.kept = kept
        where = f"; the failed file was kept as {kept}" if kept else " (pass keep_failed to keep the file)"
        super().__init__(
            f"exported graph failed validation{where}:\n" + report.format_table()
        )


class SourceCheckError(ExportValidationError):
    """The exported artifact disagrees with the source library's own model of the checkpoint (its graph, or
    the preprocessing it records against the library's own); carries the
    :class:`~vitdeploy.exporters.source_check.SourceCheckResult` (its ``failure_lines`` say by how much)."""

    def __init__(self, result: Any, kept: Path | None = None) -> None:
        self.result = result
        ExportError.__init__(self, f"exported artifact disagrees with {result.reference}: "
                             + "; ".join(result.failure_lines()))
        self.report = result.report or ParityReport(candidate="artifact vs source")
        self.kept = kept


@dataclass
class ExportOptions:
    """What to export and how to check it. Sizes are inclusive ``(min, max)`` ranges.

    ``height``/``width`` default to half to twice the model's native size, rounded to its
    stride; every bound must be a multiple of ``config.stride``. The batch size used in
    validation is capped at ``validation_max_batch`` (the report says so); the default batch
    range ends at that cap, so by default the validated range is the declared one. ``outputs`` names the
    graph's outputs (:mod:`vitdeploy.outputs`; ``None``: :func:`~vitdeploy.outputs.default_outputs`
    of the model). An export of
    per-image vectors only (logits, pooled or projected embedding) of a class-token model computes
    its last block for the class token alone (exact, and about one block's work less);
    ``class_token_last_block=False`` turns that off (see :func:`uses_class_token_last_block`).
    ``source_check`` (a :class:`~vitdeploy.exporters.source_check.SourcePlan`) also checks the
    validated graph against the checkpoint's source library (timm, transformers) and refuses it
    when they disagree; the metadata's validation record says what was checked or why not.
    ``cpu_variant`` also writes ``<stem>.cpu.onnx`` beside an fp32 or int8 file: the same graph
    with onnxruntime CPU contrib ops (:func:`~vitdeploy.exporters.ort_fusion.cpu_variant`),
    validated like the portable file, which ``OrtRuntime`` runs on CPU in its place.
    """

    batch: tuple[int, int] = (1, 8)
    height: tuple[int, int] | None = None
    width: tuple[int, int] | None = None
    opset: int = 18
    precision: str = "fp32"
    fp32_ops: tuple[str, ...] = DEFAULT_FP32_OPS
    fp16_io: bool = False
    outputs: tuple[str, ...] | None = None
    class_token_last_block: bool = True
    simplify: bool = False
    validate: bool = True
    keep_failed: bool = False
    source: str = ""
    source_sha256: str = ""
    source_format: str = ""  # ResolvedModel.format: "variant" marks random weights in the metadata
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    validation_max_batch: int = 8
    validation_images: Sequence[Any] | None = None
    preflight: bool = True
    cpu_variant: bool = True
    # int8/fp8 only: how to quantize (None = QuantizeOptions defaults for the precision), and the
    # calibration images (a folder, or None for the bundled photos plus synthetic crops).
    quantize: Any = None
    calibration: str | os.PathLike[str] | None = None
    calibration_size: int = 64
    source_check: Any = None  # a SourcePlan; None: no check against the source library, none recorded

    def __post_init__(self) -> None:
        check_precision(self.precision, GRAPH_PRECISIONS)
        if self.precision in QUANTIZED_PRECISIONS:
            from vitdeploy.exporters.quantize import QuantizeOptions

            if self.quantize is None:
                self.quantize = QuantizeOptions(precision=self.precision)
            elif self.quantize.precision != self.precision:
                raise ValueError(f"quantize options are for {self.quantize.precision}, the export for {self.precision}")
            if self.calibration_size < 1:
                raise ValueError(f"calibration_size must be >= 1, got {self.calibration_size}")
        elif self.quantize is not None or self.calibration is not None:
            raise ValueError(f"quantize/calibration options need precision int8 or fp8, not {self.precision!r}")
        check_opset(self.opset)
        if self.fp16_io and self.precision != "fp16":
            raise ValueError("fp16_io needs precision='fp16'")
        self.fp32_ops = tuple(self.fp32_ops)
        unknown = sorted(set(self.fp32_ops) - set(DEFAULT_FP32_OPS))
        if unknown:
            raise ValueError(
                f"fp32_ops {unknown} are not supported by the model's precision policy; "
                f"expected a subset of {list(DEFAULT_FP32_OPS)}"
            )
        if self.validation_max_batch < 1:
            raise ValueError(f"validation_max_batch must be >= 1, got {self.validation_max_batch}")
        if self.outputs is not None:
            if isinstance(self.outputs, str):
                raise ValueError(f"outputs must be a sequence of output names, got the string {self.outputs!r}")
            self.outputs = tuple(self.outputs)

    def output_names(self, config: Any) -> tuple[str, ...]:
        """The graph's outputs for ``config``, in canonical order; ``ValueError`` naming one it cannot have."""
        names = tuple(self.outputs) if self.outputs is not None else default_outputs(config)
        return check_outputs(names, config)

    def shape_range(self, config: Any) -> ShapeRange:
        """The declared range for ``config``; raises ``ValueError`` naming a bound off the stride."""
        stride = config.stride
        default = config.default_size_range()
        shape_range = ShapeRange(batch=tuple(self.batch), height=tuple(self.height or default),
                                 width=tuple(self.width or default))
        for axis in ("height", "width"):
            for bound in getattr(shape_range, axis):
                if bound % stride:
                    raise ValueError(
                        f"{axis} bound {bound} is not a multiple of the model's stride {stride} "
                        f"(patch size x backbone stride); use e.g. {max(stride, bound // stride * stride)}"
                    )
        return shape_range


@dataclass
class ExportResult:
    """A validated ONNX file and what was measured on it."""

    path: Path
    metadata: ArtifactMetadata
    report: ParityReport | None
    seconds: float
    data_path: Path | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    preflight: Any = None
    variant_path: Path | None = None  # the validated onnxruntime-CPU graph beside the file
    variant_report: ParityReport | None = None
    quantization: dict[str, Any] | None = None  # the quantize transform record of an int8/fp8 export
    source_check: Any = None  # the SourceCheckResult, when the export was given a source plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "path": str(self.path),
            "cpu_variant": str(self.variant_path) if self.variant_path else None,
            "cpu_variant_validation": self.variant_report.to_dict() if self.variant_report else None,
            "data_path": str(self.data_path) if self.data_path else None,
            "seconds": round(self.seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "precision": self.metadata.precision,
            "shape_range": {"batch": list(self.metadata.shape_range.batch),
                            "height": list(self.metadata.shape_range.height),
                            "width": list(self.metadata.shape_range.width)},
            "validation": self.report.to_dict() if self.report else None,
            "preflight": _preflight_dict(self.preflight),
            "source_check": self.source_check.to_dict() if self.source_check is not None else None,
        }


def _preflight_dict(report: Any) -> Any:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return {"ok": bool(getattr(report, "ok", True)), "findings": [str(f) for f in getattr(report, "findings", [])]}


class _Stages:
    """Times the stages and reports them through the progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.say(f"{name} done in {self.seconds[name]:.1f}s")


# ---------------------------------------------------------------------------------------------
# Tracing


def uses_class_token_last_block(config: Any, options: ExportOptions) -> bool:
    """Whether the export computes the last block for the class token only.

    It does unless the graph also outputs tokens (``last_hidden_state``, ``patch_tokens``), the
    head reads more than the prefix tokens (mean, attention or ``token_avg`` pooling), or
    ``options.class_token_last_block`` is off (the whole block asked for).
    """
    outputs = options.output_names(config)
    return (config.num_pooled_prefix_tokens > 0 and not any(name in TOKEN_OUTPUTS for name in outputs)
            and options.class_token_last_block)


def _export_module(model: Any, precision: str, fp16_io: bool, outputs: tuple[str, ...],
                   class_token_last_block: bool) -> Any:
    """The module torch.onnx traces: casts in/out around the (policy-prepared) model's ``outputs``.

    :meth:`~vitdeploy.model.VisionTransformer.forward_outputs` runs the last block for the class
    token alone when only per-image vectors are asked (same values, less work); without
    ``class_token_last_block`` the tokens are asked for too (forcing the whole block) and dropped.
    """
    import torch

    tokens = any(name in TOKEN_OUTPUTS for name in outputs)
    asked = outputs if class_token_last_block or tokens else (*outputs, LAST_HIDDEN_STATE)

    class ExportWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.dtype = torch.float16 if precision == "fp16" else torch.float32
            self.out_dtype = torch.float16 if fp16_io else torch.float32

        def forward(self, pixel_values: torch.Tensor) -> Any:
            values = self.model.forward_outputs(pixel_values.to(self.dtype), asked)
            result = tuple(values[name].to(self.out_dtype) for name in outputs)
            return result[0] if len(result) == 1 else result

    return ExportWrapper().eval()


def trace_to_onnx(model: Any, options: ExportOptions) -> Any:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch, height and width → ``onnx.ModelProto``."""
    import torch

    from vitdeploy.model import prepare_model

    config = model.config
    stride = config.stride
    param = next(model.parameters())
    # Quantized graphs are made from the fp32 graph (exporters/quantize.py).
    precision = "fp16" if options.precision == "fp16" else "fp32"
    if precision == "fp32" and param.dtype == torch.float32 and param.device.type == "cpu":
        prepared = model  # no copy (saves the model's size in memory); attention switched below
    else:
        prepared = prepare_model(model, precision, options.fp32_ops, fused_attention=False, device="cpu")
    output_names = list(options.output_names(config))
    module = _export_module(prepared, precision, options.fp16_io, tuple(output_names),
                            class_token_last_block=uses_class_token_last_block(config, options))
    in_dtype = torch.float16 if options.fp16_io else torch.float32
    example = torch.zeros(2, config.in_channels, config.image_size, config.image_size, dtype=in_dtype)
    max_grid = max(1024, 4 * config.image_size // stride)
    batch = torch.export.Dim("batch", min=1, max=2**20)
    grid_h = torch.export.Dim("grid_h", min=1, max=max_grid)
    grid_w = torch.export.Dim("grid_w", min=1, max=max_grid)
    dynamic = {"pixel_values": {0: batch, 2: stride * grid_h, 3: stride * grid_w}}
    # torch.onnx prints its own progress to stdout; keep stdout clean for command results.
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad(), _explicit_attention(prepared), _quiet_exporter():
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=output_names,
            dynamic_shapes=dynamic, opset_version=int(options.opset), optimize=True, verbose=False,
        )
    _fold_constants(program.model)
    proto = program.model_proto
    del program, module, prepared
    return proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter noise that says nothing about this model (torchvision ops, pytree deprecations)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _explicit_attention(model: Any) -> Iterator[None]:
    """Temporarily select the explicit MatMul -> Softmax -> MatMul attention (and eval mode)."""
    from vitdeploy.model import Attention

    saved = [(module, module.fused) for module in model.modules() if isinstance(module, Attention)]
    training = model.training
    model.eval()
    for module, _ in saved:
        module.fused = False
    try:
        yield
    finally:
        for module, fused in saved:
            module.fused = fused
        model.train(training)


def _fold_constants(ir_model: Any) -> None:
    """Fold every constant subgraph, however large (the exporter's own pass stops at 8192 elements).

    This bakes e.g. the hybrid backbone's weight standardisation into the conv weights instead
    of recomputing it in the graph. Skipped quietly if onnxscript's optimizer API differs.
    """
    try:
        from onnxscript import optimizer
    except ImportError:  # pragma: no cover - onnxscript is a dependency of torch.onnx's exporter
        return
    with contextlib.suppress(Exception):  # folding is an optimisation; validation checks the result
        optimizer.optimize(ir_model, input_size_limit=2**40, output_size_limit=2**40)


def _dim_names(value: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def name_dynamic_dims(proto: Any) -> None:
    """Rename the exporter's symbolic dims (``8*grid_h``) to ``batch``/``height``/``width`` and each
    token output's own (:func:`vitdeploy.outputs.output_dims`: ``sequence``, ``patches``)."""
    graph_input = proto.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    mapping = {}
    for index, new in ((0, "batch"), (2, "height"), (3, "width")):
        if not dims[index].dim_param:
            raise ExportError(
                f"the exported input {INPUT_NAME} has a fixed {new} ({dims[index].dim_value}); expected a dynamic dim"
            )
        mapping[dims[index].dim_param] = new
    token_dims = []
    for output in proto.graph.output:
        if output.name not in TOKEN_OUTPUTS:
            continue
        tokens = output.type.tensor_type.shape.dim[1]
        dim_name = output_dims(output.name)[1]
        if not tokens.dim_param:
            raise ExportError(f"{output.name} has a fixed {dim_name} length {tokens.dim_value}; expected a dynamic dim")
        mapping.setdefault(tokens.dim_param, dim_name)
        token_dims.append((tokens, dim_name))
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]
    # Without prefix tokens the sequence is the patch count, one symbol: each output keeps its own name.
    for dim, dim_name in token_dims:
        dim.dim_param = dim_name


def strip_exporter_metadata(proto: Any) -> None:
    """Drop per-node stack traces and names of local files the exporter records (size, privacy)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]
    del proto.metadata_props[:]
    proto.doc_string = ""


def check_graph(proto: Any, outputs: Sequence[str], layer_norm: bool = True) -> list[str]:
    """Structural guarantees of an exported graph with ``outputs``; returns the problems found (empty when fine).

    ``layer_norm=False`` for models whose norms are RMSNorms (no ``LayerNormalization`` at opset 18)."""
    import onnx

    problems = []
    opset = opset_version(proto)
    if opset < MIN_OPSET:
        problems.append(f"opset {opset} < {MIN_OPSET}")
    if proto.functions:
        problems.append(f"graph has {len(proto.functions)} local functions; expected them inlined")
    inputs = [v.name for v in proto.graph.input]
    outputs = [v.name for v in proto.graph.output]
    expected_outputs = list(outputs)
    if inputs != [INPUT_NAME]:
        problems.append(f"graph inputs are {inputs}; expected [{INPUT_NAME!r}]")
    if outputs != expected_outputs:
        problems.append(f"graph outputs are {outputs}; expected {expected_outputs}")
    if inputs == [INPUT_NAME]:
        dims = _dim_names(proto.graph.input[0])
        if dims[0] != "batch" or dims[2:] != ["height", "width"]:
            problems.append(f"{INPUT_NAME} dims are {dims}; expected ['batch', C, 'height', 'width']")
    for value in proto.graph.output:
        if value.name not in expected_outputs:
            continue
        dims, expected = _dim_names(value), list(output_dims(value.name))
        if len(dims) != len(expected) or dims[0] != "batch":
            problems.append(f"output {value.name} dims are {dims}; expected {expected} with a dynamic 'batch' first")
        elif value.name in TOKEN_OUTPUTS and dims[1] != expected[1]:
            problems.append(f"output {value.name} dims are {dims}; expected a dynamic {expected[1]!r} second")
    for node in proto.graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("antialias", 0):
                problems.append(f"Resize node {node.name} has antialias=1 (TensorRT rejects it)")
    ops = {node.op_type for node in proto.graph.node}
    for op in ("LayerNormalization", "Softmax") if layer_norm else ("Softmax",):
        if op not in ops:
            problems.append(f"no {op} node in the graph")
    if "Range" not in ops:  # vitdeploy.pos_embed builds its interpolation matrices from arange(new grid size)
        problems.append("no Range node: the position embeddings are not resampled from the input size in the graph")
    return problems


def simplify_graph(proto: Any) -> Any:
    """Run onnxslim (optional dependency) on the graph; returns the simplified ``ModelProto``."""
    try:
        import onnxslim
    except ImportError:
        raise ExportError("simplify needs the optional package onnxslim: pip install 'vitdeploy[simplify]'") from None
    with contextlib.redirect_stdout(sys.stderr):
        return onnxslim.slim(proto)


# ---------------------------------------------------------------------------------------------
# Metadata and saving


def build_metadata(model: Any, options: ExportOptions, shape_range: ShapeRange) -> ArtifactMetadata:
    """The :class:`ArtifactMetadata` an export writes into ``metadata_props``."""
    from vitdeploy import __version__

    config = model.config
    io_dtype = "float16" if options.fp16_io else "float32"
    outputs = [TensorInfo(name, io_dtype, output_shape(name, config)) for name in options.output_names(config)]
    return ArtifactMetadata(
        model_config=config.to_dict(),
        preprocessing=config.preprocessing.at(config.image_size),
        inputs=[TensorInfo(INPUT_NAME, io_dtype, ["batch", config.in_channels, "height", "width"])],
        outputs=outputs,
        shape_range=shape_range,
        precision=options.precision,
        fp32_ops=list(options.fp32_ops) if options.precision == "fp16" else [],
        opset=int(options.opset),
        optimizations=[CLASS_TOKEN_LAST_BLOCK] if uses_class_token_last_block(config, options) else [],
        source=options.source,
        source_sha256=options.source_sha256,
        source_format=options.source_format,
        vitdeploy_version=__version__,
        labels=list(config.provenance.labels) if config.provenance.labels else None,
    )


def _save(proto: Any, path: Path, external: bool) -> None:
    """Write ``proto`` to ``path``; with ``external``, weights go to ``<path.name>.data`` beside it.

    The in-memory ``proto`` then refers to the external file (its weights are moved out).
    """
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _relocate_external_data(proto: Any, location: str) -> None:
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location


def _keep_failed(proto: Any, tmp_model: Path, target: Path, external: bool) -> Path:
    """Move a failed export to ``<stem>.failed.onnx`` (and its data file, renamed consistently)."""
    import onnx

    failed = target.with_name(f"{target.stem}.failed{target.suffix or '.onnx'}")
    if external:
        data = failed.with_name(f"{failed.name}.data")
        os.replace(tmp_model.with_name(f"{target.name}.data"), data)
        _relocate_external_data(proto, data.name)
        onnx.save_model(proto, str(tmp_model))
    os.replace(tmp_model, failed)
    return failed


def _run_preflight(path: Path, stages: _Stages) -> Any:
    """The TensorRT support pre-flight (``exporters/trt_support.py``) when present; warnings only."""
    try:
        from vitdeploy.exporters.trt_support import check_onnx
    except ImportError:
        return None
    try:
        report = check_onnx(path)
    except Exception as error:  # noqa: BLE001 - a pre-flight problem must not fail the export
        stages.say(f"TensorRT pre-flight could not run: {error}")
        return None
    findings = list(getattr(report, "findings", []) or [])
    if findings and hasattr(report, "format_text"):
        for line in report.format_text().splitlines():
            stages.say(f"TensorRT pre-flight: {line.strip()}")
    elif findings:
        for finding in findings:
            stages.say(f"TensorRT pre-flight: {finding}")
    else:
        stages.say("TensorRT pre-flight: nothing would make TensorRT's ONNX parser reject the graph")
    return report


def cpu_variant_path(target: Path) -> Path:
    """Where the onnxruntime-CPU variant of the portable file ``target`` is written: ``<stem>.cpu.onnx``."""
    return target.with_name(f"{target.stem}.cpu{target.suffix or '.onnx'}")


def make_cpu_variant(proto: Any, metadata: ArtifactMetadata, external: bool,
                     say: Progress) -> tuple[Any, ArtifactMetadata] | None:
    """The onnxruntime-CPU variant of the portable graph ``proto`` (not yet validated), or ``None`` with a
    line to ``say`` why not (a precision without one, weights in an external file, nothing to fuse)."""
    if metadata.precision not in CPU_VARIANT_PRECISIONS:
        say(f"no onnxruntime CPU variant for {metadata.precision} graphs (only {', '.join(CPU_VARIANT_PRECISIONS)})")
        return None
    if external:
        say("no onnxruntime CPU variant: the weights are over 2 GB and live in an external file")
        return None
    variant = cpu_variant(proto, metadata)
    left = unfused_parts(proto, metadata.model_config.get("rope") is not None)
    if variant is None:
        say("no onnxruntime CPU variant: no attention or GELU pattern to fuse" + "".join(f"; {part}" for part in left))
    elif left:
        say(f"onnxruntime CPU variant: {'; '.join(left)}")
    return variant


def validate_cpu_variant(variant: tuple[Any, ArtifactMetadata], path: Path,
                         validate: Callable[[Path, ArtifactMetadata], ParityReport], say: Progress) -> ParityReport | None:
    """Write ``variant`` to the scratch ``path`` and ``validate`` it (against the references its portable file
    passed); its report when it passes, else ``None`` with a line to ``say`` (the portable file goes on alone)."""
    path.write_bytes(variant[0].SerializeToString())
    report = validate(path, variant[1])
    if report.passed:
        return report
    say(f"the onnxruntime CPU variant failed validation and is not written: {'; '.join(report.failures[:2])}")
    return None


def attach_cpu_variant(variant: tuple[Any, ArtifactMetadata], report: ParityReport, metadata: ArtifactMetadata,
                       variant_target: Path, record: dict[str, Any] | None = None) -> bytes:
    """Record the validated ``variant``'s ``report`` (with ``record``'s extra fields) in its own metadata and
    the variant (file name, sha256) in the portable file's ``metadata``; returns the variant's bytes to hand
    over beside it."""
    variant_proto, variant_metadata = variant
    variant_metadata.validation = {**_validation_record(report), **(record or {})}
    set_metadata(variant_proto, variant_metadata.to_props())
    variant_bytes = variant_proto.SerializeToString()
    metadata.variants = {CPU_VARIANT: {"file": variant_target.name, "sha256": hashlib.sha256(variant_bytes).hexdigest()}}
    return variant_bytes


@dataclass
class Finalized:
    """What :func:`finalize` handed over: the data file (weights over the threshold), the validation
    report, the validated onnxruntime-CPU variant with its report (``None`` when none was written), and
    the result of the check against the source library (``None`` when none was asked for)."""

    data_path: Path | None
    report: ParityReport | None
    variant_path: Path | None
    variant_report: ParityReport | None
    source_check: Any = None  # the SourceCheckResult, when finalize was given a source check


def finalize(proto: Any, metadata: ArtifactMetadata, target: Path, folder: Path, *,
             validate: Callable[[Path, ArtifactMetadata], ParityReport] | None, cpu_variant: bool,
             keep_failed: bool, not_validated: str, judged_by: dict[str, Any] | None = None,
             source_check: Callable[[Path, ArtifactMetadata], Any] | None = None,
             external_threshold: int = EXTERNAL_DATA_THRESHOLD, say: Progress,
             stage: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None) -> Finalized:
    """The one tail of every export (``export_onnx`` at each precision, ``quantize_onnx``): save the
    graph into the scratch ``folder`` → ``validate(path, metadata)`` it (``None``: recorded as
    ``not_validated``) → write its onnxruntime-CPU variant (``cpu_variant``), validated the same way →
    hand both over to ``target`` atomically. A failing graph raises :class:`ExportValidationError`
    (kept as ``<stem>.failed.onnx`` with ``keep_failed``) and nothing is written under ``target``.
    ``source_check(path, metadata)`` (``export_onnx``'s check against the checkpoint's source library) runs
    on the saved graph once it passed validation (or is not validated), before the variant: a result that
    did not pass raises :class:`SourceCheckError` the same way, and its record joins the portable file's
    validation record. ``judged_by`` adds fields to the validation records; ``stage(name)`` times each step."""
    import onnx

    step = stage or (lambda name: contextlib.nullcontext())
    external = graph_bytes(proto) > external_threshold
    variant = None
    if cpu_variant and validate is not None:  # a variant is only ever handed over validated
        with step("fuse for onnxruntime CPU"):
            variant = make_cpu_variant(proto, metadata, external, say)
    variant_target = cpu_variant_path(target)
    tmp = folder / target.name
    data_path = target.with_name(f"{target.name}.data") if external else None
    report = variant_report = source = None
    siblings: dict[Path, bytes] = {}
    with step("save"):
        _save(proto, tmp, external)
        onnx.checker.check_model(str(tmp))
    if validate is not None:
        with step("validate"):
            report = validate(tmp, metadata)
        if not report.passed:
            raise ExportValidationError(report, _keep_failed(proto, tmp, target, external) if keep_failed else None)
    if source_check is not None:
        source = source_check(tmp, metadata)
        if source.passed is False:
            raise SourceCheckError(source, _keep_failed(proto, tmp, target, external) if keep_failed else None)
    if validate is not None:
        if variant is not None:
            with step(f"validate {variant_target.name}"):
                variant_report = validate_cpu_variant(variant, folder / variant_target.name, validate, say)
            if variant_report is not None:
                siblings[variant_target] = attach_cpu_variant(variant, variant_report, metadata, variant_target,
                                                              judged_by)
        metadata.validation = {**_validation_record(report), **(judged_by or {})}
    else:
        metadata.validation = {"passed": None, "notes": [not_validated]}
    if source is not None:
        metadata.validation["source_check"] = source.to_dict()
    set_metadata(proto, metadata.to_props())
    _hand_over(proto, folder, target, data_path, siblings)
    return Finalized(data_path, report, variant_target if siblings else None, variant_report if siblings else None,
                     source)


def export_onnx(model: Any, output_path: str | os.PathLike[str], options: ExportOptions | None = None,
                progress: Progress | None = None) -> ExportResult:
    """Export ``model`` (a ``VisionTransformer``) to ``output_path``; validate; hand over atomically.

    Raises :class:`ExportValidationError` (with the parity report) when validation fails, and
    ``ValueError`` for options that do not fit the model. ``progress`` receives one line per
    stage (``vitdeploy.cli.common.progress`` prints them).
    """

    options = options or ExportOptions()
    start = time.perf_counter()
    stages = _Stages(progress)
    target = Path(output_path)
    if target.is_dir():
        raise IsADirectoryError(f"output path {str(target)!r} is a folder; expected a file name such as model.onnx")
    config = model.config
    if config.in_channels != 3:  # checked first: validation would fail only after the trace
        raise ValueError(f"the model takes {config.in_channels}-channel images; vitdeploy's preprocessing, "
                         "validation photos and runtimes are RGB, so it exports 3-channel models only")
    shape_range = options.shape_range(config)
    metadata = build_metadata(model, options, shape_range)

    # One scratch folder per target for the whole export (temporaries exist from the start, and
    # Ctrl-C or SIGTERM at any stage removes them).
    with temporary_folder(target, log=stages.say) as folder:
        with stages("trace"):
            proto = trace_to_onnx(model, options)
        with stages("convert"):
            strip_exporter_metadata(proto)
            name_dynamic_dims(proto)
            if options.precision == "fp16":
                keep_ops_in_fp32(proto, options.fp32_ops)
            if options.simplify:
                proto = simplify_graph(proto)
            proto.producer_name, proto.producer_version = "vitdeploy", metadata.vitdeploy_version
            proto.graph.name = config.provenance.name
            problems = check_graph(proto, metadata.output_names, layer_norm=config.norm == "layernorm")
            if problems:
                raise ExportError("the exported graph breaks the artifact's guarantees: " + "; ".join(problems))
            set_metadata(proto, metadata.to_props())
        quantization = None
        if options.precision in QUANTIZED_PRECISIONS:
            proto, metadata, quantization = _quantize(proto, options, stages)

        def say_case(case: Any) -> None:
            stages.say(
                f"  {case.batch}x{config.in_channels}x{case.height}x{case.width} {case.output} vs "
                f"{case.reference}: rel-max {case.metrics.rel_max_error:.2e}, cosine {case.metrics.cosine:.6f} "
                f"{'ok' if case.passed else 'FAIL'}"
            )

        validate = None
        if options.validate:
            from vitdeploy.exporters.validation import shared_references, validate_onnx
            from vitdeploy.runtimes.torch import eager_references

            references = shared_references(eager_references(
                model, metadata.precision, metadata.fp32_ops, shape_range=metadata.shape_range,
                outputs=metadata.output_names))

            def validate(path: Path, data: ArtifactMetadata) -> ParityReport:
                return validate_onnx(path, model, data, max_batch=options.validation_max_batch,
                                     images=options.validation_images, on_case=say_case, references=references)
        else:
            stages.say("validation skipped (--no-validate): the file has not been compared with the eager model")
        check_source = None
        if options.source_check is not None:
            def check_source(path: Path, data: ArtifactMetadata) -> Any:
                if not options.validate:
                    from vitdeploy.exporters.source_check import not_checked

                    return not_checked("validation disabled (--no-validate)")
                return _check_against_source(path, data, options, stages, say_case)
        done = finalize(proto, metadata, target, folder, validate=validate, source_check=check_source,
                        cpu_variant=options.cpu_variant and metadata.precision in CPU_VARIANT_PRECISIONS,
                        keep_failed=options.keep_failed, not_validated="export ran with validation disabled",
                        external_threshold=options.external_data_threshold, say=stages.say, stage=stages)
        report, data_path = done.report, done.data_path

    result = ExportResult(path=target, metadata=metadata, report=report, seconds=0.0, data_path=data_path,
                          stage_seconds=stages.seconds, variant_path=done.variant_path,
                          variant_report=done.variant_report, quantization=quantization,
                          source_check=done.source_check)
    if options.preflight:
        result.preflight = _run_preflight(target, stages)
    result.seconds = time.perf_counter() - start
    return result


def _check_against_source(path: Path, metadata: ArtifactMetadata, options: ExportOptions, stages: _Stages,
                          say_case: Callable[[Any], None]) -> Any:
    """The validated graph at ``path`` against the source library's own model (``options.source_check``)."""
    from vitdeploy.exporters.source_check import run_source_check
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    plan = options.source_check
    if not plan.runs:
        stages.say(f"source check skipped: {plan.skipped}")
        return run_source_check(None, plan, metadata, height=metadata.shape_range.height,
                                width=metadata.shape_range.width)
    candidate = OrtRuntime(path, variant="portable")
    try:
        with stages(f"check against {plan.library}'s own {plan.architecture}"):
            result = run_source_check(candidate, plan, metadata, height=metadata.shape_range.height,
                                      width=metadata.shape_range.width, images=options.validation_images,
                                      on_case=say_case)
    finally:
        candidate.close()
    stages.say(result.summary_line())
    return result


def _quantize(proto: Any, options: ExportOptions, stages: _Stages) -> tuple[Any, ArtifactMetadata, dict[str, Any]]:
    """The traced fp32 graph quantized to ``options.precision`` on the calibration images."""
    from vitdeploy.calibration import load_calibration
    from vitdeploy.exporters.quantize import quantize_model
    from vitdeploy.metadata import ArtifactMetadata

    metadata = ArtifactMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    with stages(f"calibrate and quantize to {options.precision}"):
        calibration = load_calibration(options.calibration, options.calibration_size, metadata.preprocessing,
                                       log=stages.say)
        quantized, record = quantize_model(proto, calibration, options.quantize, log=stages.say)
    del proto
    metadata = ArtifactMetadata.from_props({p.key: p.value for p in quantized.metadata_props})
    return quantized, metadata, record.to_dict()


def _validation_record(report: ParityReport) -> dict[str, Any]:
    return {
        **report.summary(),
        "runtime": _runtime_versions(),
        "validated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _hand_over(proto: Any, folder: Path, target: Path, data_path: Path | None,
               siblings: dict[Path, bytes]) -> None:
    """Move the validated files to their final names: data file and variants first, then the graph
    that names them (each atomically)."""
    from vitdeploy.files import atomic_path, atomic_write_bytes

    if data_path is not None:
        data = folder / data_path.name
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(data, 0o666 & ~umask)  # onnx writes it 0600; give it a plain open()'s permissions
        os.replace(data, data_path)
    for path, data in siblings.items():
        atomic_write_bytes(path, data)
    with atomic_path(target, suffix=".onnx") as tmp:
        tmp.write_bytes(proto.SerializeToString())
    stale = target.with_name(f"{target.name}.data")
    if data_path is None and stale.exists():
        stale.unlink()  # left over from an earlier, larger export to the same name
    _remove_stale_variant(cpu_variant_path(target), siblings)


def _remove_stale_variant(path: Path, written: dict[Path, bytes]) -> None:
    """Remove a CPU variant an earlier export to the same name left, which this export does not list."""
    from vitdeploy.metadata import read_onnx_metadata

    if path in written or not path.is_file():
        return
    try:
        stale = read_onnx_metadata(path).target == CPU_VARIANT
    except (OSError, ValueError):
        return
    if stale:
        path.unlink()


def _runtime_versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"onnxruntime": onnxruntime.__version__, "provider": "CPUExecutionProvider", "torch": torch.__version__}
