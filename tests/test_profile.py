"""Where the time goes: the profiler's categories, FLOPs and totals on a real tiny model's real onnxruntime
trace and real OpenVINO profiling info, and its command line."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import make_model, tiny_config
from cpu_profile import (
    ARITHMETIC,
    CATEGORIES,
    NodeTime,
    ProfilePlan,
    aggregate,
    categorise_graph,
    main,
    profile_nncf,
    profile_onnxruntime,
    profile_openvino,
)

from vitdeploy.benchmarks.models import BenchModel, Sweep
from vitdeploy.flops import count_flops

BATCH = 2
PLAN = ProfilePlan(batches=(BATCH,), threads=1, calls=2, warmup=1)
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_NNCF = HAS_OPENVINO and importlib.util.find_spec("nncf") is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model's fp32 (with its validated onnxruntime-CPU variant) and int8 files, as the profiler exports them."""
    model = make_model(tiny_config())
    bench = BenchModel.from_model("tiny", "tiny", model, tmp_path_factory.mktemp("profile"), True)
    sweep = Sweep(batches=(BATCH,), sizes=((32, 32),))
    return model.config, {precision: bench.onnx(precision, sweep) for precision in ("fp32", "int8")}


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((BATCH, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def ort_int8(files, pixels, tmp_path_factory):
    return profile_onnxruntime(files[1]["int8"], pixels, PLAN, tmp_path_factory.mktemp("trace"))


def _model_flops(config) -> int:
    return BATCH * count_flops(config, 32, 32, class_token_last_block=True)


def _check_totals(nodes: list[NodeTime]) -> None:
    """Every node categorised; the categories add up to the profiled total, and their shares to 1."""
    assert nodes and all(node.category in CATEGORIES for node in nodes)
    rows = aggregate(nodes, PLAN.calls, {"fp32": 1e3, "int8": 1e3})
    assert sum(row.ms for row in rows) == pytest.approx(sum(node.ms for node in nodes) / PLAN.calls)
    assert sum(row.share for row in rows) == pytest.approx(1.0)
    assert sum(row.nodes for row in rows) == len(nodes)


def test_the_portable_graph_is_categorised_by_role(files):
    model = onnx.load(str(files[1]["fp32"]))
    categories = categorise_graph(model)
    by_op: dict[str, set[str]] = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, set()).add(categories[node.name])
    # Linear layers (constant weights) are GEMMs; Q·Kᵀ and P·V attention; the MatMuls of the grid
    # resampling depend on the input's size alone.
    assert by_op["MatMul"] == {"gemm", "attention", "pos_embed"}
    assert by_op["Conv"] == {"gemm"} and by_op["Gemm"] == {"gemm"} and by_op["Softmax"] == {"softmax"}
    assert by_op["Erf"] == {"gelu"} and by_op["LayerNormalization"] == {"layernorm"}
    config = files[0]
    attention = [n for n in model.graph.node if categories[n.name] == "attention"]
    assert len(attention) == 2 * config.depth


def test_onnxruntime_trace_totals_categories_and_flops(files, ort_int8):
    nodes, facts = ort_int8
    _check_totals(nodes)
    # OrtRuntime runs the int8 file's validated CPU variant: its linear layers int8, its attention core one op.
    assert facts["graph"] == files[1]["int8"].name.replace(".onnx", ".cpu.onnx")
    assert facts["wall_ms"] > 0 and facts["outside_nodes_ms"] >= 0
    integer = [node for node in nodes if node.kind == "MatMulIntegerToFloat"]
    assert integer and all(node.category == "gemm" and node.precision == "int8" for node in integer)
    assert {node.category for node in nodes if node.kind in ("MultiHeadAttention", "FusedMatMul")} == {"attention"}
    assert {node.category for node in nodes if node.kind == "QuantizeLinear"} == {"qdq"}
    # The FLOPs read from the trace's shapes are the analytic count (the grid resampling aside: the
    # analytic count has none at the native size, the graph still multiplies by identity matrices).
    counted = sum(node.flops for node in nodes if node.category != "pos_embed")
    assert counted == _model_flops(files[0])
    rows = aggregate(nodes, PLAN.calls, {"fp32": 1e-9, "int8": 1e-9})  # no peak is a ceiling for these
    gemm = [row for row in rows if row.category == "gemm"]
    assert gemm and all(row.peak_fraction is None and "no ceiling" in row.note for row in gemm)


def test_onnxruntime_cpu_variant_fused_attention_is_its_own_category(files, pixels, tmp_path):
    nodes, facts = profile_onnxruntime(files[1]["fp32"], pixels, PLAN, tmp_path)
    _check_totals(nodes)
    assert facts["graph"].endswith(".cpu.onnx")  # what OrtRuntime runs on the CPU
    fused = [node for node in nodes if node.kind == "Attention"]
    assert fused and {node.category for node in fused} == {"fused_attention"}
    assert sum(node.flops for node in nodes if node.category != "pos_embed") == _model_flops(files[0])
    assert {node.category for node in nodes if node.kind == "BiasGelu"} == {"gelu"}


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_openvino_profiling_info_totals_categories_and_flops(files, pixels):
    nodes, facts = profile_openvino(files[1]["int8"], pixels, PLAN)
    _check_totals(nodes)
    assert facts["wall_ms"] > 0
    gemm = [node for node in nodes if node.kind.startswith(("FullyConnected", "Convolution"))]
    assert gemm and {node.category for node in gemm} == {"gemm"}
    assert any(node.precision == "int8" for node in gemm)  # int8 kernels, held against the int8 peak
    assert sum(node.flops for node in nodes if node.category != "pos_embed") == _model_flops(files[0])
    rows = aggregate(nodes, PLAN.calls, {"fp32": 1e6, "int8": 1e6})
    assert all(0 < row.peak_fraction <= 1 for row in rows if row.category == "gemm")
    assert all(row.precision is None for row in rows if row.category not in ARITHMETIC)


@pytest.mark.skipif(not HAS_NNCF, reason="openvino and nncf are not installed")
def test_the_nncf_peer_and_a_per_shape_compile_are_profiled_by_the_onnx_graphs_names(files, pixels):
    """The peer (NNCF int8 of the fp32 file, compiled for the shape) is profiled against the fp32 graph's nodes,
    with the same FLOPs as vitdeploy's int8 file; vitdeploy's file compiled per shape says so."""
    from vitdeploy.calibration import load_calibration
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.tune.peer import nncf_quantized

    fp32 = files[1]["fp32"]
    calibration = load_calibration(None, 4, read_onnx_metadata(fp32).preprocessing, log=None)
    nodes, facts = profile_nncf(fp32, nncf_quantized(fp32, calibration, BATCH, 32), pixels, PLAN)
    _check_totals(nodes)
    assert facts["graph"].startswith(f"NNCF int8 of {fp32.name}") and facts["wall_ms"] > 0
    assert any(node.precision == "int8" for node in nodes if node.category == "gemm")
    assert sum(node.flops for node in nodes if node.category != "pos_embed") == _model_flops(files[0])
    nodes, facts = profile_openvino(files[1]["int8"], pixels, replace(PLAN, per_shape=True))
    _check_totals(nodes)
    assert facts["graph"].endswith("inference precision f32, compiled for this shape")


def test_command_writes_json_and_markdown(tmp_path, capsys):
    from vitdeploy.checkpoints import save_model

    checkpoint = save_model(make_model(tiny_config()), tmp_path / "tiny.safetensors")
    output = tmp_path / "out" / "profile.json"
    status = main(["--model", str(checkpoint), "--precision", "int8", "--batch", str(BATCH), "--backend",
                   "onnxruntime", "--calls", "2", "--warmup", "1", "--threads", "1",
                   "--peak-gflops", "fp32=1000,int8=1000", "--output", str(output)])
    assert status == 0
    document = json.loads(output.read_text())
    (profile,) = document["profiles"]
    assert (profile["backend"], profile["precision"], profile["batch"]) == ("onnxruntime", "int8", BATCH)
    assert sum(c["share"] for c in profile["categories"]) == pytest.approx(1.0)
    assert profile["compute_precision"] == "int8" and 0 < profile["peak_fraction"] <= 1
    assert {p["precision"]: p["source"] for p in document["peaks"]} == {"fp32": "given", "int8": "given"}
    assert document["command"].endswith(f"--output {output}") and document["cpu"]["arithmetic_flags"] is not None
    markdown = output.with_suffix(".md").read_text()
    assert "## onnxruntime int8, batch 2" in markdown and CATEGORIES["gemm"] in markdown
    assert markdown in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backend", "tensorrt"], "backend ['tensorrt'] is not a list of onnxruntime, openvino"),
    (["--precision", "fp16"], "precision ['fp16'] is not a list of fp32, int8"),
    (["--calls", "0"], "calls must be >= 1, got 0"),
    (["--peak-gflops", "fp8=3"], "'fp8' is not one of"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
