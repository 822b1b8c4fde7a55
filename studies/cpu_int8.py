"""vitdeploy's CPU paths (fp32, int8; onnxruntime and OpenVINO) against OpenVINO + NNCF int8, side by side.

The question it answers: is vitdeploy's fastest CPU path for a model no slower than the best
peer, OpenVINO running an NNCF-quantized int8 model, at each batch size, with cosine >= 0.99
against eager fp32 on the bundled photos? Everything runs in one process: the model (random
weights, fixed seed) is exported with the real exporter (fp32 with its onnxruntime-CPU variant,
and int8 with vitdeploy's quantizer, both validated), the peers are made from the same fp32
graph (NNCF's ``quantize`` with ``ModelType.TRANSFORMER``; onnxruntime's ``quantize_static``,
s8s8 symmetric, for reference), all on the same calibration images, and every contender is timed
in interleaved rounds (the order reverses every round) so other load hits all alike. Each row
reports the median over rounds of the per-round p50 latency.

NNCF is the peer, not a dependency: ``pip install nncf`` in the environment that runs this (it
is skipped with its reason otherwise). bf16 rows appear only where the CPU has bf16.

    python studies/cpu_int8.py [--model vit_small_patch16_224] [--batch 1,8] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import study
from study import RESULTS, add_run_arguments, check_at_least_one, command_line, random_model

from vitdeploy.benchmarks.timing import time_rounds

DEFAULT_OUTPUT = RESULTS / "cpu_int8.json"
PEER = "OpenVINO + NNCF int8 (peer)"
BASELINE = "torch eager fp32"
MIN_COSINE = 0.99


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python studies/cpu_int8.py",
        description="Time vitdeploy's CPU runtimes (fp32/int8, onnxruntime/OpenVINO) against OpenVINO + NNCF "
        "int8 side by side in one process; report ratios and cosine vs eager fp32 on the bundled photos.",
    )
    add_run_arguments(parser, rounds=7, iterations=16, warmup=3, default_output=DEFAULT_OUTPUT,
                      iterations_help="timed calls per contender per round at batch 1; divided by the batch size above it")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--size", type=int, default=None, help="input height = width (default: native)")
    parser.add_argument("--calibration", metavar="DIR", help="calibration images (default: bundled photos + crops)")
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="skip OpenVINO + NNCF even if nncf is installed")
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch {args.batch!r} must be comma-separated integers")
    if not args.batches or min(args.batches) < 1:
        parser.error(f"--batch {args.batch!r} must list integers >= 1")
    check_at_least_one(parser, args, "calibration_size")
    return args


def _say(message: str) -> None:
    print(f"[cpu_int8] {message}", file=sys.stderr, flush=True)


def ort_quantize_static(fp32: Path, output: Path, calibration: Any, input_name: str) -> Path:
    """onnxruntime's static Q/DQ quantizer, s8s8 symmetric, per-channel weights, MatMul/Gemm/Conv."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.batches(8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    quantize_static(str(fp32), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return output


def openvino_session(path: Path, threads: int, precision: str = "f32") -> Callable[[np.ndarray], Any]:
    """A bare OpenVINO compiled model (for files without vitdeploy metadata, such as onnxruntime's)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda pixels: np.array(request.infer({0: pixels})[output], copy=True)


def main(argv: Sequence[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from vitdeploy.benchmarks.environment import recording_load
    from vitdeploy.calibration import load_calibration
    from vitdeploy.cpu_features import has_bf16, int8_dot_flags
    from vitdeploy.exporters.artifact_set import ArtifactSetPlan, build_artifact
    from vitdeploy.exporters.onnx_export import ExportValidationError
    from vitdeploy.exporters.quantize import QuantizeOptions
    from vitdeploy.exporters.quantize_onnx import quantize_onnx
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.parity import InputFactory, compare_logits
    from vitdeploy.runtimes import OpenVINORuntime, OrtRuntime
    from vitdeploy.tune.peer import nncf_peer

    args = parse_args(argv)
    command = command_line("cpu_int8", argv)
    model = random_model(args)
    size = args.size or model.config.image_size
    max_batch = max(max(args.batches), 4)
    bf16 = has_bf16()
    contenders: dict[str, Callable[[np.ndarray], Any]] = {}
    skipped: dict[str, str] = {}
    keep: list[Any] = []

    with tempfile.TemporaryDirectory(prefix="cpu_int8.") as folder:
        plan = ArtifactSetPlan("model", graphs=("fp32", "int8"), batch=(1, max_batch), height=(size, size),
                               width=(size, size), validation_max_batch=1, calibration=args.calibration,
                               calibration_size=args.calibration_size)
        fp32_path, int8_path = plan.path(folder, "fp32"), plan.path(folder, "int8")
        _say(f"exporting {args.model} fp32 (validated, with its onnxruntime-CPU variant)")
        build_artifact(model, plan, "fp32", folder)
        reduce_range = plan.int8.reduce_range  # the project's int8 form (INT8_POLICY)
        _say(f"exporting {args.model} int8 (calibration: {args.calibration or 'bundled photos + crops'}"
             f"{'; 7-bit weights' if reduce_range else ''})")
        int8 = build_artifact(model, plan, "int8", folder, progress=_say)
        metadata = read_onnx_metadata(fp32_path)
        calibration = load_calibration(args.calibration, args.calibration_size, metadata.preprocessing, log=None)
        # The same quantizer with the attention batch-matmuls quantized too (what NNCF does): faster on
        # CPUs, judged by the same gate (quantize_onnx validates it against the fp32 graph).
        attention_path = Path(folder) / "model-int8-attention.onnx"
        _say("quantizing int8 with the attention batch-matmuls quantized too (--keep-float without AttentionMatMul)")
        try:
            quantize_onnx(fp32_path, attention_path, QuantizeOptions(
                keep_float=("LayerNormalization", "Softmax", "Gelu"), reduce_range=reduce_range),
                calibration=args.calibration, calibration_size=args.calibration_size, max_batch=1, progress=_say,
                cpu_variant=False)  # OpenVINO runs it: no onnxruntime-CPU variant to make and validate
        except ExportValidationError as error:
            skipped["vitdeploy int8, attention quantized"] = f"failed its gate: {'; '.join(error.report.failures[:2])}"
            attention_path = None

        threads = {"intra_op_threads": args.threads, "inter_op_threads": 1}
        ort_fp32 = OrtRuntime(fp32_path, **threads)
        ort_int8 = OrtRuntime(int8_path, **threads)
        # the int8 file itself, beside the validated CPU variant OrtRuntime runs by default: what the fusion buys
        ort_int8_portable = OrtRuntime(int8_path, variant="portable", **threads)
        ov_fp32 = OpenVINORuntime(fp32_path, threads=args.threads)
        ov_int8 = OpenVINORuntime(int8_path, threads=args.threads)
        keep += [ort_fp32, ort_int8, ort_int8_portable, ov_fp32, ov_int8]
        contenders.update({
            "vitdeploy OrtRuntime fp32 (CPU variant)": ort_fp32,
            f"vitdeploy OrtRuntime int8 ({'CPU variant' if ort_int8.graph_path != int8_path else 'no CPU variant'})":
                ort_int8,
            "vitdeploy OrtRuntime int8 (portable file)": ort_int8_portable,
            "vitdeploy OpenVINORuntime fp32 (f32)": ov_fp32,
            "vitdeploy OpenVINORuntime int8 (f32 elsewhere)": ov_int8,
        })
        if attention_path is not None:
            ov_attention = OpenVINORuntime(attention_path, threads=args.threads)
            keep.append(ov_attention)
            contenders["vitdeploy OpenVINORuntime int8, attention quantized"] = ov_attention
        if bf16:
            ov_fp32_bf16 = OpenVINORuntime(fp32_path, threads=args.threads, inference_precision="bf16")
            ov_int8_bf16 = OpenVINORuntime(int8_path, threads=args.threads, inference_precision="bf16")
            keep += [ov_fp32_bf16, ov_int8_bf16]
            contenders["vitdeploy OpenVINORuntime fp32 (bf16)"] = ov_fp32_bf16
            contenders["vitdeploy OpenVINORuntime int8 (bf16 elsewhere)"] = ov_int8_bf16
            if attention_path is not None:
                ov_attention_bf16 = OpenVINORuntime(attention_path, threads=args.threads, inference_precision="bf16")
                keep.append(ov_attention_bf16)
                contenders["vitdeploy OpenVINORuntime int8, attention quantized (bf16 elsewhere)"] = ov_attention_bf16
        else:
            skipped["vitdeploy OpenVINORuntime bf16"] = "this CPU has no bf16 (avx512_bf16/amx_bf16 not in /proc/cpuinfo)"

        try:
            _say("onnxruntime quantize_static (s8s8 symmetric, MatMul/Gemm/Conv) on the fp32 graph")
            ort_static = ort_quantize_static(fp32_path, Path(folder) / "ort-static.onnx", calibration,
                                             metadata.inputs[0].name)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            session = ort.InferenceSession(str(ort_static), options, providers=["CPUExecutionProvider"])
            name = metadata.inputs[0].name
            contenders["onnxruntime quantize_static s8s8 (onnxruntime)"] = \
                lambda pixels, s=session, n=name: s.run(None, {n: pixels})[0]
            contenders["onnxruntime quantize_static s8s8 (OpenVINO)"] = openvino_session(ort_static, args.threads)
        except Exception as error:  # noqa: BLE001 - a reference contender; report and go on
            skipped["onnxruntime quantize_static"] = f"{type(error).__name__}: {error}"
        if args.no_peer:
            skipped[PEER] = "--no-peer"
        else:
            try:
                _say("NNCF int8 (ModelType.TRANSFORMER) on the fp32 graph")
                contenders[PEER] = nncf_peer(fp32_path, calibration, args.threads, max_batch, size)
            except ImportError as error:
                skipped[PEER] = f"nncf is not installed ({error}); pip install nncf"

    def eager(pixels: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(pixels)).numpy()

    runners_by_name = {BASELINE: eager, **contenders}
    photos, _ = InputFactory(metadata.preprocessing, synthetic=False).batch(max_batch, size, size)
    reference = eager(photos)
    accuracy = {}
    for name, run in runners_by_name.items():
        metrics = compare_logits(reference, np.asarray(run(photos), dtype=np.float32))
        accuracy[name] = {"cosine": round(metrics.cosine, 6), "rel_max_error": round(metrics.rel_max_error, 5),
                          "top1_agreement": metrics.top1_agreement}

    timings: dict[int, dict[str, list[float]]] = {}
    with recording_load() as load:
        for batch in args.batches:
            pixels = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
            runners = {name: (lambda run=run, pixels=pixels: run(pixels)) for name, run in runners_by_name.items()}
            iterations = max(3, args.iterations // batch)
            _say(f"batch {batch}: {len(runners)} contenders x {args.rounds} rounds x {iterations} calls")
            timings[batch] = time_rounds(runners, args.rounds, iterations, args.warmup)
    for runtime in keep:
        runtime.close()

    rows, targets = [], {}
    vitdeploy_names = [name for name in runners_by_name if name.startswith("vitdeploy")]
    for batch, p50s in timings.items():
        medians = {name: float(np.median(values)) for name, values in p50s.items()}
        eager_ms, peer_ms = medians[BASELINE], medians.get(PEER)
        for name, ms in medians.items():
            rows.append({"contender": name, "batch": batch, "p50_ms_median": round(ms, 3),
                         "p50_ms_rounds": [round(v, 3) for v in p50s[name]], "vs_eager": round(ms / eager_ms, 4),
                         "vs_peer": round(ms / peer_ms, 4) if peer_ms else None, **accuracy[name]})
        eligible = [n for n in vitdeploy_names if accuracy[n]["cosine"] >= MIN_COSINE]
        fastest = min(eligible, key=medians.get) if eligible else None
        ratio = medians[fastest] / peer_ms if fastest and peer_ms else None
        targets[f"batch {batch}"] = {
            "target": f"fastest vitdeploy CPU path with cosine >= {MIN_COSINE} no slower than {PEER}",
            "fastest": fastest, "fastest_ms": round(medians[fastest], 3) if fastest else None,
            "peer_ms": round(peer_ms, 3) if peer_ms else None,
            "ratio_to_peer": round(ratio, 4) if ratio else None, "met": (ratio <= 1.0) if ratio else None,
        }
    report = {
        "cpu": {"bf16": bf16, "int8_dot_product": int8_dot_flags()},
        **load.to_dict(),
        "setup": {"model": args.model, "depth": model.config.depth, "size": size, "batches": args.batches, "threads": args.threads,
                  "rounds": args.rounds, "iterations_batch1": args.iterations, "warmup": args.warmup,
                  "weights": "random (torch.manual_seed(0))",
                  "calibration": calibration.describe(), "int8_quantization": int8.quantization,
                  "artifact_set": plan.record(),
                  "accuracy": f"vs eager fp32 on the bundled photos, batch {max_batch} at {size}x{size}",
                  "statistic": "median over rounds of the per-round p50; rounds interleave the contenders"},
        "skipped": skipped,
        "results": rows,
        "targets": targets,
    }
    print(f"{args.model} at {size}x{size}, {args.threads} threads, {args.rounds} rounds; bf16 {bf16}, int8 dot "
          f"{int8_dot_flags() or 'none'}; {load.describe()}")
    print(f"{'contender':68s} {'batch':>5s} {'p50 ms':>8s} {'vs eager':>9s} {'vs peer':>8s} {'cosine':>9s} {'top-1':>6s}")
    for row in rows:
        peer = "-" if row["vs_peer"] is None else f"{row['vs_peer']:.3f}x"
        print(f"{row['contender']:68s} {row['batch']:5d} {row['p50_ms_median']:8.2f} {row['vs_eager']:8.3f}x "
              f"{peer:>8s} {row['cosine']:9.5f} {row['top1_agreement']:6.2f}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for name, target in targets.items():
        verdict = "n/a (no peer)" if target["met"] is None else ("met" if target["met"] else "NOT met")
        print(f"{name}: fastest vitdeploy path {target['fastest']} {target['fastest_ms']} ms vs peer "
              f"{target['peer_ms']} ms -> {verdict}")
    return study.finish(args, command, report)


if __name__ == "__main__":
    raise SystemExit(main())
