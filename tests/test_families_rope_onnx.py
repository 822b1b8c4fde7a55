"""One ONNX file per RoPE family serves every resolution, and matches timm's own model.

DINOv3 (RoPE only) and EVA-02 B (table + RoPE, split SwiGLU with its norm, split q/k/v) are
loaded from timm Hub folders and exported
by the real exporter (dynamic batch x height x width, validated against eager as every export
is). The file, run by onnxruntime at the native size, a larger square and a non-square size,
matches timm (``dynamic_img_size=True``) within 1e-4 relative; the graph has no ``If`` node and
computes RoPE's sin/cos from the input's shape (a ``Shape`` op feeds them), never from a constant
of the traced size. The onnxruntime-CPU variant says what it leaves unfused. Elsewhere, from files
those tests make anyway: the Perception Encoder's and AIMv2's files and those of transformers' DINOv3 and SigLIP 2 folders
against their source at three sizes (``tests/test_families_cli.py``, the families table's
commands, which also walk every RoPE file's graph as here: the Perception Encoder's, core and
spatial, among them); DINOv3's fp16 and int8 graphs with sin/cos and the rotation in float32, each within its
gate (``tests/test_families_precision_study.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from family_sources import rel_err
from rope_sources import (
    CASES,
    TOLERANCE,
    assert_rope_from_the_input_shape,
    save_timm_rope,
    timm,
    timm_rope_model,
    timm_rope_outputs,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.skipif(timm is None, reason="timm is not installed (CI: pip install --no-deps timm)")]

GRAPHS = ("dinov3", "eva02_base")


def _pixels(size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Callable[[str], Any]:
    """Each case exported once (fp32; DINOv3 and EVA-02 with their CPU variant)."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.outputs import available_outputs

    cache: dict[str, Any] = {}

    def get(case_id: str) -> Any:
        if case_id not in cache:
            case = CASES[case_id]
            folder = tmp_path_factory.mktemp(case_id)
            source = timm_rope_model(case)
            model = load_model(save_timm_rope(source, case, folder, hub=True))
            heights, widths = zip(*case.sizes, strict=True)
            lines: list[str] = []
            options = ExportOptions(outputs=available_outputs(model.config), batch=(1, 2),
                                    height=(min(heights), max(heights)), width=(min(widths), max(widths)),
                                    validation_max_batch=1, cpu_variant=case_id in ("dinov3", "eva02_base"),
                                    preflight=False, source=case_id)
            result = export_onnx(model, folder / f"{case_id}.onnx", options, progress=lines.append)
            cache[case_id] = (result, source, model, lines)
        return cache[case_id]

    return get


@pytest.mark.parametrize("case_id", GRAPHS)
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

    result, _, model, _ = exported(case_id)
    config = model.config
    assert_rope_from_the_input_shape(onnx.load(str(result.path)).graph, config.hidden_size, config.num_heads,
                                     CASES[case_id].patch)


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
