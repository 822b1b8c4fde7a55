"""transformers' AIMv2 (``Aimv2VisionModel`` folders) read as exactly the AIMv2 architecture, against transformers.

Eager parity (<= 1e-4 relative, per token, and the attention-pool head's ``pooler_output``) on real
photos with weights perturbed so attention is far from uniform. ``is_native: true`` computes a 2-D
sin-cos table for every grid: parity at the native size and two others, one not square, and one
exported fp32 file matching transformers at three sizes. ``is_native: false`` adds a learned table
that transformers cannot resize (it refuses other sizes): parity with transformers at the native
size, and at other sizes with timm's AIMv2 carrying the same weights (the convention vitdeploy
follows there); the export's check against transformers covers the native size only and says why.
"""

from __future__ import annotations

import pytest
import torch
from family_sources import rel_err
from rope_sources import TOLERANCE, hf_aimv2, hf_aimv2_outputs, timm
from test_families_rope import _photo

from vitdeploy.checkpoints import CheckpointError, load_model
from vitdeploy.flops import count_params
from vitdeploy.model import VisionTransformer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

SIZES = [(56, 56), (70, 70), (42, 84)]  # the native 4 x 4 grid, 5 x 5, 3 x 6


def _worst(model: VisionTransformer, source: torch.nn.Module, sizes: list[tuple[int, int]]) -> float:
    worst = 0.0
    for height, width in sizes:
        x = _photo(height, width)
        expected = hf_aimv2_outputs(source, x)
        with torch.no_grad():
            actual = model.forward_outputs(x, list(expected))
        worst = max(worst, *(rel_err(actual[name], expected[name]) for name in expected))
    return worst


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qkv_bias"])
def test_native_aimv2_matches_transformers_at_three_sizes(bias, tmp_path):
    """is_native: the sin-cos table recomputed per grid, the head read as ``pool_form="aimv2"``; with
    ``qkv_bias`` the attention's biases (and the output projection's) are read, the MLP's are zeros."""
    source = hf_aimv2(True, tmp_path, qkv_bias=bias)
    model = load_model(tmp_path)
    config = model.config
    assert (config.provenance.family, config.norm, config.mlp_type, config.pooling, config.pool_form) == (
        "aimv2", "rmsnorm", "swiglu", "map", "aimv2")
    assert config.sincos_pos_embed and not config.abs_pos_embed and not config.has_class_token
    assert config.qkv_bias == bias and config.proj_bias == bias and config.patch_norm and config.patch_bias
    assert count_params(config) == model.num_parameters()
    assert _worst(model, source, SIZES) <= TOLERANCE
    # the same weights with the learned-table position scheme's absence (no positions) miss by far
    blind = VisionTransformer(config.replace(sincos_pos_embed=False)).eval()
    blind.load_state_dict(model.state_dict())
    assert _worst(blind, source, SIZES[:1]) > 100 * TOLERANCE


def test_native_aimv2_without_head_pools_like_timm(tmp_path):
    """use_head false: no attention pool (transformers gives no pooler_output); tokens match, and the
    pooled vector is timm's AIMv2 mean of the normed tokens."""
    source = hf_aimv2(True, tmp_path, use_head=False)
    model = load_model(tmp_path)
    assert model.config.pooling == "avg" and not model.config.use_fc_norm and model.attn_pool is None
    assert _worst(model, source, SIZES) <= TOLERANCE
    x = _photo(42, 84)
    with torch.no_grad():
        outputs = model.forward_outputs(x, ["pooler_output", "last_hidden_state"])
    torch.testing.assert_close(outputs["pooler_output"], outputs["last_hidden_state"].mean(dim=1))


def test_aimv2_with_another_activation_is_refused_in_one_line(tmp_path):
    """vitdeploy's SwiGLU gates with SiLU: a folder whose hidden_act is another is refused, naming it."""
    hf_aimv2(True, tmp_path, hidden_act="gelu")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "hidden_act 'gelu'" in message and "AIMv2" in message and "\n" not in message


def _timm_aimv2_with(model: VisionTransformer) -> torch.nn.Module:
    """timm's AIMv2 (``dynamic_img_size``) at ``model``'s size, holding ``model``'s weights (its SwiGLU split
    back into ``fc1_g``/``fc1_x``; the attention pool, which timm's AIMv2 has not, left out)."""
    config = model.config
    reference = timm.create_model("aimv2_large_patch14_224", pretrained=False, dynamic_img_size=True,
                                  img_size=config.image_size, embed_dim=config.hidden_size, depth=config.depth,
                                  num_heads=config.num_heads, mlp_ratio=config.mlp_size / config.hidden_size).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("attn_pool."):
            continue
        if key.endswith("mlp.fc1.weight"):
            gate, up = value.chunk(2)
            state[key.replace("fc1", "fc1_g")], state[key.replace("fc1", "fc1_x")] = gate, up
            continue
        state[key] = value
    reference.load_state_dict(state)
    return reference


def test_learned_table_aimv2_native_size_only_in_transformers(tmp_path):
    """is_native false: equal to transformers at its native size; transformers refuses any other size, and
    there vitdeploy resamples the table as timm does for the same AIMv2 weights (equal to timm's model)."""
    source = hf_aimv2(False, tmp_path)
    model = load_model(tmp_path)
    assert model.config.abs_pos_embed and not model.config.sincos_pos_embed
    assert model.config.pos_embed_resample == "timm"
    assert _worst(model, source, SIZES[:1]) <= TOLERANCE
    with pytest.raises(RuntimeError):  # its table has the native grid's rows, added as it is
        hf_aimv2_outputs(source, _photo(70, 70))
    reference = _timm_aimv2_with(model)
    for height, width in SIZES:
        x = _photo(height, width)
        with torch.no_grad():
            expected = reference.forward_features(x)
            actual = model.forward_outputs(x, ["last_hidden_state"])["last_hidden_state"]
        assert rel_err(actual, expected) <= TOLERANCE, (height, width)


@pytest.fixture(scope="module")
def exported_native(tmp_path_factory):
    """The is_native model exported once (fp32, 42..70 x 42..84), checked against transformers by the export."""
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.exporters.source_check import plan_source_check

    folder = tmp_path_factory.mktemp("aimv2_hf")
    source = hf_aimv2(True, folder / "hf")
    options = ExportOptions(outputs=("pooler_output", "last_hidden_state"), batch=(1, 2), height=(42, 70),
                            width=(42, 84), validation_max_batch=1, preflight=False,
                            source_check=plan_source_check(folder / "hf", "huggingface"))
    lines: list[str] = []
    result = export_onnx(load_model(folder / "hf"), folder / "aimv2.onnx", options, progress=lines.append)
    return source, result, lines


def test_native_aimv2_one_onnx_file_matches_transformers_at_three_sizes(exported_native, record_property):
    from vitdeploy import runtimes

    source, result, lines = exported_native
    assert result.report.passed and result.source_check.passed
    # the sin-cos table's Sin/Cos are no RoPE: the CPU-variant line does not say there is one
    said = [line for line in lines if "onnxruntime CPU variant" in line]
    assert said and not any("RoPE" in line for line in said)
    assert len(result.source_check.sizes) == 2  # the native size and a changed, non-square one
    errors = {}
    with runtimes.load(result.path) as runtime:
        for height, width in SIZES:
            x = _photo(height, width)
            expected = hf_aimv2_outputs(source, x)
            got = runtime.run_outputs(x.numpy())
            errors.update({(height, width, name): rel_err(got[name], expected[name]) for name in expected})
    record_property("onnx_worst_rel_err", max(errors.values()))
    assert max(errors.values()) <= TOLERANCE, errors


def test_native_aimv2_graph_computes_its_table_from_the_input_shape(exported_native):
    """The sin-cos table comes from the dynamic grid (Shape → Range → Sin/Cos), no If node, no table constant."""
    import onnx

    graph = onnx.load(str(exported_native[1].path)).graph
    assert not {"If", "Loop"} & {node.op_type for node in graph.node}
    producers = {out: node for node in graph.node for out in node.output}
    trig = [node for node in graph.node if node.op_type in ("Sin", "Cos")]
    assert len(trig) >= 4
    for node in trig:
        seen, stack = set(), [node.input[0]]
        while stack:
            producer = producers.get(stack.pop())
            if producer is not None and producer.name not in seen:
                seen.add(producer.op_type)
                seen.add(producer.name)
                stack.extend(producer.input)
        assert {"Shape", "Range"} <= seen, node.name


def test_learned_table_aimv2_source_check_runs_transformers_at_the_native_size_only(tmp_path):
    """The check against transformers (what export and verify run) covers the size transformers can run,
    its native one, and says why it stops there, rather than failing on transformers' own refusal."""
    from types import SimpleNamespace

    from vitdeploy.exporters.source_check import plan_source_check, run_source_check
    from vitdeploy.metadata import ShapeRange

    hf_aimv2(False, tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    config = model.config
    names = ["pooler_output", "last_hidden_state"]

    def candidate(pixels):
        with torch.no_grad():
            return {k: v.numpy() for k, v in model.forward_outputs(torch.from_numpy(pixels), names).items()}

    metadata = SimpleNamespace(model_config=config.to_dict(), stride=config.stride, precision="fp32",
                               output_names=names, preprocessing=config.preprocessing.at(config.image_size),
                               shape_range=ShapeRange(batch=(1, 8), height=(42, 70), width=(42, 84)))
    check = run_source_check(candidate, plan_source_check(tmp_path / "hf", "huggingface"), metadata,
                             height=(42, 70), width=(42, 84))
    assert check.passed and check.sizes == [(56, 56)]
    assert "at 56x56 (Aimv2VisionModel (is_native false) runs at its native size only)" in check.summary_line()
    assert check.size_note in check.to_dict()["notes"]
