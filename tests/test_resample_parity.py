"""Other resolutions give the source framework's own logits: real timm and real transformers models,
through vitdeploy's loader, its eager model and its exported ONNX (onnxruntime), below and above the
native 224, square and not.

The position embeddings are realistic (a smooth, unit-scale 2-D sin-cos grid): timm's 0.02-scale
random init would hide the difference between conventions. Each test also shows that another
convention misses the same tolerance, so passing means something.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_pos_embed import smooth_grid
from timm_without_torchvision import TIMM_MISSING, import_timm

from vitdeploy import runtimes
from vitdeploy.checkpoints import load_model
from vitdeploy.cli import main
from vitdeploy.metadata import read_onnx_metadata
from vitdeploy.parity import InputFactory, compare_logits

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

SIZES = [(160, 160), (128, 192), (288, 288), (224, 352), (384, 384)]
TOLERANCE = 1e-4  # relative max error of the logits against the framework's own

timm = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason=TIMM_MISSING)
try:
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def realistic_pos_embed(num_prefix: int, grid: int, dim: int) -> torch.Tensor:
    """``[1, prefix + grid², dim]``: a fixed unit-scale prefix embedding, then a 2-D sin-cos grid."""
    prefix = torch.randn(1, num_prefix, dim, generator=torch.Generator().manual_seed(3))
    return torch.cat([prefix, smooth_grid(grid, grid, dim, temperature=10000.0).reshape(1, -1, dim)], dim=1)


def photo_batches(model) -> dict[tuple[int, int], np.ndarray]:
    """A photograph and a synthetic image at every size, preprocessed as the model expects."""
    config = model.config
    inputs = InputFactory(config.preprocessing.at(config.image_size))
    return {size: inputs.batch(2, *size)[0] for size in SIZES}


def eager_errors(model, batches, references, method: str | None = None) -> dict[tuple[int, int], float]:
    """Relative max error of ``model``'s logits (optionally under another convention) at every size."""
    saved = model.config
    if method is not None:
        model.config = saved.replace(pos_embed_resample=method)
    try:
        with torch.no_grad():
            return {size: compare_logits(references[size], model(torch.from_numpy(x)).numpy()).rel_max_error
                    for size, x in batches.items()}
    finally:
        model.config = saved


def export_and_check(source, folder) -> tuple[object, list[str]]:
    """``vitdeploy export`` over 128..384, then ``vitdeploy check --target tensorrt``; the file and check lines."""
    path = folder / "model.onnx"
    report = folder / "check.json"
    assert main(["export", str(source), "-o", str(path), "--resolution", "128:384", "--batch", "1:2",
                 "--validation-max-batch", "2"]) == 0
    assert main(["check", str(path), "--target", "tensorrt", "--json", str(report)]) == 0
    return path, json.loads(report.read_text())


def onnx_errors(path, batches, references) -> dict[str, dict[tuple[int, int], float]]:
    """Errors of the portable graph (what TensorRT gets) and of the onnxruntime-CPU variant beside it."""
    errors = {}
    for variant in ("portable", "auto"):
        with runtimes.load(path, variant=variant) as runtime:
            errors[variant] = {size: compare_logits(references[size], runtime(x)).rel_max_error
                               for size, x in batches.items()}
    return errors


# --------------------------------------------------------------------------- timm


def timm_checkpoint(folder, name: str, **kwargs) -> tuple[torch.nn.Module, object]:
    """A real timm ViT (``dynamic_img_size``), realistic position embeddings, saved as timm saves weights."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, dynamic_img_size=True, **kwargs).eval()
    with torch.no_grad():
        prefix = model.num_prefix_tokens
        grid = model.patch_embed.grid_size[0]
        model.pos_embed.copy_(realistic_pos_embed(prefix, grid, model.embed_dim))
        if model.cls_token is not None:
            model.cls_token.normal_()
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def timm_references(model, batches) -> dict[tuple[int, int], np.ndarray]:
    with torch.no_grad():
        return {size: model(torch.from_numpy(x)).numpy() for size, x in batches.items()}


@pytest.fixture(scope="module")
def timm_vit_small(tmp_path_factory):
    """ViT-S/16's patch grid at 224 as timm builds it (one block of width 64, to keep the export and the
    runs at 384 fast: the resampling does not depend on the width), loaded into vitdeploy."""
    folder = tmp_path_factory.mktemp("timm")
    reference, path = timm_checkpoint(folder, "vit_small_patch16_224", depth=1, embed_dim=64, num_heads=1)
    ours = load_model(path, num_heads=1)  # timm files do not store the head count
    batches = photo_batches(ours)
    return reference, ours, path, batches, timm_references(reference, batches), folder


@needs_timm
def test_timm_checkpoint_gives_timms_logits_in_eager(timm_vit_small):
    _, ours, _, batches, references, _ = timm_vit_small
    assert ours.config.pos_embed_resample == "timm"
    errors = eager_errors(ours, batches, references)
    assert max(errors.values()) <= TOLERANCE, errors
    # Hugging Face's bicubic (vitdeploy's resampling before the convention was recorded) misses it
    assert max(eager_errors(ours, batches, references, method="huggingface").values()) > TOLERANCE


@needs_timm
@pytest.mark.parametrize(("name", "kwargs"), [
    ("vit_tiny_patch16_224", {"depth": 1, "class_token": False, "global_pool": "avg", "fc_norm": False}),
    ("vit_tiny_patch16_384", {"depth": 1}),
])
def test_other_timm_models_give_timms_logits_in_eager(tmp_path, name, kwargs):
    """No prefix token (mean pooling), and a 384 model that every size here shrinks (24x24 → 8..14)."""
    reference, path = timm_checkpoint(tmp_path, name, **kwargs)
    ours = load_model(path)
    assert ours.config.pos_embed_resample == "timm"
    batches = photo_batches(ours)
    references = timm_references(reference, batches)
    errors = eager_errors(ours, batches, references)
    assert max(errors.values()) <= TOLERANCE, errors
    assert max(eager_errors(ours, batches, references, method="huggingface").values()) > TOLERANCE


@needs_timm
def test_timm_checkpoint_gives_timms_logits_in_onnx(timm_vit_small):
    _, _, path, batches, references, folder = timm_vit_small
    graph, check = export_and_check(path, folder)
    assert check["ok"] and check["errors"] == 0
    assert read_onnx_metadata(graph).model_config["pos_embed_resample"] == "timm"
    for variant, errors in onnx_errors(graph, batches, references).items():
        assert max(errors.values()) <= TOLERANCE, (variant, errors)


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """A transformers ViTForImageClassification (ViT-S/16's patch grid, one layer of width 64) saved with
    save_pretrained."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                    intermediate_size=256, image_size=224, patch_size=16, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():
        embeddings = model.vit.embeddings
        embeddings.position_embeddings.copy_(realistic_pos_embed(1, 14, 64))
        for param in model.parameters():  # HF initialises LayerNorms to 1/0 and biases to 0
            param.add_(torch.randn_like(param) * 0.02)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder / "vit")
    ours = load_model(folder / "vit")
    batches = photo_batches(ours)
    with torch.no_grad():
        references = {size: model(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True).logits.numpy()
                      for size, x in batches.items()}
    return ours, folder / "vit", batches, references, folder


@needs_transformers
def test_hf_checkpoint_gives_transformers_logits_in_eager(hf_vit):
    ours, _, batches, references, _ = hf_vit
    assert ours.config.pos_embed_resample == "huggingface"
    errors = eager_errors(ours, batches, references)
    assert max(errors.values()) <= TOLERANCE, errors
    assert max(eager_errors(ours, batches, references, method="timm").values()) > TOLERANCE


@needs_transformers
def test_hf_checkpoint_gives_transformers_logits_in_onnx(hf_vit):
    _, source, batches, references, folder = hf_vit
    graph, check = export_and_check(source, folder)
    assert check["ok"] and check["errors"] == 0
    assert read_onnx_metadata(graph).model_config["pos_embed_resample"] == "huggingface"
    for variant, errors in onnx_errors(graph, batches, references).items():
        assert max(errors.values()) <= TOLERANCE, (variant, errors)
