"""Position-embedding resampling: each convention against the function it reproduces, eager and in an ONNX graph.

The references are the very calls the frameworks make: ``F.interpolate(mode="bicubic",
antialias=True)`` (timm's ``resample_abs_pos_embed``), ``F.interpolate(mode="bicubic",
align_corners=False)`` (transformers' ``interpolate_pos_encoding``) and
``scipy.ndimage.zoom(order=1)`` (the original JAX code) and DINOv2's ``interpolate_pos_encoding``
(:func:`dinov2_original`). ``test_resample_parity.py`` compares
whole models against real timm and transformers.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import make_model, tiny_config
from safetensors.torch import save_file
from test_checkpoints_foreign import jax_arrays

from vitdeploy.checkpoints import CheckpointWarning, load_model, save_model
from vitdeploy.cli import main
from vitdeploy.config import ViTConfig
from vitdeploy.exporters.trt_support import check_onnx
from vitdeploy.pos_embed import (
    DEFAULT_RESAMPLE,
    RESAMPLE_METHODS,
    interpolation_matrix,
    resample_pos_embed,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

METHODS = list(RESAMPLE_METHODS)
# old grid → new grids: down and up, square and not, a single row/column, a 1x1 grid
CASES = [((14, 14), (10, 10)), ((14, 14), (8, 12)), ((14, 14), (18, 18)), ((14, 14), (14, 22)),
         ((14, 14), (24, 24)), ((14, 14), (1, 1)), ((14, 14), (3, 40)), ((5, 7), (9, 2)), ((1, 1), (4, 6)),
         ((24, 24), (10, 8))]


def dinov2_original(grid: torch.Tensor, new: tuple[int, int]) -> torch.Tensor:
    """facebookresearch/dinov2's DinoVisionTransformer.interpolate_pos_encoding on the grid part
    (defaults interpolate_offset=0.1, interpolate_antialias=False; the stored grid returned as is).
    The original's grid is square (``M = sqrt(N)``); each axis here scales by its own old size."""
    old = (grid.shape[0], grid.shape[1])
    if tuple(new) == old:
        return grid
    scale = (float(new[0] + 0.1) / old[0], float(new[1] + 0.1) / old[1])
    out = F.interpolate(grid.permute(2, 0, 1)[None], scale_factor=scale, mode="bicubic", antialias=False)
    assert tuple(out.shape[-2:]) == tuple(new)
    return out[0].permute(1, 2, 0)


def reference(method: str, grid: torch.Tensor, new: tuple[int, int]) -> torch.Tensor:
    """``grid`` ``[h, w, C]`` resampled to ``new`` by the framework's own call."""
    if method == "dinov2":
        return dinov2_original(grid, new)
    if method == "jax":
        zoom = (new[0] / grid.shape[0], new[1] / grid.shape[1], 1)
        return torch.from_numpy(scipy.ndimage.zoom(grid.numpy(), zoom, order=1))
    nchw = grid.permute(2, 0, 1)[None]
    if method == "siglip2":  # transformers' Siglip2 resizes with these weights
        return F.interpolate(nchw, size=new, mode="bilinear", align_corners=False, antialias=True)[0].permute(1, 2, 0)
    out = F.interpolate(nchw, size=new, mode="bicubic", align_corners=False, antialias=method == "timm")
    return out[0].permute(1, 2, 0)


def smooth_grid(height: int, width: int, channels: int = 16, temperature: float = 100.0) -> torch.Tensor:
    """A unit-scale 2-D sin-cos grid ``[h, w, C]``: sin/cos of y, then of x, at frequencies
    ``temperature ** -(k / (C/4))`` (MoCo v3's fixed embedding uses 10000), smooth like trained ones."""
    quarter = channels // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / quarter)
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    parts = [f(c[..., None] * omega) for c in (y, x) for f in (np.sin, np.cos)]
    return torch.from_numpy(np.concatenate(parts, axis=-1).astype(np.float32))


def with_prefix(grid: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    cls = torch.linspace(-1, 1, grid.shape[-1])[None, None].expand(1, prefix, -1)
    return torch.cat([cls, grid.reshape(1, -1, grid.shape[-1])], dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("old", "new"), CASES)
def test_each_convention_reproduces_its_framework(method, old, new):
    grid = smooth_grid(*old) + torch.randn(*old, 16, generator=torch.Generator().manual_seed(1))
    pos = with_prefix(grid)
    out = resample_pos_embed(pos, new, old, 1, method=method)
    assert out.shape == (1, 1 + new[0] * new[1], 16)
    assert torch.equal(out[:, :1], pos[:, :1])
    expected = reference(method, grid, new).reshape(1, -1, 16)
    torch.testing.assert_close(out[:, 1:], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_conventions_differ_from_each_other(method):
    """The conventions are not interchangeable: each one is off from the others' reference."""
    grid = smooth_grid(14, 14)
    for new in [(10, 10), (24, 24)]:
        out = resample_pos_embed(with_prefix(grid), new, (14, 14), 1, method=method)[0, 1:]
        for other in METHODS:
            error = float((out - reference(other, grid, new).reshape(-1, 16)).abs().max())
            assert (error < 1e-5) == (other == method), (method, other, new, error)


@pytest.mark.parametrize("method", METHODS)
def test_native_grid_is_an_exact_identity(method):
    pos = with_prefix(smooth_grid(7, 5))
    assert torch.equal(resample_pos_embed(pos, (7, 5), (7, 5), 1, method=method), pos)
    assert torch.equal(interpolation_matrix(7, 7, method), torch.eye(7))


@pytest.mark.parametrize("method", METHODS)
def test_rows_of_the_interpolation_matrix_sum_to_one(method):
    for old, new in [(14, 5), (14, 31), (3, 1), (1, 9)]:
        matrix = interpolation_matrix(old, new, method)
        assert matrix.shape == (new, old) and matrix.dtype == torch.float32
        torch.testing.assert_close(matrix.sum(dim=1), torch.ones(new), rtol=0, atol=1e-6)


def test_no_prefix_tokens_and_half_precision():
    grid = smooth_grid(6, 6)
    out = resample_pos_embed(grid.reshape(1, 36, 16).half(), (4, 9), (6, 6), 0, method="timm")
    assert out.dtype == torch.float16 and out.shape == (1, 36, 16)
    expected = reference("timm", grid.half().float(), (4, 9)).reshape(1, -1, 16).half()
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3)


def test_bad_method_and_shape_are_named():
    pos = with_prefix(smooth_grid(4, 4))
    with pytest.raises(ValueError, match=r"unknown position-embedding resampling 'bilinear'; expected one of "
                                         r"timm, huggingface, jax, dinov2"):
        resample_pos_embed(pos, (6, 6), (4, 4), 1, method="bilinear")
    with pytest.raises(ValueError, match=r"does not match a 5x5 grid with 1 prefix token\(s\); expected \[1, 26, C\]"):
        resample_pos_embed(pos, (6, 6), (5, 5), 1, method="timm")


# --------------------------------------------------------------------------- the config field


def test_config_field_default_legacy_and_validation():
    assert ViTConfig().pos_embed_resample == DEFAULT_RESAMPLE == "timm"
    config = tiny_config(pos_embed_resample="jax")
    assert ViTConfig.from_dict(config.to_dict()) == config
    legacy = config.to_dict()
    del legacy["pos_embed_resample"]  # a config written before the field existed: bicubic a=-0.75 = HF's
    assert ViTConfig.from_dict(legacy).pos_embed_resample == "huggingface"
    with pytest.raises(ValueError, match="unknown position-embedding resampling 'cubic'"):
        tiny_config(pos_embed_resample="cubic")


@pytest.mark.parametrize("method", METHODS)
def test_model_forward_and_set_image_size_use_the_config_convention(method):
    model = make_model(tiny_config(pos_embed_resample=method))
    old = model.pos_embed.detach().clone()
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = resample_pos_embed(old, (6, 10), (4, 4), 1, method=method)
        captured = {}
        hook = model.pos_drop.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
        model(x)
        hook.remove()
        tokens, _ = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1)
        torch.testing.assert_close(captured["x"] - tokens, expected.expand(2, -1, -1), rtol=0, atol=1e-6)
        model.set_image_size(64)
    torch.testing.assert_close(model.pos_embed.detach(), resample_pos_embed(old, (8, 8), (4, 4), 1, method=method),
                               rtol=0, atol=0)


# --------------------------------------------------------------------------- checkpoints and the CLI


def _zoomed(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    grid = pos[0, 1:].reshape(old, old, -1)
    return with_prefix(torch.from_numpy(scipy.ndimage.zoom(grid.numpy(), (new / old, new / old, 1), order=1)))[0, 1:]


def test_checkpoint_sources_set_their_convention(tmp_path, tiny_model):
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    assert load_model(tmp_path / "timm.safetensors", num_heads=4).config.pos_embed_resample == "timm"
    np.savez(tmp_path / "vit.npz", **jax_arrays(tiny_model))
    assert load_model(tmp_path / "vit.npz").config.pos_embed_resample == "timm"  # how timm loads .npz files
    jax = load_model(tmp_path / "vit.npz", pos_embed_resample="jax")  # the original code's, by name
    assert jax.config.pos_embed_resample == "jax"
    save_model(jax, tmp_path / "native")
    assert load_model(tmp_path / "native").config.pos_embed_resample == "jax"  # native keeps what it was saved with
    document = json.loads((tmp_path / "native" / "config.json").read_text())
    del document["config"]["pos_embed_resample"]
    (tmp_path / "native" / "config.json").write_text(json.dumps(document))
    assert load_model(tmp_path / "native").config.pos_embed_resample == "huggingface"


def test_loader_resamples_a_mismatched_grid_by_the_convention(tmp_path, tiny_model):
    """A JAX checkpoint loaded at another size with the original code's convention equals scipy's zoom."""
    np.savez(tmp_path / "vit.npz", **jax_arrays(tiny_model))
    with pytest.warns(CheckpointWarning, match=r"resampled position embeddings 4x4 → 12x12 .*\(jax resampling\)"):
        loaded = load_model(tmp_path / "vit.npz", image_size=96, pos_embed_resample="jax")
    pos = tiny_model.pos_embed.detach()
    torch.testing.assert_close(loaded.pos_embed.detach()[0, 1:], _zoomed(pos, 4, 12), rtol=0, atol=1e-6)
    assert torch.equal(loaded.pos_embed.detach()[0, :1], pos[0, :1])


def test_convert_cli_flag_sets_and_applies_the_convention(tmp_path, tiny_model, capsys):
    np.savez(tmp_path / "vit.npz", **jax_arrays(tiny_model))
    out = tmp_path / "native"
    assert main(["convert", str(tmp_path / "vit.npz"), "-o", str(out), "--image-size", "64",
                 "--pos-embed-resample", "jax"]) == 0
    assert "jax position-embedding resampling" in capsys.readouterr().out
    converted = load_model(out)
    assert converted.config.pos_embed_resample == "jax"
    torch.testing.assert_close(converted.pos_embed.detach()[0, 1:], _zoomed(tiny_model.pos_embed.detach(), 4, 8),
                               rtol=0, atol=1e-6)
    assert main(["convert", str(tmp_path / "vit.npz"), "-o", str(tmp_path / "x"), "--pos-embed-resample", "cubic"]) == 2
    assert "invalid choice: 'cubic'" in capsys.readouterr().err


# --------------------------------------------------------------------------- in an ONNX graph


class _Resampler(torch.nn.Module):
    """Every convention (and a prefix-free grid) resampled to the spatial size of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(with_prefix(smooth_grid(14, 14)))
        self.grid_only = torch.nn.Parameter(smooth_grid(6, 9).reshape(1, 54, 16))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new = (x.shape[-2], x.shape[-1])
        outputs = [resample_pos_embed(self.pos, new, (14, 14), 1, method=m) for m in METHODS]
        outputs.append(resample_pos_embed(self.grid_only, new, (6, 9), 0, method="timm"))
        return tuple(outputs)


@pytest.fixture(scope="module")
def resampler_graph(tmp_path_factory):
    module = _Resampler().eval()
    dims = {"x": {2: torch.export.Dim("h", min=1, max=256), 3: torch.export.Dim("w", min=1, max=256)}}
    with torch.no_grad():
        program = torch.onnx.export(module, (torch.zeros(1, 1, 14, 14),), dynamo=True, dynamic_shapes=dims,
                                    input_names=["x"], opset_version=18, optimize=True, verbose=False)
    path = tmp_path_factory.mktemp("resample") / "resample.onnx"
    program.save(str(path))
    return module, path


@pytest.mark.parametrize("new", [(14, 14), (10, 10), (8, 12), (18, 18), (14, 22), (24, 24), (1, 1), (3, 40), (61, 2)])
def test_one_graph_reproduces_every_convention_at_every_size(resampler_graph, new):
    module, path = resampler_graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": np.zeros((1, 1, *new), np.float32)})
    with torch.no_grad():
        eager = module(torch.zeros(1, 1, *new))
    grid = smooth_grid(14, 14)
    assert len(outputs) == len(eager) == len(METHODS) + 1
    for method, graph_out, eager_out in zip(METHODS, outputs[:-1], eager[:-1], strict=True):
        assert graph_out.shape == (1, 1 + new[0] * new[1], 16)
        np.testing.assert_allclose(graph_out, eager_out.numpy(), rtol=0, atol=2e-6, err_msg=method)
        expected = reference(method, grid, new).reshape(-1, 16).numpy()
        np.testing.assert_allclose(graph_out[0, 1:], expected, rtol=0, atol=1e-5, err_msg=method)
    expected = reference("timm", smooth_grid(6, 9), new).reshape(1, -1, 16).numpy()
    np.testing.assert_allclose(outputs[-1], expected, rtol=0, atol=1e-5)


def test_resampling_graph_uses_only_ops_tensorrt_parses(resampler_graph):
    _, path = resampler_graph
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert "Resize" not in ops and "Range" in ops  # matrices built from the dynamic size, no antialiased Resize
    report = check_onnx(path)
    assert report.ok, report.format_text()
    assert report.findings == []
