"""The artifact-set builder on a tiny model: the files it writes, their metadata and the int8 policy it records."""

from __future__ import annotations

import pytest
from conftest import make_model, tiny_config

from vitdeploy.exporters.artifact_set import (
    INT8_POLICY,
    ArtifactSetPlan,
    Int8Policy,
    build_artifact,
    build_artifact_set,
)
from vitdeploy.metadata import CPU_VARIANT, quantization_record, read_onnx_metadata


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = make_model(tiny_config())
    folder = tmp_path_factory.mktemp("set")
    plan = ArtifactSetPlan("tiny", graphs=("int8", "fp32", "fp16"), batch=(1, 2), height=(32, 32), width=(32, 32),
                           validation_max_batch=1, quantize_from_fp32=True, calibration_size=4, source="tiny")
    return model, folder, plan, build_artifact_set(model, plan, folder)


def test_the_set_writes_each_graph_under_its_name_with_its_precision_and_cpu_variants(built):
    _, folder, plan, results = built
    assert list(results) == ["fp32", "int8", "fp16"]  # fp32 first: int8 is quantized from it
    assert sorted(p.name for p in folder.glob("*.onnx")) == [
        "tiny-fp16.onnx", "tiny-fp32.cpu.onnx", "tiny-fp32.onnx", "tiny-int8.cpu.onnx", "tiny-int8.onnx"]
    for graph in plan.graphs:
        path = plan.path(folder, graph)
        assert results[graph].path == path
        metadata = read_onnx_metadata(path)
        assert metadata.precision == graph and metadata.source == "tiny"
        assert metadata.shape_range.batch == (1, 2) and metadata.shape_range.height == (32, 32)
        assert results[graph].report is not None and results[graph].report.passed
    for graph in ("fp32", "int8"):  # the onnxruntime-CPU variants beside the portable files
        assert read_onnx_metadata(folder / f"tiny-{graph}.cpu.onnx").target == CPU_VARIANT


def test_the_int8_file_follows_the_one_policy_and_the_plan_records_it(built):
    _, folder, plan, results = built
    assert INT8_POLICY.reduce_range is False  # deploy's policy: full-range weights on every CPU
    assert plan.int8 == INT8_POLICY
    record = quantization_record(read_onnx_metadata(plan.path(folder, "int8")))
    assert record["reduce_range"] is False and results["int8"].quantization["reduce_range"] is False
    assert plan.record() == {
        "name": "tiny", "graphs": {"int8": "tiny-int8.onnx", "fp32": "tiny-fp32.onnx", "fp16": "tiny-fp16.onnx"},
        "int8_from": "the fp32 file", "validation_max_batch": 1,
        "int8_policy": {"reduce_range": False, "weights": "full-range (+-127)", "why": INT8_POLICY.why}}


def test_the_7bit_form_and_a_traced_int8_graph(built, tmp_path):
    model, folder, _, _ = built
    plan = ArtifactSetPlan("tiny", graphs=("fp32", "int8", "int8-7bit"), batch=(1, 1), height=(32, 32),
                           width=(32, 32), validation_max_batch=1, calibration_size=4, int8=Int8Policy(True, "test"))
    assert plan.quantize_options("int8").reduce_range and plan.quantize_options("int8-7bit").reduce_range
    # a traced set: the 7-bit graph from the model itself, judged against the eager model
    result = build_artifact(model, plan, "int8-7bit", tmp_path)
    assert result.path == tmp_path / "tiny-int8-7bit.onnx" and result.report.passed
    assert quantization_record(read_onnx_metadata(result.path))["reduce_range"] is True
    assert plan.record()["int8_from"] == "a trace of the model"


def test_the_plan_refuses_unknown_graphs_and_graphs_it_does_not_hold(built, tmp_path):
    model, _, plan, _ = built
    with pytest.raises(ValueError, match=r"graphs \['int4'\] are not artifact-set graphs"):
        ArtifactSetPlan("tiny", graphs=("fp32", "int4"))
    with pytest.raises(ValueError, match="graph 'fp8' is not in the set 'tiny'"):
        build_artifact(model, plan, "fp8", tmp_path)
    with pytest.raises(ValueError, match="needs the model"):
        build_artifact(None, plan, "fp32", tmp_path)
    assert not list(tmp_path.iterdir())
