"""`vitdeploy tune` judges every output of an artifact by its kind, with real onnxruntime sessions.

A tiny headless ViT is exported with ``pooler_output`` and ``patch_tokens``. Tuned as exported, its fp32
candidate passes on both outputs. Then the real ONNX file is edited so that one patch token of every image
is shifted by a fixed vector, leaving the pooled vector untouched: tune must drop that candidate for its
patch tokens (per token, the precision's gate), while its pooled figure alone would have passed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_model, tiny_config

from vitdeploy.parity import TOLERANCES
from vitdeploy.tune import TunePlan, tune
from vitdeploy.tune.accuracy import AccuracyGate
from vitdeploy.tune_manifest import TuneManifest, read_manifest

OUTPUTS = ("pooler_output", "patch_tokens")
BAD_TOKEN = 3  # the patch token the edited graph shifts, in every image
PLAN = dict(batches=(1,), rounds=1, iterations=1, warmup=0, threads=1, throughput=False, only=("ort-fp32",))


@pytest.fixture(scope="module")
def model():
    # tests/test_outputs_export.py's headless backbone, exported with the same outputs: one trace serves both
    return make_model(tiny_config(num_classes=0, hidden_size=32, depth=1, num_heads=2, mlp_size=64), seed=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    """fp32 (with its validated onnxruntime-CPU variant), outputs pooler_output and patch_tokens."""
    from vitdeploy.exporters.artifact_set import ArtifactSetPlan, build_artifact

    folder = tmp_path_factory.mktemp("outputs")
    plan = ArtifactSetPlan("tiny", graphs=("fp32",), batch=(1, 4), validation_max_batch=4, outputs=OUTPUTS)
    build_artifact(model, plan, "fp32", folder)
    return folder


def _shift(vector_size: int) -> np.ndarray:
    return (0.5 * np.random.default_rng(7).standard_normal(vector_size)).astype(np.float32)


def _edit_patch_tokens(path, shift: np.ndarray) -> None:
    """Rewrite the ONNX file so ``patch_tokens[:, BAD_TOKEN]`` gets ``shift`` added; every other output,
    the metadata and the rest of the graph stay as they are."""
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    producer = next(node for node in graph.node if "patch_tokens" in node.output)
    producer.output[list(producer.output).index("patch_tokens")] = "patch_tokens_clean"

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)

    graph.initializer.extend([const("edit_0", [0]), const("edit_k", [BAD_TOKEN]), const("edit_k1", [BAD_TOKEN + 1]),
                              const("edit_end", [np.iinfo(np.int64).max]), const("edit_axis", [1]),
                              numpy_helper.from_array(shift, "edit_shift")])
    graph.node.extend([
        helper.make_node("Slice", ["patch_tokens_clean", "edit_0", "edit_k", "edit_axis"], ["edit_head"]),
        helper.make_node("Slice", ["patch_tokens_clean", "edit_k", "edit_k1", "edit_axis"], ["edit_token"]),
        helper.make_node("Slice", ["patch_tokens_clean", "edit_k1", "edit_end", "edit_axis"], ["edit_tail"]),
        helper.make_node("Add", ["edit_token", "edit_shift"], ["edit_shifted"]),
        helper.make_node("Concat", ["edit_head", "edit_shifted", "edit_tail"], ["patch_tokens"], axis=1),
    ])
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_every_output_is_measured_and_a_faithful_candidate_passes(exported, model, tmp_path):
    folder = shutil.copytree(exported, tmp_path / "good")
    messages: list[str] = []
    manifest = tune(TunePlan(folder=folder, **PLAN), reference_model=model, log=messages.append).manifest
    fp32 = next(c for c in manifest.candidates if c.name == "ort-fp32")
    assert fp32.status == "ok" and manifest.chosen.name == "ort-fp32"
    outputs = fp32.accuracy["outputs"]
    assert list(outputs) == list(OUTPUTS) and fp32.accuracy["primary"] == "pooler_output"
    assert outputs["pooler_output"]["kind"] == "vector" and outputs["patch_tokens"]["kind"] == "tokens"
    tokens = outputs["patch_tokens"]
    assert tokens["num_tokens"] == 4 * 16 and tokens["token_cosine_min"] > 0.99999  # 4 photos x 16 patches
    assert tokens["token_share_below"] == 0.0 and tokens["failures"] == []
    # The thresholds come from the fp32 parity gate, not a table of tune's own.
    fp32_gate = TOLERANCES["fp32"]
    assert tokens["gate"] == {"tolerance": "fp32", "min_token_cosine": fp32_gate.min_token_cosine,
                              "token_floor": fp32_gate.token_floor, "max_share_below": fp32_gate.max_share_below}
    assert tokens["token_floor"] == fp32_gate.token_floor
    assert manifest.gate["outputs"] == {"pooler_output": "vector", "patch_tokens": "tokens"}
    assert manifest.gate["token_gates"]["fp32"] == tokens["gate"]
    assert "token outputs per token" in manifest.gate["rule"] and manifest.gate["rule"].endswith("vs eager fp32")
    assert any(m.startswith("    patch_tokens (tokens): worst token cos ") and m.endswith("within the gate")
               for m in messages)
    report = (folder / "tune.md").read_text()
    assert "| ort-fp32 | patch_tokens | tokens | worst token cos " in report and "| pass |" in report


def test_a_candidate_with_bad_patch_tokens_and_a_fine_pooled_vector_is_dropped(exported, model, tmp_path):
    """The edited file runs on onnxruntime (its CPU variant removed, so the runtime opens the file itself)."""
    import torch

    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.parity import InputFactory

    folder = shutil.copytree(exported, tmp_path / "edited")
    (folder / "tiny-fp32.cpu.onnx").unlink()
    shift = _shift(model.config.hidden_size)
    _edit_patch_tokens(folder / "tiny-fp32.onnx", shift)
    messages: list[str] = []
    manifest = tune(TunePlan(folder=folder, **PLAN), reference_model=model, log=messages.append).manifest
    fp32 = next(c for c in manifest.candidates if c.name == "ort-fp32")
    assert fp32.status == "dropped" and manifest.chosen is None

    # The pooled vector is fine: judged on it alone (as tune judged before), the candidate would pass.
    pooled = fp32.accuracy["outputs"]["pooler_output"]
    assert pooled["cosine"] > 0.99999 and pooled["failures"] == [] and fp32.accuracy["cosine"] == pooled["cosine"]

    # The patch tokens are not, and the figure is the real one: eager tokens against eager tokens + the shift.
    metadata = read_onnx_metadata(folder / "tiny-fp32.onnx")
    pixels = InputFactory(metadata.preprocessing, synthetic=False).batch(4, 32, 32)[0]
    with torch.inference_mode():
        eager = model.forward_outputs(torch.from_numpy(pixels), ["patch_tokens"])["patch_tokens"].numpy()
    edited = eager.copy()
    edited[:, BAD_TOKEN] += shift
    expected = _cosines(eager, edited)
    tokens = fp32.accuracy["outputs"]["patch_tokens"]
    assert tokens["token_cosine_min"] == pytest.approx(expected.min(), abs=1e-4) and expected.min() < 0.99
    assert tokens["token_share_below"] == pytest.approx(4 / 64)  # one token of 16 in each of the 4 photos
    assert tokens["token_cosine_p1"] < tokens["gate"]["min_token_cosine"]

    # The reason names the output, its kind and the per-token figures against the fp32 gate.
    worst = f"patch_tokens (tokens): worst token cosine {tokens['token_cosine_min']:.4f} < 0.9999 over 64 tokens"
    share = "patch_tokens (tokens): 6.25 % of tokens have cosine < 0.9999, more than the 0 % allowed"
    assert worst in fp32.reason and share in fp32.reason and "pooler_output" not in fp32.reason
    assert fp32.reason.count("vs eager fp32 on 4 photos (gate fp32)") == 2
    assert any(m.startswith("    patch_tokens (tokens): worst token cos ") and
               f"OUTSIDE the gate: worst token cosine {tokens['token_cosine_min']:.4f} < 0.9999" in m for m in messages)
    report = (folder / "tune.md").read_text()
    assert f"- `ort-fp32` (dropped): {fp32.reason}" in report
    assert "| ort-fp32 | pooler_output | vector | worst cos " in report and "| pass |" in report
    assert f"| ort-fp32 | patch_tokens | tokens | worst token cos {tokens['token_cosine_min']:.4f}" in report
    assert f"| worst token cosine {tokens['token_cosine_min']:.4f} < 0.9999 over 64 tokens" in report

    # The manifest keeps the per-output figures through a write and a read (version 2, fields added within).
    again = read_manifest(folder)
    assert json.loads((folder / "tune.json").read_text())["version"] == 2
    assert again.to_dict() == TuneManifest.from_dict(again.to_dict()).to_dict()
    assert next(c for c in again.candidates if c.name == "ort-fp32").accuracy["outputs"]["patch_tokens"] == tokens

    # A looser per-token gate (--max-accuracy-drop token=...,share=...) lets it through, with the same figures.
    loose = AccuracyGate.parse(f"token={expected.min() - 0.01:.4f},share=0.1")
    assert loose.failures(fp32.accuracy) == [] and AccuracyGate().failures(fp32.accuracy) != []


def test_gate_parsing_of_the_per_token_criterion():
    gate = AccuracyGate.parse("cosine=0.99,token=0.95,share=0.02")
    assert (gate.min_cosine, gate.min_token_cosine, gate.max_token_share) == (0.99, 0.95, 0.02)
    assert gate.token_gate("int8") == {"tolerance": "int8_vs_fp32", "min_token_cosine": 0.95,
                                       "token_floor": TOLERANCES["int8_vs_fp32"].token_floor, "max_share_below": 0.02}
    default = AccuracyGate().token_gate("bf16")
    assert default["tolerance"] == "bf16_vs_fp32" and default["min_token_cosine"] == TOLERANCES["bf16_vs_fp32"].min_token_cosine
    for bad in ("token=1.5", "share=-0.1", "token=x"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            AccuracyGate.parse(bad)
    assert AccuracyGate.parse("0.25") == AccuracyGate(max_drop_points=0.25)  # what it parsed before, unchanged


def test_labelled_figures_judge_the_logits_by_top1_drop_and_the_tokens_per_token():
    """The figures' assembly on plain arrays: labelled logits by the top-1 drop, last_hidden_state per token
    with the int8 gate (worst token, share below its floor), each failure naming its output."""
    from vitdeploy.tune.accuracy import AccuracyData

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    tokens = rng.standard_normal((6, 10, 8)).astype(np.float32)
    labels = logits.argmax(1)
    data = AccuracyData("labelled", [np.zeros((6, 3, 4, 4), np.float32)],
                        {"logits": logits, "last_hidden_state": tokens}, "logits", labels, "6 labelled images")
    bad = tokens.copy()
    bad[2, 4] = -bad[2, 4]  # one token of 60 reversed: cosine -1
    figures = data.figures(lambda pixels: {"logits": logits, "last_hidden_state": bad}, "int8", AccuracyGate())
    assert figures["top1_drop_points"] == 0.0 and figures["outputs"]["logits"]["failures"] == []
    entry = figures["outputs"]["last_hidden_state"]
    assert entry["token_cosine_min"] == pytest.approx(-1.0) and entry["token_share_below"] == pytest.approx(1 / 60)
    assert entry["gate"]["tolerance"] == "int8_vs_fp32" and entry["token_floor"] == TOLERANCES["int8_vs_fp32"].token_floor
    assert AccuracyGate().failures(figures) == [
        "last_hidden_state (tokens): worst token cosine -1.0000 < 0.97 over 60 tokens vs eager fp32 on 6 labelled "
        "images (gate int8_vs_fp32)"]  # 1 of 60 below the floor is within the 10 % the int8 gate allows
    assert AccuracyGate(max_token_share=0.0).failures(figures)[1].startswith(
        "last_hidden_state (tokens): 1.67 % of tokens have cosine < 0.99, more than the 0 % allowed")
    with pytest.raises(ValueError, match="no last_hidden_state output"):
        data.figures(lambda pixels: {"logits": logits}, "int8")
