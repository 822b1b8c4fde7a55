"""`vitdeploy quantize`: an fp32 ONNX file to a calibrated, validated int8 (or fp8) Q/DQ file."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    add_quantize_arguments,
    onnx_output,
    output_file,
    positive_int,
    progress,
    quantize_options,
    write_json,
)

DESCRIPTION = """\
Quantize the fp32 vitdeploy ONNX file MODEL into explicit QuantizeLinear/DequantizeLinear form,
the form TensorRT builds INT8/FP8 engines from (strongly typed) and onnxruntime and OpenVINO run:
symmetric int8 (or fp8 E4M3) weights per output channel, activations per tensor with scales
calibrated on images, LayerNorm, Softmax, GELU and the attention batch-matmuls kept in float, and
LayerNorm-output outlier channels migrated into the weights (SmoothQuant) where they are found.

Calibration images come from --calibration DIR (any image folder, ImageFolder layouts included;
preprocessed as the file's metadata says) or, without it, the bundled photos plus synthetic crops
(with a warning: real images from the deployment domain calibrate better).

The quantized graph is validated against MODEL run by onnxruntime (itself validated against the
eager model at export), or against the eager model with --reference, with the gate of its
precision, each output judged by what it is (int8: rows cosine >= 0.99; token outputs per token,
worst >= 0.97, 1st percentile >= 0.98); it is written under its final name only if it passes, else
the numbers are printed and the exit status is 1. The keep-in-float search aims at the same gate on
its probe images; when it cannot reach it, nothing is written and the error gives its figures.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize an fp32 ONNX file to a calibrated, validated int8/fp8 Q/DQ graph",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="fp32 ONNX file written by vitdeploy export")
    parser.add_argument("-o", "--output", required=True, type=onnx_output, metavar="PATH",
                        help="the quantized ONNX file to write")
    parser.add_argument("--precision", choices=["int8", "fp8"], default="int8",
                        help="int8 (default) or fp8 (E4M3, for Hopper-class GPUs; checked by emulation on CPU)")
    add_quantize_arguments(parser)
    parser.add_argument("--reference", metavar="SOURCE",
                        help="validate against this eager model (checkpoint or variant name) instead of MODEL")
    parser.add_argument("--images", metavar="DIR", help="validation photos (default: the bundled ones)")
    parser.add_argument("--validation-max-batch", type=positive_int, default=8, metavar="N",
                        help="largest batch used in validation (default 8)")
    parser.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    parser.add_argument("--no-cpu-variant", action="store_true",
                        help="do not write the validated onnxruntime-CPU variant <name>.cpu.onnx beside an int8 file")
    parser.add_argument("--keep-failed", action="store_true",
                        help="keep a graph that fails validation as <name>.failed.onnx")
    parser.add_argument("--json", type=output_file, metavar="PATH",
                        help="write the quantization and validation report as JSON")
    add_model_override(parser, "of --reference")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.calibration import image_files
    from vitdeploy.exporters.onnx_export import ExportValidationError
    from vitdeploy.exporters.quantize_onnx import quantize_onnx

    output = Path(args.output)
    if args.calibration is not None and not Path(args.calibration).is_dir():
        raise CLIError(f"--calibration {args.calibration!r} is not a folder")
    options = quantize_options(args, args.precision)
    try:
        images = image_files(args.images) if args.images else None
    except (NotADirectoryError, ValueError) as error:
        raise CLIError(f"--images: {error}") from None
    if args.model_variant is not None and not args.reference:
        raise CLIError(f"--model {args.model_variant} applies to the --reference checkpoint; none was given")
    reference = None
    if args.reference:
        from vitdeploy.checkpoints import resolve_source

        progress(f"loading reference {args.reference}")
        reference = resolve_source(args.reference, log=progress, model=args.model_variant).model
    try:
        result = quantize_onnx(args.model, output, options, calibration=args.calibration,
                               calibration_size=args.calibration_size, reference=reference,
                               validate=not args.no_validate, max_batch=args.validation_max_batch, images=images,
                               keep_failed=args.keep_failed, progress=progress, cpu_variant=not args.no_cpu_variant)
    except ExportValidationError as error:
        print(error.report.format_table())
        if args.json:
            write_json(args.json, {"passed": False, "output": str(output),
                                   "kept": str(error.kept) if error.kept else None,
                                   "validation": error.report.to_dict()})
        print(f"vitdeploy quantize: validation failed; {output} was not written"
              + (f" (kept as {error.kept})" if error.kept else ""))
        return 1
    if result.report is not None:
        print(result.report.format_table())
    record = result.quantization
    size = output.stat().st_size + (result.data_path.stat().st_size if result.data_path else 0)
    print(f"wrote {output} ({size / 2**20:.1f} MiB; {record['precision']}; {sum(record['quantized_nodes'].values())} "
          f"quantized nodes {record['quantized_nodes']}; calibrated on {record['calibration']['count']} images; "
          f"{record['smoothing']['layer_norms']} LayerNorms smoothed)")
    if result.variant_path is not None:
        print(f"wrote {result.variant_path} (the onnxruntime-CPU variant, validated the same way; OrtRuntime runs it)")
    if args.json:
        write_json(args.json, {"passed": result.report.passed if result.report else None, **result.to_dict()})
    return 0
