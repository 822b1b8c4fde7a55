"""The families as their source libraries build them, for the parity tests (a test helper, no tests).

Each source's own model, its weights perturbed away from their init, written in its own format:
timm models (``dynamic_img_size=True``) saved as timm saves weights, transformers models saved with
``save_pretrained``, and timm DINOv2 weights under the original facebookresearch/dinov2 names. Then
each library's own outputs under vitdeploy's output names (:func:`~vitdeploy.exporters.source_check.timm_outputs`,
:func:`~vitdeploy.exporters.source_check.hf_outputs`, shared with the export's check against the source), and the sizes
every parity test runs at: the native one and three others, two of them not square.

``tests/test_families_model.py`` (eager vs timm), ``tests/test_checkpoints_families_hf.py`` (eager
vs transformers and the original DINOv2) and ``tests/test_families_onnx_parity.py`` (the exported
graph vs all three) share these builders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from test_resample_parity import realistic_pos_embed
from timm_without_torchvision import import_timm

from vitdeploy.exporters.source_check import hf_outputs, timm_outputs  # noqa: F401 - re-exported for the tests

timm = import_timm()

TOLERANCE = 1e-4  # relative max error against the source library's own output


def rel_err(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` of two tensors or arrays of the same shape."""
    actual = np.asarray(torch.as_tensor(actual).double())
    expected = np.asarray(torch.as_tensor(expected).double())
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def parity_grids(side: int) -> list[tuple[int, int]]:
    """The native ``side x side`` grid, one larger square and two non-square grids (one taller, one wider)."""
    return [(side, side), (side + 2, side + 2), (side - 1, side + 3), (side + 4, side - 2)]


def parity_sizes(native: int, patch: int) -> list[tuple[int, int]]:
    """:func:`parity_grids` in pixels."""
    return [(rows * patch, cols * patch) for rows, cols in parity_grids(native // patch)]


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved away from its init (zero tokens, unit norms and layer scales included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------- timm

SMALL = dict(embed_dim=64, depth=2, num_heads=2)  # the timm models' size unless a test asks for another


@dataclass(frozen=True)
class Family:
    """A timm model name, the kwargs that make it small, and what vitdeploy must read from its keys."""

    timm_name: str
    kwargs: dict[str, Any]
    expected: dict[str, Any]
    outputs: tuple[str, ...]
    load: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "deit": Family("deit_tiny_patch16_224", dict(img_size=64, num_classes=10),
                   dict(pooling="token", distilled=False), ("logits", "pooler_output", "last_hidden_state",
                                                             "patch_tokens")),
    "deit_distilled": Family("deit_tiny_distilled_patch16_224", dict(img_size=64, num_classes=10),
                             dict(distilled=True, num_prefix_tokens=2, family="deit"),
                             ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
    "deit3": Family("deit3_small_patch16_224", dict(img_size=64, num_classes=10),
                    dict(no_embed_class=True, family="deit3"),
                    ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
    "dinov2": Family("vit_small_patch14_dinov2", dict(img_size=70),
                     dict(num_classes=0, no_embed_class=False, family="dinov2"),
                     ("pooler_output", "last_hidden_state", "patch_tokens")),
    "dinov2_reg4": Family("vit_small_patch14_reg4_dinov2", dict(img_size=70),
                          dict(num_reg_tokens=4, no_embed_class=True, num_prefix_tokens=5, family="dinov2"),
                          ("pooler_output", "last_hidden_state", "patch_tokens")),
    "clip": Family("vit_base_patch16_clip_224", dict(img_size=64, num_classes=32),
                   dict(pre_norm=True, patch_bias=False, projection_dim=32, num_classes=0, act="gelu",
                        layer_norm_eps=1e-5, family="clip"),
                   ("pooler_output", "image_embeds", "last_hidden_state", "patch_tokens")),
    "clip_quickgelu": Family("vit_base_patch16_clip_quickgelu_224", dict(img_size=64, num_classes=32),
                             dict(act="quick_gelu", projection_dim=32, family="clip"),
                             ("pooler_output", "image_embeds", "last_hidden_state", "patch_tokens"),
                             load=dict(hub_folder=True)),
    "siglip": Family("vit_base_patch16_siglip_224", dict(img_size=64),
                     dict(pooling="map", has_class_token=False, num_prefix_tokens=0, family="siglip"),
                     ("pooler_output", "last_hidden_state", "patch_tokens")),
    # an attention pool after prefix tokens: timm's VisionTransformer pools the patch tokens alone
    "map_registers": Family("vit_so150m_patch16_reg4_map_256", dict(img_size=64, num_classes=10),
                            dict(pooling="map", num_reg_tokens=4, pool_include_prefix=False),
                            ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
    "map_class_token": Family("vit_base_patch16_224", dict(img_size=64, num_classes=10, global_pool="map"),
                              dict(pooling="map", has_class_token=True, pool_include_prefix=False),
                              ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
    # no final norm (timm's final_norm=False): C-RADIO (7 registers, patch-only table), InternViT-300M
    "radio": Family("vit_base_patch16_radio_v3", dict(img_size=64), dict(final_norm=False, num_reg_tokens=7),
                    ("pooler_output", "last_hidden_state", "patch_tokens")),
    "intern300m": Family("vit_intern300m_patch14_448", dict(img_size=56), dict(final_norm=False, has_class_token=True),
                         ("pooler_output", "last_hidden_state", "patch_tokens")),
    "siglip_gap": Family("vit_base_patch16_siglip_gap_224", dict(img_size=64, num_classes=10),
                         dict(pooling="avg", use_fc_norm=False, has_class_token=False),
                         ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
}


def perturbed_timm_model(family: Family, small: dict[str, Any] = SMALL) -> torch.nn.Module:
    """The small timm model with every weight moved away from its init and a smooth position grid
    (timm's 0.02-scale random init would hide a wrong resampling)."""
    torch.manual_seed(0)
    model = timm.create_model(family.timm_name, pretrained=False, dynamic_img_size=True,
                              **{**small, **family.kwargs}).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale: from 1e-5 to order one, so the blocks matter
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif name.endswith(("cls_token", "reg_token", "dist_token", "latent")):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name != "pos_embed":
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        if "clip" in family.timm_name:
            model.head.bias.zero_()  # timm's CLIP projection: a head without bias
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed.copy_(realistic_pos_embed(prefix, model.patch_embed.grid_size[0], model.embed_dim))
    return model


def save_timm(model: torch.nn.Module, family: Family, folder: Path, small: dict[str, Any] = SMALL) -> Path:
    """The weights as timm saves them: a bare safetensors file, or a timm Hub folder naming the architecture."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not family.load.get("hub_folder"):
        path = folder / f"{family.timm_name}.safetensors"
        save_file(tensors, str(path))
        return path
    path = folder / family.timm_name
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architecture": family.timm_name, "model_args": {**small, **family.kwargs},
              "pretrained_cfg": {"mean": list(model.pretrained_cfg["mean"]), "std": list(model.pretrained_cfg["std"]),
                                 "crop_pct": 1.0, "interpolation": "bicubic"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def timm_model(name: str, width: int, depth: int, heads: int, img_size: int | tuple[int, int] = 56,
               **kwargs: Any) -> torch.nn.Module:
    """timm's ``name`` at a small width and depth (random weights, eval mode)."""
    return timm.create_model(name, pretrained=False, embed_dim=width, depth=depth, num_heads=heads,
                             img_size=img_size, **kwargs).eval()


def timm_dinov2_giant(registers: bool, img_size: int | tuple[int, int] = 56,
                      size: dict[str, int] | None = None) -> torch.nn.Module:
    """timm's DINOv2 giant (SwiGLU, ``mlp_ratio`` 4 so the packed hidden width is even) at ``size``
    (default width 64, depth 2, 4 heads), every weight moved away from its init."""
    name = "vit_giant_patch14_reg4_dinov2" if registers else "vit_giant_patch14_dinov2"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **(size or dict(embed_dim=64, depth=2, num_heads=4)),
                              mlp_ratio=4, img_size=img_size, dynamic_img_size=True, num_classes=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


# --------------------------------------------------------------------------- transformers


@dataclass
class HFCase:
    """One transformers class: how to build it small, and the timm model of its family."""

    id: str
    hf: Callable[[], torch.nn.Module]
    timm: Callable[..., torch.nn.Module]
    fields: dict


def hf_cases(width: int = 64, depth: int = 2, heads: int = 2, mlp: int = 128) -> list[HFCase]:
    """Every supported transformers class at ``width`` x ``depth`` (56 px images; patch 8, DINOv2's 14)."""
    import transformers as T

    small = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                 image_size=56, layer_norm_eps=1e-6)
    ratio = mlp // width  # transformers' DINOv2 takes an integer mlp_ratio
    assert ratio * width == mlp, f"mlp {mlp} must be a multiple of width {width}"
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    clip_vision = dict(**{**small, "layer_norm_eps": 1e-5}, patch_size=8)

    def tm(name: str, **kwargs: Any) -> Callable[..., torch.nn.Module]:
        return lambda **more: timm_model(name, width, depth, heads, **{"mlp_ratio": ratio, **kwargs, **more})

    deit = tm("deit_tiny_distilled_patch16_224", patch_size=8, num_classes=5)
    dinov2 = tm("vit_small_patch14_dinov2", num_classes=0, init_values=1.0)
    dinov2_reg = tm("vit_small_patch14_reg4_dinov2", num_classes=0, init_values=1.0)
    clip = tm("vit_base_patch16_clip_quickgelu_224", patch_size=8, num_classes=32)
    siglip = tm("vit_base_patch16_siglip_224", patch_size=8, num_classes=0, act_layer="gelu_tanh")
    return [
        HFCase("deit_teacher",
               lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**small, patch_size=8, num_labels=5)),
               deit, dict(family="deit", distilled=True, class_token=True, num_classes=5,
                          pos_embed_resample="huggingface")),
        HFCase("deit_classifier",
               lambda: T.DeiTForImageClassification(T.DeiTConfig(**small, patch_size=8, num_labels=5)),
               deit, dict(family="deit", distilled=True, num_classes=5)),
        HFCase("deit_model", lambda: T.DeiTModel(T.DeiTConfig(**small, patch_size=8)),
               tm("deit_tiny_distilled_patch16_224", patch_size=8, num_classes=0),
               dict(family="deit", distilled=True, num_classes=0)),
        HFCase("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(**small, patch_size=14, mlp_ratio=ratio)), dinov2,
               dict(family="dinov2", num_reg_tokens=0, no_embed_class=False, layer_scale=1.0, pooling="token",
                    pos_embed_resample="huggingface", image_size=56, patch_size=14)),
        HFCase("dinov2_classifier", lambda: T.Dinov2ForImageClassification(
                   T.Dinov2Config(**small, patch_size=14, mlp_ratio=ratio, num_labels=3)),
               dinov2, dict(family="dinov2", pooling="token_avg", num_classes=3, pos_embed_resample="huggingface")),
        HFCase("dinov2_reg", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
                   **small, patch_size=14, mlp_ratio=ratio, num_register_tokens=4)),
               dinov2_reg, dict(family="dinov2", num_reg_tokens=4, no_embed_class=True, pos_embed_resample="timm")),
        HFCase("dinov2_reg_classifier", lambda: T.Dinov2WithRegistersForImageClassification(
                   T.Dinov2WithRegistersConfig(**small, patch_size=14, mlp_ratio=ratio, num_register_tokens=4,
                                               num_labels=3)),
               dinov2_reg, dict(family="dinov2", num_reg_tokens=4, pooling="token_avg", num_classes=3)),
        HFCase("clip_vision", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**clip_vision)),
               tm("vit_base_patch16_clip_quickgelu_224", patch_size=8, num_classes=0),
               dict(family="clip", pre_norm=True, patch_bias=False, act="quick_gelu", projection_dim=None,
                    layer_norm_eps=1e-5, mean=(0.48145466, 0.4578275, 0.40821073),
                    std=(0.26862954, 0.26130258, 0.27577711), crop_pct=1.0, pos_embed_resample="huggingface")),
        HFCase("clip_vision_projection", lambda: T.CLIPVisionModelWithProjection(
                   T.CLIPVisionConfig(**clip_vision, projection_dim=32)),
               clip, dict(family="clip", projection_dim=32)),
        HFCase("clip_full", lambda: T.CLIPModel(T.CLIPConfig(vision_config=clip_vision, text_config=text,
                                                             projection_dim=32)),
               clip, dict(family="clip", projection_dim=32, act="quick_gelu")),
        HFCase("siglip_vision", lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**small, patch_size=8)), siglip,
               dict(family="siglip", class_token=False, pooling="map", act="gelu_tanh", mean=(0.5, 0.5, 0.5),
                    pos_embed_resample="huggingface")),
        HFCase("siglip_full", lambda: T.SiglipModel(T.SiglipConfig(
                   vision_config=dict(**small, patch_size=8), text_config=text)),
               siglip, dict(family="siglip", pooling="map")),
    ]


def timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitdeploy's names for timm's model: CLIP's projection is timm's bias-free-by-zero ``head``."""
    state_dict = dict(state_dict)
    if "proj.weight" in state_dict:
        weight = state_dict.pop("proj.weight")
        state_dict.update({"head.weight": weight, "head.bias": torch.zeros(weight.shape[0])})
    return state_dict


# --------------------------------------------------------------------------- the original DINOv2


def hub_state_dict(model: torch.nn.Module, chunks: int = 0, class_pos: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """A timm DINOv2 model's weights under facebookresearch/dinov2's names (the opposite way from the
    reader): registers renamed, a class-token position embedding (``class_pos``, else random) split
    off, a mask token added, and optionally ``block_chunks`` names ``blocks.C.N``."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hidden = state["cls_token"].shape[-1]
    generator = torch.Generator().manual_seed(5)
    if "reg_token" in state:
        class_pos = torch.randn(1, 1, hidden, generator=generator) if class_pos is None else class_pos
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - class_pos
        state["pos_embed"] = torch.cat([class_pos, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.randn(1, hidden, generator=generator)
    if chunks:
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        per_chunk = -(-depth // chunks)
        state = {(f"blocks.{int(k.split('.')[1]) // per_chunk}.{k[len('blocks.'):]}" if k.startswith("blocks.")
                  else k): v for k, v in state.items()}
    return state


def original_dinov2_resample(pos_embed: torch.Tensor, grid: tuple[int, int], offset: float,
                             antialias: bool) -> torch.Tensor:
    """facebookresearch/dinov2's ``interpolate_pos_encoding`` (class position first, then the grid):
    bicubic with scale factors ``(new + offset) / old`` when ``offset``, else at the exact size."""
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    dim = pos_embed.shape[-1]
    if tuple(grid) == (side, side):  # the original returns the stored embeddings at their own grid
        return pos_embed
    if offset:
        kwargs = {"scale_factor": ((grid[0] + offset) / side, (grid[1] + offset) / side)}
    else:
        kwargs = {"size": grid}
    patches = torch.nn.functional.interpolate(pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                              mode="bicubic", antialias=antialias, **kwargs)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def original_dinov2_outputs(hub: dict[str, torch.Tensor], build: Callable[..., torch.nn.Module],
                            pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The original DINOv2's forward pass of the ``hub`` weights on ``pixels`` under vitdeploy's names:
    its ``x_norm_clstoken`` (``pooler_output``), every normed token (``last_hidden_state``) and
    ``x_norm_patchtokens`` (``patch_tokens``).

    Its blocks are timm's (``build(img_size=...)`` makes the timm DINOv2 model of the same
    architecture at the input's size) with the position embeddings resampled as the original's own
    ``interpolate_pos_encoding`` does (:func:`original_dinov2_resample`: offset 0.1, no antialias
    without registers; exact size, antialiased with them), and the class position added before the
    registers are inserted.
    """
    registers = "register_tokens" in hub
    patch = int(hub["patch_embed.proj.weight"].shape[-1])
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    pos = original_dinov2_resample(hub["pos_embed"], grid, 0.0 if registers else 0.1, antialias=registers)
    state = {k: v for k, v in hub.items() if k not in ("mask_token", "register_tokens")}
    if registers:  # the original adds the class position before inserting the registers: fold it
        state.update(reg_token=hub["register_tokens"], cls_token=hub["cls_token"] + pos[:, :1], pos_embed=pos[:, 1:])
    else:
        state["pos_embed"] = pos
    reference = build(img_size=(grid[0] * patch, grid[1] * patch))
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        tokens = reference.forward_features(pixels)
    return {"pooler_output": tokens[:, 0], "last_hidden_state": tokens,
            "patch_tokens": tokens[:, reference.num_prefix_tokens:]}
