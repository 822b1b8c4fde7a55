"""``check --target tensorrt`` for the TensorRT version the engine will be built with.

JetPack 6 ships TensorRT 10.3; the gpu extra pins 10.14+. The version rules are data (the support
table's ``by_version``, from onnx-tensorrt's operator tables, TensorRT's changelog and its issues) and
pure logic; none of it has run against a real TensorRT here. Graphs: an ``If`` node whose branches
give shapes [2] and [1] (the shape of DINOv3's RoPE ``If`` that 10.3 rejects, TensorRT #4558), a
RoPE-like graph without one (Range → frequencies → Sin/Cos → rotate), built with ``onnx.helper``, and
a plain ViT export, which passes on both versions.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_artifacts import tiny_onnx

from vitdeploy.cli import main
from vitdeploy.exporters import trt_support
from vitdeploy.exporters.trt_support import check_onnx, in_versions, load_support_table, parse_trt_version

JETPACK6, PINNED = "10.3", "10.14"


def kinds(report) -> set[tuple[str, str]]:
    return {(f.severity, f.kind) for f in report.findings}


def branch(name: str, values: list[int]) -> onnx.GraphProto:
    value = numpy_helper.from_array(np.array(values, dtype=np.int64), f"{name}_value")
    node = helper.make_node("Constant", [], [f"{name}_out"], value=value)
    return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.INT64,
                                                                               [len(values)])])


def if_graph(then_values: list[int], else_values: list[int]) -> onnx.ModelProto:
    """``x`` reshaped by a shape an If node picks: a grid of [h, w] in one branch, [n] in the other."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])
    nodes = [helper.make_node("If", ["flag"], ["shape"], name="rope_embed/If",
                              then_branch=branch("then", then_values), else_branch=branch("else", else_values)),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "if", [x, flag], [y]), opset_imports=[helper.make_opsetid("", 18)])


def rope_graph() -> onnx.ModelProto:
    """Rotary embedding of tokens [batch, n, 8] from positions computed for the dynamic n, as a RoPE
    graph does: Range → outer product with the frequencies → Sin, Cos → x·cos + rotate(x)·sin."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", 8])
    inits = [numpy_helper.from_array(np.array(v, dtype=dtype), name) for name, v, dtype in [
        ("one_i", [1], np.int64), ("zero_f", 0.0, np.float32), ("one_f", 1.0, np.float32), ("axis1", [1], np.int64),
        ("freqs", 1.0 / 100.0 ** (np.arange(4) / 4), np.float32), ("half", [4], np.int64), ("end", [8], np.int64),
        ("start", [0], np.int64), ("axis2", [2], np.int64)]]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one_i"], ["n_1"], axis=0),
        helper.make_node("Squeeze", ["n_1"], ["n"]),
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero_f", "n_f", "one_f"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "axis1"], ["pos_col"]),
        helper.make_node("Mul", ["pos_col", "freqs"], ["angles_half"]),
        helper.make_node("Concat", ["angles_half", "angles_half"], ["angles"], axis=1),
        helper.make_node("Sin", ["angles"], ["sin"]),
        helper.make_node("Cos", ["angles"], ["cos"]),
        helper.make_node("Slice", ["x", "start", "half", "axis2"], ["x1"]),
        helper.make_node("Slice", ["x", "half", "end", "axis2"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["minus_x2"]),
        helper.make_node("Concat", ["minus_x2", "x1"], ["rotated"], axis=2),
        helper.make_node("Mul", ["x", "cos"], ["a"]),
        helper.make_node("Mul", ["rotated", "sin"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "rope", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_graphs_are_valid_onnx_that_onnxruntime_runs() -> None:
    import onnxruntime as ort

    for model, feeds in ((rope_graph(), {"x": np.ones((2, 5, 8), np.float32)}),
                         (if_graph([2, 8], [16]), {"x": np.ones((4, 4), np.float32), "flag": np.array(True)})):
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, feeds)[0].size == next(iter(feeds.values())).size


def test_an_if_with_branches_of_different_shapes_is_rejected_by_10_3_not_by_10_14() -> None:
    model = if_graph([2, 8], [16])
    old = check_onnx(model, tensorrt_version=JETPACK6)
    assert not old.ok and ("error", "if-branch-shapes") in kinds(old)
    finding = next(f for f in old.findings if f.kind == "if-branch-shapes")
    assert finding.node == "rope_embed/If" and "[2] in then_branch but [1] in else_branch" in finding.message
    assert "NVIDIA/TensorRT#4558" in finding.message and "10.3" in finding.message
    new = check_onnx(model, tensorrt_version=PINNED)
    assert new.ok and not new.findings
    assert check_onnx(model, tensorrt_version="10.12").errors and check_onnx(model, tensorrt_version="10.13").ok
    assert check_onnx(if_graph([2, 8], [4, 4]), tensorrt_version=JETPACK6).ok  # same shape [2]: nothing to join


def test_a_rope_graph_passes_10_3_with_the_miscompile_warning_and_10_14_clean() -> None:
    model = rope_graph()
    old = check_onnx(model, tensorrt_version=JETPACK6)
    assert old.ok and kinds(old) == {("warning", "rope-miscompile")}
    assert "NVIDIA/TensorRT#4742" in old.warnings[0].message and "vitdeploy verify" in old.warnings[0].message
    assert check_onnx(model, tensorrt_version="10.4").warnings and not check_onnx(model, tensorrt_version="10.5").warnings
    new = check_onnx(model, tensorrt_version=PINNED)
    assert new.ok and not new.findings


def test_a_plain_vit_export_passes_both_versions() -> None:
    for version in (JETPACK6, PINNED):
        report = check_onnx(tiny_onnx(), tensorrt_version=version)
        assert report.ok and not report.findings, report.format_text()


def test_what_a_release_does_not_import_yet() -> None:
    # Slice with axes computed in the graph: an initializer is needed before 10.3
    model = rope_graph()
    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    model.graph.node.insert(0, helper.make_node("Identity", ["axis2"], ["axis2_computed"]))
    slices[0].input[3] = "axis2_computed"
    assert ("error", "input-not-constant") in kinds(check_onnx(model, tensorrt_version="10.2"))
    assert ("error", "input-not-constant") not in kinds(check_onnx(model, tensorrt_version=JETPACK6))
    # an operator the parser imports only since 10.15
    rms = helper.make_model(helper.make_graph(
        [helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1)], "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        initializer=[numpy_helper.from_array(np.ones(8, np.float32), "scale")]),
        opset_imports=[helper.make_opsetid("", 23)])
    too_new = check_onnx(rms, tensorrt_version=PINNED)
    assert ("error", "op-too-new") in kinds(too_new) and "since 10.15" in too_new.errors[0].message
    assert check_onnx(rms, tensorrt_version="10.15").ok
    # the opset the 10.0-10.2 operator table documents
    assert ("warning", "opset-undocumented") in kinds(check_onnx(rms, tensorrt_version="10.2"))


def test_version_ranges_and_the_table_entries_are_well_formed() -> None:
    assert parse_trt_version("10.3.0.26") == (10, 3) and parse_trt_version("11") == (11, 0)
    with pytest.raises(ValueError, match="'ten'"):
        parse_trt_version("ten")
    assert in_versions((10, 3), ">=10.0,<10.13") and not in_versions((10, 13), ">=10.0,<10.13")
    assert in_versions((10, 2), "<10.3") and not in_versions((11, 0), "<10.3")
    rules = load_support_table()["by_version"]
    entries = rules["constant_inputs"] + rules["data_types"] + rules["known_issues"] + rules["documented_opset_max"]
    for entry in entries:
        assert entry["source"] and in_versions((10, 0), entry["versions"]) in (True, False)
    issues = {issue["id"]: issue for issue in rules["known_issues"]}
    assert issues["if-branch-shapes"]["severity"] == "error" and issues["rope-miscompile"]["severity"] == "warning"
    ops = load_support_table()["operators"]
    assert ops["Attention"]["since"] == "10.14" and ops["RotaryEmbedding"]["since"] == "10.15"


def test_check_command_takes_the_version_and_defaults_to_the_installed_or_pinned_one(tmp_path, capsys,
                                                                                     monkeypatch) -> None:
    path = tmp_path / "if.onnx"
    onnx.save(if_graph([2, 8], [16]), str(path))
    assert main(["check", str(path), "--trt-version", JETPACK6, "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "TensorRT 10.3 (--trt-version) pre-flight" in out and "rope_embed/If" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tensorrt_version"] == JETPACK6 and data["tensorrt_version_from"] == "--trt-version"

    monkeypatch.setattr(trt_support, "installed_tensorrt_version", lambda: None)
    assert main(["check", str(path)]) == 0
    assert f"TensorRT {PINNED} (the gpu extra's pin, no TensorRT installed)" in capsys.readouterr().out
    monkeypatch.setattr(trt_support, "installed_tensorrt_version", lambda: "10.3.0.30")
    assert main(["check", str(path)]) == 1
    assert "TensorRT 10.3.0.30 (installed)" in capsys.readouterr().out
    assert main(["check", str(path), "--trt-version", "all"]) == 0
    assert main(["check", str(path), "--tensorrt-version", "10.13"]) == 0  # the old spelling still works
    capsys.readouterr()
    assert main(["check", str(path), "--trt-version", "8.6"]) == 2
    assert "--trt-version" in capsys.readouterr().err


def test_the_pinned_version_is_the_gpu_extras_lower_bound() -> None:
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    gpu = next(line for line in pyproject.splitlines() if line.startswith("gpu = "))
    assert f'"tensorrt-cu13>={load_support_table()["by_version"]["pinned"]},' in gpu, gpu
