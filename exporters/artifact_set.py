"""One folder of artifacts from one model: which graphs it holds, their file names, and how its int8 graph is made.

``deploy``, ``tune``, the benchmark and the studies all describe their folder with an :class:`ArtifactSetPlan`
and write it with :func:`build_artifact` (one graph) or :func:`build_artifact_set` (all of them, fp32 first), so
the files are named ``<name>-<graph>.onnx`` everywhere and the int8 weight range is chosen in one place,
:data:`INT8_POLICY`, and recorded (:meth:`ArtifactSetPlan.record`, and each int8 file's quantize record).
Every graph is validated as its export or quantization validates it; fp32 and int8 files get their
onnxruntime-CPU variant beside them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.constants import GRAPH_PRECISIONS, QUANTIZED_PRECISIONS

Progress = Callable[[str], None]

# The graphs a set may hold, each written as ``<name>-<graph>.onnx``: the precisions, and the 7-bit int8 form
# tune weighs beside the set's int8 graph.
GRAPHS: tuple[str, ...] = (*GRAPH_PRECISIONS, "int8-7bit")
INT8_FORMS: tuple[str, ...] = ("int8", "int8-7bit")


@dataclass(frozen=True)
class Int8Policy:
    """How a set's ``int8`` graph stores its weights. ``reduce_range`` (7 bits, +-63) is for x86 CPUs
    without VNNI/AMX, whose u8 x s8 products saturate at 16 bits; it is a graph of its own (``int8-7bit``)
    that ``tune`` makes and measures where it is wanted, never the set's ``int8`` file."""

    reduce_range: bool = False
    why: str = ("full-range weights (+-127), the same on every machine: what TensorRT and CPUs with VNNI/AMX int8 "
                "dot products run; the 7-bit form is the separate int8-7bit graph tune weighs")

    def to_dict(self) -> dict[str, Any]:
        return {"reduce_range": self.reduce_range, "weights": "7-bit (+-63)" if self.reduce_range else
                "full-range (+-127)", "why": self.why}


# The one int8 policy: deploy's (full range on every CPU). The benchmark, tune and the studies follow it.
INT8_POLICY = Int8Policy()


@dataclass
class ArtifactSetPlan:
    """Which graphs of one model a folder holds, what shapes they accept and how each is checked.

    ``quantize_from_fp32``: the int8/fp8 graphs are quantized from the set's fp32 file (one trace;
    :func:`~vitdeploy.exporters.quantize_onnx.quantize_onnx`, judged against the eager model when one is
    given, else against the fp32 graph) instead of traced again and quantized by ``export_onnx``.
    ``preflight`` names the graphs that also get the TensorRT pre-flight.
    """

    name: str
    graphs: tuple[str, ...] = ("fp32", "fp16", "int8")
    batch: tuple[int, int] = (1, 8)
    height: tuple[int, int] | None = None
    width: tuple[int, int] | None = None
    validation_max_batch: int = 8
    quantize_from_fp32: bool = False
    preflight: tuple[str, ...] = ()
    calibration: str | os.PathLike[str] | None = None
    calibration_size: int = 64
    source: str = ""
    source_sha256: str = ""
    source_format: str = ""
    outputs: tuple[str, ...] | None = None
    source_check: Any = None  # a SourcePlan (exporters/source_check.py), for the exported graphs
    int8: Int8Policy = field(default_factory=lambda: INT8_POLICY)

    def __post_init__(self) -> None:
        self.graphs = tuple(self.graphs)
        unknown = [g for g in (*self.graphs, *self.preflight) if g not in GRAPHS]
        if unknown:
            raise ValueError(f"graphs {unknown} are not artifact-set graphs; expected some of {list(GRAPHS)}")
        if not self.name:
            raise ValueError("an artifact set needs a name (its files are <name>-<graph>.onnx)")

    def path(self, folder: str | os.PathLike[str], graph: str) -> Path:
        """Where ``graph`` of this set lives in ``folder``."""
        return Path(folder) / f"{self.name}-{graph}.onnx"

    def quantize_options(self, graph: str) -> Any:
        """The ``QuantizeOptions`` of a quantized graph (``int8`` follows :attr:`int8`)."""
        from vitdeploy.exporters.quantize import QuantizeOptions

        if graph == "int8-7bit":
            return QuantizeOptions(reduce_range=True)
        if graph == "int8":
            return QuantizeOptions(reduce_range=self.int8.reduce_range)
        return QuantizeOptions(precision=graph)

    def export_options(self, graph: str) -> Any:
        """The ``ExportOptions`` that trace ``graph`` (a precision) from the model."""
        from vitdeploy.exporters.onnx_export import ExportOptions

        precision = "int8" if graph in INT8_FORMS else graph
        quantized = {"quantize": self.quantize_options(graph), "calibration": self.calibration,
                     "calibration_size": self.calibration_size} if precision in QUANTIZED_PRECISIONS else {}
        return ExportOptions(batch=self.batch, height=self.height, width=self.width, precision=precision,
                             validation_max_batch=self.validation_max_batch, source=self.source,
                             source_sha256=self.source_sha256, source_format=self.source_format,
                             preflight=graph in self.preflight, outputs=self.outputs,
                             source_check=self.source_check, **quantized)

    def record(self) -> dict[str, Any]:
        """What the set is, for a report: its graphs, file names, how int8 is made and the int8 policy."""
        return {"name": self.name, "graphs": {g: self.path(".", g).name for g in self.graphs},
                "int8_from": "the fp32 file" if self.quantize_from_fp32 else "a trace of the model",
                "validation_max_batch": self.validation_max_batch, "int8_policy": self.int8.to_dict()}


def build_artifact(model: Any, plan: ArtifactSetPlan, graph: str, folder: str | os.PathLike[str],
                   progress: Progress | None = None, fp32: Path | None = None) -> Any:
    """Write ``graph`` of ``plan`` into ``folder``, validated; returns the ``ExportResult`` or ``QuantizeResult``.

    A quantized graph of a ``quantize_from_fp32`` plan is made from ``fp32`` (default: the set's fp32 file in
    ``folder``) and judged against ``model`` when given, else against that fp32 graph. Raises
    ``ExportValidationError`` when the graph fails its check (nothing is written under its name then).
    """
    if graph not in plan.graphs:
        raise ValueError(f"graph {graph!r} is not in the set {plan.name!r} ({', '.join(plan.graphs)})")
    path = plan.path(folder, graph)
    quantized = graph in (*QUANTIZED_PRECISIONS, *INT8_FORMS)
    if not (quantized and plan.quantize_from_fp32):
        from vitdeploy.exporters.onnx_export import export_onnx

        if model is None:
            raise ValueError(f"exporting {path.name} needs the model")
        return export_onnx(model, path, plan.export_options(graph), progress=progress)
    from vitdeploy.exporters.quantize_onnx import quantize_onnx

    return quantize_onnx(fp32 or plan.path(folder, "fp32"), path, plan.quantize_options(graph),
                         calibration=plan.calibration, calibration_size=plan.calibration_size, reference=model,
                         max_batch=plan.validation_max_batch, progress=progress)


def build_artifact_set(model: Any, plan: ArtifactSetPlan, folder: str | os.PathLike[str],
                       progress: Progress | None = None) -> dict[str, Any]:
    """Every graph of ``plan`` written into ``folder`` (fp32 first, so the others can be quantized from it):
    ``{graph: result}``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    order = sorted(plan.graphs, key=lambda g: g != "fp32")
    return {graph: build_artifact(model, plan, graph, folder, progress) for graph in order}
