"""``vitdeploy convert``: timm/JAX/variant → native, through the command's own parser and run()."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy.checkpoints import CheckpointError, load_model
from vitdeploy.cli import convert
from vitdeploy.cli.common import CLIError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vitdeploy")
    convert.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["convert", *argv])


@pytest.fixture
def timm_checkpoint(tmp_path):
    model = make_model(tiny_config(), seed=2)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}, path)
    return model, path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_convert_to_folder(tmp_path, timm_checkpoint, capsys):
    model, path = timm_checkpoint
    out = tmp_path / "native"
    args = parse([str(path), "-o", str(out), "--num-heads", "4"])
    assert args.func is convert.run
    assert convert.run(args) == 0
    printed = capsys.readouterr().out
    assert f"loaded timm checkpoint {path}" in printed
    assert "M parameters" in printed and "10 classes" in printed
    assert f"wrote native checkpoint {out}" in printed
    assert json.loads((out / "config.json").read_text())["format"] == "vitdeploy"
    converted = load_model(out)
    assert converted.config.num_heads == 4
    assert torch.equal(logits(converted), logits(model))


def test_convert_to_single_file_with_overrides(tmp_path, timm_checkpoint, capsys):
    _, path = timm_checkpoint
    out = tmp_path / "model.safetensors"
    assert convert.run(parse([str(path), "-o", str(out), "--num-heads", "4", "--num-classes", "3",
                              "--image-size", "64", "--format", "timm"])) == 0
    err = capsys.readouterr().err
    assert "resampled position embeddings 4x4 → 8x8" in err
    converted = load_model(out)
    assert (converted.config.num_classes, converted.config.image_size) == (3, 64)
    assert torch.count_nonzero(converted.head.weight) == 0


def test_convert_variant_name_warns_about_random_weights(tmp_path, capsys):
    out = tmp_path / "random"
    assert convert.run(parse(["vit_tiny_patch16_224", "-o", str(out), "--num-classes", "0"])) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    assert "vit_tiny_patch16_224" in captured.out
    assert load_model(out).config.num_classes == 0


def test_convert_errors_are_one_line(tmp_path, timm_checkpoint, capsys):
    _, path = timm_checkpoint
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint nor a model variant"):
        convert.run(parse([str(tmp_path / "nope.pth"), "-o", str(tmp_path / "o")]))
    with pytest.raises(CLIError, match="--image-size -5"):
        convert.run(parse([str(path), "-o", str(tmp_path / "o"), "--image-size", "-5"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):  # refused while parsing, before the checkpoint is read
        parse([str(path), "-o", str(tmp_path / "file")])
    assert "is an existing file; give a folder or a path ending in .safetensors" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="a JAX checkpoint is an .npz file"):
        convert.run(parse([str(tmp_path), "-o", str(tmp_path / "o"), "--format", "jax"]))
    with pytest.raises(SystemExit):
        parse([str(path)])  # -o is required


def test_convert_through_main(tmp_path, timm_checkpoint, capsys):
    from vitdeploy.cli import main

    _, path = timm_checkpoint
    assert main(["convert", str(path), "-o", str(tmp_path / "n"), "--num-heads", "4"]) == 0
    assert main(["convert", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vitdeploy convert: error:") and "missing.pth" in err[-1]
