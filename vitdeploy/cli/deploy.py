"""`vitdeploy deploy`: the whole pipeline in one command (argument parsing; the work is vitdeploy.pipeline)."""

from __future__ import annotations

import argparse
import os
import shlex

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    add_source_check,
    batches_within,
    command_line,
    int_list_arg,
    output_folder,
    output_names,
    parse_int_list,
    parse_range,
    positive_float,
    positive_int,
    progress,
    range_arg,
)
from vitdeploy.pipeline import DEFAULT_SOURCE

DESCRIPTION = f"""\
Run the whole pipeline on SOURCE (a checkpoint in any supported format, or a variant name, which
uses random weights; default {DEFAULT_SOURCE}) and write everything into OUT/:

  1. export      OUT/<name>-fp32.onnx (+ its validated onnxruntime-CPU variant <name>-fp32.cpu.onnx)
                 OUT/<name>-fp16.onnx and OUT/<name>-int8.onnx (a calibrated Q/DQ graph; --no-int8
                 to skip), dynamic batch and resolution, each verified against the eager model on
                 real photographs before it is written, and against the checkpoint's own library
                 (timm, transformers) where it has one (--no-source-check to skip)
  2. pre-flight  the fp16 graph against TensorRT's ONNX parser support tables
  3. build       OUT/<name>-fp16.engine + manifest where TensorRT and a GPU exist; elsewhere
                 OUT/build_engine.sh with the equivalent trtexec command (and the report says so)
  4. verify      the engine against eager fp16 and fp32 (where it was built)
  5. benchmark   this machine's runtimes (CPU: torch eager, onnxruntime fp32/fp16/int8, OpenVINO
                 fp32/int8 where installed; GPU: + torch fp16,
                 onnxruntime CUDA, TensorRT) into OUT/bench/ (results.json/csv, report.md, plots)
  6. tune        on a machine without a GPU: every CPU candidate (onnxruntime/OpenVINO x fp32/bf16/
                 int8) timed side by side in a few rounds, the fastest accurate one recorded in
                 OUT/tune.json, which `vitdeploy predict OUT` follows (--no-tune to skip; see
                 `vitdeploy tune --help`)
  7. report      OUT/report.md and OUT/report.json: what was produced, the parity each artifact
                 reached, and how fast each runtime ran

The same pipeline from Python: vitdeploy.pipeline.deploy(DeployOptions(...)).

Exit status: 0 when every artifact written passed parity, 1 when an export failed its parity
check (the report is still written), 2 on bad arguments.

  vitdeploy deploy -o out/
  vitdeploy deploy -o out/ --bench-budget 60
  vitdeploy deploy path/to/checkpoint.safetensors -o out/ --bench-batch 1,8,32
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy", help=f"the whole pipeline: export fp32, fp16 and int8 ONNX, verify, TensorRT, benchmark, report "
        f"(default {DEFAULT_SOURCE})",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                        help=f"checkpoint file/folder or variant name (default {DEFAULT_SOURCE})")
    parser.add_argument("-o", "--output", default="deploy-out", type=output_folder, metavar="OUT",
                        help="output folder (default deploy-out)")
    parser.add_argument("--batch", default="1:8", type=range_arg, metavar="MIN:MAX",
                        help="batch range of the artifacts (default 1:8; the engine and Triton configs cover the "
                             "validated part, up to --validation-max-batch)")
    parser.add_argument("--resolution", type=range_arg, metavar="MIN:MAX",
                        help="resolution range of the artifacts (default: half to twice the native size)")
    parser.add_argument("--bench-batch", type=int_list_arg, metavar="N,N",
                        help="batch sizes to benchmark (default 1,8, each kept inside --batch)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--time-budget", type=positive_float, default=None, metavar="SECONDS",
                        help="timing budget per benchmark point (default 3 on CPU, 1 on GPU)")
    budget.add_argument("--bench-budget", type=positive_float, default=None, metavar="SECONDS",
                        help="timing budget for the whole benchmark, split evenly over its points")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for the benchmark (default: usable CPUs)")
    parser.add_argument("--peak-gflops", metavar="PEAK",
                        help="matmul peak the benchmark compares with, as in `vitdeploy bench`: N (all precisions) or "
                             "fp32=N,int8=M (default: measure it, about a second per library and precision)")
    parser.add_argument("--validation-max-batch", type=positive_int, default=8, metavar="N",
                        help="largest batch in the export parity checks (default 8: the whole default range)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 export")
    parser.add_argument("--no-tune", action="store_true", help="skip tune (run by default on a machine without a GPU)")
    parser.add_argument("--tune-rounds", type=positive_int, default=3, metavar="N",
                        help="interleaved rounds of tune (default 3)")
    parser.add_argument("--calibration", metavar="DIR",
                        help="int8 calibration images (default: the bundled photos plus synthetic crops)")
    parser.add_argument("--outputs", type=output_names, metavar="NAMES",
                        help="the graphs' outputs, comma-separated (as `vitdeploy export --outputs`; default: logits "
                        "for a classifier, else the image embedding)")
    add_model_override(parser)
    add_source_check(parser)
    parser.set_defaults(func=run)


def _reconstructed(args: argparse.Namespace) -> str:
    """The command line equivalent to ``args`` (when not run from the console script)."""
    parts = ["vitdeploy", "deploy", str(args.source), "-o", str(args.output)]
    for flag in ("batch", "resolution", "bench_batch", "time_budget", "bench_budget", "threads", "peak_gflops",
                 "validation_max_batch", "calibration"):
        value = getattr(args, flag, None)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if getattr(args, "outputs", None):
        parts += ["--outputs", ",".join(args.outputs)]
    if getattr(args, "model_variant", None):
        parts += ["--model", args.model_variant]
    if getattr(args, "no_bench", False):
        parts.append("--no-bench")
    if getattr(args, "no_int8", False):
        parts.append("--no-int8")
    if getattr(args, "no_tune", False):
        parts.append("--no-tune")
    if getattr(args, "no_source_check", False):
        parts.append("--no-source-check")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.pipeline import DEFAULT_BENCH_BATCHES, DeployOptions, deploy

    if args.calibration is not None and (args.no_int8 or not os.path.isdir(args.calibration)):
        raise CLIError(f"--calibration {args.calibration!r} must be a folder (and needs the int8 export)")
    batch = parse_range(args.batch, "batch")
    if args.bench_batch is None:  # the defaults, inside the artifacts' batch range
        bench_batches = batches_within(DEFAULT_BENCH_BATCHES, *batch)
    else:
        bench_batches = parse_int_list(args.bench_batch, "bench-batch")
    if any(not batch[0] <= b <= batch[1] for b in bench_batches):
        raise CLIError(f"--bench-batch {args.bench_batch!r} must lie inside --batch {args.batch}")
    from vitdeploy.benchmarks.peaks import parse_peaks

    peaks = parse_peaks(args.peak_gflops) if args.peak_gflops else None  # a bad value: main's one-line error
    options = DeployOptions(
        source=args.source, model=args.model_variant, output=args.output, batch=batch,
        resolution=parse_range(args.resolution, "resolution") if args.resolution else None,
        bench=not args.no_bench, bench_batches=tuple(bench_batches),
        point_budget_s=args.time_budget, bench_budget_s=args.bench_budget, threads=args.threads, peaks=peaks,
        validation_max_batch=args.validation_max_batch, int8=not args.no_int8, calibration=args.calibration,
        outputs=args.outputs, tune=not args.no_tune, tune_rounds=args.tune_rounds,
        source_check=not args.no_source_check,
        command=command_line("deploy") or _reconstructed(args), log=progress,
    )
    return deploy(options).status
