"""`vitdeploy export`: a checkpoint (or variant name) to a validated ONNX file with dynamic shapes."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    add_pos_embed_resample,
    add_quantize_arguments,
    add_source_check,
    onnx_output,
    op_list,
    opset,
    output_file,
    output_names,
    parse_range,
    positive_int,
    progress,
    quantize_options,
    range_arg,
    write_json,
)
from vitdeploy.constants import DEFAULT_FP32_OPS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (dynamic batch and resolution; fp32, fp16, or int8/fp8 Q/DQ), validated "
        "against eager",
        description="Export SOURCE (a checkpoint file/folder in any supported format, or a variant name, which "
        "uses random weights) to ONNX with dynamic batch, height and width: input pixel_values "
        "[batch, 3, height, width], outputs as --outputs says (logits [batch, num_classes] for a classifier). Position embeddings are resampled in "
        "the graph, so one file serves every resolution in the declared range. The file is validated with "
        "onnxruntime against the eager model at the minimum, a middle and the maximum of the range and, for a timm or "
        "Hugging Face checkpoint whose library is importable, against that library's own model on real photos at "
        "the native and a non-square size; it is only written under its final name when both pass; a failing "
        "check prints the numbers and exits 1.",
    )
    parser.add_argument("source", help="checkpoint file or folder, or a variant name such as vit_base_patch16_224")
    parser.add_argument("-o", "--output", required=True, type=onnx_output, metavar="PATH",
                        help="the ONNX file to write (model.onnx; an fp32 export also writes model.cpu.onnx)")
    parser.add_argument("--batch", default="1:8", type=range_arg, metavar="MIN:MAX",
                        help="batch size range (default 1:8, all of it validated; engines and Triton configs are "
                             "built for the validated part of a wider range, see --validation-max-batch)")
    parser.add_argument("--resolution", type=range_arg, metavar="MIN:MAX",
                        help="height and width range in pixels, multiples of the patch stride "
                        "(default: half to twice the native size)")
    parser.add_argument("--height", type=range_arg, metavar="MIN:MAX", help="height range (instead of --resolution)")
    parser.add_argument("--width", type=range_arg, metavar="MIN:MAX", help="width range (instead of --resolution)")
    parser.add_argument("--opset", type=opset, default=18, metavar="N",
                        help="ONNX opset, from 17 to the highest the installed onnx/onnxruntime support (default 18)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8", "fp8"], default="fp32",
                        help="graph precision; fp16 graphs are what TensorRT builds strongly typed fp16 engines from, "
                        "int8/fp8 are calibrated Q/DQ graphs (see the quantization options and `vitdeploy quantize`)")
    parser.add_argument("--fp32-ops", type=op_list(DEFAULT_FP32_OPS, "op"),
                        default=",".join(DEFAULT_FP32_OPS), metavar="OPS",
                        help=f"ops kept in fp32 in an fp16 graph, comma-separated, or 'none' (default "
                        f"{','.join(DEFAULT_FP32_OPS)})")
    parser.add_argument("--fp16-io", action="store_true", help="fp16 input and outputs (default fp32 IO, cast inside)")
    parser.add_argument("--outputs", type=output_names, metavar="NAMES",
                        help="the graph's outputs, comma-separated, of logits, pooler_output, image_embeds, "
                        "last_hidden_state, patch_tokens (default: logits for a classifier, image_embeds for a CLIP "
                        "tower with its projection, else pooler_output)")
    parser.add_argument("--full-last-block", action="store_true",
                        help="compute the last block for every token; by default an export of per-image vectors only "
                        "(logits, pooler_output, image_embeds) of a class-token model computes it for the class token "
                        "alone (same values, less work)")
    parser.add_argument("--no-cpu-variant", action="store_true",
                        help="do not write the validated onnxruntime-CPU variant <name>.cpu.onnx beside an fp32 or int8 file")
    parser.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim (optional package)")
    parser.add_argument("--keep-failed", action="store_true",
                        help="keep a graph that fails validation as <name>.failed.onnx for inspection")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the onnxruntime-vs-eager validation (not recommended)")
    parser.add_argument("--validation-max-batch", type=positive_int, default=8, metavar="N",
                        help="largest batch used in validation (default 8; the maximum resolution is always tested)")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="write the export and validation report as JSON to PATH")
    add_pos_embed_resample(parser)
    add_model_override(parser)
    add_source_check(parser)
    add_quantize_arguments(parser)
    parser.set_defaults(func=run)


def size_ranges(args: argparse.Namespace) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(height, width)`` ranges from ``--resolution`` or ``--height``/``--width`` (None = default)."""
    if args.resolution and (args.height or args.width):
        raise CLIError("give either --resolution or --height/--width, not both")
    if args.resolution:
        both = parse_range(args.resolution, "resolution")
        return both, both  # type: ignore[return-value]
    height = parse_range(args.height, "height") if args.height else None
    width = parse_range(args.width, "width") if args.width else None
    return height, width  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from vitdeploy.checkpoints import resolve_source
    from vitdeploy.exporters.onnx_export import (
        ExportOptions,
        ExportValidationError,
        SourceCheckError,
        export_onnx,
    )
    from vitdeploy.exporters.source_check import plan_source_check
    from vitdeploy.metadata import CLASS_TOKEN_LAST_BLOCK

    output = Path(args.output)
    batch = parse_range(args.batch, "batch")
    height, width = size_ranges(args)
    quantized = args.precision in ("int8", "fp8")
    if args.calibration is not None and not quantized:
        raise CLIError(f"--calibration applies to --precision int8 or fp8, not {args.precision}")
    if args.calibration is not None and not Path(args.calibration).is_dir():
        raise CLIError(f"--calibration {args.calibration!r} is not a folder")
    if args.fp16_io and args.precision != "fp16":
        raise CLIError(f"--fp16-io applies to --precision fp16, not {args.precision}")
    quantization = {"quantize": quantize_options(args, args.precision), "calibration": args.calibration,
                    "calibration_size": args.calibration_size} if quantized else {}
    progress(f"loading {args.source}")
    overrides = {"pos_embed_resample": args.pos_embed_resample} if args.pos_embed_resample else {}
    resolved = resolve_source(args.source, log=progress, model=args.model_variant, **overrides)
    options = ExportOptions(
        batch=batch, height=height, width=width, opset=args.opset, precision=args.precision,
        fp32_ops=args.fp32_ops, fp16_io=args.fp16_io, outputs=args.outputs,
        class_token_last_block=not args.full_last_block,
        simplify=args.simplify, validate=not args.no_validate, keep_failed=args.keep_failed,
        source=str(resolved.source), source_sha256=resolved.sha256, source_format=resolved.format,
        validation_max_batch=args.validation_max_batch, cpu_variant=not args.no_cpu_variant, **quantization,
        source_check=plan_source_check(resolved.source, resolved.format, model=args.model_variant,
                                       image_size=resolved.model.config.image_size,
                                       variant=resolved.model.config.provenance.name,
                                       enabled=not args.no_source_check),
    )
    source_info = {"source": str(resolved.source), "format": resolved.format, "sha256": resolved.sha256,
                   "random_weights": resolved.random_weights}
    try:
        result = export_onnx(resolved.model, output, options, progress=progress)
    except SourceCheckError as error:
        if error.report.cases:
            print(error.report.format_table())
        if args.json:
            write_json(args.json, {"passed": False, "output": str(output), "kept": str(error.kept) if error.kept else None,
                                   **source_info, "source_check": error.result.to_dict()})
        for line in error.result.failure_lines():
            print(f"  {line}")
        print(f"vitdeploy export: the artifact disagrees with {error.result.reference}; {output} was not written"
              + (f" (kept as {error.kept})" if error.kept else "") + " (--no-source-check skips this check)")
        return 1
    except ExportValidationError as error:
        print(error.report.format_table())
        if args.json:
            write_json(args.json, {"passed": False, "output": str(output), "kept": str(error.kept) if error.kept else None,
                                   **source_info, "validation": error.report.to_dict()})
        print(f"vitdeploy export: validation failed; {output} was not written"
              + (f" (kept as {error.kept})" if error.kept else ""))
        return 1
    if result.report is not None:
        print(result.report.format_table())
    size = output.stat().st_size + (result.data_path.stat().st_size if result.data_path else 0)
    print(
        f"wrote {output} ({size / 2**20:.1f} MiB{', weights in ' + result.data_path.name if result.data_path else ''}; "
        f"{result.metadata.precision}; {result.metadata.range_text()}"
        f"{'; last block for the class token only' if CLASS_TOKEN_LAST_BLOCK in result.metadata.optimizations else ''}) in {result.seconds:.1f}s"
    )
    print(f"outputs: {', '.join(f'{t.name} {t.shape}' for t in result.metadata.outputs)}")
    if result.variant_path is not None:
        print(f"wrote {result.variant_path} (its validated onnxruntime-CPU variant, which OrtRuntime runs on CPU)")
    if result.source_check is not None:
        print(result.source_check.summary_line())
    if args.json:
        write_json(args.json, {"passed": result.report.passed if result.report else None, **source_info,
                               **result.to_dict()})
    return 0
