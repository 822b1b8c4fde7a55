"""``vitdeploy check``: pre-flight an ONNX file for TensorRT's ONNX parser, on any machine."""

from __future__ import annotations

import argparse

from vitdeploy.cli.common import CLIError, output_file, write_json

DESCRIPTION = """\
List every node TensorRT's ONNX parser would reject (errors) or treat specially (warnings):
unsupported op types and custom domains, Resize with antialias or an unsupported mode or
coordinate transform, an opset outside the supported range, dynamic dims without names, fp16
LayerNorm/softmax that risk overflow, weights over 2 GB not in external data.

The check is for the TensorRT version the engine will be built with (--trt-version; default: the
installed TensorRT, else the version the gpu extra pins). For that version it also flags operators
its parser does not import yet, inputs it needs constant, data types it lacks, and the known field
failures of these graphs: an If node whose branches differ in shape (rejected before 10.13, e.g. on
JetPack 6's 10.3: TensorRT issues #4558, #4603) and RoPE graphs miscompiled by 10.3-10.4 (#4742,
#4723). --trt-version all checks what every 10.x/11.x release accepts instead.

The support table is onnx-tensorrt's operator documentation, TensorRT's changelog and those issues
(see exporters/trt_support_table.json for every source). Needs no TensorRT and no GPU, and has never
been run against a real TensorRT here. Exit status 1 when there are errors, 0 otherwise.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="pre-flight an ONNX file for TensorRT (no TensorRT needed)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx", help="ONNX file to check")
    parser.add_argument("--target", choices=["tensorrt"], default="tensorrt", help="what to check for (default tensorrt)")
    parser.add_argument("--trt-version", "--tensorrt-version", dest="tensorrt_version", metavar="X.Y",
                        help="the TensorRT version the engine will be built with, e.g. 10.3 (JetPack 6) or 10.14; "
                        "'all' for what every 10.x/11.x accepts (default: the installed TensorRT, else the gpu "
                        "extra's pin)")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the report as JSON to PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.exporters.trt_support import (
        check_onnx,
        default_tensorrt_version,
        opset_range,
        parse_trt_version,
    )

    version, source = args.tensorrt_version, "--trt-version"
    if version is None:
        version, source = default_tensorrt_version()
    elif version.strip().lower() == "all":
        version, source = None, ""
    if version is not None:
        try:
            parse_trt_version(version)
            opset_range(version)
        except ValueError as error:
            raise CLIError(f"--trt-version: {error}") from None
    report = check_onnx(args.onnx, target=args.target, tensorrt_version=version, version_source=source)
    print(report.format_text())
    if args.json:
        write_json(args.json, report.to_dict())
    return 0 if report.ok else 1
