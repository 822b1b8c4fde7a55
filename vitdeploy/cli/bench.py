"""`vitdeploy bench`: latency/throughput sweeps over runtimes, batch sizes and resolutions; `bench compare`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    command_line,
    int_list_arg,
    non_negative_int,
    output_folder,
    parse_int_list,
    parse_sizes,
    positive_float,
    positive_int,
    refuse_model_override,
    sizes_arg,
)

DESCRIPTION = """\
Benchmark a model (variant name, checkpoint, or .onnx/.engine artifact) on one or more runtimes
over a sweep of batch sizes and resolutions. Each point is warmed up, then timed for a fixed
number of iterations or a time budget (CUDA events on GPU, a pinned thread count on CPU).
Per point: latency p50/p90/p99/mean/stdev, images/s, peak host RSS and device memory, and
GFLOP/s as a fraction of a measured (or --peak-gflops) dense matmul peak. A runtime that cannot
run here (no GPU, TensorRT missing) is reported as skipped with its reason; the others go on.

Writes OUT/results.json (one record per point),
results.csv, report.md and PNG plots. Exit status 1 when any point failed with an error.
The record schema is documented in benchmarks/schema.json (vitdeploy/benchmarks/schema.json installed).

  vitdeploy bench vit_small_patch16_224 --runtime torch-eager-fp32,ort-cpu-fp32 --batch 1,8 -o out/
  vitdeploy bench --suite cpu -o benchmarks/results/cpu
  vitdeploy bench compare A/results.json B/results.json

Runtimes: torch-eager-{fp32,fp16,bf16}, torch-compile-{fp32,fp16,bf16}, ort-{cpu,cuda,tensorrt}-{fp32,fp16},
tensorrt-{fp16,fp32}. Speedups are against torch-eager-fp32 where it ran.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark runtimes over batch sizes and resolutions; `bench compare A.json B.json`",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="*", metavar="MODEL",
                        help="variant names, checkpoints or artifacts (or: compare A.json B.json)")
    parser.add_argument("--suite", metavar="NAME", help="a shipped suite (cpu, gpu) or a suite JSON file; flags given override it")
    parser.add_argument("--runtime", "--runtimes", dest="runtime", metavar="NAMES",
                        help="comma-separated runtime labels (default: torch-eager-fp32,ort-cpu-fp32 on CPU; "
                             "torch-eager-fp32,torch-eager-fp16,ort-cuda-fp16,tensorrt-fp16 on GPU)")
    parser.add_argument("--batch", type=int_list_arg, metavar="N,N", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--resolution", type=sizes_arg, metavar="R,R", help="comma-separated sizes, N or HxW (default: each model's native size)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="where torch runs (default auto: cuda if available)")
    parser.add_argument("--warmup", type=non_negative_int, metavar="N", help="warm-up iterations per point (default 5)")
    parser.add_argument("--iterations", type=positive_int, metavar="N", help="timed iterations per point (default: use the time budget)")
    parser.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                        help="time spent timing each point (default 5; with --iterations, whichever ends first)")
    parser.add_argument("--min-iterations", type=positive_int, metavar="N", help="at least this many timed iterations (default 5)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch and onnxruntime (default: usable CPUs)")
    parser.add_argument("--peak-gflops", metavar="PEAK",
                        help="peak GFLOP/s to compare with: N (all precisions) or fp32=N,fp16=M (default: measure)")
    parser.add_argument("--no-peak", action="store_true", help="do not measure a matmul peak (no %% of peak)")
    parser.add_argument("--overhead", action="store_true", default=None,
                        help="also measure the harness overhead against a bare loop at the smallest batch")
    parser.add_argument("--compile-mode", metavar="MODE", help="torch.compile mode for torch-compile-* (default: torch's default)")
    parser.add_argument("-o", "--output", type=output_folder, metavar="DIR", help="output folder (default: bench-results)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where exported ONNX files and engines are kept (default: OUT/artifacts)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress display (the table is still printed)")
    add_model_override(parser, "MODEL (every checkpoint given)")
    parser.set_defaults(func=run)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _check_model(source: str, sizes: list[tuple[int, int]] | None, model_override: str | None = None) -> None:
    from vitdeploy.runtimes import ENGINE_SUFFIXES, ONNX_SUFFIXES
    from vitdeploy.variants import VARIANTS

    if source in VARIANTS and not Path(source).exists():
        refuse_model_override(model_override, source, "a variant name already")
        stride = VARIANTS[source].stride
        for height, width in sizes or []:
            if height % stride or width % stride:
                raise CLIError(f"--resolution {height}x{width} is not a multiple of {source}'s patch stride {stride}")
        return
    if not Path(source).exists():
        raise CLIError(f"model {source!r} is neither a known variant name nor an existing checkpoint/artifact path "
                       "(`vitdeploy inspect --list x` lists the variants)")
    if Path(source).suffix.lower() in (*ONNX_SUFFIXES, *ENGINE_SUFFIXES):
        refuse_model_override(model_override, source, "an artifact, whose metadata records its architecture")


def _reconstructed(args: argparse.Namespace) -> str:
    parts = ["vitdeploy", "bench", *args.targets]
    for flag in ("suite", "runtime", "batch", "resolution", "device", "warmup", "iterations", "time_budget",
                 "min_iterations", "threads", "peak_gflops", "compile_mode", "output", "cache_dir"):
        value = getattr(args, flag, None)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("no_peak", "overhead", "no_plots", "quiet"):
        if getattr(args, flag, None):
            parts.append(f"--{flag.replace('_', '-')}")
    if getattr(args, "model_variant", None):
        parts += ["--model", args.model_variant]
    return shlex.join(parts)


def build_plan(args: argparse.Namespace) -> tuple[Any, Path, bool]:
    """The :class:`BenchPlan`, output folder and whether to plot, from the parsed arguments."""
    from vitdeploy.benchmarks.harness import BenchPlan, default_cache_dir
    from vitdeploy.benchmarks.peaks import parse_peaks
    from vitdeploy.benchmarks.specs import parse_runtimes
    from vitdeploy.benchmarks.suites import load_suite, overhead_settings
    from vitdeploy.benchmarks.timing import TimingConfig

    suite = load_suite(args.suite) if args.suite else None
    models = list(args.targets) or (list(suite.models) if suite else [])
    if not models:
        raise CLIError("give a model (variant name, checkpoint or artifact) or --suite NAME")
    device = args.device or (suite.device if suite else "auto")
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    if args.runtime:
        runtime_text: Any = args.runtime
    elif suite:
        runtime_text = suite.runtimes
    else:
        runtime_text = ("torch-eager-fp32,torch-eager-fp16,ort-cuda-fp16,tensorrt-fp16" if device == "cuda"
                        else "torch-eager-fp32,ort-cpu-fp32")
    runtimes = parse_runtimes(runtime_text, device)
    batches = parse_int_list(args.batch, "batch") if args.batch else (list(suite.batch) if suite else [1, 8])
    if args.resolution:
        sizes: list[tuple[int, int]] | None = parse_sizes(args.resolution)
    else:
        sizes = [(s, s) for s in suite.resolution] if suite else None
    for model in models:
        _check_model(model, sizes, args.model_variant)

    def pick(flag_value: Any, suite_key: str, default: Any) -> Any:
        if flag_value is not None:
            return flag_value
        return getattr(suite, suite_key) if suite else default

    iterations = pick(args.iterations, "iterations", None)
    budget = args.time_budget
    if budget is None:
        budget = None if args.iterations is not None else pick(None, "time_budget_s", 5.0)
    timing = TimingConfig(
        warmup=pick(args.warmup, "warmup", 5), iterations=iterations, time_budget_s=budget,
        min_iterations=min(pick(args.min_iterations, "min_iterations", 5), iterations or 10**9),
        max_iterations=max(pick(None, "max_iterations", 10_000), iterations or 1),
    )
    if args.overhead:
        overhead: dict[str, Any] = {"overhead": True}
    else:
        overhead = overhead_settings(suite) if suite else {"overhead": False}
    output = Path(args.output or "bench-results")
    command = command_line("bench") or _reconstructed(args)
    plan = BenchPlan(
        models=models, runtimes=runtimes, batches=batches, sizes=sizes, timing=timing,
        cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(output),
        threads=pick(args.threads, "threads", None),
        peaks=parse_peaks(args.peak_gflops) if args.peak_gflops else None,
        measure_peaks=not args.no_peak, **overhead,
        command=command, suite=suite.name if suite else None,
        compile_mode=pick(args.compile_mode, "compile_mode", None), model_override=args.model_variant,
        default_batches=not args.batch and not suite,
    )
    return plan, output, not args.no_plots


def run(args: argparse.Namespace) -> int:
    if args.targets and args.targets[0] == "compare":
        return run_compare(args)
    from vitdeploy.benchmarks.harness import Display, Harness
    from vitdeploy.benchmarks.report import terminal_table, write_outputs

    plan, output, plots = build_plan(args)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {str(output)!r} exists and is not a folder")
    display = Display(quiet=args.quiet)
    display.message(f"{plan.total_points} points: {len(plan.models)} model(s) x {len(plan.runtimes)} runtime(s) "
                    f"x batch {plan.batches} x {'native size' if plan.sizes is None else plan.sizes}; "
                    f"results in {output}/")
    document = Harness(plan, display).run()
    written = write_outputs(document, output, plots=plots)
    print(terminal_table(document))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    failed = [r for r in document["records"] if r["status"] == "failed"]
    return 1 if failed else 0


def run_compare(args: argparse.Namespace) -> int:
    from vitdeploy.benchmarks.compare import compare, comparison_json, render_markdown, render_text
    from vitdeploy.cli.common import write_json
    from vitdeploy.files import atomic_write_text

    files = args.targets[1:]
    if len(files) != 2:
        raise CLIError(f"bench compare needs exactly two results files (A.json B.json), got {len(files)}")
    comparison = compare(files[0], files[1])
    print(render_text(comparison))
    if args.output:
        out = Path(args.output)
        atomic_write_text(out / "compare.md", render_markdown(comparison))
        write_json(out / "compare.json", comparison_json(comparison))
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}")
    return 0
