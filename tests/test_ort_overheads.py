"""The side-by-side benchmark behind the 0.8x target, run small: its rows, parity and verdicts."""

from __future__ import annotations

import json

import ort_overheads
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def test_small_run_reports_every_row_with_parity_and_both_targets(tmp_path, capsys):
    output = tmp_path / "overheads.json"
    assert ort_overheads.main(["--model", "vit_tiny_patch16_224", "--depth", "2", "--size", "112", "--rounds", "2",
                               "--iterations", "2", "--warmup", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    rows = {row["runtime"]: row for row in report["results"]}
    assert len(rows) == 6 and rows["torch eager fp32"]["vs_eager"] == 1.0
    for name, row in rows.items():
        assert len(row["p50_ms_rounds"]) == 2 and row["p50_ms_median"] > 0
        if name != "torch eager fp32":
            assert row["rel_max_error_vs_eager"] <= 1e-4, name
    setup = report["setup"]
    assert setup["graph_optimizations"] == ["class_token_last_block"]
    assert setup["depth"] == 2
    assert setup["fusions"] == {"attention": 1, "gelu": 2}  # the class-token block keeps its attention
    wrapped = rows["onnxruntime, contrib-fused (OrtRuntime.__call__)"]["p50_ms_median"]
    ratio = report["targets"]["onnxruntime_vs_eager"]
    # Both sides are rounded (the ratio to 4 places, the p50s to 3 in ms): equal within what that rounding allows,
    # which for sub-millisecond p50s is more than a fixed relative tolerance.
    eager = rows["torch eager fp32"]["p50_ms_median"]
    rounding = 0.5e-4 + (wrapped / eager) * (0.5e-3 / wrapped + 0.5e-3 / eager)
    assert ratio["measured"] == pytest.approx(wrapped / eager, abs=rounding)
    assert ratio["met"] == (ratio["measured"] <= 0.8)
    assert "OrtRuntime vs eager" in capsys.readouterr().out
