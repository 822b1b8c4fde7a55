"""OpenCLIP checkpoints: the image tower of an ``open_clip`` CLIP model.

Accepted: a Hugging Face Hub folder as OpenCLIP publishes one (``open_clip_config.json`` beside
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), or the weight file alone
(also a training checkpoint, its tensors under ``state_dict``, OpenAI's CLIP weights re-saved as a
state dict, and the tower's own ``model.visual.state_dict()``). Only the ``visual.*`` tensors are
read; the text tower is left aside.

Two kinds of image tower:

- open_clip's own ``VisionTransformer`` (``visual.class_embedding``, ``visual.transformer.resblocks.N``):
  renamed to timm's names the way timm's ``_convert_openai_clip`` does (the fused ``in_proj`` is
  timm's ``qkv``), its ``proj`` kept as vitdeploy's bias-free ``proj``;
- a timm model inside (``visual.trunk.*``: SigLIP, EVA-02, Perception Encoder): timm's own names,
  read as a timm state dict of the architecture ``timm_model_name`` names.

The config gives what the weights cannot show: QuickGELU (``quick_gelu``, OpenAI's weights), the
heads (``width // head_width``), the pooling (``pool_type``, ``final_ln_after_pool``) and the
preprocessing; a weight file read on its own takes the config beside it. A bare file has no config:
GELU, 64-wide heads (or the registry's), class-token pooling, OpenAI's normalisation, each said in
the notes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vitdeploy.checkpoints.common import (
    ArchitectureRefused,
    Checkpoint,
    CheckpointError,
    StateDict,
    infer_config,
    note,
    read_weight_file,
    read_weight_files,
    strip_prefixes,
)
from vitdeploy.constants import CLIP_MEAN, CLIP_STD
from vitdeploy.metadata import RESIZE_MODES
from vitdeploy.variants import VARIANTS

CONFIG_FILE = "open_clip_config.json"
# The weight files of an OpenCLIP folder, in the order open_clip itself prefers them.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth")
TOWER = "visual."
TRUNK = "visual.trunk."

# Block tensors: open_clip's ResidualAttentionBlock name -> timm's Block name.
_BLOCK_NAMES = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    "ls_1.gamma": "ls1.gamma", "ls_2.gamma": "ls2.gamma",
}
_RESBLOCKS = "transformer.resblocks."
# vision_cfg fields that change what the tower computes, with the value vitdeploy builds.
_BUILT_AS = {"attentional_pool": False, "pos_embed_type": "learnable", "qk_norm": False, "scaled_cosine_attn": False,
             "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}


# The names of open_clip's VisionTransformer alone (``model.visual.state_dict()``), without ``visual.``.
_TOWER_ALONE = frozenset({"class_embedding", "conv1.weight", "transformer.resblocks.0.attn.in_proj_weight"})


def is_openclip_keys(keys: Iterable[str]) -> bool:
    """Whether tensor names are an OpenCLIP model's: a ViT image tower under ``visual.``, or that tower alone."""
    names = set(keys)
    return "visual.class_embedding" in names or any(k.startswith(TRUNK) for k in names) or names >= _TOWER_ALONE


def is_openclip_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def folder_files(folder: Path) -> list[Path]:
    """The weight file of an OpenCLIP folder (the one open_clip itself would load)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"no OpenCLIP weight file in folder {folder}; expected {' or '.join(WEIGHT_FILES)}")


def read_model_config(folder: Path) -> dict[str, Any]:
    """``open_clip_config.json``: its ``model_cfg`` and ``preprocess_cfg`` (either may be empty)."""
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}; expected an object with \"model_cfg\"")
    return data


def _preprocessing(preprocess_cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    # open_clip's defaults: OpenAI's normalisation (its OPENAI_DATASET_MEAN / _STD), the short side resized
    # (bicubic) and the whole of it centre-cropped
    fields: dict[str, Any] = {"mean": CLIP_MEAN, "std": CLIP_STD, "crop_pct": 1.0, "interpolation": "bicubic"}
    for key in ("mean", "std", "interpolation"):
        if preprocess_cfg.get(key) is not None:
            fields[key] = preprocess_cfg[key]
    resize_mode = preprocess_cfg.get("resize_mode") or "shortest"
    if resize_mode in RESIZE_MODES:  # open_clip's names for the two resizes vitdeploy reproduces
        fields["resize_mode"] = resize_mode
    else:
        notes.append(f"preprocess_cfg resize_mode {resize_mode!r} is not reproduced: vitdeploy's preprocessing "
                     "resizes the short side and centre-crops (the same image where the photo is square)")
    return fields


def _tower_state(state_dict: StateDict, what: str, notes: list[str]) -> StateDict:
    """The image tower's tensors without ``visual.`` (the text tower's left aside, and said so), or the
    state dict as it is where it is the tower alone."""
    if set(state_dict) >= _TOWER_ALONE:
        return state_dict
    tower = {k[len(TOWER):]: v for k, v in state_dict.items() if k.startswith(TOWER)}
    if not tower:
        raise CheckpointError(f"{what}: no visual.* tensors, so this is not an OpenCLIP image tower")
    rest = len(state_dict) - len(tower)
    if rest:
        notes.append(f"read the image tower (visual.*); left aside {rest} tensors of the text tower and logit scale")
    return tower


def convert_vision_transformer(tower: StateDict, what: str) -> StateDict:
    """open_clip's ``VisionTransformer`` tensors (without ``visual.``) in timm's names."""
    out: StateDict = {}
    for key, tensor in tower.items():
        if key.startswith(_RESBLOCKS):
            index, _, name = key[len(_RESBLOCKS):].partition(".")
            if name not in _BLOCK_NAMES:
                raise CheckpointError(f"{what}: visual.{key} is not a tensor of open_clip's standard "
                                      "ResidualAttentionBlock; vitdeploy does not build that block")
            out[f"blocks.{index}.{_BLOCK_NAMES[name]}"] = tensor
        elif key == "conv1.weight":
            out["patch_embed.proj.weight"] = tensor
        elif key == "class_embedding":
            out["cls_token"] = tensor.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = tensor.unsqueeze(0)
        elif key.startswith("ln_pre."):
            out["norm_pre." + key[len("ln_pre."):]] = tensor
        elif key.startswith("ln_post."):
            out["norm." + key[len("ln_post."):]] = tensor
        elif key == "proj":
            out["proj.weight"] = tensor.t().contiguous()
        elif key.startswith("attn_pool") or key == "ln_post_attn":
            raise ArchitectureRefused(f"{what}: an attentional pooler (visual.{key}, CoCa's) is not one vitdeploy "
                                      "builds; refusing to read the tower without it")
        else:
            raise CheckpointError(f"{what}: visual.{key} is not a tensor of open_clip's VisionTransformer")
    return out


def _vision_fields(model_cfg: Mapping[str, Any], state: StateDict, what: str, notes: list[str]) -> dict[str, Any]:
    """The config fields ``model_cfg`` gives an open_clip ``VisionTransformer`` (and how its tensors are named)."""
    vision = dict(model_cfg.get("vision_cfg") or {})
    for key, built in _BUILT_AS.items():
        if vision.get(key, built) != built:
            raise ArchitectureRefused(f"{what}: vision_cfg {key}={vision[key]!r} is not one vitdeploy builds "
                                      f"(it builds {key}={built!r})")
    fields: dict[str, Any] = {"act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"}
    act_kwargs = dict(vision.get("act_kwargs") or {})
    if act_kwargs:
        if act_kwargs != {"approximate": "tanh"} or fields["act"] != "gelu":
            raise ArchitectureRefused(f"{what}: vision_cfg act_kwargs={act_kwargs} is not an activation vitdeploy builds")
        fields["act"] = "gelu_tanh"
    norm_kwargs = dict(vision.get("norm_kwargs") or {})
    if set(norm_kwargs) - {"eps"}:
        raise ArchitectureRefused(f"{what}: vision_cfg norm_kwargs={norm_kwargs} is not a LayerNorm vitdeploy builds")
    fields["layer_norm_eps"] = float(norm_kwargs.get("eps", 1e-5))
    width = int(vision.get("width", state["patch_embed.proj.weight"].shape[0]))
    fields["num_heads"] = max(width // int(vision.get("head_width", 64)), 1)  # as open_clip counts them
    pool_type = vision.get("pool_type", "tok")
    after_pool = bool(vision.get("final_ln_after_pool", False))
    if pool_type == "avg" and after_pool:
        # the mean patch token, then ln_post: timm's avg pooling with its fc_norm
        for name in ("weight", "bias"):
            state[f"fc_norm.{name}"] = state.pop(f"norm.{name}")
    elif pool_type != "tok" or after_pool:
        raise ArchitectureRefused(f"{what}: vision_cfg pool_type={pool_type!r} with final_ln_after_pool={after_pool} "
                                  "is not a pooling vitdeploy builds (it builds 'tok', and 'avg' with "
                                  "final_ln_after_pool)")
    return fields


def _quickgelu_twin(name: str) -> str | None:
    twin = name.replace("_clip_", "_clip_quickgelu_", 1)
    return twin if twin != name and twin in VARIANTS else None


def read_openclip(path: Path, num_heads: int | None = None, model: str | None = None) -> Checkpoint:
    """Read an OpenCLIP folder or weight file (see the module doc); ``num_heads`` overrides the config's."""
    from vitdeploy.checkpoints.timm import timm_checkpoint

    what = str(path)
    data: dict[str, Any] = {}
    if path.is_dir():
        data = read_model_config(path)
        files = folder_files(path)
        state_dict, notes = read_weight_files(files), []
    else:
        files = [path]
        state_dict, notes = read_weight_file(path)
        if is_openclip_folder(path.parent):  # a weight file in its Hub folder: the config beside it holds
            data = read_model_config(path.parent)
            notes.append(f"took the architecture from the {CONFIG_FILE} beside the file")
    state_dict, stripped = strip_prefixes(state_dict)
    notes += stripped
    model_cfg = dict(data.get("model_cfg") or {})
    base = _preprocessing(data.get("preprocess_cfg") or {}, notes)
    if not data:
        notes.append(f"no {CONFIG_FILE}: open_clip's default preprocessing (OpenAI's mean and std, bicubic "
                     "resize of the short side, centre crop)")
    tower = _tower_state(state_dict, what, notes)
    if any(k.startswith("trunk.") for k in tower):
        vision = dict(model_cfg.get("vision_cfg") or {})
        trunk = {k[len("trunk."):]: v for k, v in tower.items() if k.startswith("trunk.")}
        head = {k: v for k, v in tower.items() if not k.startswith("trunk.")}
        if set(head) - {"head.proj.weight"}:
            raise ArchitectureRefused(f"{what}: the tower's head ({', '.join(sorted(head))}) is not a bias-free "
                                      "linear projection, the one head vitdeploy builds after a timm trunk")
        if head:
            trunk["proj.weight"] = head["head.proj.weight"]
            notes.append("read the tower's linear projection (visual.head.proj) as its visual projection proj")
        architecture = vision.get("timm_model_name")
        # open_clip builds the trunk with timm's global_pool=timm_pool (its default "avg"; "" keeps timm's)
        pool = vision.get("timm_pool", "avg") if model_cfg else None
        checkpoint = timm_checkpoint(trunk, path, files, architecture=architecture, model=model,
                                     num_heads=num_heads, base=base, notes=notes, source_format="openclip",
                                     model_args={"global_pool": pool} if pool else None)
        checkpoint.notes.insert(0, f"an OpenCLIP tower around timm's {architecture or 'ViT'} (visual.trunk)")
        return checkpoint
    if model is not None:
        raise CheckpointError(f"{what}: model={model!r} names a family variant; this OpenCLIP tower is open_clip's "
                              "own VisionTransformer, not a timm model of that family")
    if "class_embedding" not in tower:
        raise CheckpointError(f"{what}: the image tower has no visual.class_embedding, so it is not a ViT "
                              "(OpenCLIP's ResNet towers are not read)")
    state = convert_vision_transformer(tower, what)
    if model_cfg:
        base.update(_vision_fields(model_cfg, state, what, notes))
    else:
        if "norm_pre.weight" not in state:
            raise ArchitectureRefused(f"{what}: a tower without ln_pre (CLIPA's) pools by a rule its weights do not "
                                      f"show; read it from its folder, with {CONFIG_FILE}")
        base.update(layer_norm_eps=1e-5, act="gelu")
        note(notes, f"{what}: no {CONFIG_FILE}, so the activation is not known: using GELU (OpenCLIP's own "
             "training); OpenAI's CLIP weights use QuickGELU: keep the file beside its config, or pass "
             "model= a *_clip_quickgelu_* variant", warn=True)
    if num_heads is not None:
        base["num_heads"] = num_heads
    heads = base.pop("num_heads", None)
    base["pos_embed_resample"] = "timm"
    config, inferred = infer_config(state, what, num_heads=heads, base=base)
    if config.act == "quick_gelu" and (twin := _quickgelu_twin(config.provenance.name)):
        config, inferred = infer_config(state, what, num_heads=heads, base=base, prefer=twin)
    notes.append("an OpenCLIP VisionTransformer tower: renamed to timm's names (in_proj as qkv, ln_pre as norm_pre, "
                 "ln_post as the final norm)")
    return Checkpoint(config, state, "openclip", files, notes=notes + inferred)

