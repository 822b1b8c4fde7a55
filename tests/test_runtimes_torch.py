"""TorchRuntime: the eager reference behind the runtime interface."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config, tiny_hybrid_config

import vitdeploy.runtimes as runtimes
from vitdeploy.config import default_size_range
from vitdeploy.model import Attention, LayerNorm
from vitdeploy.runtimes import TorchRuntime

RNG = np.random.default_rng(1)


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config())


@pytest.fixture(scope="module")
def runtime(model):
    with TorchRuntime(model, batch=(1, 8)) as rt:
        yield rt


def pixels(batch: int, height: int, width: int, dtype=np.float32) -> np.ndarray:
    return RNG.normal(size=(batch, 3, height, width)).astype(dtype)


def reference(model, x: np.ndarray, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The model cast to ``dtype`` with the fp32 LayerNorm/softmax policy, run by hand."""
    cast = copy.deepcopy(model).to(dtype)
    if dtype != torch.float32:
        cast.set_precision_policy({"LayerNormalization", "Softmax"}, fused_attention=False)
    with torch.no_grad():
        return cast(torch.from_numpy(x).to(dtype)).float().numpy()


@pytest.mark.parametrize("shape", [(1, 32, 32), (4, 48, 24), (2, 64, 16)])
def test_fp32_equals_the_model(runtime, model, shape):
    x = pixels(*shape)
    logits = runtime(x)
    assert logits.dtype == np.float32 and logits.shape == (shape[0], 10)
    np.testing.assert_allclose(logits, reference(model, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("precision, dtype, tolerance", [("fp16", torch.float16, 2e-2), ("bf16", torch.bfloat16, 1e-1)])
def test_reduced_precision_follows_the_onnx_policy_and_leaves_the_model_alone(model, precision, dtype, tolerance):
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    rt = TorchRuntime(model, precision=precision)
    x = pixels(2, 32, 40)
    logits = rt(x)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, reference(model, x, dtype))
    fp32 = reference(model, x)
    assert 0 < np.abs(logits - fp32).max() < tolerance
    # the runtime's copy carries the policy; the caller's model is untouched
    assert all(p.dtype == dtype for p in rt.model.parameters())
    assert all(m.compute_dtype == torch.float32 for m in rt.model.modules() if isinstance(m, LayerNorm))
    assert all(not m.fused and m.softmax_dtype == torch.float32 for m in rt.model.modules() if isinstance(m, Attention))
    assert all(m.fused and m.softmax_dtype is None for m in model.modules() if isinstance(m, Attention))
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
    assert rt.metadata.precision == precision
    assert rt.metadata.fp32_ops == ["LayerNormalization", "Softmax"]
    assert rt.input_spec.dtype == "float32"


def test_default_size_range_is_half_to_twice_native():
    assert default_size_range(224, 16) == (112, 448)
    assert default_size_range(384, 16) == (192, 768)
    assert default_size_range(32, 8) == (16, 64)
    assert default_size_range(40, 16) == (32, 80)  # 20 rounds up to 32, 80 stays
    assert default_size_range(16, 16) == (16, 32)  # never below one patch


def test_input_spec_and_metadata_describe_the_model(model):
    rt = TorchRuntime(model)
    config = model.config
    spec = rt.input_spec
    assert (spec.batch, spec.height, spec.width) == ((1, 64), (16, 64), (16, 64))
    assert spec.multiple_of == config.stride and spec.channels == config.in_channels
    assert rt.metadata.model_config == config.to_dict()
    assert rt.metadata.preprocessing.crop_size == config.image_size
    assert rt.metadata.num_classes == config.num_classes
    custom = TorchRuntime(model, batch=(2, 4), height=(32, 32), width=(16, 48))
    assert (custom.input_spec.batch, custom.input_spec.height, custom.input_spec.width) == ((2, 4), (32, 32), (16, 48))


def test_hybrid_model_uses_the_total_stride():
    hybrid = make_model(tiny_hybrid_config())
    rt = TorchRuntime(hybrid, batch=(1, 2))
    assert rt.input_spec.multiple_of == 16 and rt.input_spec.height == (32, 128)
    x = pixels(1, 48, 32)
    np.testing.assert_allclose(rt(x), reference(hybrid, x), atol=1e-6)
    with pytest.raises(ValueError, match="height 40 is not a multiple of the patch stride 16"):
        rt(pixels(1, 40, 32))


def test_load_builds_a_variant_by_name():
    with runtimes.load("vit_tiny_patch16_224", batch=(1, 1)) as rt:
        assert isinstance(rt, TorchRuntime)
        assert rt.input_spec.height == (112, 448)
        assert rt(pixels(1, 112, 128)).shape == (1, 1000)


def test_load_reads_a_checkpoint(tmp_path, model):
    checkpoints = pytest.importorskip("vitdeploy.checkpoints")
    if not hasattr(checkpoints, "save_model"):
        pytest.skip("vitdeploy.checkpoints.save_model is not available yet")
    path = tmp_path / "tiny.safetensors"
    checkpoints.save_model(model, path)
    with runtimes.load(path) as rt:
        x = pixels(1, 32, 32)
        np.testing.assert_allclose(rt(x), reference(model, x), atol=1e-6)


def test_bad_sources_and_options_are_refused(model):
    with pytest.raises(FileNotFoundError, match="'no_such_thing' is neither an existing checkpoint"):
        TorchRuntime("no_such_thing")
    with pytest.raises(ValueError, match="got int"):
        TorchRuntime(42)
    with pytest.raises(ValueError, match="precision 'int8' is not one of"):
        TorchRuntime(model, precision="int8")
    with pytest.raises(ValueError, match="device 'tpu' is not one of"):
        TorchRuntime(model, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available\\(\\) is False"):
            TorchRuntime(model, device="cuda")




def test_close_drops_the_model(model):
    rt = TorchRuntime(model)
    rt.close()
    assert rt.model is None  # the rest of the close contract: tests/test_runtime_contract.py


def test_a_variant_name_gives_the_seeded_weights_export_uses():
    from vitdeploy.checkpoints import resolve_source
    from vitdeploy.runtimes.torch import TorchRuntime

    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    exported = resolve_source("vit_tiny_patch16_224", log=lambda line: None).model
    with TorchRuntime("vit_tiny_patch16_224") as first, TorchRuntime("vit_tiny_patch16_224") as second:
        a, b = first(pixels), second(pixels)
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        np.testing.assert_allclose(a, exported(torch.from_numpy(pixels)).numpy(), rtol=0, atol=1e-5)
