"""`vitdeploy verify`: parity of any artifact with the eager model over real and synthetic images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    add_source_check,
    batches_within,
    cosine,
    int_list_arg,
    output_file,
    parse_int_list,
    parse_sizes,
    positive_float,
    positive_int,
    progress,
    sizes_arg,
    write_json,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="compare an artifact (ONNX, TensorRT engine, checkpoint) with the eager model: max-abs, cosine, top-k",
        description="Run ARTIFACT (anything vitdeploy.runtimes.load opens) and the eager PyTorch model from "
        "--reference on the same batches — real photographs (the --images folder, or the bundled ones) and "
        "synthetic images — at several batch sizes and resolutions. Prints one row per shape with max-abs, "
        "mean-abs, relative max error (max-abs / max |reference logit|), cosine similarity, top-1 and top-5 "
        "agreement and pass/fail against the tolerance of the artifact's precision; exits 1 on any failure. "
        "fp16 artifacts are compared with the eager model in fp16 under the same precision policy and with "
        "the eager fp32 model. When --reference is a timm or Hugging Face checkpoint and that library is importable, "
        "ARTIFACT is also compared with the library's own model on real photos at the native and a non-square size.",
    )
    parser.add_argument("artifact", help="an .onnx file, a TensorRT .engine/.plan, or a checkpoint")
    parser.add_argument("--reference", required=True, metavar="SOURCE",
                        help="checkpoint (or variant name) of the eager reference model")
    parser.add_argument("--images", metavar="DIR", help="folder of images to use (default: the bundled photographs)")
    parser.add_argument("--batch", type=int_list_arg, metavar="N,N",
                        help="batch sizes (default 1,4, each kept inside the artifact's batch range)")
    parser.add_argument("--resolution", type=sizes_arg, metavar="R,R",
                        help="resolutions: 224 for square or 224x320 for height x width, comma-separated "
                        "(default: native, smallest and a non-square size within the artifact's range)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8", "fp8"],
                        help="precision of the artifact, which picks the eager reference and tolerance "
                        "(default: from the artifact's metadata)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"],
                        help="onnxruntime provider for .onnx artifacts (default cpu)")
    parser.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt", "torch"],
                        help="runtime that runs ARTIFACT (default: by file type; openvino runs .onnx files)")
    accuracy = parser.add_argument_group(
        "accuracy on labelled images",
        "With --labelled (or --labels) verify reports the top-1/top-5 accuracy of the artifact and of the eager "
        "fp32 model on those images, side by side, and the drop, plus their agreement; the shape sweep is skipped.")
    accuracy.add_argument("--labelled", metavar="DIR",
                          help="ImageFolder layout: DIR/<class>/<image>; a class folder named like one of the "
                          "artifact's labels (or an integer) maps to that class, others to their sorted position")
    accuracy.add_argument("--labels", metavar="FILE",
                          help="a labels file: 'PATH LABEL' per line (PATH relative to --labelled DIR or the file)")
    accuracy.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                          help="fail (exit 1) if top-1 accuracy drops more than POINTS against eager fp32")
    accuracy.add_argument("--accuracy-batch", type=positive_int, default=32, metavar="N",
                          help="images per batch for the accuracy run (default 32)")
    parser.add_argument("--no-synthetic", action="store_true", help="use real images only")
    parser.add_argument("--max-rel-error", type=positive_float, metavar="X", help="override the tolerance's relative max error")
    parser.add_argument("--min-cosine", type=cosine, metavar="X", help="override the tolerance's minimum cosine, in (0, 1]")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="write the full report as JSON to PATH")
    add_model_override(parser, "of --reference")
    add_source_check(parser)
    parser.set_defaults(func=run)


DEFAULT_BATCHES = (1, 4)


def default_resolutions(spec: Any, native: int) -> list[tuple[int, int]]:
    """Native size, the smallest size, and a non-square size, all inside the runtime's range."""
    from vitdeploy.config import snap_to_stride

    stride = spec.multiple_of

    def clamp(value: int, low: int, high: int) -> int:
        return snap_to_stride(value, low, high, stride)

    h = clamp(native, *spec.height)
    w = clamp(native, *spec.width)
    wide = clamp(native + 2 * stride, *spec.width)
    if wide == h:
        wide = clamp(native - 2 * stride, *spec.width)
    sizes = [(h, w), (spec.height[0], spec.width[0]), (h, wide)]
    return list(dict.fromkeys(sizes))


def image_files(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise CLIError(f"--images {folder!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CLIError(f"--images {folder!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


# The fields that make two models compute differently (sizes, tokens, pooling, blocks), compared before any run.
SAME_MODEL_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_size", "num_classes", "pooling",
                     "num_reg_tokens", "distilled", "pre_norm", "act", "projection_dim")


def check_same_model(reference: str, config: Any, metadata: Any) -> None:
    """Refuse a ``--reference`` of another architecture than the artifact's (one line naming each difference),
    so a wrong reference is not reported as a shape or parity failure."""
    from vitdeploy.outputs import available_outputs

    exported = metadata.model_config
    differences = [f"{name} {getattr(config, name)} (the artifact: {exported[name]})" for name in SAME_MODEL_FIELDS
                   if name in exported and getattr(config, name) != exported[name]]
    if bool(config.hybrid) != bool(exported.get("hybrid")):
        differences.append(f"{'a' if config.hybrid else 'no'} ResNet stem (the artifact: "
                           f"{'one' if exported.get('hybrid') else 'none'})")
    lacking = [name for name in metadata.output_names if name not in available_outputs(config)]
    if lacking:
        differences.append(f"no {', '.join(lacking)} output{'s' if len(lacking) > 1 else ''}")
    if differences:
        theirs = f"{metadata.model_provenance['family'] or '?'} {metadata.model_provenance['name'] or '?'}"
        raise CLIError(f"--reference {reference} is a different model from the artifact: {'; '.join(differences)} "
                       f"(reference: {config.provenance.family} {config.provenance.name}, artifact: {theirs}); "
                       "pass the checkpoint the artifact was exported from")


def check_shapes(shapes: list[tuple[int, int, int]], spec: Any) -> None:
    """The runtime's own input check, applied to each requested shape before any work."""
    from vitdeploy.runtimes.base import validate_shape

    for batch, height, width in shapes:
        try:
            validate_shape(spec, (batch, spec.channels, height, width))
        except ValueError as error:
            raise CLIError(f"--batch/--resolution {batch}x{height}x{width}: {error} for this artifact") from None


def run(args: argparse.Namespace) -> int:
    from vitdeploy.checkpoints import resolve_source
    from vitdeploy.constants import DEFAULT_FP32_OPS
    from vitdeploy.metadata import ShapeRange
    from vitdeploy.parity import InputFactory, verify
    from vitdeploy.runtimes import load, runtime_kind
    from vitdeploy.runtimes.torch import eager_references

    kind = runtime_kind(args.artifact)
    if kind != "torch" and not Path(args.artifact).is_file():
        raise CLIError(f"artifact {args.artifact!r} does not exist")
    batches = parse_int_list(args.batch, "batch") if args.batch else None
    images = image_files(args.images) if args.images else None
    backend = args.backend or kind
    options: dict[str, Any] = {}
    if args.provider:
        if backend != "onnxruntime":
            raise CLIError(f"--provider applies to the onnxruntime backend, not {backend}")
        options["provider"] = args.provider
    if args.labels is None and args.labelled is not None and not Path(args.labelled).is_dir():
        raise CLIError(f"--labelled {args.labelled!r} is not a folder")
    if args.max_accuracy_drop is not None and not (args.labelled or args.labels):
        raise CLIError("--max-accuracy-drop needs --labelled DIR or --labels FILE")
    progress(f"loading {args.artifact} ({backend})")
    runtime = load(args.artifact, backend=backend, **options)
    if args.labelled or args.labels:
        try:
            return run_accuracy(args, runtime, backend)
        finally:
            runtime.close()
    try:
        metadata = runtime.metadata
        if metadata is None:
            raise CLIError(f"{args.artifact} has no vitdeploy metadata (preprocessing and stride unknown)")
        progress(f"loading reference {args.reference}")
        resolved = resolve_source(args.reference, log=progress, model=args.model_variant)
        model = resolved.model
        check_same_model(args.reference, model.config, metadata)
        spec = runtime.input_spec
        sizes = parse_sizes(args.resolution) if args.resolution else default_resolutions(
            spec, int(metadata.model_config["image_size"]))
        if batches is None:  # the defaults, inside the range the artifact takes (an engine of batch 1)
            batches = batches_within(DEFAULT_BATCHES, *spec.batch)
        shapes = [(b, h, w) for b in batches for h, w in sizes]
        check_shapes(shapes, spec)
        precision = args.precision or metadata.precision
        bounds = ShapeRange(
            batch=(1, max(b for b, _, _ in shapes)),
            height=(min(h for _, h, _ in shapes), max(h for _, h, _ in shapes)),
            width=(min(w for _, _, w in shapes), max(w for _, _, w in shapes)),
        )
        refs = eager_references(model, precision, list(metadata.fp32_ops) or DEFAULT_FP32_OPS, shape_range=bounds,
                                max_rel_error=args.max_rel_error, min_cosine=args.min_cosine,
                                outputs=metadata.output_names)
        inputs = InputFactory(metadata.preprocessing, images=images, synthetic=not args.no_synthetic)
        notes = []
        if metadata.source_sha256 and resolved.sha256 != metadata.source_sha256:
            notes.append(
                f"the reference weights (sha256 {resolved.sha256[:12]}) differ from those the artifact was "
                f"exported from ({metadata.source or '?'}, sha256 {metadata.source_sha256[:12]})"
            )
            progress(f"warning: {notes[-1]}")
        progress(f"verifying {len(shapes)} shape(s) against {', '.join(r.name for r in refs)}")
        report = verify(
            runtime, refs, shapes, inputs, candidate_name=f"{args.artifact} ({backend})", notes=notes,
            on_case=lambda c: progress(
                f"  {c.output} {c.batch}x3x{c.height}x{c.width} vs {c.reference}: "
                f"rel-max {c.metrics.rel_max_error:.2e}, "
                f"cosine {c.metrics.cosine:.6f} {'ok' if c.passed else 'FAIL'}"),
        )
        source = _source_check(args, resolved, runtime, metadata, spec, images)
    finally:
        runtime.close()
    print(report.format_table())
    if source.report is not None:
        print(source.report.format_table())
    print(source.summary_line())
    if args.json:
        write_json(args.json, {"artifact": str(args.artifact), "runtime": backend, "reference": args.reference,
                               "precision": precision, **report.to_dict(), "source_check": source.to_dict()})
    return 0 if report.passed and source.passed is not False else 1


def _source_check(args: argparse.Namespace, resolved: Any, runtime: Any, metadata: Any, spec: Any,
                  images: list[Path] | None) -> Any:
    """The artifact against the reference checkpoint's own library (or why not), at the native and a
    non-square size inside the runtime's range."""
    from vitdeploy.exporters.source_check import plan_source_check, run_source_check

    plan = plan_source_check(resolved.source, resolved.format, model=args.model_variant,
                             image_size=resolved.model.config.image_size,
                             variant=resolved.model.config.provenance.name, enabled=not args.no_source_check)
    if plan.runs:
        progress(f"checking against {plan.library}'s own {plan.architecture}")
    return run_source_check(runtime, plan, metadata, height=spec.height, width=spec.width, images=images,
                            on_case=lambda c: progress(
                                f"  {c.batch}x3x{c.height}x{c.width} vs {c.reference}: "
                                f"{'ok' if c.passed else 'FAIL'}"))


def _reference_model(args: argparse.Namespace, metadata: Any) -> Any:
    from vitdeploy.checkpoints import resolve_source

    progress(f"loading reference {args.reference}")
    resolved = resolve_source(args.reference, log=progress, model=args.model_variant)
    check_same_model(args.reference, resolved.model.config, metadata)
    return resolved


def run_accuracy(args: argparse.Namespace, runtime: Any, backend: str) -> int:
    """``verify --labelled/--labels``: accuracy of the artifact and of eager fp32, the drop, their agreement."""
    from vitdeploy.constants import DEFAULT_FP32_OPS
    from vitdeploy.datasets import image_folder, labels_file
    from vitdeploy.metadata import ShapeRange
    from vitdeploy.parity import evaluate_accuracy
    from vitdeploy.runtimes.torch import eager_references

    metadata = runtime.metadata
    if metadata is None:
        raise CLIError(f"{args.artifact} has no vitdeploy metadata (preprocessing unknown)")
    if "logits" not in metadata.output_names:
        raise CLIError(f"{args.artifact} has no logits output (it has {', '.join(metadata.output_names)}): "
                       "accuracy needs a classifier; verify it against its reference without --labelled/--labels")
    names = list(metadata.labels) if metadata.labels else None
    if args.labels:
        data = labels_file(args.labels, metadata.num_classes, names, root=args.labelled)
    else:
        data = image_folder(args.labelled, metadata.num_classes, names)
    resolved = _reference_model(args, metadata)
    spec = runtime.input_spec
    size = int(metadata.preprocessing.crop_size)
    batch = min(args.accuracy_batch, spec.batch[1])
    check_shapes([(min(batch, data.count), size, size)], spec)
    precision = args.precision or metadata.precision
    bounds = ShapeRange(batch=(1, batch), height=(size, size), width=(size, size))
    reference = eager_references(resolved.model, precision, list(metadata.fp32_ops) or DEFAULT_FP32_OPS,
                                 shape_range=bounds, max_rel_error=args.max_rel_error, min_cosine=args.min_cosine)[-1]
    progress(f"accuracy on {data.count} labelled images ({data.mapping} class mapping) at {size}x{size}, "
             f"against {reference.name}")
    report = evaluate_accuracy(runtime, reference, list(data.items), metadata.preprocessing, batch_size=batch,
                               candidate_name=f"{Path(args.artifact).name} ({backend})", source=data.source,
                               max_drop=args.max_accuracy_drop,
                               on_batch=lambda done, total: progress(f"  {done}/{total} images"))
    if data.mapping == "sorted":
        report.notes.append("class folders matched neither the artifact's labels nor integers: numbered in "
                            "sorted order (torchvision ImageFolder)")
    print(report.format_table())
    if args.json:
        write_json(args.json, {"artifact": str(args.artifact), "runtime": backend, "reference": args.reference,
                               "precision": precision, **report.to_dict()})
    return 0 if report.passed else 1
