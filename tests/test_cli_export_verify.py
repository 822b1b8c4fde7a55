"""`vitdeploy export` and `vitdeploy verify` end to end on small checkpoints."""

from __future__ import annotations

import argparse
import json

import onnx
import pytest
from conftest import make_model, tiny_config

from vitdeploy.checkpoints import save_model
from vitdeploy.cli import export as export_cli
from vitdeploy.cli import verify as verify_cli
from vitdeploy.cli.common import CLIError
from vitdeploy.metadata import ArtifactMetadata

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def cli(*argv: str) -> int:
    """Run one of the two commands through its own argparse registration."""
    parser = argparse.ArgumentParser(prog="vitdeploy")
    subparsers = parser.add_subparsers(dest="command", required=True)
    export_cli.register(subparsers)
    verify_cli.register(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    good = save_model(make_model(tiny_config(), seed=0), folder / "tiny.safetensors")
    other = save_model(make_model(tiny_config(), seed=1), folder / "other.safetensors")
    return good, other


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    output, report = folder / "tiny.onnx", folder / "export.json"
    status = cli("export", checkpoints[0], "-o", output, "--batch", "1:4", "--resolution", "16:48",
                 "--json", report)
    return status, output, json.loads(report.read_text())


def test_export_writes_a_validated_file_and_json(exported, checkpoints, capsys):
    status, output, report = exported
    assert status == 0 and output.is_file()
    assert report["passed"] is True and report["format"] == "native"
    assert report["validation"]["passed"] is True and len(report["validation"]["cases"]) >= 3
    assert set(report["stage_seconds"]) >= {"trace", "convert", "save", "validate"}
    metadata = ArtifactMetadata.from_props({p.key: p.value for p in onnx.load(str(output)).metadata_props})
    assert metadata.shape_range.batch == (1, 4) and metadata.shape_range.height == (16, 48)
    assert metadata.source == str(checkpoints[0]) and metadata.source_sha256 == report["sha256"]
    assert metadata.source_format == "native" and not metadata.random_weights
    assert metadata.validated_range.batch == (1, 4) and metadata.validated_range.height == (16, 48)
    assert metadata.optimizations == ["class_token_last_block"]


def test_full_last_block_flag_turns_the_class_token_pruning_off(checkpoints, tmp_path, capsys):
    output = tmp_path / "full.onnx"
    assert cli("export", checkpoints[0], "-o", output, "--batch", "1:2", "--resolution", "16:32",
               "--full-last-block", "--no-validate") == 0
    out = capsys.readouterr().out
    assert "class token" not in out
    assert "fp32; validated: not checked; declared: batch 1..2, 16..32)" in out  # --no-validate
    metadata = ArtifactMetadata.from_props({p.key: p.value for p in onnx.load(str(output)).metadata_props})
    assert metadata.optimizations == []


def test_verify_passes_against_the_source_checkpoint(exported, checkpoints, tmp_path, capsys):
    _, output, _ = exported
    report_path = tmp_path / "verify.json"
    status = cli("verify", output, "--reference", checkpoints[0], "--batch", "1,3", "--resolution", "32,16x48",
                 "--json", report_path)
    out = capsys.readouterr().out
    assert status == 0
    for shape in ("1x3x32x32", "3x3x32x32", "1x3x16x48", "3x3x16x48"):
        assert shape in out
    assert "max-abs" in out and "cosine" in out and "top-1" in out and "PASSED" in out
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["precision"] == "fp32"
    assert {(c["batch"], c["height"], c["width"]) for c in report["cases"]} == {(1, 32, 32), (3, 32, 32),
                                                                                (1, 16, 48), (3, 16, 48)}
    assert all(c["metrics"]["rel_max_error"] <= 1e-4 for c in report["cases"])
    assert any("photo" in c["inputs"] and "synthetic" in c["inputs"] for c in report["cases"])


def test_verify_fails_against_other_weights_and_says_why(exported, checkpoints, capsys):
    _, output, _ = exported
    status = cli("verify", output, "--reference", checkpoints[1], "--batch", "2", "--resolution", "32")
    captured = capsys.readouterr()
    assert status == 1
    assert "FAIL" in captured.out and "tolerance fp32" in captured.out
    assert "differ from those the artifact was exported from" in captured.err


def test_verify_uses_an_images_folder_and_default_resolutions(exported, checkpoints, tmp_path, capsys):
    from PIL import Image

    from vitdeploy.preprocessing import bundled_images

    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(bundled_images()[0]).save(folder / "one.png")
    _, output, _ = exported
    assert cli("verify", output, "--reference", checkpoints[0], "--images", folder, "--batch", "1",
               "--no-synthetic") == 0
    out = capsys.readouterr().out
    assert "1x3x32x32" in out and "1x3x16x16" in out  # native and the smallest size
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CLIError, match="contains no images"):
        cli("verify", output, "--reference", checkpoints[0], "--images", empty)
    with pytest.raises(CLIError, match="is not a folder"):
        cli("verify", output, "--reference", checkpoints[0], "--images", tmp_path / "missing")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolution", "64"], "outside the validated range 16..48"),
        (["--resolution", "36"], "not a multiple of the patch stride 8"),
        (["--batch", "8"], "outside the validated range 1..4"),
    ],
)
def test_verify_rejects_shapes_outside_the_artifact(exported, checkpoints, argv, message):
    _, output, _ = exported
    with pytest.raises(CLIError, match=message):
        cli("verify", output, "--reference", checkpoints[0], *argv)


def test_export_rejects_bad_arguments(checkpoints, tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of the model's stride 8"):
        cli("export", checkpoints[0], "-o", tmp_path / "m.onnx", "--resolution", "20:40")
    with pytest.raises(SystemExit):  # refused while parsing, before anything is loaded
        cli("export", checkpoints[0], "-o", tmp_path / "m.bin")
    assert "must end in .onnx" in capsys.readouterr().err
    with pytest.raises(CLIError, match="either --resolution or --height/--width"):
        cli("export", checkpoints[0], "-o", tmp_path / "m.onnx", "--resolution", "16:32", "--height", "16:32")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        cli("export", "no_such_model", "-o", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_variant_names_export_with_random_weights_and_say_so():
    """``export``/``verify`` resolve their source with ``resolve_source(..., log=progress)``."""
    from vitdeploy.checkpoints import resolve_source

    lines: list[str] = []
    resolved = resolve_source("vit_tiny_patch16_224", log=lines.append)
    assert resolved.random_weights and resolved.format == "variant"
    assert any("RANDOM weights" in line for line in lines)


def test_fp16_export_and_verify_against_both_references(checkpoints, tmp_path, capsys):
    """verify compares an fp16 graph with eager fp16 under the same policy and with eager fp32."""
    output = tmp_path / "vit_fp16.onnx"
    status = cli("export", checkpoints[0], "-o", output, "--precision", "fp16", "--batch", "1:2",
                 "--height", "16:32", "--width", "16:48", "--simplify")
    captured = capsys.readouterr()
    assert status == 0 and output.is_file()
    assert "eager fp16" in captured.out and "eager fp32" in captured.out
    assert "last block for the class token only" in captured.out
    report_path = tmp_path / "verify.json"
    status = cli("verify", output, "--reference", checkpoints[0], "--batch", "2",
                 "--resolution", "32x48", "--json", report_path)
    assert status == 0
    report = json.loads(report_path.read_text())
    assert report["precision"] == "fp16"
    assert {c["tolerance"]["name"] for c in report["cases"]} == {"fp16", "fp16_vs_fp32"}
    assert all(c["metrics"]["cosine"] >= 0.999 for c in report["cases"])


def test_verify_against_a_different_model_says_so_before_any_shape(exported, tmp_path, capsys):
    """A reference of another architecture (patch 16, wider, no class token) is named as a different model,
    field by field, before the shapes are checked against its stride."""
    _, output, _ = exported
    other = save_model(make_model(tiny_config(patch_size=16, hidden_size=96, num_heads=4, pooling="avg"), seed=0),
                       tmp_path / "other_arch.safetensors")
    with pytest.raises(CLIError) as error:
        cli("verify", output, "--reference", other, "--batch", "1")
    message = str(error.value)
    assert message.startswith(f"--reference {other} is a different model from the artifact: ")
    assert "patch_size 16 (the artifact: 8)" in message and "hidden_size 96 (the artifact: 64)" in message
    assert "pooling avg (the artifact: token)" in message
    assert "multiple of the patch stride" not in message
    # A reference without the artifact's outputs is a different model too.
    headless = save_model(make_model(tiny_config(num_classes=0), seed=0), tmp_path / "headless.safetensors")
    with pytest.raises(CLIError, match=r"is a different model from the artifact: .*no logits output"):
        cli("verify", output, "--reference", headless, "--batch", "1")
