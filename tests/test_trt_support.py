"""TensorRT pre-flight on real exported graphs: the clean one passes, each edited one is flagged."""

from __future__ import annotations

import argparse
import copy
import json

import onnx
import pytest
from onnx import helper
from trt_artifacts import (
    load_tiny,
    tiny_onnx,
    with_antialias,
    with_fp16_layernorm,
    with_resize,
    with_unsupported_op,
)

from vitdeploy.cli import check as check_cli
from vitdeploy.exporters.trt_support import (
    Finding,
    check_onnx,
    format_report,
    load_support_table,
    opset_range,
)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return load_tiny()


def kinds(report) -> list[tuple[str, str]]:
    return [(f.severity, f.kind) for f in report.findings]


def test_support_table_is_sourced_data() -> None:
    table = load_support_table()
    assert "onnx-tensorrt" in table["sources"]["operators"] and "10.15" in table["sources"]["operators"]
    assert set(table["tensorrt_versions"]) == {"10", "11"}
    for name, entry in table["operators"].items():
        assert set(entry) == {"supported", "types", "restrictions", "since"}, name
    ops = table["operators"]
    assert ops["LayerNormalization"]["supported"] and ops["Resize"]["supported"] and ops["Attention"]["supported"]
    assert not ops["Bernoulli"]["supported"] and not ops["Unique"]["supported"]
    assert "cubic" in table["resize"]["modes"] and table["resize"]["antialias"] == [0]


def test_opset_ranges() -> None:
    assert opset_range() == (9, 24)
    assert opset_range("10.13") == (9, 24)
    assert opset_range("11.4") == (9, 24) and opset_range("11.5") == (9, 25)
    with pytest.raises(ValueError, match="'8.6'"):
        opset_range("8.6")


def test_clean_export_passes(model) -> None:
    report = check_onnx(tiny_onnx())
    assert report.ok and report.findings == [] and report.opset == 18
    assert {n.op_type for n in model.graph.node} >= {"Range", "LayerNormalization", "Softmax", "MatMul"}
    assert check_onnx(with_resize(model)).findings == []  # a plain cubic Resize is fine


def test_clean_fp16_export_passes() -> None:
    # vitdeploy export --precision fp16 keeps LayerNormalization and Softmax in fp32: no overflow warning
    report = check_onnx(tiny_onnx("fp16"))
    assert report.ok and report.findings == []


def test_antialias_resize_is_an_error(model) -> None:
    report = check_onnx(with_antialias(model))
    assert not report.ok
    assert kinds(report) == [("error", "resize-antialias")]
    assert report.errors[0].op_type == "Resize" and report.errors[0].node == "extra_resize"


def test_unsupported_op_is_an_error(model) -> None:
    report = check_onnx(with_unsupported_op(model))
    assert kinds(report) == [("error", "unsupported-op")]
    assert report.errors[0].node == "extra_bernoulli" and "Bernoulli" in report.errors[0].message


def test_fp16_layernorm_is_a_warning(model) -> None:
    edited = with_fp16_layernorm(model)
    onnx.checker.check_model(edited, full_check=True)  # still a valid graph
    report = check_onnx(edited)
    assert report.ok  # the parser imports it; the risk is numerical
    assert kinds(report) == [("warning", "fp16-overflow")]
    assert report.warnings[0].op_type == "LayerNormalization"


def test_fp16_softmax_is_a_warning(model) -> None:
    edited = copy.deepcopy(model)
    graph = edited.graph
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Softmax")
    source, target = node.input[0], node.output[0]
    node.input[0], node.output[0] = source + "_h", target + "_h"
    graph.node.insert(index, helper.make_node("Cast", [source], [source + "_h"], to=onnx.TensorProto.FLOAT16))
    graph.node.insert(index + 2, helper.make_node("Cast", [target + "_h"], [target], to=onnx.TensorProto.FLOAT))
    assert kinds(check_onnx(edited)) == [("warning", "fp16-overflow")]


@pytest.mark.parametrize(
    ("attribute", "value", "kind"),
    [("coordinate_transformation_mode", "half_pixel_symmetric", "resize-coordinate-transform"),
     ("mode", "lanczos", "resize-mode"),
     ("keep_aspect_ratio_policy", "not_larger", "resize-aspect-ratio")],
)
def test_other_resize_restrictions(model, attribute, value, kind) -> None:
    edited = with_resize(model)
    resize = next(n for n in edited.graph.node if n.op_type == "Resize")
    for item in resize.attribute:
        if item.name == attribute:
            item.s = value.encode()
    assert kinds(check_onnx(edited)) == [("error", kind)]


def test_opset_outside_the_range(model) -> None:
    edited = copy.deepcopy(model)
    edited.opset_import[0].version = 26
    report = check_onnx(edited)
    assert ("error", "opset") in kinds(report) and "opset 26 is outside the range 9..24" in report.errors[0].message
    assert check_onnx(edited, tensorrt_version="11.5").errors[0].message.count("9..25") == 1


def test_custom_domain_op(model) -> None:
    edited = copy.deepcopy(model)
    edited.graph.node.append(helper.make_node("FusedGelu", ["logits"], ["g"], domain="com.microsoft", name="ms_gelu"))
    edited.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = check_onnx(edited)
    assert kinds(report) == [("error", "custom-domain")] and report.errors[0].node == "ms_gelu"


def test_unnamed_dynamic_dim(model) -> None:
    edited = copy.deepcopy(model)
    edited.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    report = check_onnx(edited)
    assert kinds(report) == [("warning", "unnamed-dynamic-dim")] and "axis 0" in report.warnings[0].message


def test_weights_over_2gb_inline_vs_external() -> None:
    inline = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [0.0])
    inline.dims[0] = 2**29 + 1  # claims 2 GiB + 4 bytes of inline data (accounting only; nothing is allocated)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], [inline])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert ("error", "weights-over-2gb") in kinds(check_onnx(model))
    model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    assert ("error", "weights-over-2gb") not in kinds(check_onnx(model))


def test_report_formats(model) -> None:
    report = check_onnx(with_antialias(with_unsupported_op(model)))
    data = report.to_dict()
    assert data["ok"] is False and data["errors"] == 2 and data["supported_opsets"] == [9, 24]
    assert {f["kind"] for f in data["findings"]} == {"resize-antialias", "unsupported-op"}
    text = format_report(report)
    assert text.splitlines()[0].endswith("2 error(s), 0 warning(s)")
    assert "extra_bernoulli" in text and report.format_text() == text
    with pytest.raises(ValueError, match="severity 'fatal'"):
        Finding("fatal", "n", "Op", "m", "k")
    with pytest.raises(ValueError, match="target 'openvino'"):
        check_onnx(model, target="openvino")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        check_onnx("missing.onnx")


def run_check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vitdeploy")
    check_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", *argv])
    return args.func(args)


def test_check_command(model, tmp_path, capsys) -> None:
    assert run_check([str(tiny_onnx())]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    onnx.save(with_antialias(model), str(bad))
    assert run_check([str(bad), "--target", "tensorrt", "--json", str(tmp_path / "r.json")]) == 1
    assert "antialias=1" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["findings"][0]["kind"] == "resize-antialias"
