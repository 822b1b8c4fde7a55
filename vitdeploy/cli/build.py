"""``vitdeploy build``: ONNX → TensorRT engine + manifest (strongly typed; the graph's precision)."""

from __future__ import annotations

import argparse

from vitdeploy.cli.common import CLIError, output_file, parse_range, progress, range3_arg
from vitdeploy.engine_manifest import HARDWARE_COMPATIBILITY_LEVELS, PRECISIONS

DESCRIPTION = """\
Build a TensorRT engine from an ONNX file written by `vitdeploy export`, and write a manifest
<engine>.json beside it (TensorRT version, GPU, precision, profiles, IO, sha256s, options).

Networks are strongly typed (TensorRT 11 builds nothing else): the engine computes in the ONNX
graph's precision. --precision fp16 on an fp32 graph first converts the graph with the same code
`vitdeploy export --precision fp16` uses (LayerNorm and softmax stay fp32). int8 and fp8 engines
come from Q/DQ graphs (explicit quantization; fp8 needs compute capability 8.9+); no precision flag
is ever set on the builder.

Engines are built with detailed profiling verbosity; the engine inspector's layer list is written
to <engine>.layers.json and the manifest says whether attention was fused (`vitdeploy inspect
model.engine`). When an fp16/int8/fp8 engine has no fused attention, build warns; --softmax fp16
leaves softmax to TensorRT's fused kernel (the graph's fp32 softmax islands removed, the rewrite
checked against the graph on onnxruntime CPU before building).

Optimization profiles default to the range the ONNX file was validated on: min/max batch and
resolution from its metadata (the shapes its parity check covered, not the wider range the graph
declares), opt = the smallest validated batch at the model's native size. Shapes must be
multiples of the patch stride and inside the validated range; --beyond-validated allows the
declared range (a warning says so, and the manifest records it). A file exported with
--no-validate has no validated range: its declared range is used, with a warning.

Without TensorRT or a GPU, build stops with a one-line error; --print-trtexec prints the
equivalent trtexec command instead (no TensorRT needed), to build on another machine.

examples:
  vitdeploy build model.onnx -o model.engine
  vitdeploy build model.onnx --batch 1:8:32 --resolution 224:224:384 --workspace 4G
  vitdeploy build model.onnx --profile res=224 --profile res=384:384:448 --precision fp16
  vitdeploy build model.onnx --min-shape 1x3x224x224 --opt-shape 8x3x224x224 --max-shape 32x3x224x224
  vitdeploy build model_fp16.onnx --softmax fp16
  vitdeploy build model_int8.onnx --device 1
  vitdeploy build model.onnx --print-trtexec
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build", help="build a TensorRT engine (+ manifest) from an exported ONNX file",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx", help="ONNX file from `vitdeploy export`")
    parser.add_argument("-o", "--output", type=output_file, metavar="PATH", help="engine file (default: the ONNX name with .engine)")
    parser.add_argument("--precision", choices=list(PRECISIONS),
                        help="engine precision (default: the graph's); fp16 converts an fp32 graph first; "
                             "int8/fp8 need a Q/DQ graph of that type")
    shapes = parser.add_argument_group("optimization profiles")
    shapes.add_argument("--batch", type=range3_arg, metavar="MIN:OPT:MAX", help="batch sizes for every profile (N = fixed)")
    shapes.add_argument("--resolution", type=range3_arg, metavar="MIN:OPT:MAX", help="square image sizes for every profile (N = fixed)")
    shapes.add_argument("--min-shape", metavar="NxCxHxW", help="explicit minimum input shape (with --opt/--max-shape)")
    shapes.add_argument("--opt-shape", metavar="NxCxHxW", help="explicit optimum input shape")
    shapes.add_argument("--max-shape", metavar="NxCxHxW", help="explicit maximum input shape")
    shapes.add_argument("--beyond-validated", action="store_true",
                        help="let profiles reach the file's declared range, beyond the validated one (warned; "
                             "recorded in the manifest)")
    shapes.add_argument(
        "--profile", action="append", default=[], metavar="SPEC",
        help="add a profile (repeat for several, e.g. one per resolution bucket): "
             "'batch=1:8:32,res=224' (keys batch, res/resolution, height, width; missing axes default) "
             "or 'min=1x3x224x224,opt=8x3x224x224,max=32x3x224x224'",
    )
    builder = parser.add_argument_group("builder options")
    builder.add_argument("--workspace", metavar="SIZE", help="workspace memory limit, e.g. 4G or 512M (bare number: MiB)")
    builder.add_argument("--opt-level", type=int, choices=range(0, 6), metavar="0-5",
                         help="builder optimization level (TensorRT's default 3; higher builds longer)")
    builder.add_argument("--timing-cache", type=output_file, metavar="PATH", help="timing cache file, loaded if present and saved back")
    builder.add_argument("--hardware-compat", choices=HARDWARE_COMPATIBILITY_LEVELS, default="none",
                         help="build an engine that also runs on other GPU architectures (default: none)")
    builder.add_argument("--version-compatible", action="store_true",
                         help="build an engine that newer TensorRT versions can load (can be slower)")
    builder.add_argument("--no-tf32", action="store_true",
                         help="keep fp32 matmuls/convolutions in full fp32 (TensorRT allows TF32 by default)")
    builder.add_argument("--softmax", choices=["graph", "fp16"], default="graph",
                         help="fp16: compute softmax in fp16 inside attention so TensorRT can fuse it (fp16 engines; "
                              "the rewritten graph is parity-checked first); graph (default): as the graph says")
    builder.add_argument("--no-layer-info", action="store_true",
                         help="build with layer-names-only profiling verbosity (no layer types or tactics, "
                              "so no word on attention fusion)")
    builder.add_argument("--verbose", action="store_true", help="TensorRT's verbose builder log")
    parser.add_argument("--device", type=int, default=0, metavar="N", help="CUDA device to build on (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for the build phases")
    parser.add_argument("--print-trtexec", action="store_true",
                        help="print the equivalent trtexec command and exit (no TensorRT needed)")
    parser.set_defaults(func=run)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(args: argparse.Namespace) -> int:
    from vitdeploy.exporters.trt_plan import (
        BuildOptions,
        format_command,
        parse_size,
        plan_build,
        trtexec_command,
    )

    options = BuildOptions(
        precision=args.precision,
        workspace=parse_size(args.workspace, "--workspace") if args.workspace else None,
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        hardware_compatibility=args.hardware_compat,
        version_compatible=args.version_compatible,
        verbose=args.verbose,
        tf32=not args.no_tf32,
        softmax=args.softmax,
        detailed_profiling=not args.no_layer_info,
        beyond_validated=args.beyond_validated,
    )
    plan = plan_build(
        args.onnx, args.output, options=options,
        batch=parse_range(args.batch, "batch", 3) if args.batch else None,
        resolution=parse_range(args.resolution, "resolution", 3) if args.resolution else None,
        min_shape=args.min_shape, opt_shape=args.opt_shape, max_shape=args.max_shape,
        profile_specs=args.profile,
    )
    if plan.range_warning:
        progress(f"warning: {plan.range_warning}")
    from vitdeploy.exporters import tensorrt_build

    if args.print_trtexec:
        onnx_path = plan.onnx.path
        if plan.rewrites_graph:
            try:
                onnx_path, _ = tensorrt_build.prepare_graph(plan, plan.engine_path.parent, progress)
            except tensorrt_build.BuildError as error:
                raise CLIError(_one_line(error)) from None
            progress(f"trtexec builds from the rewritten graph {onnx_path}")
        print(format_command(trtexec_command(plan, onnx_path)))
        return 0
    try:
        manifest = tensorrt_build.run_build(plan, show_progress=not args.no_progress, device=args.device, log=progress)
    except tensorrt_build.TensorRTUnavailable as error:
        raise CLIError(
            f"{_one_line(error)}; or run `vitdeploy build {args.onnx} --print-trtexec` for the equivalent trtexec "
            "command to build on a machine that has TensorRT"
        ) from None
    except tensorrt_build.BuildError as error:
        raise CLIError(_one_line(error)) from None
    progress(f"wrote {plan.engine_path} ({manifest.engine_bytes / 2**20:.1f} MiB, {manifest.precision}, "
             f"built in {manifest.build_seconds:.1f}s) and {plan.manifest_path}")
    print(plan.engine_path)
    return 0
