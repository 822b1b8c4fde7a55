"""`vitdeploy deploy` end to end on a tiny checkpoint (no TensorRT here: the trtexec command is written)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config

import vitdeploy.cli as cli


@pytest.fixture
def main(monkeypatch):
    """The real ``vitdeploy`` entry point with the commands deploy relies on registered."""
    monkeypatch.setattr(cli, "COMMANDS", ["deploy", "bench"])
    return cli.main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vitdeploy.checkpoints import save_model

    model = make_model(tiny_config())
    return save_model(model, tmp_path_factory.mktemp("deploy_model") / "tiny.safetensors"), model


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_tensorrt_available(), reason="checks the no-TensorRT path; this machine has TensorRT and a GPU")
def test_deploy_pipeline_without_tensorrt(main, capsys, recwarn, checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "out"
    status = main(["deploy", str(path), "-o", str(out), "--batch", "1:4", "--resolution", "32:48",
                   "--bench-batch", "1,2", "--time-budget", "0.02", "--validation-max-batch", "2", "--threads", "1",
                 "--tune-rounds", "1", "--peak-gflops", "fp32=150,int8=600,bf16=300"])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    report = json.loads((out / "report.json").read_text())

    artifacts = {a["path"]: a for a in report["artifacts"]}
    for precision in ("fp32", "fp16", "int8"):
        onnx = artifacts[f"tiny.safetensors-{precision}.onnx"]
        assert onnx["passed"] is True and onnx["parity"]["passed"] is True
        assert onnx["bytes"] > 0 and len(onnx["sha256"]) == 64
        assert "source check skipped: vitdeploy's own safetensors format" in " ".join(onnx["notes"])
    script = artifacts["build_engine.sh"]
    assert script["kind"] == "trtexec-command"
    text = (out / "build_engine.sh").read_text()
    assert "trtexec --onnx=tiny.safetensors-fp16.onnx" in text and "--stronglyTyped" in text
    # Declared batch 1..4, validated 1..2 (--validation-max-batch 2): the engine is for what was validated.
    assert "--maxShapes=pixel_values:2x3x48x48" in text and "--minShapes=pixel_values:1x3x32x32" in text

    stages = {s["name"]: s for s in report["stages"]}
    assert [s["name"] for s in report["stages"]] == ["load", "export fp32", "export fp16", "export int8",
                                                      "TensorRT pre-flight", "TensorRT build", "benchmark", "tune"]
    int8_notes = " ".join(artifacts["tiny.safetensors-int8.onnx"]["notes"])
    assert "Q/DQ" in int8_notes and "TensorRT pre-flight: 0 error(s)" in int8_notes
    # --validation-max-batch 2 of --batch 1:4: the report tells the two ranges apart.
    assert "validated: batch 1..2, " in int8_notes and "declared: batch 1..4, 32..48" in int8_notes
    assert stages["TensorRT build"]["status"] == "skipped"
    assert report["tensorrt"]["built"] is False and report["tensorrt"]["reason"]
    assert report["tensorrt_preflight"]["ok"] is True

    points = report["benchmark"]["points"]
    runtimes = ["torch-eager-fp32", "ort-cpu-fp32", "ort-cpu-fp16", "ort-cpu-int8"]
    if importlib.util.find_spec("openvino") is not None:
        from vitdeploy.cpu_features import has_bf16, int8_dot_flags

        runtimes += ["openvino-cpu-fp32", "openvino-cpu-int8"] + (["openvino-cpu-bf16"] if has_bf16() else [])
        # The deployed int8 file has full-range weights (TensorRT's and VNNI CPUs' form); where this CPU
        # lacks VNNI/AMX the user is told that OpenVINO here wants --reduce-range.
        told = [str(w.message) for w in recwarn if "--reduce-range" in str(w.message)]
        assert bool(told) == (not int8_dot_flags()), told
    assert {(p["runtime"], p["batch"]) for p in points} == {(r, b) for r in runtimes for b in (1, 2)}
    assert all(p["status"] == "ok" and p["p50_ms"] > 0 for p in points)
    results = json.loads((out / "bench" / "results.json").read_text())
    from vitdeploy.benchmarks.schema import validate

    validate(results)
    assert results["command"] == report["command"] and "--bench-batch 1,2" in report["command"]
    assert "--peak-gflops fp32=150,int8=600,bf16=300" in report["command"]
    # The peaks given are the ones compared with: none is measured.
    assert {p["source"] for p in results["peaks"]} == {"given"}
    assert {(p["precision"], p["gflops"]) for p in results["peaks"]} <= {("fp32", 150), ("int8", 600), ("bf16", 300)}
    assert (out / "bench" / "latency_vs_batch.png").is_file()

    markdown = (out / "report.md").read_text()
    assert "## What was produced" in markdown and "not built here" in markdown
    assert "## Speed on this machine" in markdown and "ort-cpu-fp16" in markdown

    # No GPU here: deploy tuned the CPU path on its own exports and reports every candidate.
    assert stages["tune"]["status"] == "ok", stages["tune"]
    tuned = report["tune"]["document"]
    assert tuned["chosen"]["name"] in {c["name"] for c in tuned["candidates"] if c["status"] == "ok"}
    assert (out / "tune.json").is_file() and "## Fastest accurate CPU path (tune)" in markdown
    # The benchmark and tune both timed the fp32 graph on onnxruntime: each table says how and when it was
    # measured, and the report puts the two figures side by side with why they differ.
    assert "Measured by the benchmark stage (started " in markdown and "Measured by the tune stage (recorded " in markdown
    same = {(p["bench_runtime"], p["batch"]): p for p in report["benchmark"]["same_graph"]}
    fp32 = same[("ort-cpu-fp32", 1)]
    assert fp32["tune_candidate"] == "ort-fp32" and fp32["graph"] == "tiny.safetensors-fp32.cpu.onnx"
    bench_p50 = next(p["p50_ms"] for p in points if (p["runtime"], p["batch"]) == ("ort-cpu-fp32", 1))
    tune_p50 = next(c for c in tuned["candidates"] if c["name"] == "ort-fp32")["latency_ms"]["1"]
    assert (fp32["bench_p50_ms"], fp32["tune_p50_ms"]) == (bench_p50, tune_p50)
    assert (f"- onnxruntime, fp32 graph (fused CPU variant) (`tiny.safetensors-fp32.cpu.onnx`), batch 1, 32x32: p50 "
            f"{bench_p50:.3f} ms in the benchmark (`ort-cpu-fp32`), {tune_p50:.3f} ms in tune (`ort-fp32`); "
            f"benchmark/tune {bench_p50 / tune_p50:.2f}x") in markdown
    assert "Compare runtimes within one table, not across the tables" in markdown
    assert all(f"`{c['name']}` ({c['status']}): {c['reason']}" in markdown for c in tuned["candidates"]
               if c["status"] != "ok")

    # The parity the report claims holds for the file on disk: run it and compare with the eager model.
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    pixels = np.random.default_rng(3).standard_normal((2, 3, 48, 40), dtype=np.float32)
    with OrtRuntime(out / "tiny.safetensors-fp32.onnx") as runtime:
        logits = runtime(pixels)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1:8", "--bench-batch", "16"], "--bench-batch"),
    (["--resolution", "30:60"], "stride"),
    (["--time-budget", "0"], "--time-budget"),
    (["--batch", "8:1"], "--batch"),
    (["--outputs", "image_embeds"], "this model has no image_embeds output; it has logits, pooler_output"),
    (["--peak-gflops", "fp32=fast"], "'fast' is not a number of GFLOP/s"),
])
def test_deploy_bad_arguments_give_one_line_errors(main, capsys, checkpoint, tmp_path, argv, message):
    path, _ = checkpoint
    status = main(["deploy", str(path), "-o", str(tmp_path / "out"), *argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("vitdeploy deploy: error:") and message in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("batch, expected", [("1:1", (1,)), ("2:4", (2, 4)), ("1:8", (1, 8))])
def test_deploy_default_bench_batches_stay_inside_its_batch_range(main, checkpoint, tmp_path, monkeypatch, batch,
                                                                   expected):
    """--batch 1:1 alone is no error about a --bench-batch nobody gave: the defaults (1, 8) are kept inside it."""
    import types

    import vitdeploy.pipeline as pipeline

    taken = []
    monkeypatch.setattr(pipeline, "deploy", lambda options: taken.append(options) or types.SimpleNamespace(status=0))
    path, _ = checkpoint
    assert main(["deploy", str(path), "-o", str(tmp_path / "out"), "--batch", batch]) == 0
    assert taken[0].bench_batches == expected and taken[0].batch == tuple(int(b) for b in batch.split(":"))


def test_deploy_unknown_source(main, capsys, tmp_path):
    status = main(["deploy", "vit_unknown_patch16_224", "-o", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert status == 2 and len(err) == 1 and "vit_unknown_patch16_224" in err[0]


def _report(random_weights: bool, top1: float) -> dict:
    worst = {"tolerance": "int8", "rel_max_error": 0.05, "max_abs": 0.01, "min_cosine": 0.995,
             "min_top1_agreement": top1, "min_top5_agreement": 0.6}
    int8 = {"path": "m-int8.onnx", "kind": "onnx", "precision": "int8", "bytes": 2**20, "passed": True,
            "parity": {"passed": True, "shapes": [[1, 32, 32], [2, 48, 40]], "references": {"eager fp32": worst},
                       "notes": []},
            "notes": ["validated: batch 1..2, height 32..48, width 32..40; declared: batch 1..4, 32..48"]}
    return {"source": {"source": "vit_small_patch16_224", "format": "variant" if random_weights else "safetensors",
                       "sha256": "0" * 64, "random_weights": random_weights, "model": "vit_small_patch16_224"},
            "command": "vitdeploy deploy -o out", "seconds": 1.0, "artifacts": [int8], "tensorrt": {"built": False},
            "tensorrt_preflight": None, "benchmark": None, "stages": [],
            "environment": {"cpu": {"model": "test CPU", "usable_cpus": 2}, "load_average_start": 0.0, "gpu": None,
                            "versions": {}}}


def test_report_says_random_weights_make_top1_a_near_tie():
    from vitdeploy.pipeline import render_markdown

    row = next(line for line in render_markdown(_report(True, 0.0)).splitlines() if line.startswith("| `m-int8.onnx`"))
    assert "top-1 0.000); random weights leave the top classes near a tie, so top-1 agreement says little" in row
    assert "validated: batch 1..2" in row and "declared: batch 1..4" in row
    for random_weights, top1 in ((False, 0.0), (True, 1.0)):  # real weights, or no disagreement: nothing to explain
        assert "near a tie" not in render_markdown(_report(random_weights, top1))
