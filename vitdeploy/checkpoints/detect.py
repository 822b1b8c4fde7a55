"""Tell a checkpoint's format from its files (never from trying to unpickle it)."""

from __future__ import annotations

import json
from pathlib import Path

from vitdeploy.checkpoints.common import TORCH_SUFFIXES, CheckpointError, safetensors_metadata
from vitdeploy.checkpoints.huggingface import is_hf_vit_config
from vitdeploy.checkpoints.native import is_native_folder_config, is_native_metadata
from vitdeploy.checkpoints.timm import is_timm_hub_config

FORMATS = ("native", "timm", "huggingface", "jax")

EXPECTED = (
    "expected a vitdeploy folder (config.json with \"format\": \"vitdeploy\") or .safetensors file, "
    "a timm state dict (.safetensors, .pth, .pt, .bin, .ckpt) or timm Hub folder, "
    "a Hugging Face ViT folder (config.json with model_type \"vit\" + model.safetensors or pytorch_model.bin), "
    "or an original JAX ViT .npz"
)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON file ({error}); {EXPECTED}") from None


def checkpoint_path(source: str | Path) -> Path:
    """``source`` as a path that exists; a ``config.json`` stands for its folder."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist; {EXPECTED}")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    return path


def detect_format(source: str | Path) -> str:
    """One of :data:`FORMATS` for the checkpoint at ``source``, or a :class:`CheckpointError` saying why not."""
    path = checkpoint_path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"folder {path} has no config.json; {EXPECTED}")
        data = _read_json(config_path)
        if is_native_folder_config(data):
            return "native"
        if is_hf_vit_config(data):
            return "huggingface"
        if is_timm_hub_config(data):
            return "timm"
        model_type = data.get("model_type") if isinstance(data, dict) else None
        kind = f"model_type {model_type!r}" if model_type else "no recognised format marker"
        raise CheckpointError(f"{config_path} has {kind}; {EXPECTED}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "jax"
    if suffix == ".safetensors":
        return "native" if is_native_metadata(safetensors_metadata(path)) else "timm"
    if suffix in TORCH_SUFFIXES:
        return "timm"
    raise CheckpointError(f"cannot tell the checkpoint format of {path} from its suffix {suffix!r}; {EXPECTED}")
