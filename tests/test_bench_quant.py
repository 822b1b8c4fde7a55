"""Benchmark runtimes for int8 and OpenVINO: labels, their rules, and a real OpenVINO session."""

from __future__ import annotations

import pytest
from conftest import make_model, tiny_config

from vitdeploy.benchmarks.peaks import PeakTable
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


def test_no_matmul_peak_is_measured_for_quantized_precisions():
    table = PeakTable(measure=True)
    assert table.get("cpu", "int8") is None
    assert PeakTable(given={"int8": 100.0}).get("cpu", "int8").gflops == 100.0


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


def test_bench_int8_file_fits_this_cpu_and_a_cached_other_form_is_reexported(tmp_path, monkeypatch):
    import vitdeploy.benchmarks.artifacts as artifacts
    from vitdeploy.benchmarks.models import BenchModel, Sweep
    from vitdeploy.cpu_features import int8_dot_flags
    from vitdeploy.metadata import read_onnx_metadata

    def weight_range(path):
        quantize = next(t for t in read_onnx_metadata(path).transforms if t["name"] == "quantize")
        return bool(quantize.get("reduce_range"))

    model = make_model(tiny_config())
    sweep = Sweep(batches=(1,), sizes=((32, 32),))
    path = BenchModel.from_model("tiny", "tiny", model, tmp_path, True).onnx("int8", sweep)
    assert weight_range(path) is (not int8_dot_flags())  # 7-bit weights exactly where VNNI/AMX are missing

    monkeypatch.setattr(artifacts, "bench_int8_reduce_range", lambda: bool(int8_dot_flags()))
    again = BenchModel.from_model("tiny", "tiny", model, tmp_path, True).onnx("int8", sweep)
    assert again == path and weight_range(again) is bool(int8_dot_flags())
