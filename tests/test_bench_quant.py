"""Benchmark runtimes for int8 and OpenVINO: labels, their rules, and a real OpenVINO session."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
from conftest import make_model, tiny_config

from vitdeploy.benchmarks.peaks import (
    PeakTable,
    int8_matmul_graph,
    int8_weight_qmax,
    measure_int8_peak,
    parse_peaks,
)
from vitdeploy.benchmarks.specs import RuntimeSpec, parse_runtimes


def test_int8_and_openvino_labels_round_trip():
    specs = parse_runtimes("ort-cpu-int8,openvino-cpu-fp32,openvino-bf16,ov-cpu-int8,tensorrt-int8")
    assert [s.label for s in specs] == ["ort-cpu-int8", "openvino-cpu-fp32", "openvino-cpu-bf16",
                                        "openvino-cpu-int8", "tensorrt-int8"]
    bf16 = specs[2]
    assert bf16.graph_precision == "fp32" and bf16.options == {"inference_precision": "bf16"}
    assert specs[3].graph_precision == "int8" and specs[3].options == {"inference_precision": "f32"}
    assert specs[3].device == "cpu"


@pytest.mark.parametrize("label, message", [
    ("torch-eager-int8", "Q/DQ graph precision"),
    ("ort-cpu-fp8", "only benchmarked as a TensorRT engine"),
    ("openvino-cpu-fp16", "openvino is benchmarked on fp32"),
    ("ort-cpu-bf16", "bf16 is only benchmarked on torch and openvino"),
])
def test_rules_name_the_label(label, message):
    with pytest.raises(ValueError, match=message):
        RuntimeSpec.parse(label)


def test_the_int8_peak_is_measured_on_the_cpu_only_and_fp8_has_none():
    table = PeakTable(measure=True, threads=1, seconds=0.02)
    peak = table.get("cpu", "int8")
    assert peak is not None and peak.source == "measured" and peak.gflops > 0
    assert "GOP/s" in peak.method and "onnxruntime Q/DQ MatMul" in peak.method
    assert table.get("cuda", "int8") is None and table.get("cpu", "fp8") is None
    assert PeakTable(given={"int8": 100.0}).get("cpu", "int8").gflops == 100.0
    assert parse_peaks("fp32=150,int8=200") == {"fp32": 150.0, "int8": 200.0}
    with pytest.raises(ValueError, match="'fp8' is not one of fp32, fp16, bf16, int8"):
        parse_peaks("fp8=1")


def test_the_int8_peak_times_the_kernels_our_int8_graphs_run(tmp_path):
    """The Q/DQ linear layer it times is what the int8 exports' linear layers become: onnxruntime's
    MatMulIntegerToFloat and OpenVINO's int8 FullyConnected; weights in the int8 policy's range."""
    import numpy as np
    import onnxruntime as ort

    from vitdeploy.exporters.artifact_set import INT8_POLICY

    qmax = int8_weight_qmax()
    assert qmax == (63 if INT8_POLICY.reduce_range else 127)
    model = int8_matmul_graph(64, qmax)
    weights = next(init for init in model.graph.initializer if init.name == "w_q")
    assert np.abs(onnx.numpy_helper.to_array(weights)).max() <= qmax
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert "MatMulIntegerToFloat" in fused and "MatMul" not in fused
    if importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        compiled = ov.Core().compile_model(ov.Core().read_model(model.SerializeToString()), "CPU")
        kinds = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                 for op in compiled.get_runtime_model().get_ordered_ops()}
        assert any(layer.startswith("FullyConnected") and precision in ("i8", "u8") for layer, precision in kinds), kinds

    peak = measure_int8_peak(threads=1, size=256, seconds=0.03)
    assert peak.precision == "int8" and peak.device == "cpu"
    assert f"weights within +-{qmax}" in peak.method and "256x256" in peak.method
    rates = [float(part.split(" GOP/s")[0].rsplit(" ", 1)[1]) for part in peak.method.split("; ")]
    assert peak.gflops == pytest.approx(max(rates), rel=0.01)  # the fastest kernel is the peak


def test_openvino_session_times_the_runtime(tmp_path):
    pytest.importorskip("openvino")
    from vitdeploy.benchmarks.backends import open_session
    from vitdeploy.benchmarks.models import BenchModel, Sweep
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    model = make_model(tiny_config())
    path = tmp_path / "tiny-fp32.onnx"
    export_onnx(model, path, ExportOptions(batch=(1, 4), validate=False, preflight=False, cpu_variant=False))
    bench = BenchModel.from_model("tiny", "tiny", model, tmp_path, True, onnx={"fp32": path})
    sweep = Sweep(batches=(1, 2), sizes=((32, 32),))
    session = open_session(RuntimeSpec.parse("openvino-cpu-fp32"), bench, sweep, threads=1)
    try:
        assert session.artifact == str(path) and session.threads == 1
        logits = session.bind(2, 32, 32)()
        assert logits.shape == (2, 10)
    finally:
        session.close()


def test_bench_int8_file_follows_the_int8_policy_and_a_cached_other_form_is_reexported(tmp_path, monkeypatch):
    import vitdeploy.exporters.artifact_set as artifact_set
    from vitdeploy.benchmarks.models import BenchModel, Sweep
    from vitdeploy.metadata import read_onnx_metadata

    def weight_range(path):
        quantize = next(t for t in read_onnx_metadata(path).transforms if t["name"] == "quantize")
        return bool(quantize.get("reduce_range"))

    model = make_model(tiny_config())
    sweep = Sweep(batches=(1,), sizes=((32, 32),))
    path = BenchModel.from_model("tiny", "tiny", model, tmp_path, True).onnx("int8", sweep)
    assert weight_range(path) is False  # deploy's policy: full-range weights on every CPU

    monkeypatch.setattr(artifact_set, "INT8_POLICY", artifact_set.Int8Policy(reduce_range=True))
    again = BenchModel.from_model("tiny", "tiny", model, tmp_path, True).onnx("int8", sweep)
    assert again == path and weight_range(again) is True
