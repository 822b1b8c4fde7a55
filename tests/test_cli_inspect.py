"""`vitdeploy inspect` end to end through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_model, tiny_config

from vitdeploy.cli import main


def test_inspect_variant_prints_counts_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    assert main(["inspect", "vit_large_patch16_224", "--resolution", "224,384", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "304,326,632" in text and "paper Table 1: ViT-L 307M" in text
    report = json.loads(out.read_text())
    assert report["parameters"] == 304_326_632
    assert [s["sequence_length"] for s in report["sizes"]] == [197, 577]
    assert report["sizes"][1]["grid"] == [24, 24]


def test_inspect_checkpoint(tmp_path, capsys) -> None:
    from vitdeploy.checkpoints import save_model

    model = make_model(tiny_config())
    save_model(model, tmp_path / "tiny")
    assert main(["inspect", str(tmp_path / "tiny"), "--resolution", "32,64"]) == 0
    text = capsys.readouterr().out
    assert f"{model.num_parameters():,}" in text and "8x8" in text


def test_inspect_bad_input_is_one_line_and_nonzero() -> None:
    for args in (["inspect", "vit_nope"], ["inspect", "vit_base_patch16_224", "--resolution", "200"]):
        proc = subprocess.run([sys.executable, "-m", "vitdeploy", *args], capture_output=True, text=True)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vitdeploy inspect: error:")
