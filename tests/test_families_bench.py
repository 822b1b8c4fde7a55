"""The family benchmark (``python studies/families_vs_timm.py``): its ratios and verdict, and one
real run on a one-block DeiT III (a real timm model, vitdeploy's real exports, one round) for the JSON
it writes. Timing figures from here mean nothing (tiny, one call); the shape and the logic do."""

from __future__ import annotations

import json

import families_vs_timm as families
import pytest
from families_vs_timm import CONTENDERS, EAGER, FP32, INT8, summarize
from timm_without_torchvision import TIMM_MISSING, import_timm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("fp32_rounds, no_slower", [([9.0, 11.0, 10.0], True), ([21.0, 19.0, 20.5], False)])
def test_summary_takes_the_median_of_the_rounds_and_the_ratio_to_eager_timm(fp32_rounds, no_slower):
    summary = summarize({EAGER: [20.0, 18.0, 40.0], FP32: fp32_rounds, INT8: [5.0, 6.0, 7.0]})
    fp32 = sorted(fp32_rounds)[1]
    assert summary["p50_ms"] == {EAGER: 20.0, FP32: fp32, INT8: 6.0}
    assert summary["fp32_graph_vs_eager"] == round(fp32 / 20.0, 4) and summary["int8_graph_vs_eager"] == 0.3
    assert summary["fp32_graph_no_slower_than_eager"] is no_slower
    assert summary["p50_ms_rounds"][FP32] == fp32_rounds


def test_summary_refuses_a_contender_without_timings():
    with pytest.raises(ValueError, match="no timings for"):
        summarize({EAGER: [1.0], FP32: [1.0], INT8: []})


@pytest.mark.parametrize("argv, message", [(["--models", ","], "names no model"), (["--rounds", "0"], "--rounds")])
def test_bad_arguments_are_one_argparse_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        families.parse_args(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(import_timm() is None, reason=TIMM_MISSING)
def test_an_unknown_model_is_one_line_before_any_work(tmp_path, capsys):
    assert families.main(["--models", "vit_small_patch16_224,vit_nonexistent_patch16_224",
                          "--output", str(tmp_path / "f.json")]) == 2
    assert capsys.readouterr().err.strip() == ("python studies/families_vs_timm.py: error: --models "
                                               "vit_nonexistent_patch16_224: not timm model names (timm.list_models() "
                                               "has them)")
    assert not (tmp_path / "f.json").exists()


@pytest.mark.skipif(import_timm() is None, reason=TIMM_MISSING)
def test_a_run_writes_each_contender_the_ratios_and_the_machine(tmp_path, capsys):
    output = tmp_path / "families.json"
    argv = ["--models", "deit3_small_patch16_224", "--depth", "1", "--rounds", "1", "--iterations", "1",
            "--warmup", "0", "--threads", "1", "--output", str(output)]
    assert families.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["command"].endswith(" ".join(argv)) and report["timm_version"]
    assert report["environment"]["cpu"]["model"] and "arithmetic_flags" in report["environment"]["cpu"]
    (row,) = report["results"]
    assert (row["model"], row["depth"], row["batch"], row["height"], row["output"]) == (
        "deit3_small_patch16_224", 1, 1, 224, "logits")
    assert set(row["p50_ms"]) == set(CONTENDERS) and all(len(v) == 1 for v in row["p50_ms_rounds"].values())
    assert row["fp32_graph_vs_eager"] == pytest.approx(row["p50_ms"][FP32] / row["p50_ms"][EAGER], rel=1e-3)
    assert row["fp32_graph_no_slower_than_eager"] == (row["p50_ms"][FP32] <= row["p50_ms"][EAGER])
    assert report["fp32_graph_no_slower_than_eager_everywhere"] == row["fp32_graph_no_slower_than_eager"]
    # the same weights in every contender: the fp32 graph gives timm's logits, the int8 one close to them
    assert row["accuracy_vs_eager"][FP32]["rel_max_error"] <= 1e-4
    assert row["accuracy_vs_eager"][INT8]["cosine"] >= 0.99
    assert row["graphs"][FP32].endswith("-fp32.cpu.onnx")  # what OrtRuntime runs on a CPU
    assert isinstance(row["int8_reduce_range"], bool) and "other_processes_cpus" in row
    assert "fp32 graph no slower than eager timm" in capsys.readouterr().out
