"""`vitdeploy inspect` end to end through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_inspect_tells_the_validated_range_from_the_declared_one(tmp_path, capsys) -> None:
    """Parity ran on batches up to 4 of a graph declared up to 64: inspect must not claim 1..64 was validated."""
    import shutil

    from onnx_artifacts import attach_metadata
    from trt_artifacts import tiny_onnx  # the session's exported tiny graph (shared with other tests)

    from vitdeploy.metadata import ShapeRange, read_onnx_metadata

    path = Path(shutil.copy(tiny_onnx(), tmp_path / "tiny.onnx"))
    metadata = read_onnx_metadata(path)
    metadata.shape_range = ShapeRange(batch=(1, 64), height=(16, 64), width=(16, 64))
    metadata.validation = {"passed": True, "shapes": [[1, 16, 16], [4, 40, 24], [1, 64, 16], [1, 64, 64]]}
    attach_metadata(path, metadata)
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--json", str(out)]) == 0
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
             if ":" in line}
    assert lines["validated"] == "batch 1..4, 16..64; parity passed"
    assert lines["declared"].startswith("batch 1..64, 16..64")
    report = json.loads(out.read_text())["artifact"]
    assert report["validated_range"] == {"batch": [1, 4], "height": [16, 64], "width": [16, 64]}
    assert report["shape_range"]["batch"] == [1, 64]

    metadata.validation = {"passed": None, "notes": ["export ran with validation disabled"]}
    unchecked = Path(shutil.copy(path, tmp_path / "unchecked.onnx"))
    attach_metadata(unchecked, metadata)
    assert main(["inspect", str(unchecked)]) == 0
    assert "validated    : not checked\n" in capsys.readouterr().out


def test_inspect_shows_the_preprocessing_runtimes_apply(tmp_path, capsys) -> None:
    """A variant's at its native size; an artifact's as its metadata records it (what predict, the runtimes
    and Triton's clients apply), whatever its config would give."""
    import dataclasses
    import shutil

    from onnx_artifacts import attach_metadata
    from trt_artifacts import tiny_onnx

    from vitdeploy.metadata import read_onnx_metadata

    assert main(["inspect", "eva02_base_patch14_448"]) == 0
    assert ("  preprocess   : resize both sides to 448 (bicubic), centre-crop 448, mean 0.481455/0.457827/0.408211, "
            "std 0.26863/0.261303/0.275777\n") in capsys.readouterr().out
    path = Path(shutil.copy(tiny_onnx(), tmp_path / "tiny.onnx"))
    metadata = read_onnx_metadata(path)
    metadata.preprocessing = dataclasses.replace(metadata.preprocessing, resize_size=40, resize_mode="squash",
                                                 interpolation="bilinear")
    attach_metadata(path, metadata)
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--json", str(out)]) == 0
    assert "preprocess   : resize both sides to 40 (bilinear), centre-crop 32" in capsys.readouterr().out
    assert json.loads(out.read_text())["preprocessing"]["resize_mode"] == "squash"


def test_inspect_names_the_backbone_of_each_hybrid(capsys) -> None:
    """R50+B/16 shows its three stages; AugReg's R+Ti/16 its stem alone, under a 7x7 grid at 224 (stride 32)."""
    assert main(["inspect", "vit_base_r50_s16_224", "--resolution", "224"]) == 0
    assert "backbone     : ResNet-v2 stages (3, 4, 9)" in capsys.readouterr().out
    assert main(["inspect", "vit_tiny_r_s16_p8_224", "--resolution", "224"]) == 0
    text = capsys.readouterr().out
    assert "backbone     : ResNet-v2 stem only (no stage)" in text and "7x7" in text
