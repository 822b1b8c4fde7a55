"""`vitdeploy tune` on a tiny model with real onnxruntime and OpenVINO sessions (short rounds).

One tune run per module (exports + every candidate this CPU runs); the tests read what it chose and
recorded, load the folder the way a user does, and check the selection rule on its own.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
from conftest import make_model, tiny_config

from vitdeploy.cpu_features import cpu_flags
from vitdeploy.tune import TunePlan, tune
from vitdeploy.tune.accuracy import AccuracyGate
from vitdeploy.tune.candidates import candidate_list, export_for_tune
from vitdeploy.tune.selection import StabilityRule, select
from vitdeploy.tune_manifest import Candidate, TuneManifestError, read_manifest

OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def model():
    # The conftest tiny model (seed 0), whose fp32 trace the session's trace cache already holds in a full run.
    return make_model(tiny_config())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, model):
    """A folder exported as deploy does (fp32 + CPU variant, int8), then tuned: 1 round, batches 1 and 2."""
    folder = tmp_path_factory.mktemp("tuned")
    export_for_tune(model, folder, "tiny", (1, 4), source="tiny", source_sha256="0" * 64)
    plan = TunePlan(folder=folder, batches=(1, 2), rounds=1, iterations=2, warmup=1, threads=1,
                    calibration_size=8, command="pytest")
    return folder, tune(plan, reference_model=model)


def test_tune_times_every_runnable_candidate_and_records_the_fastest_accurate(tuned):
    folder, result = tuned
    manifest = read_manifest(folder)
    assert manifest.to_dict() == json.loads((folder / "tune.json").read_text())
    runnable = {c.name for c in candidate_list(cpu_flags(), True, OPENVINO) if c.reason is None}
    records = {c.name: c for c in manifest.candidates}
    assert set(records) == {c.name for c in candidate_list(frozenset())}  # every candidate is listed
    for name, record in records.items():
        if name in runnable:
            assert record.status in ("ok", "dropped"), (name, record.reason)
            assert set(record.latency_ms) == {"1", "2"} and all(v > 0 for v in record.latency_ms.values())
            assert record.images_per_s["2"] == pytest.approx(2000.0 / record.latency_ms["2"])
            assert record.throughput["batch"] == 2 and record.throughput["images_per_s"] > 0
            assert record.accuracy["kind"] == "agreement" and record.accuracy["images"] == 4  # the bundled photos
        else:
            assert record.status == "unavailable" and record.reason and not record.latency_ms
    # The tool made the int8 form the export lacked, from the fp32 file.
    assert (folder / "tiny-int8-7bit.onnx").is_file() and records["ort-int8-7bit"].artifact == "tiny-int8-7bit.onnx"
    assert records["ort-fp32"].accuracy["cosine"] > 0.99999  # the fused CPU graph against eager fp32

    chosen = manifest.chosen
    ok = [r for r in manifest.candidates if r.status == "ok"]
    assert chosen.name == min(ok, key=lambda r: r.latency_ms["1"]).name
    assert all(AccuracyGate().failures(r.accuracy) == [] for r in ok)
    assert chosen.artifact == records[chosen.name].artifact and len(chosen.sha256) == 64
    assert manifest.cpu["flags"] == sorted(set(manifest.cpu["flags_checked"]) & cpu_flags())
    report = (folder / "tune.md").read_text()
    assert all(f"| {name} |" in report for name in records) and f"chosen: {chosen.name}" in report
    assert result.plot_path is not None and result.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_an_unavailable_candidate_is_listed_with_its_reason(tuned):
    no_bf16 = {c.name: c.reason for c in candidate_list(frozenset({"avx2"}), onnxruntime=True, openvino=True)}
    assert "avx512_bf16" in no_bf16["openvino-bf16"] and "avx512_bf16" in no_bf16["openvino-int8-bf16"]
    assert no_bf16["openvino-fp32"] is None and "fp8 kernel" in no_bf16["ort-fp8"]
    without = {c.name: c.reason for c in candidate_list(frozenset({"avx512_bf16"}), onnxruntime=True, openvino=False)}
    assert all("openvino is not installed" in without[n] for n in without if n.startswith("openvino"))
    folder, _ = tuned
    fp8 = next(c for c in read_manifest(folder).candidates if c.name == "ort-fp8")
    assert fp8.status == "unavailable" and f"- `ort-fp8` (unavailable): {fp8.reason}" in (folder / "tune.md").read_text()


def _record(name: str, p50: float, cosine: float = 1.0, top1: float = 1.0, drop: float | None = None):
    accuracy = ({"kind": "labelled", "top1_drop_points": drop, "images": 100} if drop is not None else
                {"kind": "agreement", "cosine": cosine, "top1_agreement": top1, "images": 4})
    return Candidate(name, "onnxruntime", "int8", "int8", name, "ok", latency_ms={"1": p50}, accuracy=accuracy)


def test_the_selection_rule_drops_an_inaccurate_fastest_candidate():
    records = [_record("fp32", 10.0), _record("int8", 4.0, cosine=0.998), _record("bf16", 6.0, cosine=0.9995),
               _record("int8-7bit", 5.0, cosine=0.9999, top1=0.75)]
    selection = select(records, AccuracyGate())
    assert selection.chosen == "bf16" and selection.ranking == ["bf16", "fp32"]
    assert "worst cosine 0.99800" in selection.dropped["int8"] and "top-1 agreement 0.750" in selection.dropped["int8-7bit"]
    looser = select(records, AccuracyGate(min_cosine=0.99, min_top1_agreement=0.5))
    assert looser.chosen == "int8" and not looser.dropped
    labelled = [_record("fp32", 10.0, drop=0.0), _record("int8", 4.0, drop=0.8), _record("int8-7bit", 5.0, drop=0.3)]
    picked = select(labelled, AccuracyGate(max_drop_points=0.5))
    assert picked.chosen == "int8-7bit" and "drops 0.80 points" in picked.dropped["int8"]
    assert select([_record("int8", 4.0, cosine=float("nan"))], AccuracyGate()).chosen is None


def test_gate_parsing():
    assert AccuracyGate.parse("0.25") == AccuracyGate(max_drop_points=0.25)
    assert AccuracyGate.parse("cosine=0.99, top1=0.9") == AccuracyGate(min_cosine=0.99, min_top1_agreement=0.9)
    for bad in ("cos=0.9", "cosine=high", "", "points=-1"):
        with pytest.raises(ValueError):
            AccuracyGate.parse(bad)


def test_runtimes_load_of_the_folder_follows_the_manifest(tuned, tmp_path):
    import vitdeploy.runtimes as runtimes

    source, _ = tuned
    folder = tmp_path / "copy"
    shutil.copytree(source, folder)
    manifest = read_manifest(folder)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with runtimes.load(folder) as runtime:
        assert type(runtime).__name__ == {"onnxruntime": "OrtRuntime", "openvino": "OpenVINORuntime"}[
            manifest.chosen.backend]
        assert runtime.path == folder / manifest.chosen.artifact
        with runtimes.load(folder / manifest.chosen.artifact, backend=manifest.chosen.backend,
                           **manifest.chosen.options) as direct:
            np.testing.assert_array_equal(runtime(pixels), direct(pixels))
    assert runtimes.runtime_kind(folder) == "tuned"

    # Point the manifest at another candidate: load follows it, precision hint included.
    data = json.loads((folder / "tune.json").read_text())
    other = next(c for c in data["candidates"] if c["status"] in ("ok", "dropped") and c["backend"] != data["chosen"]["backend"])
    from vitdeploy.files import sha256_file

    data["chosen"] = {"name": other["name"], "backend": other["backend"], "artifact": other["artifact"],
                      "sha256": sha256_file(folder / other["artifact"]), "options": other["options"], "why": "test"}
    (folder / "tune.json").write_text(json.dumps(data))
    with runtimes.load(folder) as runtime:
        assert runtime.path == folder / other["artifact"]
        if other["backend"] == "openvino":
            assert runtime.inference_precision == other["options"]["inference_precision"]
    with pytest.raises(ValueError, match="was tuned to run"):
        runtimes.load(folder, backend="onnxruntime" if other["backend"] == "openvino" else "openvino")

    # A CPU other than the tuned one is told to tune again; a changed artifact is refused.
    data["cpu"]["flags"] = ["not-a-flag-here"]
    (folder / "tune.json").write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="run `vitdeploy tune` again"), runtimes.load(folder):
        pass
    with open(folder / other["artifact"], "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(TuneManifestError, match="changed since"):
        runtimes.load(folder)
    (folder / "tune.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(TuneManifestError, match="version 99"):
        runtimes.load(folder)


def test_a_version_1_manifest_reads_with_empty_spread_and_stability():
    """The committed results were tuned before version 2: they still read (and plot), the new fields empty."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tune" / "vit_small_patch16_224"
    assert json.loads((path / "tune.json").read_text())["version"] == 1
    manifest = read_manifest(path)
    assert manifest.chosen.name == "ort-int8" and manifest.stability is None
    assert all(c.latency_spread == {} and c.unstable == {} for c in manifest.candidates)
    assert manifest.to_dict()["version"] == 2


def test_a_strict_gate_drops_real_candidates_and_labelled_accuracy(tuned, model, tmp_path):
    """A second, short run on the same folder: only two candidates, labelled digits, a gate int8 cannot meet."""
    from digits import write_image_folder

    from vitdeploy.parity import accuracy
    from vitdeploy.preprocessing import preprocess_batch

    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    labelled = write_image_folder(tmp_path / "digits", limit=20)
    plan = TunePlan(folder=folder, batches=(1,), rounds=1, iterations=1, warmup=0, threads=1, throughput=False,
                    labelled=str(labelled), gate=AccuracyGate(max_drop_points=0.0), only=("ort-fp32", "ort-int8"))
    manifest = tune(plan, reference_model=model).manifest
    records = {c.name: c for c in manifest.candidates}
    assert (records["openvino-fp32"].status, records["openvino-fp32"].reason) == ("skipped", "not asked for (--candidates)")
    fp32, int8 = records["ort-fp32"].accuracy, records["ort-int8"].accuracy
    files = sorted(labelled.rglob("*.png"))
    labels = [int(f.parent.name) for f in files]
    import torch

    from vitdeploy.metadata import read_onnx_metadata

    pre = read_onnx_metadata(folder / "tiny-fp32.onnx").preprocessing
    with torch.inference_mode():
        eager = model(torch.from_numpy(preprocess_batch(files, pre))).numpy()
    assert fp32["kind"] == "labelled" and fp32["images"] == 20
    assert fp32["reference_top1"] == pytest.approx(accuracy(eager, labels).top1)
    assert fp32["top1_drop_points"] == pytest.approx(100 * (fp32["reference_top1"] - fp32["top1"]))
    assert (records["ort-int8"].status == "dropped") == (int8["top1_drop_points"] > 0.0)
    assert manifest.chosen is not None and records[manifest.chosen.name].status == "ok"


def test_cli_tune_and_predict_follow_the_folder(tuned, monkeypatch, capsys, tmp_path):
    import vitdeploy.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", ["tune", "predict"])
    folder, _ = tuned
    assert cli.main(["tune", str(tmp_path / "nothing-here")]) == 2
    assert "give -o OUT" in capsys.readouterr().err
    assert cli.main(["tune", str(folder), "--max-accuracy-drop", "0.5"]) == 2  # points without --labelled
    assert "--labelled" in capsys.readouterr().err
    assert cli.main(["predict", str(folder), str(tmp_path / "missing.jpg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from vitdeploy.preprocessing import bundled_images

    out = tmp_path / "predictions.json"
    assert cli.main(["predict", str(folder), str(bundled_images()[0]), "--top-k", "3", "--json", str(out)]) == 0
    chosen = read_manifest(folder).chosen
    written = json.loads(out.read_text())
    assert written["runtime"] == f"tuned: {chosen.backend}" and len(written["predictions"][0]["top_k"]) == 3


def test_the_nncf_peer_is_timed_beside_the_candidates(tuned, model, tmp_path):
    """--compare-nncf: OpenVINO + NNCF int8 of the same fp32 file, in the same rounds (skipped without nncf)."""
    pytest.importorskip("nncf")
    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    plan = TunePlan(folder=folder, batches=(1, 2), rounds=1, iterations=1, warmup=0, threads=1, throughput=False,
                    calibration_size=4, peer=True, only=("ort-fp32",))
    manifest = tune(plan, reference_model=model).manifest
    peer, chosen = manifest.peer, next(c for c in manifest.candidates if c.name == manifest.chosen.name)
    assert peer["accuracy"]["kind"] == "agreement" and peer["accuracy"]["cosine"] > 0.99
    assert set(peer["latency_ms"]) == {"1", "2"} and peer["calibration"]["count"] == 4
    for batch, ratio in peer["chosen_vs_peer"].items():
        assert ratio == pytest.approx(chosen.latency_ms[batch] / peer["latency_ms"][batch])
    assert "(peer) | peer |" in (folder / "tune.md").read_text()


def test_without_a_model_the_log_and_the_gates_name_the_same_reference(tuned, tmp_path):
    """Tune on a folder alone judges against the fp32 graph: the log, the gate rule and every drop reason say
    so (none says "eager fp32"), and each candidate and each interleaved round gets its own progress line."""
    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    messages: list[str] = []
    plan = TunePlan(folder=folder, batches=(1,), rounds=2, iterations=1, warmup=0, threads=1, throughput=False,
                    gate=AccuracyGate(min_cosine=0.99999), only=("ort-fp32", "ort-int8"))
    manifest = tune(plan, log=messages.append).manifest
    reference = "tiny-fp32.onnx (fp32 graph on onnxruntime)"
    assert messages[0].startswith(f"accuracy reference of every gate: {reference}, itself validated against eager "
                                  f"fp32 at export; gate: worst cosine >= 0.99999 and top-1 agreement >= 0.99 vs "
                                  f"{reference}")
    assert manifest.gate["rule"].endswith(f"vs {reference}") and manifest.reference.startswith(reference)
    dropped = [c for c in manifest.candidates if c.status == "dropped"]
    assert dropped and all(f"vs {reference}" in c.reason for c in dropped)
    assert not any("eager fp32" in m for m in messages if not m.startswith("accuracy reference"))
    for name in ("ort-fp32", "ort-int8"):
        assert any(m.startswith(f"  {name}: worst cosine ") and m.endswith(f"vs {reference}") for m in messages)
    rounds = [m for m in messages if m.startswith("  batch 1, round ")]
    assert [m.split(":")[0] for m in rounds] == ["  batch 1, round 1/2", "  batch 1, round 2/2"]
    assert all("ort-fp32 " in m and "ort-int8 " in m and m.endswith(" ms") for m in rounds)


class FlippingRuntime:
    """A real onnxruntime session padded with real sleeps: ``fast_s`` before every call, or ``slow_s``
    in every other period of ``period`` calls (a round's block is one untimed call + the iterations),
    like a shared VM whose speed flips while neighbours come and go. No timer is mocked."""

    def __init__(self, runtime, fast_s: float, slow_s: float | None = None, period: int = 1) -> None:
        self.runtime, self.fast_s, self.slow_s, self.period, self.calls = runtime, fast_s, slow_s, period, 0

    def __call__(self, pixels):
        import time

        slow = self.slow_s is not None and (self.calls // self.period) % 2 == 1
        self.calls += 1
        time.sleep(self.slow_s if slow else self.fast_s)
        return self.runtime(pixels)

    def close(self) -> None:
        self.runtime.close()


def test_an_unstable_candidate_is_flagged_and_a_steady_one_with_a_close_median_is_chosen(tuned, model):
    """Two real sessions timed side by side: one flips between 40 and 120 ms per round (fastest median),
    the other holds 48 ms; the flipping one is flagged and the steady one chosen, with the figures."""
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.runtimes import OrtRuntime
    from vitdeploy.tune.accuracy import accuracy_data, eager_reference
    from vitdeploy.tune.report import render_markdown
    from vitdeploy.tune.timing import time_latency
    from vitdeploy.tune_manifest import TuneManifest

    folder, _ = tuned
    records = {c.name: c for c in candidate_list(cpu_flags()) if c.name in ("ort-int8", "ort-fp32")}
    iterations = 2
    runtimes = {"ort-int8": FlippingRuntime(OrtRuntime(folder / "tiny-int8.onnx", intra_op_threads=1), 0.040, 0.120,
                                            period=1 + iterations),
                "ort-fp32": FlippingRuntime(OrtRuntime(folder / "tiny-fp32.onnx", intra_op_threads=1), 0.048)}
    metadata = read_onnx_metadata(folder / "tiny-fp32.onnx")
    data = accuracy_data(eager_reference(model), metadata, 4, 32)
    for name, runtime in runtimes.items():
        records[name].accuracy = data.figures(runtime.runtime)
    rule = StabilityRule(close_margin=0.3)
    plan = TunePlan(folder=folder, batches=(1,), rounds=7, iterations=iterations, warmup=0, threads=1,
                    throughput=False, stability=rule)
    said = []
    try:
        time_latency(plan, records, runtimes, None, 32, said.append)
    finally:
        for runtime in runtimes.values():
            runtime.close()

    flipping, steady = records["ort-int8"], records["ort-fp32"]
    rounds = flipping.latency_rounds_ms["1"]
    assert sum(v > 100 for v in rounds) == 3 and sum(v < 70 for v in rounds) == 4, rounds  # really two speeds
    assert flipping.latency_spread["1"]["median"] == pytest.approx(float(np.median(rounds)))
    assert flipping.latency_spread["1"]["p75"] > 100 > 70 > flipping.latency_spread["1"]["p25"]
    modes = re.fullmatch(r"two modes: 4 of 7 rounds at ~([\d.]+) ms, 3 at ~([\d.]+) ms", flipping.unstable["1"])
    assert modes and float(modes[1]) < 70 and float(modes[2]) > 100, flipping.unstable["1"]
    assert any(line.startswith("ort-int8 is unstable at batch 1: two modes") for line in said)
    assert steady.unstable == {} and steady.latency_spread["1"]["iqr_over_median"] < rule.spread_limit
    assert flipping.latency_ms["1"] < steady.latency_ms["1"] <= flipping.latency_ms["1"] * (1 + rule.close_margin)

    # Without the rule the fastest median wins; with it the steady candidate, and the decision keeps the figures.
    assert select(list(records.values()), AccuracyGate(0.5, 0.99, 0.9)).chosen == "ort-int8"
    selection = select(list(records.values()), AccuracyGate(0.5, 0.99, 0.9), stability=rule)
    assert selection.chosen == "ort-fp32" and selection.ranking == ["ort-int8", "ort-fp32"]
    decision = selection.steadiness
    assert decision["preferred"] == "ort-fp32" and decision["fastest"] == "ort-int8"
    assert decision["figures"]["ort-int8"]["spread"] == flipping.latency_spread["1"]
    assert decision["figures"]["ort-fp32"]["slower_than_fastest"] == pytest.approx(
        steady.latency_ms["1"] / flipping.latency_ms["1"] - 1, abs=1e-4)
    # A steady candidate beyond the margin does not displace the fastest one: it is kept, and the doubt recorded.
    narrow = select(list(records.values()), AccuracyGate(0.5, 0.99, 0.9), stability=StabilityRule(close_margin=0.01))
    assert narrow.chosen == "ort-int8" and narrow.steadiness["preferred"] is None

    # The manifest and tune.md carry the flag, the spread and the decision.
    manifest = TuneManifest(chosen=None, candidates=list(records.values()), cpu={"model": "x", "usable_cpus": 1,
                            "threads": 1, "flags": []}, gate={"rule": "r", "accuracy_on": "photos"}, objective="latency",
                            batches=[1], rounds=7, reference="eager", stability={**rule.to_dict(), "decision": decision})
    again = TuneManifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert {c.name: c.unstable for c in again.candidates} == {"ort-fp32": {}, "ort-int8": flipping.unstable}
    assert again.stability["decision"]["preferred"] == "ort-fp32"
    report = render_markdown(again)
    spread = flipping.latency_spread["1"]
    assert f"{flipping.latency_ms['1']:.3f} [{spread['p25']:.3f}-{spread['p75']:.3f}]" in report
    assert "| UNSTABLE (b1) |" in report and "| steady |" in report
    assert f"- `ort-int8` at batch 1: {flipping.unstable['1']}" in report and decision["why"] in report


def test_the_stability_rule_on_plain_figures():
    rule = StabilityRule()
    assert rule.judge([20.0, 20.4, 19.9, 20.2, 20.1]) is None
    assert rule.judge([20.0, 41.0]) is None  # two rounds cannot tell
    assert "IQR" in rule.judge([20.0, 24.0, 28.0, 32.0, 36.0])  # wide but not two modes
    assert rule.judge([20.5, 41.9, 20.4, 42.0, 20.6]).startswith("two modes: 3 of 5 rounds at ~20.5 ms, 2 at ~41.95")
    with pytest.raises(ValueError):
        StabilityRule(mode_ratio=1.0)


@pytest.mark.parametrize("argv, expected", [([], (1,)), (["--batch", "1"], (1,))])
def test_the_default_batches_stay_inside_a_batch_one_folder(monkeypatch, tmp_path, argv, expected):
    """An export folder validated at batch 1 only: tune's default batches (1, 8) become (1), not an error
    about batch 8 that nobody asked for; --batch 1,8 given is still refused, naming the range."""
    import types

    from onnx_artifacts import validated_tiny_export

    import vitdeploy.cli as cli
    import vitdeploy.tune as tune_package
    import vitdeploy.tune.report as tune_report

    folder = tmp_path / "one"
    folder.mkdir()
    validated_tiny_export(folder, batch=(1, 1), validation_max_batch=1)
    plans = []
    monkeypatch.setattr(tune_package, "tune", lambda plan, **_: plans.append(plan) or types.SimpleNamespace(
        manifest=types.SimpleNamespace(chosen="measured elsewhere")))
    monkeypatch.setattr(tune_report, "terminal_table", lambda manifest: "")
    assert cli.main(["tune", str(folder), *argv]) == 0
    assert plans[0].batches == expected
    monkeypatch.undo()
    assert cli.main(["tune", str(folder), "--batch", "1,8"]) == 2
