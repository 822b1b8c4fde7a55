"""`vitdeploy bench` and `vitdeploy bench compare` from the command line, on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, tiny_config

import vitdeploy.cli as cli
from vitdeploy.benchmarks.schema import validate


@pytest.fixture
def main(monkeypatch):
    """The real ``vitdeploy`` entry point with only the bench command registered (others are not needed)."""
    monkeypatch.setattr(cli, "COMMANDS", ["bench"])
    return cli.main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vitdeploy.checkpoints import save_model

    return save_model(make_model(tiny_config()), tmp_path_factory.mktemp("cli_model") / "tiny.safetensors")


@pytest.mark.parametrize("argv, message", [
    (["vit_tiny_patch16_224", "--runtime", "tflite"], "runtime 'tflite'"),
    (["vit_tiny_patch16_224", "--batch", "0"], "argument --batch: '0'"),
    (["vit_tiny_patch16_224", "--batch", "1,x"], "argument --batch: '1,x'"),
    (["vit_tiny_patch16_224", "--resolution", "225"], "not a multiple"),
    (["vit_tiny_patch16_224", "--resolution", "22x"], "--resolution"),
    (["vit_nonexistent_patch16_224"], "vit_nonexistent_patch16_224"),
    (["vit_tiny_patch16_224", "--iterations", "0"], "argument --iterations: must be an integer >= 1, got 0"),
    (["vit_tiny_patch16_224", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["vit_tiny_patch16_224", "--peak-gflops", "fp8=3"], "fp8"),
    (["--suite", "no_such_suite"], "no_such_suite"),
    ([], "give a model"),
    (["compare", "only_one.json"], "exactly two"),
])
def test_bad_arguments_give_one_line_errors(main, capsys, tmp_path, argv, message):
    status = main(["bench", *argv, "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("vitdeploy bench: error:")
    assert message in lines[0]
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_bench_then_compare(main, capsys, checkpoint, tmp_path):
    out = tmp_path / "run"
    status = main(["bench", str(checkpoint), "--runtime", "torch-eager-fp32,ort-cpu-fp32,tensorrt-fp16",
                   "--batch", "1,2", "--resolution", "32", "--iterations", "3", "--warmup", "1", "--threads", "1",
                   "--no-peak", "--quiet", "-o", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    document = json.loads((out / "results.json").read_text())
    validate(document)
    assert document["command"].startswith("vitdeploy bench ") and "--iterations 3" in document["command"]
    statuses = {(r["runtime"], r["batch"]): r["status"] for r in document["records"]}
    assert statuses == {("torch-eager-fp32", 1): "ok", ("torch-eager-fp32", 2): "ok", ("ort-cpu-fp32", 1): "ok",
                        ("ort-cpu-fp32", 2): "ok", ("tensorrt-fp16", 1): "skipped", ("tensorrt-fp16", 2): "skipped"}
    assert all(r["latency_ms"]["n"] == 3 for r in document["records"] if r["status"] == "ok")
    assert document["peaks"] == [] and all(r["peak_fraction"] is None for r in document["records"])
    for name in ("results.csv", "report.md", "latency_vs_batch.png", "throughput_by_batch.png"):
        assert (out / name).is_file()
    assert not (out / "throughput_vs_resolution.png").exists()  # one resolution: nothing to plot against
    assert "ort-cpu-fp32" in captured.out and "tensorrt-fp16: skipped" in captured.out
    assert (out / "artifacts" / "tiny.safetensors-fp32.onnx").is_file()  # the export is kept for reruns

    status = main(["bench", "compare", str(out / "results.json"), str(out), "-o", str(tmp_path / "cmp")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "B/A latency" in captured.out and "1.000" in captured.out
    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(comparison["points"]) == 4
    assert all(p["latency_ratio"] == pytest.approx(1.0) for p in comparison["points"])
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# vitdeploy benchmark comparison")


def test_compare_with_a_file_that_is_not_results(main, capsys, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    status = main(["bench", "compare", str(bogus), str(bogus)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "not a vitdeploy benchmark results file" in err[0]
