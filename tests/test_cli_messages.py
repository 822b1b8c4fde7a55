"""What the command line says when a user gets something wrong: short lines that name the closest thing and
where the rest is, and a closed stdout pipe that ends quietly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_model, tiny_config

from vitdeploy.checkpoints import save_model
from vitdeploy.cli import main

# One error line, the "vitdeploy <command>: error: " prefix and any path the user typed aside.
SHORT = 300


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error line"
    return lines[-1]


def test_a_misspelled_variant_is_one_short_line_with_the_closest_names(tmp_path, capsys):
    assert main(["export", "vit_smal_patch16_224", "-o", str(tmp_path / "x.onnx")]) == 2
    line = error_line(capsys)
    assert line.startswith("vitdeploy export: error: 'vit_smal_patch16_224' is neither an existing checkpoint nor "
                           "a model variant; closest: vit_small_patch16_224, "), line
    assert "`vitdeploy inspect --list`" in line
    assert len(line) <= SHORT, len(line)
    assert "vit_tiny_patch16_384" not in line  # no listing of every variant
    assert not (tmp_path / "x.onnx").exists()


def test_the_details_behind_a_short_line_come_with_vitdeploy_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITDEPLOY_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="closest: vit_small_patch16_224"):
        main(["export", "vit_smal_patch16_224", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    details = [line for line in err.splitlines() if line.startswith("vitdeploy export: details: ")]
    assert len(details) == 1
    assert "vit_tiny_patch16_384" in details[0] and "a Hugging Face folder" in details[0]


@pytest.fixture(scope="module")
def tiny_width_checkpoint(tmp_path_factory):
    """ViT-Ti's width and depth (192 wide, 12 blocks) at a 32x32 input: a file `--model vit_small_*` cannot load."""
    model = make_model(tiny_config(hidden_size=192, depth=12, num_heads=3, mlp_size=768, patch_size=16))
    return save_model(model, tmp_path_factory.mktemp("messages") / "ti.safetensors")


def test_model_of_the_wrong_size_is_one_short_line_naming_what_fits(tiny_width_checkpoint, tmp_path, capsys):
    report = tmp_path / "r.json"
    argv = ["export", str(tiny_width_checkpoint), "--model", "vit_small_patch16_224", "-o", str(tmp_path / "x.onnx"),
            "--json", str(report)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert len(line.replace(str(tiny_width_checkpoint), "")) <= SHORT, line
    assert ("does not fit the vit_small_patch16_224 model (384 wide, 12 blocks): 151 tensor shapes differ; "
            "the weights are 192 wide, 12 blocks, like vit_tiny_patch16_224, vit_tiny_patch16_384") in line
    assert "`vitdeploy inspect --list`" in line and "blocks.3.mlp.fc1.weight" not in line
    # --json holds every tensor.
    written = json.loads(report.read_text())
    assert written["passed"] is False and written["error"] == line.split("error: ", 1)[1]
    assert "blocks.3.mlp.fc1.weight (checkpoint [768, 192], model [1536, 384])" in written["details"]
    assert written["details"].count("(checkpoint [") == 151


@pytest.mark.parametrize("argv", [["inspect", "--list"], ["inspect", "--help"]])
def test_a_closed_stdout_pipe_ends_quietly(argv):
    """`vitdeploy inspect --list | head -1`: the reader is gone before the first write, as with head."""
    process = subprocess.Popen([sys.executable, "-m", "vitdeploy", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    status = process.wait(timeout=120)
    process.stderr.close()
    assert err == ""
    assert status in (0, 141)  # 141 = 128 + SIGPIPE, what a POSIX tool's shell reports
    assert status == 141 or argv[-1] == "--help"


def test_a_broken_pipe_elsewhere_stays_an_error(capsys, monkeypatch):
    """Only stdout's reader going away is a quiet end: a broken pipe to a subprocess is an error line."""
    import vitdeploy.cli.inspect as inspect_cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect_cli, "run", broken)
    assert main(["inspect", "--list"]) == 2
    assert error_line(capsys) == "vitdeploy inspect: error: [Errno 32] Broken pipe"


def test_a_file_of_another_architecture_names_no_closest_family(tmp_path, capsys):
    """A ConvNeXt state dict shares no tensor name with any ViT family: the line says so and names none."""
    import torch
    from safetensors.torch import save_file

    names = ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias", "head.norm.weight", "head.norm.bias",
             "head.fc.weight", "head.fc.bias"]
    for stage in range(4):
        names += [f"stages.{stage}.downsample.0.weight", f"stages.{stage}.downsample.1.weight"] if stage else []
        names += [f"stages.{stage}.blocks.{b}.{n}" for b in range(2) for n in (
            "gamma", "conv_dw.weight", "conv_dw.bias", "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")]
    path = tmp_path / "convnext_tiny.safetensors"
    save_file({name: torch.zeros(2) for name in names}, str(path))
    assert main(["export", str(path), "-o", str(tmp_path / "x.onnx")]) == 2
    line = error_line(capsys)
    assert "its tensor names share nothing with any supported layout" in line
    assert "closest supported family" not in line and "siglip (like" not in line


@pytest.mark.parametrize(("gate", "expected"), [
    ("cosine=1.5", "argument --max-accuracy-drop: 'cosine=1.5': cosine must be in (0, 1], got 1.5"),
    ("cosine=0", "argument --max-accuracy-drop: 'cosine=0': cosine must be in (0, 1], got 0"),
    ("top1=2", "argument --max-accuracy-drop: 'top1=2': top1 must be in [0, 1], got 2"),
    ("points=-1", "argument --max-accuracy-drop: 'points=-1': points must be >= 0, got -1"),
    ("cos=0.9", "argument --max-accuracy-drop: 'cos=0.9': 'cos' is not one of points, cosine, top1, token, share"),
])
def test_a_bad_accuracy_gate_is_an_argument_error_in_the_names_the_user_typed(gate, expected, tmp_path, capsys):
    assert main(["tune", "vit_tiny_patch16_224", "-o", str(tmp_path / "out"), "--max-accuracy-drop", gate]) == 2
    line = error_line(capsys)
    assert line.startswith(f"vitdeploy tune: error: {expected}"), line
    assert "min_cosine" not in line and "[-1, 1]" not in line
    assert not (tmp_path / "out").exists()


def test_inspect_takes_the_sizes_verify_takes(capsys):
    assert main(["inspect", "vit_base_patch16_224", "--resolution", "224x336,384"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["224x336", "14x21", "295"] in [row[:3] for row in rows]
    assert ["384", "24x24", "577"] in [row[:3] for row in rows]
    assert main(["inspect", "vit_base_patch16_224", "--resolution", "224x330"]) == 2
    assert error_line(capsys) == "vitdeploy inspect: error: resolution 224x330 is not a multiple of the patch stride 16"


def test_precisions_take_the_article_they_are_read_with():
    from vitdeploy.constants import with_article

    assert [with_article(p) for p in ("fp32", "fp16", "bf16", "int8", "fp8")] == [
        "an fp32", "an fp16", "a bf16", "an int8", "an fp8"]


def test_inspect_of_a_misspelled_variant_names_the_closest(capsys):
    assert main(["inspect", "vit_bse_patch16_224"]) == 2
    line = error_line(capsys)
    assert "closest: vit_base_patch16_224" in line and "`vitdeploy inspect --list`" in line
    assert len(line) <= SHORT
