"""``--model NAME``: every command that loads a checkpoint forces a registry variant's architecture with
it (``resolve_source(model=...)``), a bad name is one line naming the closest variants before torch
loads, and a source that is no checkpoint says so."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from vitdeploy.checkpoints import CheckpointWarning
from vitdeploy.cli import build_parser, main

# The commands that load a checkpoint (predict and verify's reference, quantize's reference, tune and bench
# when given one), and those that only take artifacts.
LOADING = {"deploy", "tune", "inspect", "convert", "export", "quantize", "verify", "predict", "bench"}
ARTIFACTS_ONLY = {"check", "build", "triton", "serve"}


def commands() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def test_every_command_that_loads_a_checkpoint_has_the_option() -> None:
    parsers = commands()
    assert set(parsers) == LOADING | ARTIFACTS_ONLY
    for name, parser in parsers.items():
        action = parser._option_string_actions.get("--model")
        assert (action is not None) == (name in LOADING), name
        if action is not None:
            assert action.dest == "model_variant" and action.metavar == "NAME", name
            assert "QuickGELU" in action.help and "OpenAI CLIP" in action.help, name


def test_a_bad_name_is_one_line_naming_the_closest_before_torch_loads(tmp_path) -> None:
    """Through the real entry point in a fresh interpreter: exit 2, one line per command, no heavy import."""
    onnx = str(tmp_path / "m.onnx")
    runs = [["export", "ckpt", "-o", onnx], ["convert", "ckpt", "-o", str(tmp_path / "out")], ["deploy", "ckpt"],
            ["verify", onnx, "--reference", "ckpt"], ["predict", "ckpt", "a.jpg"], ["inspect", "ckpt"],
            ["tune", "ckpt", "-o", str(tmp_path / "t")], ["quantize", onnx, "-o", onnx, "--reference", "ckpt"],
            ["bench", "ckpt"]]
    code = f"""
import json, sys
from vitdeploy.cli import main
codes = [main(argv + ["--model", "vit_base_patch16_clip_quickgelu"]) for argv in {runs!r}]
print(json.dumps([codes, sorted(m for m in ("torch", "onnx", "onnxruntime", "timm") if m in sys.modules)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    codes, heavy = json.loads(proc.stdout)
    assert codes == [2] * len(runs) and heavy == [], proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(runs), proc.stderr
    for argv, line in zip(runs, lines, strict=True):
        assert line.startswith(f"vitdeploy {argv[0]}: error: argument --model: unknown model variant "
                               "'vit_base_patch16_clip_quickgelu'; closest: vit_base_patch16_clip_quickgelu_224, "), line


def one_line(capsys, *argv: str) -> str:
    status = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1, captured.err
    return lines[0]


def test_a_source_that_is_no_checkpoint_says_so(capsys, tmp_path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")  # never opened: the option is refused first
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    line = one_line(capsys, "predict", str(onnx), str(image), "--model", "vit_tiny_patch16_224")
    assert line == (f"vitdeploy predict: error: --model vit_tiny_patch16_224 forces an architecture on a checkpoint; "
                    f"{str(onnx)!r} is an artifact, whose metadata records its architecture")
    line = one_line(capsys, "inspect", "deit_tiny_patch16_224", "--model", "vit_tiny_patch16_224")
    assert line.endswith("'deit_tiny_patch16_224' is a variant name already"), line
    line = one_line(capsys, "bench", str(onnx), "--model", "vit_tiny_patch16_224")
    assert "is an artifact, whose metadata records its architecture" in line, line
    line = one_line(capsys, "quantize", str(onnx), "-o", str(tmp_path / "q.onnx"), "--model", "vit_tiny_patch16_224")
    assert line.endswith("--model vit_tiny_patch16_224 applies to the --reference checkpoint; none was given"), line


def test_the_model_option_gives_a_clip_state_dict_its_quickgelu(tmp_path) -> None:
    """A bare CLIP B/16 state dict does not show its activation: read alone it is the GELU tower (with a
    warning); with ``--model vit_base_patch16_clip_quickgelu_224`` the loaded config is QuickGELU (and
    the warning about the guess is not given)."""
    from vitdeploy.checkpoints.common import infer_config
    from vitdeploy.model import VisionTransformer
    from vitdeploy.variants import get_config

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VisionTransformer(get_config("vit_base_patch16_clip_224")).state_dict().items()}
    tensors = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in shapes.items()}
    with pytest.warns(Warning, match="QuickGELU"):
        detected, _ = infer_config(tensors, "test")
    assert (detected.provenance.name, detected.act) == ("vit_base_patch16_clip_224", "gelu")
    source = tmp_path / "openai_clip_b16.safetensors"
    save_file(tensors, str(source))
    report = tmp_path / "inspect.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # no word about a GELU guess the option replaced
        assert main(["inspect", str(source), "--model", "vit_base_patch16_clip_quickgelu_224", "--json",
                     str(report)]) == 0
    config = json.loads(report.read_text())["config"]
    assert (config["provenance"]["name"], config["act"], config["projection_dim"]) == ("vit_base_patch16_clip_quickgelu_224",
                                                                         "quick_gelu", 512)


def test_convert_and_predict_load_a_checkpoint_with_the_forced_architecture(tmp_path, capsys) -> None:
    """A ViT-Ti/16 state dict is read as the plain ViT; ``--model deit_tiny_patch16_224`` makes it DeiT (its
    family and preprocessing) in the checkpoint ``convert`` writes and for ``predict``'s eager runtime."""
    from vitdeploy.checkpoints.common import safetensors_metadata
    from vitdeploy.checkpoints.native import META_CONFIG
    from vitdeploy.model import create_model
    from vitdeploy.preprocessing import bundled_images

    source = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("vit_tiny_patch16_224").state_dict().items()}, str(source))
    for argv, family in (([], "vit"), (["--model", "deit_tiny_patch16_224"], "deit")):
        out = tmp_path / f"native-{family}.safetensors"
        assert main(["convert", str(source), "-o", str(out), *argv]) == 0
        config = json.loads(safetensors_metadata(out)[META_CONFIG])
        assert config["provenance"]["family"] == family
    assert (config["provenance"]["name"], config["preprocessing"]["mean"]) == ("deit_tiny_patch16_224", [0.485, 0.456, 0.406])
    predictions = tmp_path / "predictions.json"
    image = str(bundled_images()[0])
    assert main(["predict", str(source), image, "--model", "deit_tiny_patch16_224", "--json", str(predictions)]) == 0
    capsys.readouterr()
    ran = json.loads(predictions.read_text())
    assert ran["runtime"] == "torch" and len(ran["predictions"][0]["top_k"]) == 5


def test_bench_model_refuses_an_override_it_cannot_apply(tmp_path) -> None:
    """The library path behind ``bench --model`` refuses, rather than ignores, an override for a variant
    name or an artifact (nothing is loaded from them to force an architecture on)."""
    from vitdeploy.benchmarks.models import BenchModel

    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"")
    for source in ("vit_tiny_patch16_224", str(artifact)):
        with pytest.raises(ValueError, match="forces an architecture on a checkpoint"):
            BenchModel.open(source, tmp_path / "cache", model_override="deit_small_patch16_224")
