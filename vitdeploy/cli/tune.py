"""`vitdeploy tune`: time every CPU candidate side by side, keep the fastest accurate one (the work is
vitdeploy.tune)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    batches_within,
    command_line,
    output_file,
    parse_int_list,
    positive_int,
    progress,
    refuse_model_override,
    write_json,
)

DESCRIPTION = """\
Find the fastest accurate way to run a model on this CPU, and record it.

SOURCE_OR_FOLDER is an export folder (`vitdeploy deploy`/`export` output: an fp32 vitdeploy ONNX file
with its onnxruntime-CPU variant, and int8 files) or a checkpoint / variant name, which is first
exported into OUT (fp32 + int8, validated). Every candidate this CPU can run is timed side by side
in interleaved rounds at each --batch (and in each backend's throughput mode: onnxruntime parallel
sessions, OpenVINO's THROUGHPUT hint):

  onnxruntime: fp32 (fused CPU variant), int8 full-range weights, int8 7-bit weights, fp8
  OpenVINO:    fp32 at f32, fp32 at bf16, int8 (f32 or bf16 elsewhere), int8 7-bit weights

A candidate that cannot run here is listed with its reason (no bf16 on this CPU, no fp8 kernel,
backend not installed). Missing int8 forms are quantized from the fp32 file with the same
calibration images. Accuracy: with --labelled DIR, top-1 on those images against eager fp32;
otherwise the worst cosine and top-1 agreement against eager fp32 on real photos (--images DIR,
default the bundled ones). Every output of the file is judged by its kind: logits as above, vectors
(pooler_output, image_embeds) by worst row cosine, token outputs (last_hidden_state, patch_tokens) per
token: worst token cosine and share of tokens below the floor, from the candidate precision's parity
gate unless token=T,share=S set them. Each figure is reported with its spread across the rounds, and a
candidate whose speed is unstable here (two modes, or an IQR above 20 % of its median) is flagged;
a steady candidate within 10 % of an unstable faster one is preferred to it. The fastest (steady)
candidate within --max-accuracy-drop is chosen and written to OUT/tune.json with every candidate's
figures and the CPU's flags (plus OUT/tune.md and OUT/tune_latency_vs_accuracy.png);
`vitdeploy predict OUT IMAGE` and runtimes.load(OUT) run it.

Exit status: 0 a candidate was chosen; 1 none passed the accuracy gate; 2 bad input.

  vitdeploy tune deploy-out/
  vitdeploy tune vit_small_patch16_224 -o tuned/ --batch 1,8,32 --rounds 7
  vitdeploy tune digits.safetensors -o out/ --labelled val/ --max-accuracy-drop 0.5
  vitdeploy tune out/ --max-accuracy-drop cosine=0.99,top1=0.95 --compare-nncf
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from vitdeploy.calibration import DEFAULT_CALIBRATION_SIZE
    from vitdeploy.tune.candidates import candidate_list
    from vitdeploy.tune.selection import OBJECTIVES

    names = ", ".join(c.name for c in candidate_list(frozenset()))
    parser = subparsers.add_parser(
        "tune", help="time every CPU path (onnxruntime/OpenVINO x fp32/bf16/int8) side by side, keep the fastest "
        "accurate one", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE_OR_FOLDER",
                        help="an export folder, or a checkpoint file/folder or variant name to export first")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="where the artifacts and tune.json go (default: the export folder itself; required "
                        "for a checkpoint)")
    parser.add_argument("--batch", metavar="N,N",
                        help="batch sizes to time (default 1,8, each kept inside an export folder's batch range)")
    parser.add_argument("--rounds", type=positive_int, default=5, metavar="N", help="interleaved rounds (default 5)")
    parser.add_argument("--iterations", type=positive_int, default=10, metavar="N",
                        help="calls per candidate per round at batch 1, divided by the batch size (default 10)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed calls per candidate (default 2)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads per candidate (default: usable CPUs)")
    parser.add_argument("--labelled", metavar="DIR",
                        help="labelled images (ImageFolder: DIR/<class>/<image>): judge accuracy by top-1 drop")
    parser.add_argument("--images", metavar="DIR",
                        help="real photos to measure agreement with eager fp32 on (default: the bundled photos)")
    parser.add_argument("--max-accuracy-drop", default=None, metavar="GATE", type=accuracy_gate,
                        help="how much accuracy a candidate may lose: POINTS of labelled top-1 (default 0.5), or "
                        "cosine=C,top1=A for agreement without labels (default cosine=0.999,top1=0.99); token=T,"
                        "share=S: worst token cosine and share of tokens below the floor for token outputs "
                        "(default: the candidate precision's parity gate)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency",
                        help="latency: lowest p50 at the smallest --batch (default); throughput: most images/s "
                        "in the backend's throughput mode")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput-mode measurement")
    parser.add_argument("--throughput-batch", type=positive_int, metavar="N",
                        help="batch per request in throughput mode (default: the largest --batch)")
    parser.add_argument("--candidates", metavar="NAMES", help=f"consider only these, comma-separated: {names}")
    parser.add_argument("--calibration", metavar="DIR",
                        help="calibration images for int8 files tune makes (default: bundled photos + crops)")
    parser.add_argument("--calibration-size", type=positive_int, default=DEFAULT_CALIBRATION_SIZE, metavar="N",
                        help=f"calibration images (default {DEFAULT_CALIBRATION_SIZE})")
    parser.add_argument("--compare-nncf", action="store_true",
                        help="also time OpenVINO + NNCF int8 of the same fp32 file and calibration images, "
                        "compiled for each input shape (the peer, at its fastest; needs nncf: pip install "
                        "'vitdeploy[bench]')")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the manifest as JSON to PATH")
    add_model_override(parser, "SOURCE_OR_FOLDER (not an export folder)")
    parser.set_defaults(func=run)


def _reconstructed(args: argparse.Namespace) -> str:
    parts = ["vitdeploy", "tune", str(args.source)] + (["-o", str(args.output)] if args.output else [])
    for flag in ("batch", "rounds", "iterations", "threads", "labelled", "images", "max_accuracy_drop", "objective",
                 "throughput_batch", "candidates", "calibration"):
        value = getattr(args, flag, None)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if getattr(args, "model_variant", None):
        parts += ["--model", args.model_variant]
    parts += [f"--{flag.replace('_', '-')}" for flag in ("no_throughput", "compare_nncf") if getattr(args, flag, False)]
    return shlex.join(parts)


def accuracy_gate(text: str) -> str:
    """argparse type of ``--max-accuracy-drop``: checked at parse time, kept as text (``gate_from`` builds it)."""
    from vitdeploy.tune.accuracy import AccuracyGate

    try:
        AccuracyGate.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def gate_from(text: str | None, labelled: bool) -> object:
    """The accuracy gate of ``--max-accuracy-drop`` (the defaults where it is not given)."""
    from vitdeploy.tune.accuracy import AccuracyGate

    if text is None:
        return AccuracyGate()
    try:
        gate = AccuracyGate.parse(text)
    except ValueError as error:
        raise CLIError(str(error)) from None
    keys = {part.rpartition("=")[0].strip() or "points" for part in text.split(",") if part.strip()}
    if labelled and keys - {"points", "token", "share"}:
        raise CLIError(f"argument --max-accuracy-drop: {text!r}: with --labelled the gate is the top-1 drop in points")
    if not labelled and "points" in keys:
        raise CLIError(f"argument --max-accuracy-drop: {text!r} is a labelled top-1 drop: give --labelled DIR, or "
                       "gate the agreement with cosine=C,top1=A")
    return gate


def run(args: argparse.Namespace) -> int:
    from vitdeploy.tune import TunePlan, tune
    from vitdeploy.tune.candidates import export_for_tune, find_artifacts
    from vitdeploy.tune.report import terminal_table
    from vitdeploy.tune.run import DEFAULT_BATCHES

    batches = tuple(parse_int_list(args.batch, "batch")) if args.batch else DEFAULT_BATCHES
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    source = Path(args.source)
    artifacts = find_artifacts(source) if source.is_dir() else {}
    needs_export = "fp32" not in artifacts
    if not args.batch and not needs_export:  # the defaults, inside the range the folder's files take
        from vitdeploy.metadata import read_onnx_metadata

        batches = tuple(batches_within(DEFAULT_BATCHES, *read_onnx_metadata(artifacts["fp32"]).shape_range.batch))
    if not needs_export:
        refuse_model_override(args.model_variant, args.source, "an export folder, whose files record the architecture")
        if args.output is not None and Path(args.output).resolve() != source.resolve():
            raise CLIError(f"tune writes tune.json beside the artifacts it measured: omit -o or give {args.source!r}")
        folder = source
    else:
        if args.output is None:
            raise CLIError(f"{args.source!r} is not an export folder with an fp32 vitdeploy ONNX file; give -o OUT to "
                           "export it there first")
        folder = Path(args.output)
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"output {args.output!r} exists and is not a folder")
    only = tuple(n.strip() for n in args.candidates.split(",") if n.strip()) if args.candidates else None
    # The plan checks every option before any export or measurement starts.
    plan = TunePlan(folder=folder, batches=batches, rounds=args.rounds, iterations=args.iterations,
                    warmup=args.warmup, threads=args.threads,
                    gate=gate_from(args.max_accuracy_drop, args.labelled is not None), labelled=args.labelled,
                    images=args.images, objective=args.objective, throughput=not args.no_throughput,
                    throughput_batch=args.throughput_batch, calibration=args.calibration,
                    calibration_size=args.calibration_size, peer=args.compare_nncf, only=only,
                    command=command_line("tune") or _reconstructed(args))
    reference = None
    if needs_export:
        from vitdeploy.checkpoints import resolve_source
        from vitdeploy.files import slug

        resolved = resolve_source(args.source, log=progress, model=args.model_variant)
        reference = resolved.model.eval()
        export_for_tune(reference, folder, slug(args.source), (1, max(64, *batches)), str(resolved.source),
                        resolved.sha256, args.calibration, args.calibration_size, log=progress)
    result = tune(plan, reference_model=reference, log=progress)
    print(terminal_table(result.manifest))
    if args.json:
        write_json(args.json, result.manifest.to_dict())
    return 0 if result.manifest.chosen is not None else 1
