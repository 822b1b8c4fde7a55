"""How close each quantizer's graph stays to eager fp32, with and without injected outlier channels.

The evidence behind vitdeploy's quantizer choices (docs/precision.md, "INT8 and FP8"): one fp32 export of
the model (random weights, seed 0), then, on the same calibration images, vitdeploy's int8
(SmoothQuant migration off, at a fixed alpha, and the default: alpha searched per LayerNorm and the
measured float fallback; 7-bit weights), its fp8, and onnxruntime's ``quantize_static``
(s8s8 symmetric, MatMul/Gemm/Conv: it cannot tell the attention batch-matmuls from the linear
layers by op type), each run by onnxruntime and OpenVINO and compared with the eager model on
the bundled photos and on synthetic images: cosine (minimum over samples), relative max error,
top-1 agreement. The same is repeated on a copy of the graph with outlier channels injected into
every LayerNorm output (``studies/outliers.py``: x30 on 4 channels, the float function
unchanged), the phenomenon trained ViTs show and random weights do not. Accuracy only; no timing.

    python studies/quant_accuracy.py [--model vit_small_patch16_224] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from study import RESULTS, command_line, write_results

DEFAULT_OUTPUT = RESULTS / "quant_accuracy.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python studies/quant_accuracy.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="variant name (random weights, seed 0)")
    parser.add_argument("--batch", type=int, default=8, help="images per comparison batch (default 8)")
    parser.add_argument("--calibration", metavar="DIR", help="calibration images (default: bundled photos + crops)")
    parser.add_argument("--calibration-size", type=int, default=32)
    parser.add_argument("--outlier-factor", type=float, default=30.0)
    parser.add_argument("--fp32", type=Path, metavar="PATH",
                        help="reuse this fp32 export of the same model (random weights, seed 0) instead of exporting")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.calibration_size < 1:
        parser.error("--batch must be >= 2 and --calibration-size >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import onnx
    import onnxruntime as ort
    import openvino as ov
    import torch
    from cpu_int8 import ort_quantize_static
    from outliers import inject_outlier_channels

    import vitdeploy
    from vitdeploy.calibration import load_calibration
    from vitdeploy.cpu_features import int8_dot_flags
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.exporters.quantize import QuantizeOptions, quantize_model
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.parity import InputFactory, compare_logits

    args = parse_args(argv)
    command = command_line("quant_accuracy", argv)
    torch.manual_seed(0)
    model = vitdeploy.create_model(args.model).eval()
    size = model.config.image_size
    core = ov.Core()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant_accuracy.") as folder:
        fp32_path = args.fp32 or Path(folder) / "model.onnx"
        if args.fp32 is None:
            print(f"exporting {args.model} fp32 ...", file=sys.stderr)
            export_onnx(model, fp32_path, ExportOptions(batch=(1, args.batch), height=(size, size),
                                                        width=(size, size), validate=False, cpu_variant=False,
                                                        preflight=False))
        metadata = read_onnx_metadata(fp32_path)
        calibration = load_calibration(args.calibration, args.calibration_size, metadata.preprocessing, log=None)
        batches = {
            "photos": InputFactory(metadata.preprocessing, synthetic=False).batch(args.batch, size, size)[0],
            # uniform random pixels, normalised like images (InputFactory's synthetic inputs)
            "synthetic": InputFactory(metadata.preprocessing, images=[]).batch(args.batch, size, size)[0],
        }
        with torch.no_grad():
            references = {name: model(torch.from_numpy(x)).numpy() for name, x in batches.items()}
        base = onnx.load(str(fp32_path))
        variants = {"random weights": base,
                    f"outlier channels x{args.outlier_factor:g}": inject_outlier_channels(base, factor=args.outlier_factor)}
        for graph_name, graph in variants.items():
            source = Path(folder) / "source.onnx"
            onnx.save(graph, str(source))
            candidates = {
                "vitdeploy int8, no outlier handling": QuantizeOptions(smooth_alpha=0.0, fallback_cosine=None),
                "vitdeploy int8, SmoothQuant alpha 0.5 where outliers, no fallback (before 12-03)":
                    QuantizeOptions(smooth_alpha=0.5, fallback_cosine=None),
                "vitdeploy int8 (default: alpha searched where outliers, float fallback)": QuantizeOptions(),
                "vitdeploy int8, SmoothQuant on every LayerNorm": QuantizeOptions(smooth_threshold=1.0),
                "vitdeploy int8, 7-bit weights (--reduce-range)": QuantizeOptions(reduce_range=True),
                "vitdeploy int8, percentile 99.99": QuantizeOptions(calibrator="percentile"),
                "vitdeploy fp8 E4M3 (emulated)": QuantizeOptions(precision="fp8"),
            }
            files = {}
            for name, options in candidates.items():
                print(f"{graph_name}: {name} ...", file=sys.stderr)
                quantized, _ = quantize_model(graph, calibration, options)
                files[name] = Path(folder) / f"{len(files)}.onnx"
                onnx.save(quantized, str(files[name]))
            try:
                files["onnxruntime quantize_static s8s8"] = ort_quantize_static(
                    source, Path(folder) / "ort.onnx", calibration, metadata.inputs[0].name)
            except Exception as error:  # noqa: BLE001 - a comparison contender; report and go on
                print(f"onnxruntime quantize_static failed: {error}", file=sys.stderr)
            for name, path in files.items():
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                runners = {"onnxruntime": lambda x, s=session: s.run(None, {"pixel_values": x})[0]}
                if "fp8" not in name:
                    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                                  {"INFERENCE_PRECISION_HINT": "f32"})
                    request = compiled.create_infer_request()
                    runners["openvino"] = lambda x, r=request, c=compiled: r.infer({0: x})[c.output(0)]
                for runtime, run in runners.items():
                    row = {"graph": graph_name, "quantizer": name, "runtime": runtime}
                    for kind, x in batches.items():
                        metrics = compare_logits(references[kind], np.asarray(run(x)))
                        row[kind] = {"cosine": round(metrics.cosine, 5), "rel_max_error": round(metrics.rel_max_error, 4),
                                     "top1_agreement": metrics.top1_agreement}
                    rows.append(row)
                    print(f"{graph_name:26s} {name:55s} {runtime:11s} photos cos {row['photos']['cosine']:.5f} "
                          f"top-1 {row['photos']['top1_agreement']:.2f} | synthetic cos {row['synthetic']['cosine']:.5f}")
    report = {"cpu_int8_dot_product": int8_dot_flags(),
              "setup": {"model": args.model, "size": size, "batch": args.batch, "calibration": calibration.describe(),
                        "outliers": f"x{args.outlier_factor:g} on channels of every LayerNorm feeding linear layers",
                        "metrics": "vs eager fp32; cosine is the minimum over the batch's samples"},
              "results": rows}
    write_results(args.output, command, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
