"""The int8 float fallback ranks layers by their measured effect on the outputs when the fully quantized graph
misses its gate: a layer whose own int8 error is small can matter most (one that feeds a sharp softmax, as the
first q/k projections of a ViT with sharp attention do), and one whose own error is large can hardly matter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.calibration import CalibrationSet
from vitdeploy.exporters.quantize import (
    QuantizationTargetError,
    QuantizeOptions,
    collect_stats,
    layer_errors,
    output_tail_error,
    plan_quantization,
    quantize_model,
)

CHANNELS = 16




def _sharp_and_damped() -> tuple[onnx.ModelProto, CalibrationSet]:
    """``softmax(40 * x @ Wa) + 0.01 * ((x * boost) @ Wb)``: ``sharp`` (Wa) has a tiny own error but feeds a sharp
    softmax; ``damped`` (Wb) has a large own error (one input channel x30 stretches its per-tensor range) but its
    output is scaled down before it reaches the graph output. With 32 calibration rows of N(0, 1)."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((CHANNELS, CHANNELS)) / np.sqrt(CHANNELS)).astype(np.float32) for _ in range(2)]
    boost = np.ones(CHANNELS, np.float32)
    boost[0] = 30.0
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="sharp"),
             helper.make_node("Mul", ["a", "sharpness"], ["logits_a"]),
             helper.make_node("Softmax", ["logits_a"], ["p"], axis=-1),
             helper.make_node("Mul", ["x", "boost"], ["x_boosted"]),
             helper.make_node("MatMul", ["x_boosted", "wb"], ["b"], name="damped"),
             helper.make_node("Mul", ["b", "damping"], ["b_damped"]),
             helper.make_node("Add", ["p", "b_damped"], ["pooler_output"])]
    initializers = [numpy_helper.from_array(weights[0], "wa"), numpy_helper.from_array(weights[1], "wb"),
                    numpy_helper.from_array(boost, "boost"),
                    numpy_helper.from_array(np.array(40.0, np.float32), "sharpness"),
                    numpy_helper.from_array(np.array(0.01, np.float32), "damping")]
    graph = helper.make_graph(nodes, "sharp_and_damped",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CHANNELS])],
                              [helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", CHANNELS])],
                              initializers)
    calibration = CalibrationSet(rng.standard_normal((32, CHANNELS)).astype(np.float32), "test", 0)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), calibration


def _options(**overrides) -> QuantizeOptions:
    # One layer may go back to float; the calibrator's ranges as they are (no range choice, no smoothing).
    return QuantizeOptions(smooth_alpha=0.0, range_grid=(), fallback_trials=1, gate_trials=1, **overrides)


def test_own_error_and_effect_on_the_outputs_rank_the_layers_oppositely():
    model, calibration = _sharp_and_damped()
    plan = plan_quantization(model)
    stats = collect_stats(model, list(plan.activations), calibration.batches(8), rows=["x", "x_boosted"])
    errors = layer_errors(model, plan, {name: s.amax for name, s in stats.items()}, stats, weight_qmax=127.0)
    assert errors["damped"] > 20 * errors["sharp"]
    _, record = quantize_model(model, calibration, _options())
    sensitivity = record.fallback["sensitivity"]
    assert record.fallback["ranking"] == "sensitivity"
    assert sensitivity["sharp"] > 20 * sensitivity["damped"]


def test_the_fallback_keeps_the_layer_that_matters_in_float_and_reaches_the_gate():
    """Ranked by own error, the one layer the fallback may keep in float is ``damped`` and the graph is refused
    (the behaviour before the sensitivity ranking); ranked by measured effect it is ``sharp``, and the gate
    holds. The choice is recorded, and the written graph has no Q/DQ in front of ``sharp``."""
    model, calibration = _sharp_and_damped()
    with pytest.raises(QuantizationTargetError, match="pooler_output"):
        quantize_model(model, calibration, _options(sensitivity_ranking=False))
    quantized, record = quantize_model(model, calibration, _options())
    fallback = record.fallback
    assert fallback["reached"] is True and fallback["initial_cosine"] < 0.99 < fallback["final_cosine"]
    assert fallback["kept_float"] == ["sharp"] and fallback["tried"][0]["sensitivity"] == fallback["sensitivity"]["sharp"]
    assert fallback["tried_first"] == []
    producers = {name: node.op_type for node in quantized.graph.node for name in node.output}
    sharp = next(node for node in quantized.graph.node if node.name == "sharp")
    damped = next(node for node in quantized.graph.node if node.name == "damped")
    assert all(producers.get(name) != "DequantizeLinear" for name in sharp.input)
    assert all(producers.get(name) == "DequantizeLinear" for name in damped.input)


def test_a_graph_within_its_gate_keeps_the_cheap_ranking():
    """The per-layer measurement (one run per layer) is made only when the gate itself is missed."""
    model, calibration = _sharp_and_damped()
    gentle = onnx.ModelProto()
    gentle.CopyFrom(model)
    for init in gentle.graph.initializer:
        if init.name == "sharpness":
            init.CopyFrom(numpy_helper.from_array(np.array(2.0, np.float32), "sharpness"))
    _, record = quantize_model(gentle, calibration, _options())
    assert record.fallback["ranking"] == "layer error" and "sensitivity" not in record.fallback


def test_output_tail_error_is_the_mean_of_the_worst_rows():
    reference = {"last_hidden_state": np.ones((2, 50, 4), np.float32)}
    got = {"last_hidden_state": reference["last_hidden_state"].copy()}
    got["last_hidden_state"][1, 7] = [1.0, 0.0, 0.0, 0.0]  # cosine 0.5 for one token of 100
    assert output_tail_error(reference, got, tail=0.01) == pytest.approx(0.5)
    assert output_tail_error(reference, got, tail=0.02) == pytest.approx(0.25)
    assert output_tail_error(reference, reference) == pytest.approx(0.0, abs=1e-12)



def test_a_sensitivity_search_that_misses_the_gate_is_followed_by_the_own_error_search():
    """Errors that compound across layers can make one-layer effects mislead: when the search by effect misses
    the gate, the search by own error runs from the start as well, and the closer of the two is kept (both in the
    record)."""
    from vitdeploy.exporters.quantize import ProbeResult, fall_back

    gains = {"a": 0.006, "b": 0.005, "c": 0.001}

    def measure(kept: list[str]) -> ProbeResult:
        margin = -0.01 + sum(gains[name] for name in kept)
        return ProbeResult(margin, ["below"] if margin < 0 else [], {"logits": {"cosine": 0.99 + margin}})

    errors = {"a": 3e-3, "b": 2e-3, "c": 1e-3}
    kept, record = fall_back(lambda kept: kept, errors, measure, 2, lambda message: None, gate_trials=2,
                             sensitivity=lambda: {"c": 5e-2, "a": 1e-2, "b": 1e-3})
    assert kept == ["a", "b"] and record["reached"] is True and record["ranking"] == "layer error"
    assert [search["ranking"] for search in record["searches"]] == ["sensitivity", "layer error"]
    assert record["searches"][0]["reached"] is False and record["searches"][1]["reached"] is True
    assert [trial["node"] for trial in record["tried"]] == ["a", "b"] and record["sensitivity"]["c"] == 5e-2
    # A search by effect that reaches the gate is the only one run.
    kept, record = fall_back(lambda kept: kept, errors, measure, 2, lambda message: None, gate_trials=2,
                             sensitivity=lambda: {"a": 5e-2, "b": 1e-2, "c": 1e-3})
    assert kept == ["a", "b"] and record["ranking"] == "sensitivity" and "searches" not in record
