"""`vitdeploy triton`: write a Triton Inference Server model repository from ONNX files and engines."""

from __future__ import annotations

import argparse

from vitdeploy.cli.common import (
    non_negative_int,
    output_file,
    output_folder,
    positive_int,
    progress,
    write_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "triton",
        help="write a Triton Inference Server model repository (onnxruntime, tensorrt_plan and python models)",
        description="Write REPO/<model>/config.pbtxt and REPO/<model>/1/... for each artifact, filled from its "
        "metadata or engine manifest: an ONNX file gives an onnxruntime_onnx model (<stem>_onnxruntime) and a "
        "python-backend model running vitdeploy's onnxruntime runtime with its validated CPU variant "
        "(<stem>_python, the one that runs on the PyPI tritonserver); an engine gives a tensorrt_plan model "
        "(<stem>_tensorrt) with its manifest and the Triton release whose TensorRT loads it, plus a python model "
        "when the ONNX it was built from is beside it. Inputs are pixel_values [3, -1, -1] (Triton owns the batch "
        "dimension), max_batch_size and the shape range clients are told are the validated ones (the shapes the "
        "export's parity check covered; --beyond-validated serves the declared range, with a warning), requests "
        "are batched dynamically, and the "
        "preprocessing goes into the model parameters for clients. Serve it with `vitdeploy serve REPO`.",
    )
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="exported .onnx files and/or TensorRT engines")
    parser.add_argument("-o", "--output", required=True, type=output_folder, metavar="REPO",
                        help="model repository folder (created)")
    parser.add_argument("--name", metavar="NAME", help="base model name (one artifact only; default: the artifact's file stem)")
    parser.add_argument("--kinds", default=None, metavar="KIND,...",
                        help="which models to write: python, onnxruntime, tensorrt (default: all the artifact allows)")
    parser.add_argument("--max-batch", type=positive_int, default=None, metavar="N",
                        help="max_batch_size (default and upper bound: the validated or built maximum)")
    parser.add_argument("--beyond-validated", action="store_true",
                        help="serve an ONNX file's declared batch/size range instead of its validated one (warned; "
                             "recorded in config.pbtxt)")
    parser.add_argument("--instances", type=positive_int, default=1, metavar="N",
                        help="model instances per device (instance_group count, default 1)")
    parser.add_argument("--max-queue-delay-us", type=non_negative_int, default=2000, metavar="N",
                        help="how long the dynamic batcher waits to fill a batch, in microseconds (default 2000)")
    parser.add_argument("--ort-tensorrt", action="store_true",
                        help="give the onnxruntime model the TensorRT execution accelerator (FP16 for fp16 graphs, "
                        "min/opt/max profile shapes from the validated range)")
    parser.add_argument("--overwrite", action="store_true", help="replace models of the same name in REPO")
    parser.add_argument("--json", type=output_file, metavar="PATH",
                        help="also write the list of models as JSON to PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.serving.repository import RepositoryOptions, write_repository

    kinds = None
    if args.kinds is not None:
        kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
        if not kinds:
            raise ValueError(f"--kinds {args.kinds!r} names no model kind")
    options = RepositoryOptions(name=args.name, max_batch=args.max_batch, instances=args.instances,
                                max_queue_delay_us=args.max_queue_delay_us, ort_tensorrt=args.ort_tensorrt,
                                kinds=kinds, overwrite=args.overwrite, beyond_validated=args.beyond_validated)
    entries = write_repository(list(args.artifacts), args.output, options)
    for entry in entries:
        for warning in entry.warnings:
            progress(f"warning: {entry.name}: {warning}")
    for entry in entries:
        print(f"{entry.name}  {entry.kind} model, max_batch_size {entry.max_batch_size}  -> {entry.path}")
    if args.json:
        write_json(args.json, {"repository": str(args.output), "models": [entry.to_dict() for entry in entries]})
    return 0
