"""vitdeploy's own checkpoint format: safetensors weights plus the full :class:`ViTConfig`.

A folder holds ``model.safetensors`` and ``config.json``
(``{"format": "vitdeploy", "vitdeploy_version": ..., "config": {...}}``); a single
``*.safetensors`` file carries the same information in its metadata. The folder's
``model.safetensors`` carries the metadata too, so the weight file alone is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitdeploy.checkpoints.common import Checkpoint, CheckpointError, read_safetensors
from vitdeploy.config import ViTConfig
from vitdeploy.files import atomic_path, atomic_write_text
from vitdeploy.model import VisionTransformer

FORMAT_TAG = "vitdeploy"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# safetensors metadata keys (values must be strings).
META_FORMAT = "format"
META_VERSION = "vitdeploy_version"
META_CONFIG = "vitdeploy_config"


def _version() -> str:
    from vitdeploy import __version__

    return __version__


def save_model(model: VisionTransformer, path: str | Path) -> Path:
    """Save ``model`` in the native format and return the path written.

    ``path`` ending in ``.safetensors`` gives one file with the config in its metadata;
    anything else is a folder with ``model.safetensors`` and ``config.json``. Writes are atomic.
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = model.config
    metadata = {META_FORMAT: FORMAT_TAG, META_VERSION: _version(), META_CONFIG: config.to_json()}
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if path.suffix == ".safetensors":
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; a single-file checkpoint needs a file path")
        weights = path
    else:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(
                f"{path} exists and is not a folder; give a folder or a path ending in .safetensors"
            )
        path.mkdir(parents=True, exist_ok=True)
        weights = path / WEIGHTS_NAME
    with atomic_path(weights, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    if weights is not path:
        document = {"format": FORMAT_TAG, "vitdeploy_version": _version(), "config": config.to_dict()}
        atomic_write_text(path / CONFIG_NAME, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def is_native_folder_config(data: object) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT_TAG


def is_native_metadata(metadata: dict[str, str]) -> bool:
    return metadata.get(META_FORMAT) == FORMAT_TAG and META_CONFIG in metadata


def _config(data: object, where: Path) -> ViTConfig:
    try:
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return ViTConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: invalid vitdeploy model config: {error}") from None


def read_native(path: Path) -> Checkpoint:
    """Read a native folder or single ``.safetensors`` file."""
    if path.is_dir():
        config_path = path / CONFIG_NAME
        try:
            document = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{config_path}: not a readable vitdeploy config.json ({error})") from None
        if not is_native_folder_config(document):
            raise CheckpointError(f"{config_path} has no \"format\": \"vitdeploy\"; not a native checkpoint folder")
        if "config" not in document:
            raise CheckpointError(f"{config_path} has no \"config\" entry")
        config = _config(document["config"], config_path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"native checkpoint folder {path} has no {WEIGHTS_NAME}")
        state_dict, _ = read_safetensors(weights)
        return Checkpoint(config, state_dict, "native", [weights])
    state_dict, metadata = read_safetensors(path)
    if not is_native_metadata(metadata):
        raise CheckpointError(
            f"{path} has no vitdeploy metadata ({META_FORMAT}={FORMAT_TAG!r} and {META_CONFIG}); "
            "not a native single-file checkpoint"
        )
    config = _config(metadata[META_CONFIG], path)
    return Checkpoint(config, state_dict, "native", [path])
