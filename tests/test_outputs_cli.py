"""The command line with outputs: `export --outputs`, `predict` on an embedding artifact (and --save-outputs),
`verify` and `inspect` showing every output. One export of a headless checkpoint is shared."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy.checkpoints import save_model
from vitdeploy.cli import main
from vitdeploy.metadata import read_onnx_metadata
from vitdeploy.preprocessing import bundled_images, preprocess

# The same model as tests/test_outputs_export.py's headless one, so a session traces it once.
SMALL = dict(hidden_size=32, depth=1, num_heads=2, mlp_size=64)
OUTPUTS = "patch_tokens,pooler_output"

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    model = make_model(tiny_config(num_classes=0, **SMALL), seed=1)
    folder = tmp_path_factory.mktemp("cli-outputs")
    checkpoint = save_model(model, folder / "backbone.safetensors")
    output = folder / "backbone.onnx"
    status = main(["export", str(checkpoint), "-o", str(output), "--outputs", OUTPUTS, "--batch", "1:4",
                   "--resolution", "16:48", "--validation-max-batch", "2", "--no-cpu-variant"])
    return model, checkpoint, output, status


def test_outputs_are_checked_when_parsing_and_against_the_model(backbone, tmp_path, capsys):
    _, checkpoint, _, _ = backbone
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--outputs", "logits,features"]) == 2
    assert "unknown output(s) features; expected some of logits, pooler_output" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--outputs", "logits"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("vitdeploy export: error: this model has no logits output; it has pooler_output, "
                     "last_hidden_state, patch_tokens")
    assert not (tmp_path / "x.onnx").exists()


def test_export_writes_the_outputs_asked_for(backbone, capsys):
    _, _, output, status = backbone
    assert status == 0
    assert read_onnx_metadata(output).output_names == ["pooler_output", "patch_tokens"]


def test_predict_prints_shape_and_norm_and_saves_every_output(backbone, tmp_path, capsys):
    model, _, output, _ = backbone
    images = [str(path) for path in bundled_images()[:2]]
    saved = tmp_path / "out.npz"
    assert main(["predict", str(output), *images, "--save-outputs", str(saved), "--json",
                 str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    metadata = read_onnx_metadata(output)
    pixels = np.stack([preprocess(image, metadata.preprocessing) for image in images]).astype(np.float32)
    with torch.no_grad():
        expected = model.forward_outputs(torch.from_numpy(pixels), ["pooler_output", "patch_tokens"])
    norms = np.linalg.norm(expected["pooler_output"].numpy(), axis=1)
    for image, norm in zip(images, norms, strict=True):
        assert f"{image}\n  pooler_output [32], L2 norm {norm:.4f}" in printed
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [p["shape"] for p in predictions] == [[32], [32]]
    with np.load(saved) as arrays:
        assert sorted(arrays.files) == ["images", "patch_tokens", "pooler_output"]
        assert list(arrays["images"]) == images
        np.testing.assert_allclose(arrays["patch_tokens"], expected["patch_tokens"].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(arrays["pooler_output"], expected["pooler_output"].numpy(), rtol=1e-4, atol=1e-5)
    assert main(["predict", str(output), images[0], "--save-outputs", str(tmp_path / "out.npy")]) == 2
    assert "does not end in .npz" in capsys.readouterr().err


def test_verify_and_inspect_show_every_output(backbone, capsys):
    _, checkpoint, output, _ = backbone
    assert main(["verify", str(output), "--reference", str(checkpoint), "--batch", "1", "--resolution", "16x40"]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "pooler_output" in table and "patch_tokens" in table and "PASSED" in table
    # Each progress line names the output it compares (two outputs, one shape: two lines).
    cases = [line for line in captured.err.splitlines() if " 1x3x16x40 vs " in line]
    assert len(cases) == 2
    assert cases[0].startswith("[vitdeploy]   pooler_output 1x3x16x40 vs eager")
    assert cases[1].startswith("[vitdeploy]   patch_tokens 1x3x16x40 vs eager")
    assert main(["inspect", str(output)]) == 0
    assert "outputs      : pooler_output [batch, 32], patch_tokens [batch, patches, 32]" in capsys.readouterr().out
