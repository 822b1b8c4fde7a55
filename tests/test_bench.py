"""The benchmark harness on a tiny model: statistics, timing, schema, reports, plots, skips, compare."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
import statistics
import sys
import time

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy.benchmarks.compare import compare, render_text
from vitdeploy.benchmarks.harness import BenchPlan, Display, Harness, add_speedups
from vitdeploy.benchmarks.report import (
    evaluate_targets,
    markdown_report,
    records_to_csv,
    terminal_table,
    write_outputs,
)
from vitdeploy.benchmarks.schema import SchemaError, load_schema, validate, validation_errors
from vitdeploy.benchmarks.specs import RuntimeSpec, parse_runtimes
from vitdeploy.benchmarks.stats import achieved_gflops, percentile, summarize, throughput
from vitdeploy.benchmarks.suites import load_suite, overhead_settings
from vitdeploy.benchmarks.timing import TimingConfig, WallTimer, measure, measure_overhead
from vitdeploy.flops import count_flops

# ---------------------------------------------------------------------------------------------
# statistics with known timings


def test_percentiles_of_known_timings():
    samples = [float(v) for v in range(1, 101)]  # 1..100 ms, shuffled below
    random.Random(0).shuffle(samples)
    # Linear interpolation at rank (n - 1) * q / 100 of the sorted values 1..100: value = 1 + rank.
    assert percentile(samples, 50) == pytest.approx(1 + 99 * 0.50)
    assert percentile(samples, 90) == pytest.approx(1 + 99 * 0.90)
    assert percentile(samples, 99) == pytest.approx(1 + 99 * 0.99)
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 100.0
    stats = summarize(samples)
    assert stats.n == 100
    assert stats.mean == pytest.approx(50.5)
    assert stats.stdev == pytest.approx(statistics.stdev(range(1, 101)))
    assert (stats.min, stats.max) == (1.0, 100.0)


def test_percentiles_match_numpy_on_random_samples():
    rng = np.random.default_rng(1)
    for size in (1, 2, 7, 50, 333):
        samples = rng.lognormal(size=size).tolist()
        for q in (50, 90, 99):
            assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_two_samples_interpolate_and_one_sample_has_no_spread():
    stats = summarize([2.0, 4.0])
    assert stats.p50 == pytest.approx(3.0) and stats.p90 == pytest.approx(3.8) and stats.p99 == pytest.approx(3.98)
    single = summarize([5.0])
    assert (single.p50, single.p99, single.stdev) == (5.0, 5.0, 0.0)


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [1.0, float("nan")]])
def test_summarize_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_throughput_and_gflops():
    assert throughput(8, 4.0) == pytest.approx(2000.0)
    assert achieved_gflops(10**9, 4, 2.0) == pytest.approx(2000.0)
    with pytest.raises(ValueError):
        throughput(1, 0.0)


# ---------------------------------------------------------------------------------------------
# timing loops


class ScriptedTimer:
    """A timer double returning known latencies, so the harness's statistics can be checked exactly."""

    name = "perf_counter"

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def __call__(self, fn):
        fn()
        value = self.values[self.calls % len(self.values)]
        self.calls += 1
        return value

    def synchronize(self):
        return None


def test_measure_uses_warmup_then_fixed_iterations_with_known_timings():
    calls = []
    timings = [9.0, 9.0] + [float(v) for v in range(1, 21)]  # two warm-up values, then 1..20
    result = measure(lambda: calls.append(1), TimingConfig(warmup=2, iterations=20, time_budget_s=None),
                     ScriptedTimer(timings))
    assert len(calls) == 22
    assert result.warmup_ms == [9.0, 9.0] and result.first_call_ms == 9.0
    assert result.samples_ms == [float(v) for v in range(1, 21)]
    stats = summarize(result.samples_ms)
    assert stats.p50 == pytest.approx(10.5) and stats.p90 == pytest.approx(1 + 19 * 0.9)


def test_measure_time_budget_stops_after_budget_and_min_iterations():
    config = TimingConfig(warmup=0, iterations=None, time_budget_s=0.05, min_iterations=3)
    start = time.perf_counter()
    result = measure(lambda: time.sleep(0.01), config)
    elapsed = time.perf_counter() - start
    assert len(result.samples_ms) >= 3
    assert 0.05 <= elapsed < 2.0
    assert all(s >= 9.0 for s in result.samples_ms)  # each call sleeps 10 ms
    slow = measure(lambda: time.sleep(0.03), TimingConfig(warmup=0, time_budget_s=0.001, min_iterations=4))
    assert len(slow.samples_ms) == 4  # the budget ran out at once; the minimum still holds


def test_measure_reports_progress():
    seen = []
    config = TimingConfig(warmup=0, iterations=None, time_budget_s=0.2, min_iterations=1)
    config.progress_interval_s = 0.02
    measure(lambda: time.sleep(0.005), config, progress=lambda done, elapsed: seen.append((done, elapsed)))
    assert seen and all(done >= 1 for done, _ in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("kwargs", [dict(warmup=-1), dict(iterations=0), dict(time_budget_s=0),
                                    dict(iterations=None, time_budget_s=None), dict(min_iterations=0)])
def test_timing_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TimingConfig(**kwargs)


def test_harness_overhead_against_bare_loop_is_small():
    result = measure_overhead(lambda: time.sleep(0.002), iterations=20, rounds=3, timer=WallTimer(), warmup=1)
    assert result.bare_ms >= 2.0
    # Timer reads cost well under a microsecond; 2 ms sleeps leave only scheduler noise.
    assert result.noop_overhead_ns < 50_000
    assert abs(result.reported_overhead) < 0.25
    assert result.to_dict()["noop_fraction"] == pytest.approx(result.noop_overhead_ns * 1e-6 / result.bare_ms)


# ---------------------------------------------------------------------------------------------
# runtime labels and suites


@pytest.mark.parametrize("text, label, device", [
    ("torch", "torch-eager-fp32", "cpu"), ("torch-fp16-compile", "torch-compile-fp16", "cpu"),
    ("ort", "ort-cpu-fp32", "cpu"), ("onnxruntime-cuda-fp16", "ort-cuda-fp16", "cuda"),
    ("ort-trt-fp16", "ort-tensorrt-fp16", "cuda"), ("trt-fp16", "tensorrt-fp16", "cuda"),
])
def test_runtime_labels(text, label, device):
    spec = RuntimeSpec.parse(text, device="cpu")
    assert spec.label == label and spec.device == device
    assert RuntimeSpec.parse(spec.label) == spec


@pytest.mark.parametrize("text", ["tflite", "torch-int8", "ort-cpu-bf16", "tensorrt-compile", "ort-gpu"])
def test_bad_runtime_labels_name_the_value(text):
    with pytest.raises(ValueError, match="runtime"):
        parse_runtimes(text)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_shipped_suites_are_valid(name):
    from vitdeploy.variants import VARIANTS

    suite = load_suite(name)
    specs = parse_runtimes(suite.runtimes, suite.device)
    assert specs[0].label == "torch-eager-fp32"  # the speedup baseline runs first
    for model in suite.models:
        assert model in VARIANTS
        assert all(size % VARIANTS[model].stride == 0 for size in suite.resolution)
    settings = overhead_settings(suite)
    assert settings["overhead"] is True
    assert set(settings.get("overhead_models", [])) <= set(suite.models)
    TimingConfig(warmup=suite.warmup, iterations=suite.iterations, time_budget_s=suite.time_budget_s,
                 min_iterations=suite.min_iterations, max_iterations=suite.max_iterations)


def test_bad_suite_file_gives_clear_error(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"models": ["vit_tiny_patch16_224"], "runtimes": ["torch"], "batch": [1],
                                "resolution": [224], "iterationz": 3}))
    with pytest.raises(ValueError, match="iterationz"):
        load_suite(path)
    path.write_text(json.dumps({"models": ["x"], "runtimes": ["torch"], "batch": [0], "resolution": [224]}))
    with pytest.raises(ValueError, match="batch"):
        load_suite(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_suite("nope")


# ---------------------------------------------------------------------------------------------
# the harness on a tiny model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vitdeploy.checkpoints import save_model

    folder = tmp_path_factory.mktemp("bench_model")
    return save_model(make_model(tiny_config()), folder / "tiny.safetensors")


@pytest.fixture(scope="module")
def bench_run(tiny_checkpoint, tmp_path_factory):
    """One harness run: torch and onnxruntime run; onnxruntime CUDA and TensorRT are skipped here."""
    out = tmp_path_factory.mktemp("bench_out")
    plan = BenchPlan(
        models=[str(tiny_checkpoint)],
        runtimes=parse_runtimes("torch-eager-fp32,ort-cpu-fp32,tensorrt-fp16,ort-cuda-fp16"),
        batches=[1, 2], sizes=[(32, 32), (48, 48)],
        timing=TimingConfig(warmup=1, iterations=5, time_budget_s=None, min_iterations=1),
        cache_dir=out / "artifacts", threads=1, peaks={"fp32": 100.0}, overhead=True,
        overhead_iterations=5, overhead_rounds=2, command="vitdeploy bench tiny (test)",
    )
    stream = io.StringIO()
    document = Harness(plan, Display(stream=stream, live=False)).run()
    written = write_outputs(document, out)
    return document, written, stream.getvalue(), out


def test_harness_records_every_point_and_validates(bench_run):
    document, _, progress, _ = bench_run
    validate(document)
    records = document["records"]
    assert len(records) == 4 * 2 * 2  # runtimes x batches x sizes
    by_runtime = {}
    for record in records:
        by_runtime.setdefault(record["runtime"], []).append(record)
    config = tiny_config()
    for label in ("torch-eager-fp32", "ort-cpu-fp32"):
        for record in by_runtime[label]:
            assert record["status"] == "ok", record["reason"]
            lat = record["latency_ms"]
            assert lat["n"] == 5 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert record["throughput_ips"] == pytest.approx(record["batch"] * 1000 / lat["mean"])
            # the exported graph computes its last block for the class token only
            pruned = label.startswith("ort-")
            assert record["flops_per_image"] == count_flops(config, record["height"], record["width"], pruned)
            assert record["peak_fraction"] == pytest.approx(record["gflops_per_s"] / 100.0)
            assert record["peak_rss_mib"] > 0 and record["threads"] == 1 and record["timer"] == "perf_counter"
    for record in by_runtime["torch-eager-fp32"]:
        assert record["speedup_vs_baseline"] == 1.0
    assert by_runtime["ort-cpu-fp32"][0]["artifact"].endswith(".cpu.onnx")  # the validated CPU variant users run
    # One line of progress per point.
    assert progress.count("\n[") + progress.startswith("[") >= len(records)


def test_missing_runtimes_are_skipped_with_reason_and_others_run(bench_run):
    document, _, progress, _ = bench_run
    skipped = [r for r in document["records"] if r["status"] == "skipped"]
    assert {r["runtime"] for r in skipped} == {"tensorrt-fp16", "ort-cuda-fp16"}
    assert all(r["latency_ms"] is None and r["reason"] for r in skipped)
    assert any("TensorRT" in r["reason"] for r in skipped if r["runtime"] == "tensorrt-fp16")
    assert any("CUDAExecutionProvider" in r["reason"] for r in skipped if r["runtime"] == "ort-cuda-fp16")
    assert "skipped" in progress
    # The runtimes after the skipped ones in the list still ran: the skip stopped nothing.
    assert sum(r["status"] == "ok" for r in document["records"]) == 8


def test_outputs_are_written(bench_run):
    document, written, _, out = bench_run
    assert set(written) >= {"json", "csv", "markdown", "latency_vs_batch", "throughput_vs_resolution",
                            "throughput_by_batch"}
    reloaded = json.loads((out / "results.json").read_text())
    assert reloaded == json.loads(json.dumps(document))
    validate(reloaded)
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == len(document["records"])
    assert {r["status"] for r in rows} == {"ok", "skipped"}
    report = (out / "report.md").read_text()
    assert "vitdeploy bench tiny (test)" in report  # the exact command
    assert "torch-eager-fp32" in report and "ort-cpu-fp32" in report and "## Not run" in report
    assert "latency_vs_batch.png" in report
    for name in ("latency_vs_batch", "throughput_vs_resolution", "throughput_by_batch"):
        data = written[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    env = document["environment"]
    assert env["command"] == "vitdeploy bench tiny (test)"
    assert env["cpu"]["threads"] == 1 and env["versions"]["vitdeploy"]
    assert "load_average_start" in env


def test_outputs_without_matplotlib(bench_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    written = write_outputs(json.loads(json.dumps(bench_run[0])), tmp_path)
    assert set(written) == {"json", "csv", "markdown"}
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_harness_overhead_is_recorded(bench_run):
    document, _, _, _ = bench_run
    entries = document["harness_overhead"]
    assert {e["runtime"] for e in entries} == {"torch-eager-fp32", "ort-cpu-fp32"}
    for entry in entries:
        assert entry["batch"] == 1 and entry["bare_loop_ms"] > 0 and entry["noop_overhead_ns"] >= 0
    assert any(t["target"].startswith("harness overhead") for t in evaluate_targets(document))


def test_point_outside_an_artifacts_range_fails_alone(bench_run, tmp_path):
    """A failing point (batch beyond the ONNX file's validated range) is recorded and the sweep goes on."""
    document, _, _, out = bench_run
    onnx_path = next((out / "artifacts").glob("*-fp32.onnx"))
    plan = BenchPlan(models=[str(onnx_path)], runtimes=parse_runtimes("ort-cpu-fp32,torch-eager-fp32"),
                     batches=[1, 3], sizes=[(32, 32)],
                     timing=TimingConfig(warmup=0, iterations=2, time_budget_s=None, min_iterations=1),
                     cache_dir=tmp_path, threads=1, measure_peaks=False)
    records = Harness(plan, Display(quiet=True)).run()["records"]
    status = {(r["runtime"], r["batch"]): r for r in records}
    assert status[("ort-cpu-fp32", 1)]["status"] == "ok"
    failed = status[("ort-cpu-fp32", 3)]
    assert failed["status"] == "failed" and "batch size 3" in failed["reason"]
    # torch rebuilt from the artifact's config (random weights: timing only) ran both batches
    assert status[("torch-eager-fp32", 3)]["status"] == "ok" and status[("torch-eager-fp32", 3)]["random_weights"]
    assert status[("ort-cpu-fp32", 1)]["speedup_vs_baseline"] > 0


def test_a_default_batch_outside_an_artifacts_range_is_skipped_not_failed(bench_run, tmp_path):
    """bench's default batches (1, 8) on a file validated to batch 2: batch 8 is no failure of the runtime, and
    says which flag chooses batches; the same batch asked for with --batch still fails (test above)."""
    document, _, _, out = bench_run
    onnx_path = next((out / "artifacts").glob("*-fp32.onnx"))
    plan = BenchPlan(models=[str(onnx_path)], runtimes=parse_runtimes("ort-cpu-fp32"), batches=[1, 8], sizes=[(32, 32)],
                     timing=TimingConfig(warmup=0, iterations=2, time_budget_s=None, min_iterations=1),
                     cache_dir=tmp_path, threads=1, measure_peaks=False, default_batches=True)
    status = {r["batch"]: r for r in Harness(plan, Display(quiet=True)).run()["records"]}
    assert status[1]["status"] == "ok"
    assert status[8]["status"] == "skipped" and "outside the artifact's batch range 1..2" in status[8]["reason"]
    assert "--batch chooses" in status[8]["reason"]


def test_terminal_table_shows_speedups_and_skips(bench_run):
    document, _, _, _ = bench_run
    table = terminal_table(document)
    assert "vs torch-eager-fp32" in table and "1.00x" in table
    assert "tensorrt-fp16: skipped (4 points)" in table


def test_engine_profiles_and_reuse_of_a_built_engine(bench_run, tmp_path):
    from vitdeploy.benchmarks.artifacts import _reusable, engine_profiles
    from vitdeploy.benchmarks.models import Sweep
    from vitdeploy.engine_manifest import EngineManifest, GpuInfo
    from vitdeploy.exporters.trt_plan import BuildOptions, plan_build
    from vitdeploy.files import sha256_file

    small = Sweep((1, 2), ((32, 32), (48, 48)))
    assert engine_profiles(small) == ["batch=1:1:2,resolution=32:32:48"]
    large = Sweep((1, 64, 256), ((224, 224), (384, 384)))
    assert engine_profiles(large) == ["batch=1:1:8,resolution=224:224:384", "batch=1:256:256,resolution=224:384:384"]

    onnx_path = next((bench_run[3] / "artifacts").glob("*-fp32.onnx"))
    engine = tmp_path / "tiny.engine"
    # The bench export validated batch 1 only; its timing engines go beyond that on purpose (build_engine_for_bench).
    timing = BuildOptions(beyond_validated=True)
    plan = plan_build(onnx_path, engine, options=timing, profile_specs=engine_profiles(small))
    assert not _reusable(plan)
    engine.write_bytes(b"TensorRT engine double")  # stands in for an engine TensorRT built
    EngineManifest(
        engine_file=engine.name, engine_sha256=sha256_file(engine), engine_bytes=engine.stat().st_size,
        onnx_file=str(onnx_path), onnx_sha256=sha256_file(onnx_path), tensorrt_version="10.13",
        gpu=GpuInfo(name="GPU double", compute_capability="9.0"), precision="fp32", profiles=plan.profiles,
        inputs=[], outputs=[],
    ).write(plan.manifest_path)
    assert _reusable(plan)
    assert not _reusable(plan_build(onnx_path, engine, options=timing, profile_specs=["batch=1:2:2,resolution=32:48:48"]))
    engine.write_bytes(b"another engine")
    assert not _reusable(plan)  # the manifest no longer describes the file


# ---------------------------------------------------------------------------------------------
# schema


def test_schema_rejects_broken_documents(bench_run):
    document = json.loads(json.dumps(bench_run[0]))
    broken = copy.deepcopy(document)
    del broken["records"][0]["latency_ms"]
    assert any("latency_ms" in e for e in validation_errors(broken))
    broken = copy.deepcopy(document)
    broken["records"][0]["status"] = "maybe"
    with pytest.raises(SchemaError, match="maybe"):
        validate(broken)
    broken = copy.deepcopy(document)
    broken["records"][0]["latency_ms"]["p50"] = "fast"
    assert any("records[0].latency_ms" in e for e in validation_errors(broken))
    broken = copy.deepcopy(document)
    broken["records"][0]["batch"] = 0
    assert any("records[0].batch" in e and "minimum" in e for e in validation_errors(broken))
    broken = copy.deepcopy(document)
    broken["records"][0]["peak_fraction"] = 1.4  # a fraction of a peak above 1 is impossible
    assert any("peak_fraction" in e for e in validation_errors(broken))
    broken = copy.deepcopy(document)
    broken["surprise"] = 1
    assert any("surprise" in e for e in validation_errors(broken))


def test_schema_is_a_valid_json_schema_and_applies_every_keyword():
    import jsonschema

    jsonschema.validators.validator_for(load_schema()).check_schema(load_schema())
    with pytest.raises(SchemaError, match="does not match"):
        validate("x", {"type": "string", "pattern": "^y$"})


# ---------------------------------------------------------------------------------------------
# speedups, compare, report pieces


def _record(runtime, p50, batch=1, status="ok"):
    return {"model": "m", "runtime": runtime, "batch": batch, "height": 32, "width": 32, "status": status,
            "latency_ms": {"p50": p50} if status == "ok" else None, "speedup_vs_baseline": None}


def test_speedups_are_relative_to_the_baseline_at_the_same_point():
    records = [_record("torch-eager-fp32", 10.0), _record("ort-cpu-fp32", 4.0), _record("ort-cpu-fp32", 4.0, batch=2),
               _record("tensorrt-fp16", None, status="skipped")]
    add_speedups(records)
    assert records[0]["speedup_vs_baseline"] == 1.0
    assert records[1]["speedup_vs_baseline"] == pytest.approx(2.5)
    assert records[2]["speedup_vs_baseline"] is None  # no baseline at batch 2
    assert records[3]["speedup_vs_baseline"] is None


def test_compare_shows_ratio_per_point(bench_run, tmp_path):
    document = json.loads(json.dumps(bench_run[0]))
    slower = copy.deepcopy(document)
    for record in slower["records"]:
        if record["status"] == "ok":
            record["latency_ms"]["p50"] *= 2
            record["throughput_ips"] /= 2
    slower["records"] = [r for r in slower["records"] if not (r["runtime"] == "ort-cpu-fp32" and r["batch"] == 2)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(document))
    b.write_text(json.dumps(slower))
    comparison = compare(a, b)
    assert len(comparison.points) == 8 - 2
    assert all(p.latency_ratio == pytest.approx(2.0) and p.speedup == pytest.approx(0.5) for p in comparison.points)
    assert all(p.throughput_ratio == pytest.approx(0.5) for p in comparison.points)
    assert {(k[1], k[2]) for k in comparison.only_a} == {("ort-cpu-fp32", 2)}
    text = render_text(comparison)
    assert "2.000" in text and "only in A" in text and "geometric mean speedup of B over A: 0.500x" in text


def test_compare_refuses_files_that_are_not_results(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a vitdeploy benchmark results file"):
        compare(path, path)
    with pytest.raises(FileNotFoundError):
        compare(tmp_path / "missing.json", path)


def test_csv_and_markdown_render_failed_points_without_measurements(bench_run):
    document = json.loads(json.dumps(bench_run[0]))
    document["records"][0].update(status="failed", reason="RuntimeError: boom", latency_ms=None, throughput_ips=None)
    rows = list(csv.DictReader(io.StringIO(records_to_csv(document))))
    assert rows[0]["status"] == "failed" and rows[0]["p50_ms"] == ""
    report = markdown_report(document)
    assert "RuntimeError: boom" in report
    assert math.isfinite(float(rows[1]["p50_ms"]))


# ---------------------------------------------------------------------------------------------
# GPU (runs only where a CUDA device is present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_runtimes_are_timed_with_cuda_events(tiny_checkpoint, tmp_path):
    labels = "torch-eager-fp32,torch-eager-fp16,torch-compile-fp16,ort-cuda-fp16,ort-tensorrt-fp16,tensorrt-fp16"
    plan = BenchPlan(models=[str(tiny_checkpoint)], runtimes=parse_runtimes(labels, "cuda"), batches=[1, 4],
                     sizes=[(32, 32)], timing=TimingConfig(warmup=3, iterations=10, time_budget_s=None),
                     cache_dir=tmp_path, overhead=True, overhead_iterations=10, overhead_rounds=2)
    document = Harness(plan, Display(quiet=True)).run()
    validate(document)
    records = {(r["runtime"], r["batch"]): r for r in document["records"]}
    for batch in (1, 4):
        for label in ("torch-eager-fp32", "torch-eager-fp16"):
            record = records[(label, batch)]
            assert record["status"] == "ok", record["reason"]
            assert record["timer"] == "cuda_event" and record["device"] == "cuda"
            assert record["peak_device_mib"] > 0 and record["peak_fraction"] > 0
        for label in ("torch-compile-fp16", "ort-cuda-fp16", "ort-tensorrt-fp16", "tensorrt-fp16"):
            record = records[(label, batch)]  # ok where installed; otherwise skipped, never failed
            assert record["status"] in ("ok", "skipped"), record["reason"]
            assert record["status"] == "ok" or record["reason"]
    assert {(p["device"], p["precision"]) for p in document["peaks"]} >= {("cuda", "fp32"), ("cuda", "fp16")}


# ---------------------------------------------------------------------------------------------
# honest peaks: the precision a backend computes in, a bounded measurement, never a fraction above 1


def test_peak_precision_is_what_the_backend_computes_in():
    from vitdeploy.benchmarks.peaks import compute_precision

    epyc = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})  # no fp16 arithmetic
    sapphire_rapids = epyc | {"avx512_fp16", "amx_bf16", "amx_int8"}
    assert compute_precision("onnxruntime", "cpu", "fp16", sapphire_rapids) == "fp32"  # no fp16 MatMul kernel
    assert compute_precision("torch", "cpu", "fp16", epyc) == "fp32"
    assert compute_precision("torch", "cpu", "fp16", sapphire_rapids) == "fp16"
    assert compute_precision("torch", "cpu", "bf16", epyc) == "bf16"
    assert compute_precision("torch", "cpu", "bf16", frozenset({"avx2"})) == "fp32"
    assert compute_precision("torch", "cuda", "fp16", frozenset()) == "fp16"
    assert compute_precision("onnxruntime", "cpu", "fp32", frozenset()) == "fp32"


def test_matmul_peak_measurement_is_sized_to_its_budget():
    from vitdeploy.benchmarks.peaks import measure_matmul_peak

    peak = measure_matmul_peak("cpu", "fp32", threads=1, seconds=0.05)
    n = int(peak.method.split()[1].split("x")[0])
    assert 256 <= n < 2048  # a 2048^3 product alone would take longer than the whole budget here
    assert 2 * n**3 / (peak.gflops * 1e9) <= 0.05  # one timed product fits in the budget
    assert peak.gflops > 0 and peak.source == "measured"


def test_a_fraction_of_peak_above_one_is_never_reported(tiny_checkpoint, tmp_path):
    plan = BenchPlan(
        models=[str(tiny_checkpoint)], runtimes=parse_runtimes("torch-eager-fp32,ort-cpu-fp16,ort-cpu-int8"),
        batches=[1], sizes=[(32, 32)], timing=TimingConfig(warmup=1, iterations=3, time_budget_s=None, min_iterations=1),
        cache_dir=tmp_path / "artifacts", threads=1, peaks={"fp32": 1e-6, "int8": 2e-6}, command="test",
    )
    document = Harness(plan, Display(stream=io.StringIO(), live=False)).run()
    validate(document)  # the schema itself caps peak_fraction at 1
    for record in document["records"]:
        assert record["status"] == "ok", record["reason"]
        # onnxruntime CPU computes its fp16 graph's matmuls in fp32; an int8 graph's in int8
        assert record["compute_precision"] == ("int8" if record["precision"] == "int8" else "fp32")
        assert record["peak_fraction"] is None and "no ceiling" in record["peak_note"]
        assert f"above the {record['compute_precision']} matmul peak" in record["peak_note"]
    report = markdown_report(document)
    assert "no ceiling" in report
    percents = [float(cell) for line in report.splitlines() if line.startswith("| ") for cell in
                line.strip("|").split("|")[11:12] if cell.strip().replace(".", "", 1).isdigit()]
    assert all(value <= 100 for value in percents)


def test_recording_load_fills_the_report_fields_around_its_block():
    import time as _time

    from vitdeploy.benchmarks.environment import recording_load

    with recording_load() as load:
        assert load.before is not None and load.after is None and load.other_cpus is None  # filled on exit
        _time.sleep(0.1)  # long enough for /proc/stat's 100 Hz ticks to say something
    assert len(load.after) == 3 and load.other_cpus is not None and load.other_cpus >= 0
    assert load.to_dict() == {"load_average": {"before": load.before, "after": load.after},
                              "other_processes_cpus": load.other_cpus}
    assert load.describe() == f"load {load.before} -> {load.after}, other processes {load.other_cpus} CPUs"
