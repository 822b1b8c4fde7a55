"""An existing fp32 vitdeploy ONNX file to a validated int8/fp8 Q/DQ file (``vitdeploy quantize``).

The fp32 file was validated against the eager model when it was exported (its metadata says
so), so by default the quantized graph is judged against *it*, run by onnxruntime on the same
real and synthetic batches, with the precision's gate (``int8_vs_fp32``, ``fp8_vs_fp32``):
no torch and no checkpoint are needed. With ``reference`` (a ``VisionTransformer``) it is judged
against the eager fp32 model instead, exactly as ``export --precision int8`` does. Either way
the file is written under a temporary name beside the target and gets its final name only when
it passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.constants import with_article
from vitdeploy.metadata import CPU_VARIANT, ArtifactMetadata
from vitdeploy.parity import ParityReport, Reference, tolerance_for

from .onnx_export import finalize
from .quantize import QuantizeOptions, quantize_model

Progress = Callable[[str], None]


@dataclass
class QuantizeResult:
    """A validated quantized ONNX file and what was measured on it."""

    path: Path
    metadata: ArtifactMetadata
    report: ParityReport | None
    quantization: dict[str, Any]
    data_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    variant_path: Path | None = None  # the validated onnxruntime-CPU variant written beside it, if any

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "data_path": str(self.data_path) if self.data_path else None,
                "variant_path": str(self.variant_path) if self.variant_path else None,
                "precision": self.metadata.precision, "quantization": self.quantization,
                "validation": self.report.to_dict() if self.report else None}


def _fp32_reference(path: Path) -> Reference:
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    runtime = OrtRuntime(path, variant="portable")
    return Reference("fp32 graph (onnxruntime; validated against eager at export)", runtime, tolerance_for("fp32"))


def quantize_onnx(source: str | os.PathLike[str], output: str | os.PathLike[str], options: QuantizeOptions,
                  calibration: str | os.PathLike[str] | None = None, calibration_size: int = 64,
                  reference: Any = None, validate: bool = True, max_batch: int = 8,
                  images: Sequence[Any] | None = None, keep_failed: bool = False,
                  progress: Progress | None = None, cpu_variant: bool = True) -> QuantizeResult:
    """Quantize the fp32 vitdeploy ONNX file ``source`` into ``output`` (see the module docstring).

    ``cpu_variant`` also writes the int8 graph's onnxruntime-CPU variant ``<stem>.cpu.onnx`` beside it,
    validated against the same reference (as ``export --precision int8`` does); ``OrtRuntime`` runs it.

    Raises ``ValueError`` for a file that is not a portable fp32 vitdeploy graph, and
    :class:`~vitdeploy.exporters.onnx_export.ExportValidationError` when the quantized graph fails
    its gate (nothing is written under ``output`` then).
    """
    import dataclasses

    import onnx

    from vitdeploy.calibration import load_calibration
    from vitdeploy.exporters.validation import validate_onnx
    from vitdeploy.files import temporary_folder
    from vitdeploy.metadata import read_onnx_metadata

    say = progress or (lambda message: None)
    source, target = Path(source), Path(output)
    if not source.is_file():
        raise FileNotFoundError(f"ONNX file {str(source)!r} does not exist")
    if target.suffix.lower() != ".onnx":
        raise ValueError(f"output {str(target)!r} must end in .onnx")
    if target.resolve() == source.resolve():
        raise ValueError(f"output {str(target)!r} is the input file; write the quantized graph to a new file")
    metadata = read_onnx_metadata(source)
    if metadata.precision != "fp32":
        raise ValueError(f"{source} is {with_article(metadata.precision)} graph; quantize the fp32 export")
    if metadata.target == CPU_VARIANT:
        raise ValueError(f"{source} is the onnxruntime-CPU variant (contrib ops); quantize the portable file it "
                         "was written beside")
    say(f"loading {source}")
    proto = onnx.load(str(source))
    calibration_set = load_calibration(calibration, calibration_size, metadata.preprocessing, log=say)
    quantized, record = quantize_model(proto, calibration_set, options, log=say)
    del proto
    quantized_metadata = ArtifactMetadata.from_props({p.key: p.value for p in quantized.metadata_props})

    judge = None
    judged_by: dict[str, Any] = {}
    if validate:
        if reference is not None:
            from vitdeploy.runtimes.torch import eager_references

            references = eager_references(reference, quantized_metadata.precision,
                                          shape_range=quantized_metadata.shape_range,
                                          outputs=quantized_metadata.output_names)
        else:
            fp32 = _fp32_reference(source)
            references = [dataclasses.replace(fp32, tolerance=tolerance_for(quantized_metadata.precision))]
            judged_by = {"reference": f"{source.name} (fp32 graph)"}
        say(f"validating against {references[-1].name} ({references[-1].tolerance.name}); the onnxruntime-CPU "
            "variant the same way")

        def say_case(case: Any) -> None:
            m = case.metrics
            tokens = "" if m.token_cosine_min is None else (
                f", worst token {m.token_cosine_min:.5f} (p1 {m.token_cosine_p1:.5f})")
            say(f"  {case.batch}x3x{case.height}x{case.width} {case.output}: cosine {m.cosine:.5f}{tokens},"
                f" rel-max {m.rel_max_error:.3f} {'ok' if case.passed else 'FAIL'}")

        def judge(path: Path, data: ArtifactMetadata) -> ParityReport:
            return validate_onnx(path, None, data, max_batch=max_batch, images=images, references=references,
                                 on_case=say_case)

    with temporary_folder(target, log=say) as folder:
        done = finalize(quantized, quantized_metadata, target, folder, validate=judge, cpu_variant=cpu_variant,
                        keep_failed=keep_failed, not_validated="quantized with validation disabled",
                        judged_by=judged_by, say=say)
    return QuantizeResult(target, quantized_metadata, done.report, record.to_dict(), done.data_path,
                          variant_path=done.variant_path)
