"""Pieces every checkpoint format shares: errors, safe tensor I/O, config inference, strict loading.

Every format reader turns its file(s) into a :class:`Checkpoint`: a :class:`ViTConfig` and a
state dict in *our* parameter names (which are timm's). :func:`instantiate` then builds the model
and loads that state dict strictly, so each format only has to rename and reshape tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitdeploy.config import CLASS_TOKEN_POOLINGS, HybridConfig, ViTConfig
from vitdeploy.files import sha256_files
from vitdeploy.model import VisionTransformer
from vitdeploy.pos_embed import infer_grid, resample_pos_embed
from vitdeploy.variants import VARIANTS, unknown_variant_message

StateDict = dict[str, torch.Tensor]

# Names of the weight files a checkpoint folder may hold, in the order they are looked for.
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def is_torch_file(path: Path) -> bool:
    """Whether ``path`` has a ``torch.save`` file's name (``.pth.tar`` too: I-JEPA's, older training scripts')."""
    return path.suffix.lower() in TORCH_SUFFIXES or path.name.lower().endswith(".pth.tar")


def name_in_file_name(path: Path) -> str:
    """The model name a weight file's name gives, as timm names its weights: ``NAME[.tag].safetensors`` → NAME."""
    return path.name.split(".")[0]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why in one short line,
    ``details`` (optional) holds the full listing (the CLI shows it with VITDEPLOY_DEBUG=1 or in --json)."""

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details


class ArchitectureRefused(CheckpointError):
    """A checkpoint refused for what it is (a named architecture vitdeploy does not build, tensors that
    differ from the architecture the file names, names that fit two architectures): no layout hint."""


class CheckpointWarning(UserWarning):
    """Something about a loaded checkpoint the user should know (resampling, guesses, random weights)."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk: config and tensors in vitdeploy (= timm) parameter names.

    ``unexpected`` lists source tensors that map to no parameter (reported by strict loading);
    ``notes`` are human-readable remarks about the conversion.
    """

    config: ViTConfig
    state_dict: StateDict
    format: str
    weight_files: list[Path]
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def note(notes: list[str], message: str, warn: bool = False) -> None:
    """Record ``message`` (logged by the loader), and issue it as a :class:`CheckpointWarning` when ``warn``."""
    notes.append(message)
    if warn:
        warnings.warn(message, CheckpointWarning, stacklevel=3)


# --------------------------------------------------------------------------- hashing


def folder_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a checkpoint folder: shards listed by an index, or the single weight file."""
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index} is not a valid shard index: {error}") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".npz") or is_torch_file(p))
    )
    if len(candidates) == 1:
        return candidates
    raise CheckpointError(
        f"no weight file in folder {folder}; expected {' or '.join(FOLDER_WEIGHTS)} "
        f"(or a {SAFETENSORS_INDEX} with its shards)"
    )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a weight file, streamed; for a folder, of its weight file (shards hashed in order)."""
    path = Path(path)
    if path.is_dir():
        return sha256_files(folder_weight_files(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return sha256_files([path])


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (for weights with no file)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading tensors


def read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    """All tensors of a .safetensors file and its metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    return tensors, metadata


def safetensors_metadata(path: Path) -> dict[str, str]:
    """Only the metadata of a .safetensors file (the header; tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (code and constants beside the tensors), told from
    its zip listing without loading it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_torch(path: Path) -> Any:
    """A PyTorch pickle loaded with ``weights_only=True``: tensors and plain containers, never code."""
    if is_torchscript_archive(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (as OpenAI's original CLIP .pt files are), which vitdeploy does not "
            "run: re-save its tensors where you trust the file, e.g. python -c \"import torch; torch.save(torch.jit"
            f".load('{path}', map_location='cpu').state_dict(), 'state_dict.pt')\", and read that")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} could not be read as a weights-only PyTorch checkpoint ({first_line}); vitdeploy only "
            "loads tensors (torch.load weights_only=True) and never unpickles code: re-save the state dict "
            "alone, ideally as .safetensors"
        ) from None


def read_weight_file(path: Path) -> tuple[StateDict, list[str]]:
    """The tensors of one weight file (.safetensors, or a weights-only torch pickle unwrapped by
    :func:`unwrap_state_dict`) and notes on where in the file they were found."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0], []
    return unwrap_state_dict(read_torch(path), path)


def read_weight_files(files: list[Path]) -> StateDict:
    """Tensors of one or more weight files (.safetensors or weights-only torch pickles), merged."""
    merged: StateDict = {}
    for path in files:
        merged.update(read_weight_file(path)[0])
    return merged


# (I-JEPA's training checkpoints hold the image encoder under "encoder", as timm reads them)
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "encoder")


def unwrap_state_dict(obj: Any, path: Path) -> tuple[StateDict, list[str]]:
    """Find the tensors in a loaded pickle: a bare state dict or one under a wrapper key.

    EMA weights are preferred when a training checkpoint holds both (as timm's loader does).
    """
    notes: list[str] = []
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        besides = sorted(str(k) for k, v in obj.items() if k != key and isinstance(v, Mapping))
        notes.append(f"using the tensors under the {key!r} key" + (f" (not {', '.join(besides)})" if besides else ""))
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no tensors at the top level or under any of the keys {list(WRAPPER_KEYS)}"
        )
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if skipped:
        notes.append(f"ignored non-tensor entries {skipped}")
    return tensors, notes


def strip_prefixes(state_dict: StateDict, prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> tuple[StateDict, list[str]]:
    """Remove wrapper prefixes (DataParallel's ``module.``, torch.compile's ``_orig_mod.``) shared by every key."""
    notes: list[str] = []
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                notes.append(f"stripped the {prefix!r} prefix from every key")
                changed = True
    return state_dict, notes


# --------------------------------------------------------------------------- config inference

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_STAGE_BLOCK = re.compile(r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.")
# What a registry variant must share with a state dict's shapes to lend it its name and defaults
# (config fields and properties; the LayerScale init is compared as present or not).
_ARCH_FIELDS = ("image_size", "patch_size", "in_channels", "hidden_size", "depth", "mlp_size", "qkv_bias",
                "pooling", "hybrid", "has_class_token", "num_reg_tokens", "distilled", "no_embed_class",
                "pre_norm", "use_fc_norm", "patch_bias", "projection_dim", "representation_size", "abs_pos_embed",
                "rope", "mlp_type", "mlp_norm", "norm", "qv_bias", "proj_bias", "patch_norm", "final_norm",
                "pool_include_prefix")
# Fields the weights cannot show, lent by the matching registry variant (or forced by model=).
_VARIANT_DEFAULTS = ("name", "family", "mean", "std", "crop_pct", "interpolation", "resize_mode", "layer_norm_eps",
                     "act", "layer_scale")
_CONFIG_FIELDS = ViTConfig.field_names()
# Fields no tensor shows (left out of the probe config that is matched against the registry).
_NOT_IN_SHAPES = ("name", "family", "mean", "std", "crop_pct", "interpolation", "resize_mode", "layer_norm_eps", "act",
                  "labels", "pos_embed_resample")
# Fields a checkpoint keeps when model= forces another variant's architecture on it (with its preprocessing,
# unless that was only a default).
_CHECKPOINT_FIELDS = ("num_classes", "image_size", "labels", "pos_embed_resample")


# The leading _ARCH_FIELDS that are sizes (the rest are structure).
_SIZE_FIELDS = ("image_size", "patch_size", "in_channels", "hidden_size", "depth", "mlp_size")


def _architecture(config: ViTConfig) -> tuple[Any, ...]:
    return (*(getattr(config, f) for f in _ARCH_FIELDS), config.layer_scale is not None)


def registry_heads(hidden_size: int, depth: int) -> int | None:
    """Heads of the registry variant with this hidden size (and depth, where that decides)."""
    exact = {c.num_heads for c in VARIANTS.values() if (c.hidden_size, c.depth) == (hidden_size, depth)}
    if len(exact) == 1:
        return exact.pop()
    by_hidden = {c.num_heads for c in VARIANTS.values() if c.hidden_size == hidden_size}
    return by_hidden.pop() if len(by_hidden) == 1 else None


def match_variant(config: ViTConfig, prefer: str | None = None) -> str | None:
    """The registry name whose architecture (heads aside) equals ``config``'s, if any.

    ``prefer`` (a name a file records, such as a timm Hub ``architecture``) wins when it matches;
    otherwise plain ViTs come before the families with the same shapes (DeiT's are the same network),
    then names in order (CLIP's GELU tower before its QuickGELU twin, which the weights cannot tell apart).
    """
    wanted = _architecture(config)
    if prefer in VARIANTS and _architecture(VARIANTS[prefer]) == wanted:
        return prefer
    for name in sorted(VARIANTS, key=lambda n: (VARIANTS[n].provenance.family != "vit", n)):
        if _architecture(VARIANTS[name]) == wanted:
            return name
    return None


def _require(state_dict: StateDict, key: str, what: str) -> torch.Tensor:
    if key not in state_dict:
        sample = ", ".join(sorted(state_dict)[:8])
        closest = closest_family(state_dict)
        raise CheckpointError(f"{what}: no {key!r} tensor, so this is not a ViT state dict (keys: {sample}, ...)"
                              + (f"; {closest}" if closest else ""))
    return state_dict[key]


def _key_pattern(name: str) -> str:
    """A parameter name with its block index replaced: ``blocks.3.attn.qkv.weight`` → ``blocks.*.attn.qkv.weight``."""
    return _BLOCK.sub("blocks.*.", name)


@functools.lru_cache(maxsize=1)
def _family_patterns() -> tuple[tuple[str, frozenset[str]], ...]:
    """The key patterns of every registry variant's structure (built on the meta device, one block deep)."""
    seen: dict[frozenset[str], str] = {}
    built: set[str] = set()
    for name in sorted(VARIANTS, key=lambda n: (VARIANTS[n].provenance.family != "vit", n)):
        variant = VARIANTS[name]
        structure = repr(tuple(bool(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                               for v in _architecture(variant)[len(_SIZE_FIELDS):]))
        if structure in built:  # the names do not depend on the sizes
            continue
        built.add(structure)
        small = variant.replace(depth=1, hidden_size=variant.num_heads * 8 * (variant.pool_heads or 1), mlp_size=8,
                                image_size=variant.stride, num_classes=min(variant.num_classes, 2))
        with torch.device("meta"):
            model = VisionTransformer(small)
        seen.setdefault(frozenset(_key_pattern(k) for k in model.state_dict()), name)
    return tuple((name, patterns) for patterns, name in seen.items())


def closest_family(state_dict: Mapping[str, Any], limit: int = 6) -> str:
    """One line naming the supported family whose tensor names are closest to ``state_dict``'s, and how they
    differ; empty when no family shares a tensor name with it (then none is closer than another)."""
    have = frozenset(_key_pattern(k) for k in state_dict)
    name, patterns = min(_family_patterns(), key=lambda item: len(item[1] ^ have))
    if not patterns & have:
        return ""

    def listed(keys: frozenset[str]) -> str:
        shown = sorted(keys)[:limit]
        return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")

    lacks, extra = patterns - have, have - patterns
    parts = [f"lacks {listed(lacks)}" if lacks else "", f"has {listed(extra)} besides" if extra else ""]
    detail = "; ".join(p for p in parts if p) or "has the same tensor names"
    return f"closest supported family: {VARIANTS[name].provenance.family} (like {name}): it {detail}"


def _guess_family(fields: Mapping[str, Any]) -> str:
    """The family name of an architecture no registry variant matches (informational only)."""
    if fields["distilled"]:
        return "deit"
    if fields["pooling"] == "map":
        return "siglip"
    if fields["pre_norm"]:
        return "clip"
    if fields["layer_scale"] is not None:
        return "dinov2" if fields["patch_size"] == 14 else "deit3"
    return "vit"


def _position_layout(tokens: int, prefix: int, reg_tokens: int, what: str) -> tuple[tuple[int, int], bool]:
    """The position-embedding grid and ``no_embed_class`` of ``tokens`` embeddings with ``prefix`` prefix tokens."""
    layouts = [(prefix, False), (0, True)] if prefix else [(0, False)]
    if reg_tokens:  # timm's register models embed the patches only; try that reading first
        layouts.reverse()
    for embedded, no_embed_class in layouts:
        try:
            return infer_grid(tokens, embedded), no_embed_class
        except ValueError:
            continue
    raise CheckpointError(f"{what}: {tokens} position embeddings are neither a square grid nor {prefix} prefix "
                          "token(s) plus one")


def infer_config(state_dict: StateDict, what: str, num_heads: int | None = None,
                 base: Mapping[str, Any] | None = None, prefer: str | None = None,
                 file_name: str | None = None, pooling: str | None = None) -> tuple[ViTConfig, list[str]]:
    """Derive the :class:`ViTConfig` of a timm-named state dict from its tensor names and shapes.

    Read from the tensors: the class (``cls_token``), distillation (``dist_token``) and register
    (``reg_token``) tokens, whether the prefix tokens have position embeddings, LayerScale
    (``ls1.gamma``), CLIP's ``norm_pre`` and bias-free patch embedding, ``fc_norm``, SigLIP's
    ``attn_pool``, the heads and CLIP's ``proj``. Heads leave no trace in the shapes of a fused
    qkv: ``num_heads`` if given, else the registry variant with the same width, else
    ``hidden_size // 64``. ``base`` supplies fields the shapes cannot (preprocessing, labels,
    layer-norm eps). A matching registry variant (``prefer`` first, then ``file_name``: the variant
    a bare file's name names, as timm names its weights) lends its name, activation, norm epsilon and
    preprocessing defaults. ``pooling`` is the pooling the source's own config names (timm's
    ``global_pool``), which the tensors cannot always show: a class-token model pooled by the mean.
    """
    notes: list[str] = []
    proj = _require(state_dict, "patch_embed.proj.weight", what)
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{what}: patch_embed.proj.weight has shape {tuple(proj.shape)}; expected [D, C, p, p]")
    hidden, patch = int(proj.shape[0]), int(proj.shape[-1])

    hybrid = None
    in_channels = int(proj.shape[1])
    if any(k.startswith("patch_embed.backbone.") for k in state_dict):
        stem = _require(state_dict, "patch_embed.backbone.stem.conv.weight", what)
        stage_blocks: dict[int, int] = {}
        for key in state_dict:
            if match := _STAGE_BLOCK.match(key):
                stage, block = int(match[1]), int(match[2])
                stage_blocks[stage] = max(stage_blocks.get(stage, 0), block + 1)
        layers = tuple(stage_blocks.get(i, 0) for i in range(len(stage_blocks)))
        if 0 in layers or (not layers and any(k.startswith("patch_embed.backbone.stages.") for k in state_dict)):
            raise CheckpointError(f"{what}: could not count the ResNet stages/blocks of the hybrid backbone")
        width_factor = 1  # a stem-only backbone (timm's R+Ti) has no stage to show one
        if layers:
            conv3 = _require(state_dict, "patch_embed.backbone.stages.0.blocks.0.conv3.weight", what)
            width_factor = max(int(conv3.shape[0]) // 256, 1)
        hybrid = HybridConfig(layers=layers, stem_width=int(stem.shape[0]) // width_factor, width_factor=width_factor)
        in_channels = int(stem.shape[1])

    depth = len({int(m[1]) for k in state_dict if (m := _BLOCK.match(k))})
    if depth == 0:
        raise CheckpointError(f"{what}: no transformer blocks (blocks.N.*) found")
    mlp = int(_require(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0])
    fc2 = state_dict.get("blocks.0.mlp.fc2.weight")
    swiglu = fc2 is not None and fc2.ndim == 2 and mlp == 2 * int(fc2.shape[1])  # fc1 packs gate and value
    mlp = mlp // 2 if swiglu else mlp
    class_token = "cls_token" in state_dict
    distilled = "dist_token" in state_dict
    reg = state_dict.get("reg_token")
    reg_tokens = int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0
    fc_norm = "fc_norm.weight" in state_dict
    head = state_dict.get("head.weight")
    pre_logits = state_dict.get("pre_logits.fc.weight")
    projection = state_dict.get("proj.weight")
    named_pooling = pooling
    if "attn_pool.latent" in state_dict:
        inferred_pooling = "map"
    elif class_token and not fc_norm:
        # A head twice as wide as the tokens reads the class token and the mean patch token side by side.
        concatenated = (head is not None and head.ndim == 2 and int(head.shape[1]) == 2 * hidden
                        and pre_logits is None and not distilled)
        inferred_pooling = "token_avg" if concatenated else "token"
    else:
        inferred_pooling = "avg"
    if named_pooling is not None and named_pooling != inferred_pooling and inferred_pooling != "token_avg":
        if named_pooling not in ("token", "avg") or (named_pooling == "token" and not class_token):
            raise ArchitectureRefused(f"{what}: its config pools by {named_pooling!r}, which these tensors cannot "
                                      "do in a model vitdeploy builds (it builds 'token' with a class token, 'avg', "
                                      "and 'map' with an attn_pool head)")
        if inferred_pooling == "map":
            raise ArchitectureRefused(f"{what}: its config pools by {named_pooling!r} but it has an attn_pool head")
    pooling = inferred_pooling if named_pooling is None or inferred_pooling == "token_avg" else named_pooling
    prefix = int(class_token) + int(distilled) + reg_tokens
    pos = _require(state_dict, "pos_embed", what)
    grid, no_embed_class = _position_layout(int(pos.shape[1]), prefix, reg_tokens, what)
    stride = patch * (hybrid.stride if hybrid else 1)

    fields: dict[str, Any] = dict(base or {})
    fields.update(
        image_size=grid[0] * stride, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        mlp_size=mlp, mlp_type="swiglu" if swiglu else "mlp", num_classes=int(head.shape[0]) if head is not None else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict, pooling=pooling,
        representation_size=int(pre_logits.shape[0]) if pre_logits is not None else None, hybrid=hybrid,
        # None where the pooling implies the value (as configs written by hand leave it)
        class_token=None if class_token == (pooling in CLASS_TOKEN_POOLINGS) else class_token, distilled=distilled, num_reg_tokens=reg_tokens, no_embed_class=no_embed_class,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state_dict else None, pre_norm="norm_pre.weight" in state_dict,
        fc_norm=None if fc_norm == (pooling == "avg") else fc_norm, patch_bias="patch_embed.proj.bias" in state_dict,
        projection_dim=int(projection.shape[0]) if projection is not None else None,
        # timm's VisionTransformer pools the patch tokens alone (its Eva, read by the families, pools them all)
        pool_include_prefix=not (pooling == "map" and prefix > 0),
        final_norm="norm.weight" in state_dict or fc_norm,  # timm's final_norm=False: C-RADIO, InternViT
    )
    heads_from = "given"
    if num_heads is None:
        num_heads = registry_heads(hidden, depth)
        heads_from = "registry"
        if num_heads is None:
            num_heads = max(hidden // 64, 1) if hidden % max(hidden // 64, 1) == 0 else 1
            heads_from = "guess"
    fields["num_heads"] = num_heads

    shapes_only = {k: v for k, v in fields.items() if k in _CONFIG_FIELDS and k not in _NOT_IN_SHAPES}
    try:
        probe = ViTConfig.from_fields(shapes_only)
    except ValueError as error:
        raise CheckpointError(f"{what}: inferred an invalid configuration: {error}") from None
    name = match_variant(probe, prefer or file_name)
    named_by_file = name is not None and name == file_name and not prefer
    if name is not None:
        variant = VARIANTS[name]
        lent = variant.to_fields()
        fields = {**{k: lent[k] for k in _VARIANT_DEFAULTS}, **fields}
        # the same architecture, spelled as the registry spells it
        fields.update({k: getattr(variant, k) for k in ("layer_scale", "class_token", "fc_norm")})
        if heads_from != "given":  # the matched variant knows its heads better than its width does
            fields["num_heads"], heads_from = variant.num_heads, "variant"
        notes.append(f"inferred variant {name} from the tensor shapes{' and the file name' if named_by_file else ''}")
    else:
        if prefer in VARIANTS:  # a named architecture built with other sizes (timm's model_args)
            named = VARIANTS[prefer].to_fields()
            fields = {**{k: named[k] for k in ("family", "act", "layer_norm_eps", "mean", "std", "interpolation",
                                                 "resize_mode")},
                      **fields}
            notes.append(f"took the activation, norm epsilon and family of {prefer} (the file's architecture, "
                         "here with other sizes)")
        kind = "hybrid " if hybrid else ""
        tag = "_r" if hybrid else ""
        fields.setdefault("name", f"vit{tag}_d{hidden}_l{depth}_p{patch}_{fields['image_size']}")
        fields.setdefault("crop_pct", 0.9 if fields["image_size"] == 224 else 1.0)
        fields.setdefault("family", _guess_family(fields))
        if fields["pre_norm"]:
            fields.setdefault("layer_norm_eps", 1e-5)  # CLIP's
        notes.append(
            f"inferred a {kind}ViT from the tensor shapes: hidden {hidden}, depth {depth}, patch {patch}, "
            f"mlp {mlp}, image {fields['image_size']} (no registry variant matches)"
        )
    if fields.get("family") == "clip" and prefer not in VARIANTS and "act" not in (base or {}) and not named_by_file:
        note(notes, f"{what}: a CLIP tower's activation is not stored in the weights; using {fields.get('act', 'gelu')}"
             " (OpenCLIP's LAION towers). OpenAI's CLIP uses QuickGELU: pass model= a *_clip_quickgelu_* "
             "variant if that is what this is", warn=True)
    if heads_from == "guess":
        note(notes, f"{what}: the number of attention heads is not stored in the weights; guessed "
             f"{num_heads} (hidden_size // 64). Pass num_heads= (CLI: `vitdeploy convert --num-heads N`, or --model NAME) if that is wrong", warn=True)
    try:
        return ViTConfig.from_fields(fields), notes
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{what}: inferred an invalid configuration: {error}") from None


def force_variant(config: ViTConfig, name: str, what: str, notes: list[str]) -> ViTConfig:
    """``config`` with the architecture of registry variant ``name`` (the ``model=`` override).

    The checkpoint keeps what its weights or files say about the task and the input (classes,
    native size, labels, resampling convention, preprocessing unless it was only a default) and,
    where the variant has one, its projection width, and a ``token_avg`` classifier head over a
    class-token variant; everything else is the variant's. Strict loading then lists every
    tensor the two disagree on.
    """
    if name not in VARIANTS:
        raise ValueError(unknown_variant_message(name, " for model="))
    variant = VARIANTS[name]
    kept = {k: v for k, v in config.to_fields().items() if k in _CHECKPOINT_FIELDS}
    # Preprocessing that was only a default (the detected variant's, or ViTConfig's) is the forced variant's.
    detected = config.provenance.name
    defaults = [ViTConfig()] + ([VARIANTS[detected]] if detected in VARIANTS else [])
    only_default = any(config.preprocessing == d.preprocessing for d in defaults)
    kept["preprocessing"] = variant.preprocessing if only_default else config.preprocessing
    if variant.projection_dim and config.projection_dim:
        kept["projection_dim"] = config.projection_dim
    if config.pooling == "token_avg" and variant.pooling == "token" and config.num_classes:
        kept["pooling"] = "token_avg"  # a classifier's own head over the variant's backbone (Dinov2ForImageClassification)
    if kept["image_size"] % variant.stride:
        kept["image_size"] = variant.image_size
    differs = [f for f in _ARCH_FIELDS if f not in kept and getattr(variant, f) != getattr(config, f)]
    detail = f" (the weights looked different in: {', '.join(differs)})" if differs else ""
    note(notes, f"{what}: architecture forced to {name} by model={name!r}{detail}")
    try:
        return variant.replace(**kept)
    except ValueError as error:
        raise CheckpointError(f"{what}: model={name!r} does not fit this checkpoint: {error}") from None


# --------------------------------------------------------------------------- building the model


def _resample_checkpoint_pos_embed(tensor: torch.Tensor, config: ViTConfig, what: str,
                                   notes: list[str]) -> torch.Tensor | None:
    """The checkpoint's position embeddings resampled to ``config``'s grid, or None if they cannot be."""
    prefix = config.num_pos_prefix_tokens  # the prefix tokens that have position embeddings
    if tensor.ndim != 3 or tensor.shape[-1] != config.hidden_size:
        return None
    try:
        old_grid = infer_grid(int(tensor.shape[1]), prefix)
    except ValueError:
        return None
    new_grid = config.grid_size
    note(notes, f"{what}: resampled position embeddings {old_grid[0]}x{old_grid[1]} → "
         f"{new_grid[0]}x{new_grid[1]} (checkpoint grid differs from image_size {config.image_size}; "
         f"{config.pos_embed_resample} resampling)", warn=True)
    return resample_pos_embed(tensor.float(), new_grid, old_grid, prefix, method=config.pos_embed_resample)


def load_strict(model: VisionTransformer, state_dict: StateDict, what: str,
                unexpected_sources: Iterable[str] = (), notes: list[str] | None = None) -> None:
    """Load ``state_dict`` into ``model`` (built on any device, ``meta`` included) or raise one error.

    Every missing, unexpected or wrongly-shaped tensor is listed. Position embeddings of another
    square grid are resampled rather than rejected. Floating tensors are loaded as float32.
    """
    notes = notes if notes is not None else []
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state_dict = dict(state_dict)
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted([k for k in state_dict if k not in expected] + list(unexpected_sources))
    wrong: list[str] = []
    for name, shape in expected.items():
        tensor = state_dict.get(name)
        if tensor is None or tuple(tensor.shape) == shape:
            continue
        if name == "pos_embed":
            resampled = _resample_checkpoint_pos_embed(tensor, model.config, what, notes)
            if resampled is not None and tuple(resampled.shape) == shape:
                state_dict[name] = resampled
                continue
        wrong.append(f"{name} (checkpoint {list(tensor.shape)}, model {list(shape)})")
    if missing or unexpected or wrong:
        raise _misfit_error(model.config, state_dict, what, missing, unexpected, wrong)
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor = tensor.float()
        state_dict[name] = tensor.contiguous()
    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a buffer the state dict does not carry; cannot happen with today's model
        raise CheckpointError(f"{what}: tensors {leftover} were not initialised by the checkpoint")


def _misfit_error(config: ViTConfig, state_dict: StateDict, what: str, missing: list[str], unexpected: list[str],
                  wrong: list[str], shown: int = 1) -> CheckpointError:
    """The strict-load failure as one short line (counts, the first names, or the variants the weights'
    sizes fit) with every tensor in ``details``."""

    def listed(kind: str, names: list[str], limit: int | None) -> str:
        head = names if limit is None else names[:limit]
        more = f", +{len(names) - len(head)} more" if len(names) > len(head) else ""
        return f"{kind} {len(names)}: {', '.join(head)}{more}"

    def parts(limit: int | None) -> str:  # names are short, wrong shapes long: ``limit`` of those, 3x of names
        lists = (("missing", missing, 3), ("unexpected", unexpected, 3), ("wrong shape", wrong, 1))
        return "; ".join(listed(kind, names, None if limit is None else limit * times)
                         for kind, names, times in lists if names)

    head = f"{what} does not fit the {config.provenance.name} model ({config.hidden_size} wide, {config.depth} blocks): "
    closest = closest_family(state_dict) if missing or unexpected else ""
    tail = f". {closest}" if closest else ""
    short = parts(shown)
    width = next((int(state_dict[k].shape[-1]) for k in ("cls_token", "norm.weight") if k in state_dict), None)
    depth = len({match.group(1) for key in state_dict if (match := _BLOCK.match(key))})
    if wrong and not (missing or unexpected) and width and (width, depth) != (config.hidden_size, config.depth):
        # The same layout at another size: say which variants it does fit.
        family = config.provenance.family
        fits = [name for name, v in sorted(VARIANTS.items(), key=lambda item: (item[1].provenance.family != family,
                                                                               item[0]))
                if v.hidden_size == width and v.depth == depth and v.patch_size == config.patch_size][:2]
        short = (f"{len(wrong)} tensor shapes differ; the weights are {width} wide, {depth} blocks"
                 + (f", like {', '.join(fits)}" if fits else ""))
    listing = " (see `vitdeploy inspect --list`; all tensors: VITDEPLOY_DEBUG=1 or --json)"
    return CheckpointError(head + short + tail + listing, details=head + parts(None) + tail)


_SPECIAL_OVERRIDES = ("num_classes", "image_size", "labels")


def instantiate(checkpoint: Checkpoint, what: str, overrides: Mapping[str, Any]) -> VisionTransformer:
    """Build the model of ``checkpoint``, load its weights strictly, then apply ``overrides``.

    ``num_classes`` different from the checkpoint's gives a new zero-initialised head;
    ``image_size`` resamples the position embeddings for good; ``labels`` replaces the class
    names; every other override edits the config before the weights are loaded.
    """
    overrides = dict(overrides)
    special = {k: overrides.pop(k) for k in _SPECIAL_OVERRIDES if k in overrides}
    config = checkpoint.config.replace(**overrides) if overrides else checkpoint.config
    with torch.device("meta"):
        model = VisionTransformer(config)
    load_strict(model, checkpoint.state_dict, what, checkpoint.unexpected, checkpoint.notes)
    num_classes = special.get("num_classes")
    if num_classes is not None and int(num_classes) != model.config.num_classes:
        note(checkpoint.notes, f"replaced the {model.config.num_classes}-class head with a zero-initialised "
             f"{num_classes}-class head")
        model.reset_head(int(num_classes))
    image_size = special.get("image_size")
    if image_size is not None and int(image_size) != model.config.image_size:
        old = model.config.grid_size
        model.set_image_size(int(image_size))
        new = model.config.grid_size
        note(checkpoint.notes, f"{what}: resampled position embeddings {old[0]}x{old[1]} → {new[0]}x{new[1]} "
             f"for image_size {image_size} ({model.config.pos_embed_resample} resampling)", warn=True)
    if "labels" in special:
        labels = special["labels"]
        if labels is not None and len(labels) != model.config.num_classes:
            raise CheckpointError(f"{len(labels)} labels given for a {model.config.num_classes}-class head")
        model.config = model.config.replace(labels=list(labels) if labels is not None else None)
    return model.eval()
