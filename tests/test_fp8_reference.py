"""fp8's accuracy known on the CPU: the fp8 Q/DQ graph evaluated by the ONNX reference implementation
(exact float8e4m3fn rounding and saturation) beside onnxruntime's emulation, in the export's own report."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, tiny_config
from onnx import TensorProto, helper

from vitdeploy.exporters.validation import FP8_REFERENCE, OnnxReferenceRun


def _fp8_roundtrip_graph(path):
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0.0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.save(model, str(path))
    return model


def test_reference_evaluator_rounds_to_e4m3_as_onnxruntime_does(tmp_path):
    model = _fp8_roundtrip_graph(tmp_path / "fp8.onnx")
    x = np.array([1.1, 1.0625, 1.1875, -3.3, 0.0137, 500.0, -1e4], np.float32)
    run = OnnxReferenceRun(tmp_path / "fp8.onnx")
    got = run.run_outputs(x)["y"]
    # e4m3: 3 mantissa bits (1.0, 1.125, 1.25, ...), ties to even, saturating at +-448.
    np.testing.assert_array_equal(got, np.array([1.125, 1.0, 1.25, -3.25, 0.013671875, 448.0, -448.0], np.float32))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], got)


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    model = make_model(tiny_config())
    path = tmp_path_factory.mktemp("fp8") / "tiny-fp8.onnx"
    result = export_onnx(model, path, ExportOptions(batch=(1, 2), precision="fp8", validation_max_batch=2,
                                                    preflight=False, cpu_variant=False, calibration_size=8,
                                                    outputs=("logits", "last_hidden_state")))
    return model, path, result


def test_fp8_export_report_carries_the_reference_evaluation(fp8_export):
    """The fp8 export's validation compares onnxruntime's run with onnx.reference's on a photo (per output
    kind, the token output per token) and records it; the fp8 figures against eager fp32 beside it are
    really fp8's (the graph's outputs differ from the fp32 model's by more than fp32 rounding)."""
    model, path, result = fp8_export
    report = result.report
    checked = [c for c in report.cases if c.reference.startswith("onnx.reference")]
    assert {c.output for c in checked} == {"logits", "last_hidden_state"} and all(c.passed for c in checked)
    assert all(c.tolerance.name == FP8_REFERENCE.name for c in checked)
    tokens = next(c for c in checked if c.output == "last_hidden_state").metrics
    assert tokens.kind == "tokens" and tokens.token_cosine_min >= 0.999
    validation = result.metadata.validation
    assert "onnx.reference evaluator (same graph)" in validation["references"]
    eager = [c for c in report.cases if c.tolerance.name == "fp8_vs_fp32"]
    assert eager and all(c.passed for c in eager)
    assert max(c.metrics.rel_max_error for c in eager) > 1e-4  # fp8 rounding is in the figures
    assert validation["gates"]["last_hidden_state"]["references"]
