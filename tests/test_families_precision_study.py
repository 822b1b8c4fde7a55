"""The precision study of the 2025-26 families (``python studies/families_precision_2025.py``) on a tiny
DINOv3 (width 64, 1 block, 64x64): the timm model is loaded back as exactly DINOv3, its fp32 graph matches
timm per token at the three sizes, fp16 is measured per token and per row, int8 is either measured or
refused with the numbers that refused it, and every graph made is checked for TensorRT 10.3 (the RoPE
warning) and 10.14 (none)."""

from __future__ import annotations

import json
from dataclasses import replace

import families_precision_2025 as study
import pytest
from timm_without_torchvision import TIMM_MISSING, import_timm

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.skipif(import_timm() is None, reason=TIMM_MISSING)]

TINY = replace(study.CASES["dinov3"], image=64, model_args=dict(embed_dim=64, depth=1, num_heads=4))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("study")


@pytest.fixture(scope="module")
def record(folder):
    return study.measure_family(TINY, folder, calibration_size=8, photos=2, progress=lambda line: None)


def test_the_study_measures_each_graph_per_output_kind_at_three_sizes(record):
    assert record["loaded_as"] == "dinov3" and record["sizes"] == [[64, 64], [96, 96], [32, 96]]
    assert record["outputs"] == ["pooler_output", "last_hidden_state", "patch_tokens"]
    fp32, fp16 = record["graphs"]["fp32"], record["graphs"]["fp16"]
    assert fp32["passed"] and min(fp32["worst_cosine"].values()) > 0.9999
    for size in ("64x64", "96x96", "32x96"):
        tokens = fp16["outputs"]["last_hidden_state"][size]
        assert tokens["kind"] == "tokens" and tokens["worst_cosine"] <= tokens["cosine"]  # per token, not per image
        assert fp16["outputs"]["pooler_output"][size]["kind"] == "vector"
        assert tokens["passed"] == (tokens["worst_cosine"] >= study.FP16_MIN_COSINE and not tokens["failures"])
    int8 = record["graphs"]["int8"]
    if int8["refused"]:
        assert "cosine" in int8["refusal"]  # the numbers that refused it
    else:
        assert "int8_vs_fp32" in int8["outputs"]["last_hidden_state"]["64x64"]["gate"]


def test_rope_stays_float32_in_the_fp16_and_int8_graphs_which_pass_their_gates(record, folder, record_property):
    """At this size both reduced graphs are made and pass their gates against timm per token at the three
    sizes (fp16: worst token cosine >= 0.999), with RoPE's sin/cos computed in float32 in both; the fp16
    graph's matrix products are fp16 and the int8 graph has Q/DQ pairs."""
    import onnx

    for graph in ("fp16", "int8"):
        entry = record["graphs"][graph]
        assert not entry["refused"] and entry["passed"], (graph, entry.get("refusal"))
        record_property(f"{graph}_worst_cosine", min(entry["worst_cosine"].values()))
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "graphs" / f"{TINY.id}-{graph}.onnx")))
        types = {info.name: info.type.tensor_type.elem_type for info in proto.graph.value_info}
        trig = [node for node in proto.graph.node if node.op_type in ("Sin", "Cos")]
        assert trig and all(types.get(node.output[0]) == onnx.TensorProto.FLOAT for node in trig), graph
        if graph == "fp16":
            assert min(entry["worst_cosine"].values()) >= 0.999
            assert any(node.op_type == "MatMul" and types.get(node.output[0]) == onnx.TensorProto.FLOAT16
                       for node in proto.graph.node), "not an fp16 graph"
        else:
            assert any(node.op_type == "QuantizeLinear" for node in proto.graph.node)


def test_every_graph_made_is_checked_for_tensorrt_10_3_and_10_14(record):
    for graph, entry in record["graphs"].items():
        if entry["refused"]:
            continue
        checks = entry["tensorrt_check"]
        assert set(checks) == {"10.3", "10.14"} and checks["10.3"]["exit_status"] == 0, graph
        assert any(w["kind"] == "rope-miscompile" for w in checks["10.3"]["warnings"]), graph
        assert not any(w["kind"] == "rope-miscompile" for w in checks["10.14"]["warnings"]), graph


def test_the_summary_has_a_row_per_size_and_graph(record):
    rows = study.summary_rows({"dinov3": record})
    made = [g for g, entry in record["graphs"].items() if not entry["refused"]]
    assert {(row["graph"], row["size"]) for row in rows if row["size"] != "all"} == {
        (graph, size) for graph in made for size in ("64x64", "96x96", "32x96")}
    assert all(row["token"] is not None and row["row"] is not None for row in rows if row["size"] != "all")
    assert "dinov3" in study.format_table(rows)


def test_an_unknown_family_is_one_argparse_line(capsys):
    with pytest.raises(SystemExit) as exit:
        study.parse_args(["--families", "dinov3,vit_7b"])
    assert exit.value.code == 2 and "vit_7b" in capsys.readouterr().err


def test_reports_of_runs_side_by_side_merge_into_one(record, tmp_path):
    from study import write_results

    args = study.parse_args(["--families", "dinov3"])
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_results(first, "python studies/families_precision_2025.py --families dinov3", study.report(
        {"dinov3": record}, args))
    write_results(second, "python studies/families_precision_2025.py --families eva02", study.report(
        {"eva02": record}, args))
    assert study.main(["--merge", str(first), str(second), "--output", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert list(merged["families"]) == ["dinov3", "eva02"] and "--merge" in merged["command"]
    assert [run["command"].split()[-1] for run in merged["runs"]] == ["dinov3", "eva02"]
    assert {row["family"] for row in merged["summary"]} == {"dinov3", "eva02"}
