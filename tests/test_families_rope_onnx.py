"""One ONNX file per RoPE family serves every resolution, and matches timm's own model.

DINOv3 (RoPE only), EVA-02 B (table + RoPE, split SwiGLU with its norm, split q/k/v) and the
Perception Encoder (table + RoPE, attention pool) are loaded from timm Hub folders and exported
by the real exporter (dynamic batch x height x width, validated against eager as every export
is). The file, run by onnxruntime at the native size, a larger square and a non-square size,
matches timm (``dynamic_img_size=True``) within 1e-4 relative; the graph has no ``If`` node and
computes RoPE's sin/cos from the input's shape (a ``Shape`` op feeds them), never from a constant
of the traced size; in the fp16 graph sin/cos and the rotation stay float32. The onnxruntime-CPU
variant says what it leaves unfused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from family_sources import rel_err
from rope_sources import CASES, TOLERANCE, save_timm_rope, timm, timm_rope_model, timm_rope_outputs

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.skipif(timm is None, reason="timm is not installed (CI: pip install --no-deps timm)")]

GRAPHS = ("dinov3", "eva02_base", "pe")


def _pixels(size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Callable[[str, str], Any]:
    """Each case exported once per precision (fp32 with its CPU variant; fp16 for DINOv3 only)."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.outputs import available_outputs

    cache: dict[tuple[str, str], Any] = {}

    def get(case_id: str, precision: str = "fp32") -> Any:
        if (case_id, precision) not in cache:
            case = CASES[case_id]
            folder = tmp_path_factory.mktemp(case_id)
            if (case_id, "source") not in cache:
                source = timm_rope_model(case)
                cache[(case_id, "source")] = (source, load_model(save_timm_rope(source, case, folder, hub=True)))
            source, model = cache[(case_id, "source")]
            heights, widths = zip(*case.sizes, strict=True)
            lines: list[str] = []
            options = ExportOptions(outputs=available_outputs(model.config), batch=(1, 2),
                                    height=(min(heights), max(heights)), width=(min(widths), max(widths)),
                                    validation_max_batch=1, cpu_variant=precision == "fp32" and case_id in ("dinov3", "eva02_base"), preflight=False,
                                    precision=precision, source=case_id)
            result = export_onnx(model, folder / f"{case_id}_{precision}.onnx", options, progress=lines.append)
            cache[(case_id, precision)] = (result, source, model, lines)
        return cache[(case_id, precision)]

    return get


def _ancestors(graph: Any, name: str) -> set[str]:
    """Op types of every node ``name`` depends on."""
    producers = {out: node for node in graph.node for out in node.output}
    seen: set[int] = set()
    ops: set[str] = set()
    stack = [name]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        ops.add(node.op_type)
        stack.extend(node.input)
    return ops


@pytest.mark.parametrize("case_id", [*GRAPHS, "aimv2"])
def test_one_file_matches_timm_at_three_sizes(case_id, exported, record_property):
    from vitdeploy import runtimes

    result, source, model, _ = exported(case_id)
    case = CASES[case_id]
    assert result.report.passed
    errors = {}
    with runtimes.load(result.path) as runtime:
        for index, size in enumerate(case.sizes):
            pixels = _pixels(size, index)
            expected = timm_rope_outputs(source, case, pixels)
            got = runtime.run_outputs(pixels.numpy())
            for name in expected:
                errors[(size, name)] = rel_err(got[name], expected[name])
    record_property("onnx_worst_rel_err", max(errors.values()))
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("case_id", GRAPHS)
def test_rope_is_computed_from_the_dynamic_grid(case_id, exported):
    import onnx

    result = exported(case_id)[0]
    graph = onnx.load(str(result.path)).graph
    ops = [node.op_type for node in graph.node]
    assert "If" not in ops and "Loop" not in ops
    trig = [node for node in graph.node if node.op_type in ("Sin", "Cos")]
    assert trig, "RoPE's sin/cos were folded into constants"
    for node in trig:
        assert {"Shape", "Range"} <= _ancestors(graph, node.input[0]), node.name
    # no sin/cos table of any grid in the range survives as a constant ([tokens, head_dim] or half of it)
    config, case = exported(case_id)[2].config, CASES[case_id]
    head_dim = config.hidden_size // config.num_heads
    grids = {(h // case.patch) * (w // case.patch) for h in range(case.patch, 200, case.patch)
             for w in range(case.patch, 200, case.patch)}
    constants = [*graph.initializer, *(a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute)]
    for tensor in constants:
        dims = list(tensor.dims)
        assert not (len(dims) == 2 and dims[-1] in (head_dim, head_dim // 2) and dims[-2] in grids), (tensor.name, dims)


def test_fp16_graph_keeps_rope_in_fp32_and_its_gate(exported, record_property):
    import onnx

    from vitdeploy import runtimes

    result, _, model, _ = exported("dinov3", "fp16")
    assert result.report.passed
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(result.path)))
    types = {info.name: info.type.tensor_type.elem_type for info in proto.graph.value_info}
    trig = [node for node in proto.graph.node if node.op_type in ("Sin", "Cos")]
    assert trig and all(types.get(node.output[0]) == onnx.TensorProto.FLOAT for node in trig)
    assert any(node.op_type == "MatMul" and types.get(node.output[0]) == onnx.TensorProto.FLOAT16
               for node in proto.graph.node), "not an fp16 graph"
    worst = 1.0
    with runtimes.load(result.path) as runtime:
        for index, size in enumerate(CASES["dinov3"].sizes):
            pixels = _pixels(size, 20 + index)
            got = runtime.run_outputs(pixels.numpy())["last_hidden_state"].astype(np.float64)
            with torch.no_grad():
                ref = model.forward_outputs(pixels, ["last_hidden_state"])["last_hidden_state"].double().numpy()
            cosine = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
            worst = min(worst, float(cosine.min()))
    record_property("fp16_worst_token_cosine", worst)
    assert worst >= 0.999, worst


def test_cpu_variant_says_what_it_leaves_unfused(exported):
    """EVA-02 (RoPE + SwiGLU, no GELU) gets no onnxruntime-CPU variant, and the export says why;
    DINOv3's variant fuses its GELUs and records that its RoPE attention stays unfused."""
    from vitdeploy.exporters.onnx_export import cpu_variant_path
    from vitdeploy.metadata import read_onnx_metadata

    result, _, _, lines = exported("eva02_base")
    assert not cpu_variant_path(Path(result.path)).exists()
    said = [line for line in lines if "no onnxruntime CPU variant" in line]
    assert said and "RoPE" in said[0] and "SwiGLU" in said[0]
    result, _, _, lines = exported("dinov3")
    variant = read_onnx_metadata(cpu_variant_path(Path(result.path)))
    entry = variant.transforms[-1]
    assert entry["counts"]["gelu"] == 2 and entry["counts"]["attention"] == 0
    assert any("RoPE" in part for part in entry["unfused"])


def test_transformers_dinov3_file_matches_transformers_at_three_sizes(tmp_path, record_property):
    """A transformers DINOv3ViTModel folder, exported once, against transformers at three sizes."""
    from rope_sources import hf_dinov3, hf_dinov3_outputs

    from vitdeploy import runtimes
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    source = hf_dinov3(True, tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    sizes = [(64, 64), (80, 80), (48, 96)]
    options = ExportOptions(outputs=["pooler_output", "last_hidden_state"], batch=(1, 2), height=(48, 80),
                            width=(64, 96), validation_max_batch=1, cpu_variant=False, preflight=False)
    result = export_onnx(model, tmp_path / "dinov3_hf.onnx", options)
    errors = {}
    with runtimes.load(result.path) as runtime:
        for index, size in enumerate(sizes):
            pixels = _pixels(size, 30 + index)
            expected = hf_dinov3_outputs(source, pixels)
            got = runtime.run_outputs(pixels.numpy())
            errors.update({(size, name): rel_err(got[name], expected[name]) for name in got})
    record_property("onnx_worst_rel_err", max(errors.values()))
    assert max(errors.values()) <= TOLERANCE, errors


def test_int8_graph_of_a_rope_family_passes_its_gate_with_rope_in_float(exported, tmp_path):
    """The quantizer on DINOv3's fp32 file (random weights, its built-in calibration photos): the int8
    graph passes the int8 gate against the fp32 graph, and RoPE's sin/cos are left in float32."""
    import onnx

    from vitdeploy.exporters.quantize import QuantizeOptions
    from vitdeploy.exporters.quantize_onnx import quantize_onnx

    result = exported("dinov3")[0]
    quantized = quantize_onnx(result.path, tmp_path / "dinov3-int8.onnx", QuantizeOptions(), calibration_size=8,
                              max_batch=1, cpu_variant=False)
    assert quantized.report is not None and quantized.report.passed
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(quantized.path)))
    types = {info.name: info.type.tensor_type.elem_type for info in proto.graph.value_info}
    trig = [node for node in proto.graph.node if node.op_type in ("Sin", "Cos")]
    assert trig and all(types.get(node.output[0]) == onnx.TensorProto.FLOAT for node in trig)
    assert any(node.op_type == "QuantizeLinear" for node in proto.graph.node)


def test_transformers_siglip2_file_matches_transformers_at_three_sizes(tmp_path, record_property):
    """A transformers Siglip2VisionModel folder exported once (its table resized in the graph as
    transformers resizes it) against transformers at three sizes, whole images as patch sequences."""
    from family_sources import hf_outputs
    from rope_sources import hf_siglip2

    from vitdeploy import runtimes
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    source = hf_siglip2(tmp_path / "hf", layers=1)
    options = ExportOptions(outputs=["pooler_output", "last_hidden_state"], batch=(1, 2), height=(48, 80),
                            width=(64, 96), validation_max_batch=1, cpu_variant=False, preflight=False)
    result = export_onnx(load_model(tmp_path / "hf"), tmp_path / "siglip2.onnx", options)
    errors = {}
    with runtimes.load(result.path) as runtime:
        for index, (height, width) in enumerate([(64, 64), (80, 80), (48, 96)]):
            pixels = _pixels((height, width), 40 + index)
            expected = hf_outputs(source, pixels)
            got = runtime.run_outputs(pixels.numpy())
            errors.update({(height, width, name): rel_err(got[name], expected[name]) for name in got})
    record_property("onnx_worst_rel_err", max(errors.values()))
    assert max(errors.values()) <= TOLERANCE, errors
