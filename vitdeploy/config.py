"""Model configuration: one dataclass describes every ViT variant we build."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from vitdeploy.pos_embed import DEFAULT_RESAMPLE, LEGACY_RESAMPLE, check_resample

Pooling = Literal["token", "avg"]


def default_size_range(image_size: int, stride: int) -> tuple[int, int]:
    """Half to twice ``image_size``, both rounded inward to multiples of ``stride`` (never below one)."""
    low = max(stride, -(-image_size // 2 // stride) * stride)
    high = max(low, (2 * image_size) // stride * stride)
    return low, high


def snap_to_stride(value: float, low: int, high: int, stride: int, nearest: bool = False) -> int:
    """``value`` as a size an input may have: a multiple of ``stride`` inside ``[low, high]``.

    Rounded down to the stride (to the nearest multiple with ``nearest``), then kept inside the
    range; a result below ``low`` moves up one stride (``low`` itself need not be a multiple).
    """
    snapped = int(round(value / stride)) * stride if nearest else int(value) // stride * stride
    snapped = min(snapped, high - high % stride)
    while snapped < low:
        snapped += stride
    return snapped


@dataclass
class HybridConfig:
    """ResNet-v2 (BiT-style, GroupNorm + weight standardisation) stem and stages of a hybrid ViT.

    ``layers`` gives the number of bottleneck blocks per stage; the first stage has stride 1
    and every later one stride 2, after a stride-4 stem. The patch embedding then uses 1x1
    patches on the resulting feature map.
    """

    layers: tuple[int, ...] = (3, 4, 9)
    stem_width: int = 64
    width_factor: int = 1
    groups: int = 32
    std_conv_eps: float = 1e-8

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)

    @property
    def stride(self) -> int:
        """Total stride of the backbone (stem 4x, then 2x per stage after the first)."""
        return 4 * 2 ** max(len(self.layers) - 1, 0)

    @property
    def out_channels(self) -> int:
        return 256 * self.width_factor * 2 ** (len(self.layers) - 1)


@dataclass
class ViTConfig:
    """Everything that defines a Vision Transformer's architecture and its default input."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    num_classes: int = 1000
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pooling: Pooling = "token"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    hybrid: HybridConfig | None = None
    # CLIP's visual projection (pooled embedding -> the joint image-text space): its width, or None.
    projection_dim: int | None = None
    name: str = "vit"
    # Preprocessing the checkpoint was trained with; runtimes read it from artifact metadata.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    labels: list[str] | None = field(default=None, repr=False)
    # How position embeddings are resampled at another grid (vitdeploy.pos_embed.RESAMPLE_METHODS):
    # the checkpoint framework's own convention, so other resolutions give that framework's logits.
    pos_embed_resample: str = DEFAULT_RESAMPLE

    def __post_init__(self) -> None:
        if isinstance(self.hybrid, dict):
            self.hybrid = HybridConfig(**self.hybrid)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.pooling not in ("token", "avg"):
            raise ValueError(f"pooling must be 'token' or 'avg', got {self.pooling!r}")
        if self.image_size % self.stride:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the total stride {self.stride}"
            )
        check_resample(self.pos_embed_resample)

    @property
    def stride(self) -> int:
        """Pixels per token along one side: patch size, times the backbone stride for hybrids."""
        backbone = self.hybrid.stride if self.hybrid else 1
        return self.patch_size * backbone

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid at the native image size."""
        side = self.image_size // self.stride
        return side, side

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pooling == "token" else 0

    def default_size_range(self) -> tuple[int, int]:
        """The default validated height/width range: half to twice the native size, both rounded
        inward to multiples of the stride (what exports and the eager runtime accept by default)."""
        return default_size_range(self.image_size, self.stride)

    def seq_len(self, height: int, width: int | None = None) -> int:
        """Number of tokens (prefix tokens included) for an input of ``height`` x ``width``."""
        width = height if width is None else width
        return self.num_prefix_tokens + (height // self.stride) * (width // self.stride)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        if self.hybrid is not None:
            data["hybrid"]["layers"] = list(self.hybrid.layers)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """A config from :meth:`to_dict`'s output; one saved before ``pos_embed_resample`` existed
        keeps the resampling it was made with (:data:`vitdeploy.pos_embed.LEGACY_RESAMPLE`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**{"pos_embed_resample": LEGACY_RESAMPLE, **data})

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> ViTConfig:
        """A copy with ``overrides`` applied (and validated)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model overrides {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(self, **overrides)
