"""What every family module provides (:class:`Family`), and the pieces timm's ``Eva`` class shares.

timm builds DINOv3, EVA-02 and the Perception Encoder with one class (``timm.models.eva.Eva``);
its parameter names differ from its ``VisionTransformer``'s in a few places, which
:func:`from_timm_eva` maps to vitdeploy's (= timm ViT's) names: LayerScale ``gamma_1``/``gamma_2``
→ ``ls1.gamma``/``ls2.gamma``; a split q/k/v projection (``q_proj``, ``k_proj``, ``v_proj``) →
one ``qkv`` with ``q_bias``/``v_bias``; a split SwiGLU (``fc1_g``, ``fc1_x``) → one packed ``fc1``
(gate first). :func:`infer_family_config` then reads the sizes from the tensors and takes
everything the tensors cannot show (the RoPE, norm epsilon, heads, preprocessing) from the
family's variant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vitdeploy.config import ViTConfig

StateDict = dict[str, Any]  # name -> torch.Tensor (torch is imported lazily)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Family:
    """One model family: its config ``name``, a ``label`` for messages, its ``variants`` (timm's names),
    the key maps from each source format to vitdeploy's names (``key_maps``: format → function), and
    the structure its tensors alone give away (``signature``: tensor name patterns that only it has)."""

    name: str
    label: str
    variants: dict[str, ViTConfig]
    key_maps: dict[str, Callable[[StateDict], StateDict]] = field(default_factory=dict)
    # fields of a config inferred without a variant name (what a bare state dict cannot show)
    defaults: dict[str, Any] = field(default_factory=dict)
    # whether a bare timm state dict's tensor names (a set) fit this family; with ``lookalike`` (what
    # else they fit that computes differently) such a file is refused rather than read as the family
    fits_bare: Callable[[frozenset[str]], bool] | None = None
    lookalike: str | None = None
    # a transformers config.json's fields that no tensor shows (num_heads among them), where the family
    # reads transformers folders (key_maps["huggingface"])
    transformers_fields: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def has_part(names: frozenset[str], part: str) -> bool:
    """Whether any tensor name contains ``part``."""
    return any(part in name for name in names)


def variant(name: str, image: int, patch: int, hidden: int, depth: int, heads: int, mlp: int,
            **fields: Any) -> ViTConfig:
    """A registry entry: ``name`` at ``image`` pixels with the given sizes and family fields (flat names,
    :meth:`ViTConfig.from_fields`)."""
    return ViTConfig.from_fields(dict(name=name, image_size=image, patch_size=patch, hidden_size=hidden, depth=depth,
                                      num_heads=heads, mlp_size=mlp, **fields))


def _concat(tensors: list[Any]) -> Any:
    import torch

    return torch.cat(tensors, dim=0)


def from_timm_eva(state_dict: StateDict) -> StateDict:
    """timm ``Eva`` parameter names → vitdeploy's (see the module doc); other names pass unchanged."""
    out: StateDict = {}
    for key, value in state_dict.items():
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value
    for prefix in sorted({k.rsplit(".attn.", 1)[0] for k in out if ".attn.q_proj." in k}):
        attn = f"{prefix}.attn"
        weights = [out.pop(f"{attn}.{p}_proj.weight") for p in "qkv"]
        out[f"{attn}.qkv.weight"] = _concat(weights)
        for letter in "qv":
            bias = out.pop(f"{attn}.{letter}_proj.bias", None)
            if bias is not None:
                out[f"{attn}.{letter}_bias"] = bias
        if f"{attn}.k_proj.bias" in out:  # AttentionRope's separate projections carry a k bias too
            k_bias = out.pop(f"{attn}.k_proj.bias")
            out[f"{attn}.qkv.bias"] = _concat([out.pop(f"{attn}.q_bias"), k_bias, out.pop(f"{attn}.v_bias")])
    for prefix in sorted({k.rsplit(".mlp.", 1)[0] for k in out if ".mlp.fc1_g." in k}):
        for kind in ("weight", "bias"):
            gate = out.pop(f"{prefix}.mlp.fc1_g.{kind}", None)
            value = out.pop(f"{prefix}.mlp.fc1_x.{kind}", None)
            if gate is not None and value is not None:
                out[f"{prefix}.mlp.fc1.{kind}"] = _concat([gate, value])
    return out


def move_block_tensors(names: dict[str, Any], table: Mapping[str, str], prefix: str, out: StateDict) -> None:
    """Move a block's tensors that ``table`` renames (a whole name, or a module's weight and bias) from
    ``names`` (the block's tensors by their source names) to ``out`` under ``prefix``."""
    for name in list(names):
        module, _, kind = name.rpartition(".")
        if name in table:
            out[f"{prefix}.{table[name]}"] = names.pop(name)
        elif module in table:
            out[f"{prefix}.{table[module]}.{kind}"] = names.pop(name)


def pop_qkv(names: dict[str, Any], module: str) -> tuple[list[Any], list[Any]]:
    """The weights and biases (None where there is none) of the separate ``{module}.{q,k,v}_proj``
    projections, taken out of ``names``."""
    weights = [names.pop(f"{module}.{p}_proj.weight") for p in "qkv"]
    return weights, [names.pop(f"{module}.{p}_proj.bias", None) for p in "qkv"]


def _shape(state_dict: StateDict, key: str) -> tuple[int, ...] | None:
    tensor = state_dict.get(key)
    return tuple(int(n) for n in tensor.shape) if tensor is not None else None


def shape_fields(state_dict: StateDict, what: str) -> dict[str, Any]:
    """The architecture fields vitdeploy-named tensors show (sizes, tokens, biases, norms, MLP type,
    pooling where a tensor decides it); raises ``ValueError`` naming what is missing."""
    proj = _shape(state_dict, "patch_embed.proj.weight")
    fc2 = _shape(state_dict, "blocks.0.mlp.fc2.weight")
    fc1 = _shape(state_dict, "blocks.0.mlp.fc1.weight")
    if proj is None or len(proj) != 4 or fc2 is None or fc1 is None:
        raise ValueError(f"{what}: no patch_embed.proj.weight [D, C, p, p] or blocks.0.mlp.fc1/fc2 weights")
    hidden, patch = proj[0], proj[-1]
    depth = len({int(m[1]) for k in state_dict if (m := _BLOCK.match(k))})
    reg = _shape(state_dict, "reg_token")
    fields: dict[str, Any] = dict(
        patch_size=patch, in_channels=proj[1], hidden_size=hidden, depth=depth, mlp_size=fc2[1],
        mlp_type="swiglu" if fc1[0] == 2 * fc2[1] else "mlp", mlp_norm="blocks.0.mlp.norm.weight" in state_dict,
        attn_norm="blocks.0.attn.norm.weight" in state_dict,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict, qv_bias="blocks.0.attn.q_bias" in state_dict,
        class_token="cls_token" in state_dict, num_reg_tokens=reg[1] if reg else 0,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        pre_norm="norm_pre.weight" in state_dict, patch_bias="patch_embed.proj.bias" in state_dict,
        abs_pos_embed="pos_embed" in state_dict, proj_bias="blocks.0.attn.proj.bias" in state_dict,
        patch_norm="patch_embed.norm.weight" in state_dict,
        final_norm="norm.weight" in state_dict or "fc_norm.weight" in state_dict,
        norm="layernorm" if "blocks.0.norm1.bias" in state_dict else "rmsnorm",
    )
    if "attn_pool.latent" in state_dict:
        fields.update(pooling="map")
    elif "fc_norm.weight" in state_dict:
        fields.update(pooling="avg", fc_norm=True)
    head = _shape(state_dict, "head.weight")
    projection = _shape(state_dict, "proj.weight")
    fields["num_classes"] = head[0] if head else 0
    fields["projection_dim"] = projection[0] if projection else None
    pos = _shape(state_dict, "pos_embed")
    if pos is not None:
        prefix = int(fields["class_token"]) + fields["num_reg_tokens"]
        for count, no_embed_class in ((prefix, False), (0, True)):
            side = round((pos[1] - count) ** 0.5)
            if side * side == pos[1] - count:
                fields.update(image_size=side * patch, no_embed_class=no_embed_class and prefix > 0)
                break
        else:
            raise ValueError(f"{what}: pos_embed {list(pos)} is no square grid after {prefix} prefix tokens")
    return fields


# Fields a variant lends an inferred config (what no tensor shows).
LENT = ("name", "family", "num_heads", "layer_norm_eps", "act", "rope", "rope_temperature", "rope_offset",
        "rope_indexing", "rope_ref_grid", "pool_heads", "mean", "std", "crop_pct", "interpolation", "resize_mode",
        "pos_embed_resample", "pooling", "fc_norm", "image_size", "class_token", "pool_form", "sincos_pos_embed")
# Fields the tensors show that must equal a named variant's (the rest are sizes).
STRUCTURE = ("mlp_type", "mlp_norm", "attn_norm", "qkv_bias", "qv_bias", "has_class_token", "num_reg_tokens", "pre_norm",
             "patch_bias", "abs_pos_embed", "norm", "pooling", "use_fc_norm", "proj_bias", "patch_norm", "final_norm")


def sized_like(variant: ViTConfig, shapes: Mapping[str, Any]) -> bool:
    """Whether ``variant`` has the sizes and block form that ``shapes`` (:func:`shape_fields`) show."""
    keys = ("hidden_size", "depth", "patch_size", "mlp_size", "mlp_type", "qv_bias", "attn_norm")
    return all(getattr(variant, key) == shapes[key] for key in keys)


def infer_family_config(family: Family, state_dict: StateDict, what: str, architecture: str | None = None,
                        num_heads: int | None = None, base: Mapping[str, Any] | None = None,
                        model_args: Mapping[str, Any] | None = None) -> tuple[ViTConfig, list[str]]:
    """The config of ``state_dict`` (vitdeploy names) as a member of ``family``.

    ``architecture`` (a variant name the file records) lends what the tensors cannot show and
    must agree with what they do show, else ``ValueError`` in one line naming it; without one, the
    family variant with the same sizes does (or the family's defaults). ``model_args`` (a timm Hub
    ``config.json``'s) overrides the variant's fields it names (``num_heads``, ``global_pool``,
    ``img_size``); ``base`` adds preprocessing and labels.
    """
    notes: list[str] = []
    shapes = shape_fields(state_dict, what)
    name = architecture.split(".")[0] if architecture else None
    if name is not None and name not in family.variants:
        raise ValueError(f"{what}: {family.label} architecture {architecture!r} is not one vitdeploy registers "
                         f"(expected one of {', '.join(sorted(family.variants))})")
    if name is None:
        sized = [n for n, v in sorted(family.variants.items()) if sized_like(v, shapes)]
        name = sized[0] if sized else None
    reference = family.variants[name] if name else None
    lent = {k: v for k, v in reference.to_fields().items() if k in LENT} if reference else dict(family.defaults)
    if reference is None:
        lent.setdefault("name", f"{family.name}_d{shapes['hidden_size']}_l{shapes['depth']}_p{shapes['patch_size']}")
    fields = {**lent, **{k: v for k, v in shapes.items() if k != "image_size" or shapes["abs_pos_embed"]}}
    for key in ("pooling", "fc_norm"):  # the tensors decide these only where they show them
        if key not in shapes and key in lent:
            fields[key] = lent[key]
    args = dict(model_args or {})
    if "num_heads" in args:
        fields["num_heads"] = int(args["num_heads"])
    if args.get("global_pool") in ("token", "avg", "map") and "pooling" not in shapes:
        fields["pooling"] = args["global_pool"]
    elif args.get("global_pool") in ("token", "avg") and shapes.get("pooling") == "avg":
        # fc_norm shows where timm normalises the pooled vector, not how it pools: timm's reset_classifier
        # (how open_clip sets a trunk's timm_pool) changes the pooling and keeps the norm
        fields["pooling"] = args["global_pool"]
    if "img_size" in args and not shapes["abs_pos_embed"]:
        size = args["img_size"]
        fields["image_size"] = int(size if isinstance(size, int) else size[0])
    if num_heads is not None:
        fields["num_heads"] = int(num_heads)
    fields.update(dict(base or {}))
    if "num_heads" not in fields:
        fields["num_heads"] = max(shapes["hidden_size"] // 64, 1)
        notes.append(f"{what}: guessed {fields['num_heads']} attention heads (hidden_size // 64); "
                     "RoPE depends on the head size: pass num_heads= if that is wrong")
    try:
        config = ViTConfig.from_fields(fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: inferred an invalid {family.label} configuration: {error}") from None
    if architecture and reference is not None:
        differs = [k for k in STRUCTURE if getattr(config, k) != getattr(reference, k)
                   and not (k in ("pooling", "use_fc_norm") and "global_pool" in args)]
        if differs:
            raise ValueError(f"{what}: the file names {architecture!r} but its tensors differ from that "
                             f"architecture in {', '.join(differs)}; refusing to build something else")
    notes.append(f"read as {family.label} ({config.provenance.name}; positions: {config.position_scheme})")
    return config, notes
