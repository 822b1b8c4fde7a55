"""``vitdeploy check``: pre-flight an ONNX file for TensorRT's ONNX parser, on any machine."""

from __future__ import annotations

import argparse

from vitdeploy.cli.common import output_file, write_json

DESCRIPTION = """\
List every node TensorRT's ONNX parser would reject (errors) or treat specially (warnings):
unsupported op types and custom domains, Resize with antialias or an unsupported mode or
coordinate transform, an opset outside the supported range, dynamic dims without names, fp16
LayerNorm/softmax that risk overflow, weights over 2 GB not in external data.

The support table is onnx-tensorrt's operator documentation (see exporters/trt_support_table.json
for the source and TensorRT versions). Needs no TensorRT and no GPU. Exit status 1 when there
are errors, 0 otherwise.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="pre-flight an ONNX file for TensorRT (no TensorRT needed)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx", help="ONNX file to check")
    parser.add_argument("--target", choices=["tensorrt"], default="tensorrt", help="what to check for (default tensorrt)")
    parser.add_argument("--tensorrt-version", metavar="X.Y",
                        help="narrow the opset range to one TensorRT version, e.g. 10.13 or 11.5 (default: all of 10.x/11.x)")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the report as JSON to PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.exporters.trt_support import check_onnx

    report = check_onnx(args.onnx, target=args.target, tensorrt_version=args.tensorrt_version)
    print(report.format_text())
    if args.json:
        write_json(args.json, report.to_dict())
    return 0 if report.ok else 1
