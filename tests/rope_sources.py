"""The 2025-26 families as timm builds them, for the parity tests (a test helper, no tests).

Each case is a timm ``Eva`` model (DINOv3, EVA-02, Perception Encoder; and AIMv2, a timm
``VisionTransformer`` with RMSNorm and SwiGLU) at a tiny size (width 64,
depth 2, 4 heads), built with ``dynamic_img_size=True`` (timm's own switch for other sizes), its
weights moved far from their init — q/k projections large enough that attention is far from
uniform, so a wrong RoPE shows — written as timm writes weights: a timm Hub folder naming the
architecture, or a bare state dict; and the original facebookresearch/dinov3 names for DINOv3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from family_sources import timm_outputs
from safetensors.torch import save_file
from test_resample_parity import realistic_pos_embed
from timm_without_torchvision import import_timm

timm = import_timm()

TOLERANCE = 1e-4
TINY = dict(embed_dim=64, depth=2, num_heads=4)


@dataclass(frozen=True)
class RopeCase:
    """A timm architecture at a tiny size, its native and changed input sizes, and its outputs' names."""

    id: str
    timm_name: str
    image: int
    patch: int
    family: str
    outputs: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The native size, a larger square one and a non-square one."""
        side = self.image // self.patch
        return [(self.image, self.image), ((side + 1) * self.patch, (side + 1) * self.patch),
                ((side - 1) * self.patch, (side + 2) * self.patch)]


CASES = {
    case.id: case for case in (
        RopeCase("dinov3", "vit_small_patch16_dinov3", 64, 16, "dinov3",
                 ("pooler_output", "last_hidden_state", "patch_tokens")),
        RopeCase("dinov3_plus_qkvb", "vit_small_plus_patch16_dinov3_qkvb", 64, 16, "dinov3",
                 ("pooler_output", "last_hidden_state"), dict(global_pool="token")),
        RopeCase("eva02", "eva02_tiny_patch14_224", 56, 14, "eva02", ("pooler_output", "last_hidden_state")),
        RopeCase("eva02_base", "eva02_base_patch14_448", 56, 14, "eva02",
                 ("logits", "pooler_output", "last_hidden_state"), dict(num_classes=7)),
        RopeCase("eva02_clip", "eva02_base_patch16_clip_224", 64, 16, "eva02",
                 ("logits", "pooler_output", "last_hidden_state"), dict(num_classes=32)),
        RopeCase("eva02_clip_large", "eva02_large_patch14_clip_224", 56, 14, "eva02",
                 ("logits", "pooler_output", "last_hidden_state"), dict(num_classes=32)),
        RopeCase("pe", "vit_pe_core_tiny_patch16_384", 64, 16, "pe",
                 ("image_embeds", "pooler_output", "last_hidden_state"), dict(num_classes=32)),
        RopeCase("pe_spatial", "vit_pe_spatial_tiny_patch16_512", 64, 16, "pe_spatial",
                 ("pooler_output", "last_hidden_state")),
        RopeCase("aimv2", "aimv2_large_patch14_224", 56, 14, "aimv2", ("pooler_output", "last_hidden_state")),
    )
}


def timm_rope_model(case: RopeCase, seed: int = 0, size: dict[str, int] = TINY) -> torch.nn.Module:
    """timm's ``case`` model at ``size`` (tiny), with every weight moved far from its init."""
    torch.manual_seed(seed)
    model = timm.create_model(case.timm_name, pretrained=False, dynamic_img_size=True, img_size=case.image,
                              **size, **case.kwargs).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif name.endswith(("cls_token", "reg_token", "latent")):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif any(part in name for part in ("attn.qkv.weight", "q_proj.weight", "k_proj.weight")):
                param.copy_(0.4 * torch.randn(param.shape, generator=generator))  # peaked attention
            elif name == "pos_embed":
                prefix = 0 if model.no_embed_class else model.num_prefix_tokens
                param.copy_(realistic_pos_embed(prefix, case.image // case.patch, param.shape[-1]))
            else:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        if case.family == "pe":
            model.head.bias.zero_()  # PE's projection: timm's zero-bias head
    return model


def save_timm_rope(model: torch.nn.Module, case: RopeCase, folder: Path, hub: bool, size: dict[str, int] = TINY,
                   name: str | None = None) -> Path:
    """The weights as timm saves them: a timm Hub folder naming the architecture (its ``model_args``
    ``size``), or a bare file; named ``name`` in ``folder``, else after the case."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not hub:
        path = folder / (name or f"{case.id}.safetensors")
        save_file(tensors, str(path))
        return path
    path = folder / (name or f"{case.id}_hub")
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    cfg = model.pretrained_cfg
    config = {"architecture": case.timm_name, "model_args": {**size, "img_size": case.image, **case.kwargs},
              "pretrained_cfg": {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "crop_pct": 1.0,
                                 "interpolation": "bicubic"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def original_dinov3_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv3 model's weights under facebookresearch/dinov3's names (the opposite way from the
    reader, as timm's ``checkpoint_filter_fn`` reads them): storage tokens, a masked qkv bias, LayerScale
    ``ls1/ls2``, SwiGLU ``w1/w2/w3``, a mask token and a bf16 ``rope_embed.periods`` buffer."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        key = key.replace("gamma_2", "ls2.gamma")
        if key.endswith("attn.q_bias"):
            v_bias = state[key.replace("attn.", "attn.").replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            out[key.replace("q_bias", "qkv.bias_mask")] = torch.cat(
                [torch.ones_like(value), torch.zeros_like(value), torch.ones_like(value)])
            continue
        if key.endswith("attn.v_bias"):
            continue
        if ".mlp.fc1_g." in key:
            out[key.replace("fc1_g", "w1")] = value
            continue
        if ".mlp.fc1_x." in key:
            out[key.replace("fc1_x", "w2")] = value
            continue
        if ".mlp.fc2." in key and "fc1_g" in "".join(state):
            key = key.replace("fc2", "w3")
        out[key] = value.clone()
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    out["rope_embed.periods"] = torch.ones(model.embed_dim // model.blocks[0].attn.num_heads // 4,
                                           dtype=torch.bfloat16)
    return out


def timm_rope_outputs(model: torch.nn.Module, case: RopeCase, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm's own view of each of ``case``'s outputs (:func:`family_sources.timm_outputs`)."""
    return timm_outputs(model, x, case.outputs)


def hf_dinov3(gated: bool, folder: Path, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """transformers' ``DINOv3ViTModel`` at a tiny size (4 registers), perturbed like the timm models
    (large q/k projections), written with ``save_pretrained`` to ``folder``."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                               num_register_tokens=4, image_size=64, patch_size=16, use_gated_mlp=gated,
                               hidden_act="silu" if gated else "gelu", layerscale_value=0.5)
    model = perturb_peaked(T.DINOv3ViTModel(config).eval(), seed + 1, ("cls_token", "register_tokens"))
    model.save_pretrained(folder)
    return model


def perturb_peaked(model: torch.nn.Module, seed: int, tokens: tuple[str, ...], table: str | None = None,
                   grid: int = 0) -> torch.nn.Module:
    """A transformers model's weights moved far from their init: q/k projections large (peaked attention),
    the parameters named ending in ``tokens`` unit-scale, the position ``table`` (a parameter's name)
    a smooth ``grid`` x ``grid`` sin-cos grid, every other parameter moved by 5 %."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("q_proj.weight", "k_proj.weight")):
                param.copy_(0.4 * torch.randn(param.shape, generator=generator))
            elif name.endswith(tokens):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name == table:
                param.copy_(realistic_pos_embed(0, grid, param.shape[-1])[0])
            else:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def hf_dinov3_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' own outputs (it computes RoPE for every input size itself)."""
    with torch.no_grad():
        result = model(pixel_values=x)
    return {"pooler_output": result.pooler_output, "last_hidden_state": result.last_hidden_state,
            "patch_tokens": result.last_hidden_state[:, 5:]}


def hf_siglip2(folder: Path, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """transformers' ``Siglip2VisionModel`` at a tiny size (16 patches of 16 pixels: native 64 x 64),
    perturbed like the timm models (large q/k projections), written with ``save_pretrained`` to ``folder``."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.Siglip2VisionModel(T.Siglip2VisionConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128, patch_size=16,
        num_patches=16)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.4 if any(p in name for p in ("q_proj.weight", "k_proj.weight")) else 0.05
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return model


def hf_aimv2(native: bool, folder: Path, seed: int = 0, **config: Any) -> torch.nn.Module:
    """transformers' ``Aimv2VisionModel`` at a tiny size (patch 14, 56 px, its attention-pool head unless
    ``use_head=False``), perturbed like the timm models (large q/k projections), written with
    ``save_pretrained`` to ``folder``; ``native`` is its ``is_native`` (sin-cos positions at every size)."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.Aimv2VisionModel(T.Aimv2VisionConfig(**{
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "patch_size": 14, "image_size": 56, "is_native": native, **config})).eval()
    perturb_peaked(model, seed + 1, ("cls_token",), "embeddings.position_embedding.weight", grid=4)
    model.save_pretrained(folder)
    return model


def hf_aimv2_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' own outputs (its final RMSNorm applied to every token; the head's, where it has one)."""
    with torch.no_grad():
        result = model(pixel_values=x)
    outputs = {"last_hidden_state": result.last_hidden_state}
    if result.pooler_output is not None:
        outputs["pooler_output"] = result.pooler_output
    return outputs


def graph_ancestors(graph: Any, name: str) -> set[str]:
    """Op types of every node of the ONNX ``graph`` that the value ``name`` depends on."""
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


def assert_rope_from_the_input_shape(graph: Any, hidden: int, heads: int, patch: int) -> None:
    """The ONNX ``graph`` has no ``If``/``Loop`` node, computes RoPE's sin/cos from the input's ``Shape``,
    and keeps no sin/cos table of any grid as a constant (``[tokens, head_dim]`` or half of it; with one
    head a ``[tokens, hidden]`` table has a weight's shape, so only the half-width one is looked for)."""
    head_dim = hidden // heads
    ops = [node.op_type for node in graph.node]
    assert "If" not in ops and "Loop" not in ops
    trig = [node for node in graph.node if node.op_type in ("Sin", "Cos")]
    assert trig, "RoPE's sin/cos were folded into constants"
    for node in trig:
        assert {"Shape", "Range"} <= graph_ancestors(graph, node.input[0]), node.name
    grids = {(h // patch) * (w // patch) for h in range(patch, 200, patch) for w in range(patch, 200, patch)}
    constants = [*graph.initializer, *(a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute)]
    for tensor in constants:
        dims = list(tensor.dims)
        table = len(dims) == 2 and dims[-1] in {head_dim, head_dim // 2} - {hidden} and dims[-2] in grids
        assert not table, (tensor.name, dims)
