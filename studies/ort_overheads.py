"""Eager PyTorch vs onnxruntime vs the OrtRuntime wrapper, side by side in one process.

Answers two targets on a CPU at batch 1: onnxruntime fp32 latency <= 0.8x eager PyTorch's,
and ``OrtRuntime.__call__`` adding at most 3% over a bare ``InferenceSession.run`` on the same
session. The model (random weights, fixed seed) is exported once with the real exporter;
every runtime is then timed in interleaved rounds (the order reverses every round) so that
load from other processes hits all of them alike, and each row reports the median of the
per-round p50 latencies. Two more rows split onnxruntime's gain in two: the same graph with
its last block computed for every token (``--full-last-block``), and eager PyTorch computing
the last block for the class token alone (``model(x, class_token_last_block=True)``).

    python studies/ort_overheads.py [--model vit_small_patch16_224] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import study
from study import RESULTS, add_run_arguments, check_at_least_one, command_line, random_model

from vitdeploy.benchmarks.timing import time_rounds

DEFAULT_OUTPUT = RESULTS / "ort_overheads.json"
ORT_TARGET = 0.8  # onnxruntime latency / eager latency
WRAPPER_TARGET = 0.03  # OrtRuntime latency / bare session latency - 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python studies/ort_overheads.py",
        description="Time eager torch fp32, a bare onnxruntime InferenceSession.run and OrtRuntime side by side.",
    )
    add_run_arguments(parser, rounds=9, iterations=30, warmup=5, default_output=DEFAULT_OUTPUT,
                      iterations_help="timed calls per runtime per round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="input height = width (default: native)")
    args = parser.parse_args(argv)
    check_at_least_one(parser, args, "batch")
    return args


def _logits(output: Any) -> np.ndarray:
    """Logits from a session's output list, a runtime's array or a torch tensor."""
    if isinstance(output, list):
        output = output[0]
    return output.numpy() if hasattr(output, "numpy") else np.asarray(output)


def main(argv: Sequence[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from vitdeploy.benchmarks.environment import recording_load
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.parity import compare_logits
    from vitdeploy.runtimes import OrtRuntime

    args = parse_args(argv)
    command = command_line("ort_overheads", argv)
    model = random_model(args)
    size = args.size or model.config.image_size
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    tensor = torch.from_numpy(pixels)

    with tempfile.TemporaryDirectory(prefix="ort_overheads.") as folder:
        path = Path(folder) / f"{args.model}.onnx"
        print(f"exporting {args.model} (fp32) ...", file=sys.stderr)
        full_path = Path(folder) / f"{args.model}-full-last-block.onnx"
        # Validated exports (only those carry the onnxruntime-CPU variant OrtRuntime runs), for the
        # one size and batch timed here: validation costs no more than it must.
        shapes = {"batch": (args.batch, args.batch), "height": (size, size), "width": (size, size),
                  "validation_max_batch": args.batch, "preflight": False}
        export_onnx(model, path, ExportOptions(**shapes))
        export_onnx(model, full_path, ExportOptions(class_token_last_block=False, **shapes))
        runtime = OrtRuntime(path, intra_op_threads=args.threads, inter_op_threads=1)
        full_runtime = OrtRuntime(full_path, intra_op_threads=args.threads, inter_op_threads=1)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        file_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    session, input_name, output_name = runtime.session, runtime.input_spec.name, runtime.output_name
    feeds = {input_name: pixels}

    def eager() -> Any:
        with torch.inference_mode():
            return model(tensor)

    def eager_class_token_last_block() -> Any:
        with torch.inference_mode():
            return model(tensor, class_token_last_block=True)

    # The target row is OrtRuntime vs `model(x)`. The two "last block" rows split the gain into
    # its parts: the exported graph computes the last block for the class token alone (so does
    # model(x, class_token_last_block=True)), and onnxruntime's kernels do the rest.
    runners = {
        "torch eager fp32": eager,
        "torch eager fp32, class-token last block": eager_class_token_last_block,
        "onnxruntime, contrib-fused, full last block (OrtRuntime)": lambda: full_runtime(pixels),
        "onnxruntime, file as exported (InferenceSession.run)": lambda: file_session.run([output_name], feeds),
        "onnxruntime, contrib-fused (bare InferenceSession.run)": lambda: session.run([output_name], feeds),
        "onnxruntime, contrib-fused (OrtRuntime.__call__)": lambda: runtime(pixels),
    }
    reference = eager().numpy()
    parity = {name: compare_logits(reference, _logits(run())).rel_max_error
              for name, run in runners.items() if name != "torch eager fp32"}

    with recording_load() as load:
        p50s = time_rounds(runners, args.rounds, args.iterations, args.warmup)

    medians = {name: float(np.median(values)) for name, values in p50s.items()}
    eager_ms = medians["torch eager fp32"]
    bare_ms = medians["onnxruntime, contrib-fused (bare InferenceSession.run)"]
    wrapped_ms = medians["onnxruntime, contrib-fused (OrtRuntime.__call__)"]
    rows = [{"runtime": name, "p50_ms_median": round(ms, 3), "p50_ms_rounds": [round(v, 3) for v in p50s[name]],
             "vs_eager": round(ms / eager_ms, 4), "rel_max_error_vs_eager": parity.get(name)}
            for name, ms in medians.items()]
    wrapper = wrapped_ms / bare_ms - 1.0
    ort_ratio = wrapped_ms / eager_ms
    report = {
        **load.to_dict(),
        "setup": {"model": args.model, "depth": model.config.depth, "batch": args.batch, "height": size, "width": size, "threads": args.threads,
                  "rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
                  "weights": "random (torch.manual_seed(0))", "fusions": runtime.fusions,
                  "graph_optimizations": runtime.metadata.optimizations if runtime.metadata else [],
                  "statistic": "median over rounds of the per-round p50; rounds interleave the runtimes"},
        "results": rows,
        "targets": {
            "onnxruntime_vs_eager": {"target": f"<= {ORT_TARGET}", "measured": round(ort_ratio, 4),
                                     "met": ort_ratio <= ORT_TARGET},
            "wrapper_overhead": {"target": f"<= {WRAPPER_TARGET:.0%}", "measured": round(wrapper, 4),
                                 "overhead_us": round((wrapped_ms - bare_ms) * 1000, 1),
                                 "met": wrapper <= WRAPPER_TARGET},
        },
    }
    print(study.run_line(args, size, load))
    print(f"{'runtime':62s} {'p50 ms':>8s} {'vs eager':>9s} {'rel err':>9s}")
    for row in rows:
        print(f"{row['runtime']:62s} {row['p50_ms_median']:8.2f} {row['vs_eager']:8.3f}x "
              f"{study.error_cell(row['rel_max_error_vs_eager'])}")
    print(f"OrtRuntime vs eager: {ort_ratio:.3f}x (target <= {ORT_TARGET}) "
          f"{'met' if ort_ratio <= ORT_TARGET else 'NOT met'}")
    print(f"wrapper overhead: {wrapper:+.2%} ({(wrapped_ms - bare_ms) * 1000:+.0f} us; target <= "
          f"{WRAPPER_TARGET:.0%}) {'met' if wrapper <= WRAPPER_TARGET else 'NOT met'}")
    return study.finish(args, command, report)


if __name__ == "__main__":
    raise SystemExit(main())
