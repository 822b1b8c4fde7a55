"""Model configuration: one dataclass describes every ViT variant we build."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from vitdeploy.metadata import Preprocessing, check_resize_mode
from vitdeploy.pos_embed import DEFAULT_RESAMPLE, LEGACY_RESAMPLE, check_resample
from vitdeploy.rope import RopeSpec, check_rope

Pooling = Literal["token", "avg", "map", "token_avg"]
POOLINGS: tuple[str, ...] = ("token", "avg", "map", "token_avg")
# Poolings that read the class token (and so imply one when ``class_token`` is None).
CLASS_TOKEN_POOLINGS: tuple[str, ...] = ("token", "token_avg")
# MLP activations: "gelu" (exact, erf), "quick_gelu" (x * sigmoid(1.702 x), OpenAI's CLIP),
# "gelu_tanh" (the tanh approximation, Hugging Face's SigLIP).
ACTIVATIONS: tuple[str, ...] = ("gelu", "quick_gelu", "gelu_tanh")
# Informational family names (inspect, metadata, error messages); the fields decide the architecture.
FAMILIES: tuple[str, ...] = ("vit", "deit", "deit3", "dinov2", "clip", "siglip", "dinov3", "eva02", "pe", "aimv2",
                             "pe_spatial", "ijepa")
# The MLP of each block: "mlp" (Linear -> act -> Linear) or "swiglu" (SiLU-gated, fc1 packed [gate; value]).
MLP_TYPES: tuple[str, ...] = ("mlp", "swiglu")
NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")
# The attention-pool head: "latent" (timm's AttentionPoolLatent: a projected latent query, then a residual
# norm -> MLP) or "aimv2" (transformers' Aimv2AttentionPoolingHead: the latent itself is the query, the
# output projection is the last step).
POOL_FORMS: tuple[str, ...] = ("latent", "aimv2")


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
    patches on the resulting feature map; with no stages (the stem alone, timm's R+Ti) it uses
    larger ones.
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
        if not self.layers:
            return self.stem_width * self.width_factor
        return 256 * self.width_factor * 2 ** (len(self.layers) - 1)


@dataclass
class InputPreprocessing:
    """The eval transform a checkpoint was trained with, at any size: normalisation, the share of the
    resized image the centre crop keeps (timm's ``crop_pct``), the resize filter and whether the resize
    keeps the aspect (``resize_mode``: ``"shortest"`` side, or ``"squash"`` both sides; see
    :data:`~vitdeploy.metadata.RESIZE_MODES`).

    :meth:`at` resolves it for one input size into the runtime's
    :class:`~vitdeploy.metadata.Preprocessing` (resize and crop sizes), which artifacts carry.
    """

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.crop_pct = float(self.crop_pct)
        check_resize_mode(self.resize_mode)

    def at(self, image_size: int) -> Preprocessing:
        """The resize/crop/normalise steps for ``image_size`` inputs (timm's eval transform)."""
        return Preprocessing.for_model(image_size, self.crop_pct, self.mean, self.std, self.interpolation,
                                       self.resize_mode)


@dataclass
class Provenance:
    """Where a model comes from and what its outputs mean: its family (:data:`FAMILIES`), its
    variant name and its class names. Informational (inspect, metadata, messages, serving)."""

    family: str = "vit"
    name: str = "vit"
    labels: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")


# The parts of a ViTConfig besides the architecture, and the flat field names each holds.
_PARTS: dict[str, type] = {"preprocessing": InputPreprocessing, "provenance": Provenance}
_PART_OF: dict[str, str] = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


@dataclass
class ViTConfig:
    """A Vision Transformer: its architecture (the fields that decide the computation), the input
    preprocessing its checkpoint was trained with (:class:`InputPreprocessing`) and where it comes
    from (:class:`Provenance`).

    The fields of the three parts have distinct names: :meth:`to_fields`, :meth:`from_fields` and
    :meth:`replace` address them all by name, side by side, as the checkpoint loaders collect them.
    """

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
    # "token" (class token), "avg" (mean of the patch tokens), "map" (SigLIP's attention-pool head) or
    # "token_avg" (the class token and the mean patch token concatenated: transformers'
    # Dinov2ForImageClassification, whose head reads [batch, 2 * hidden]).
    pooling: Pooling = "token"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    hybrid: HybridConfig | None = None
    # CLIP's visual projection (pooled embedding -> the joint image-text space): its width, or None.
    projection_dim: int | None = None
    # A class token; None: exactly when the pooling reads one (CLASS_TOKEN_POOLINGS; what configs
    # without the field mean).
    class_token: bool | None = None
    # DINOv2's register tokens: prefix tokens after the class/distillation tokens that take part in
    # attention, get no output of their own and are dropped from patch_tokens.
    num_reg_tokens: int = 0
    # DeiT's distillation token (second prefix token) and its head `head_dist`; logits average both heads.
    distilled: bool = False
    # timm's no_embed_class: position embeddings cover the patches only, not the prefix tokens.
    no_embed_class: bool = False
    # LayerScale (ls1.gamma / ls2.gamma on both residual branches); the value is its init.
    layer_scale: float | None = None
    # CLIP's LayerNorm after the embeddings, before the blocks (norm_pre).
    pre_norm: bool = False
    # The final norm applied to the pooled vector (fc_norm) instead of to the tokens (norm);
    # None: timm's rule, exactly when pooling is "avg".
    fc_norm: bool | None = None
    act: str = "gelu"
    # The patch embedding's bias (CLIP has none).
    patch_bias: bool = True
    # What the checkpoint expects of its input, and where it comes from: neither changes the computation.
    preprocessing: InputPreprocessing = field(default_factory=InputPreprocessing)
    provenance: Provenance = field(default_factory=Provenance)
    # How position embeddings are resampled at another grid (vitdeploy.pos_embed.RESAMPLE_METHODS):
    # the checkpoint framework's own convention, so other resolutions give that framework's logits.
    pos_embed_resample: str = DEFAULT_RESAMPLE
    # Position information: a learned table (pos_embed), 2-D RoPE on the patch tokens
    # (vitdeploy.rope.ROPE_FORMS, with its temperature, coordinate offset, axis order and reference
    # grid), both (EVA-02, PE) or neither.
    abs_pos_embed: bool = True
    rope: str | None = None
    rope_temperature: float = 10000.0
    rope_offset: float = 0.0
    rope_indexing: str = "ij"
    rope_ref_grid: tuple[int, int] | None = None
    # The block's MLP (MLP_TYPES), with a norm over its hidden width before fc2 (EVA-02's scale-norm).
    mlp_type: str = "mlp"
    mlp_norm: bool = False
    norm: str = "layernorm"
    # EVA's attention bias: q and v biases as their own tensors (attn.q_bias, attn.v_bias), none on k.
    qv_bias: bool = False
    # Heads of the attention-pool head (None: num_heads).
    pool_heads: int | None = None
    # Biases of the blocks' output projection and MLP linears (timm's proj_bias; AIMv2 has none), and a
    # norm after the patch embedding (timm's embed_norm_layer, AIMv2).
    proj_bias: bool = True
    patch_norm: bool = False
    # The final norm (``norm``, or ``fc_norm`` after the pooling); PE spatial has neither.
    final_norm: bool = True
    # A norm over the attention output before its projection (timm's scale_attn_inner: EVA-02 CLIP towers).
    attn_norm: bool = False
    # The attention pool's form (POOL_FORMS).
    pool_form: str = "latent"
    # Whether the attention pool reads the prefix tokens (class, registers) too, as timm's Eva (PE) does;
    # timm's VisionTransformer pools the patch tokens alone (vit_so150m_patch16_reg4_map_256).
    pool_include_prefix: bool = True
    # A fixed 2-D sin-cos position table computed for every grid and added to the patch tokens instead of a
    # learned one (transformers' AIMv2 ``is_native``: [sin_w | cos_w | sin_h | cos_h], temperature 10000).
    sincos_pos_embed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.hybrid, dict):
            self.hybrid = HybridConfig(**self.hybrid)
        if isinstance(self.preprocessing, dict):
            self.preprocessing = InputPreprocessing(**self.preprocessing)
        if isinstance(self.provenance, dict):
            self.provenance = Provenance(**self.provenance)
        if self.rope_ref_grid is not None:
            self.rope_ref_grid = (int(self.rope_ref_grid[0]), int(self.rope_ref_grid[1]))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.pooling in CLASS_TOKEN_POOLINGS and self.class_token is False:
            raise ValueError(f"pooling {self.pooling!r} needs the class token; got class_token=False")
        if self.pooling == "token_avg" and (self.fc_norm or self.representation_size):
            raise ValueError("pooling 'token_avg' concatenates the normed class and mean patch tokens (as "
                             "Dinov2ForImageClassification): it has no fc_norm or representation layer; got "
                             f"fc_norm={self.fc_norm}, representation_size={self.representation_size}")
        if self.distilled and (self.pooling != "token" or not self.has_class_token):
            raise ValueError(f"a distilled model reads its class and distillation tokens: it needs pooling "
                             f"'token' and a class token, got pooling {self.pooling!r}")
        if self.distilled and (self.num_reg_tokens or self.representation_size):
            raise ValueError("a distilled model has no register tokens or representation layer (as DeiT); "
                             f"got num_reg_tokens={self.num_reg_tokens}, "
                             f"representation_size={self.representation_size}")
        if self.distilled and self.fc_norm:
            raise ValueError("a distilled model's heads read the normed tokens; it has no fc_norm")
        if self.num_reg_tokens < 0:
            raise ValueError(f"num_reg_tokens must be >= 0, got {self.num_reg_tokens}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"layer_scale is the LayerScale init and must be > 0 (or None), got {self.layer_scale}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive (or None), got {self.projection_dim}")
        if self.hybrid is not None and (self.num_reg_tokens or self.distilled or self.pooling == "map"):
            raise ValueError("hybrid (ResNet stem) ViTs take no register/distillation tokens or attention pooling")
        if self.image_size % self.stride:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the total stride {self.stride}"
            )
        check_resample(self.pos_embed_resample)
        check_rope(self.rope, self.rope_indexing)
        if self.rope is not None and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got "
                             f"{self.hidden_size // self.num_heads}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"mlp_type must be one of {', '.join(MLP_TYPES)}, got {self.mlp_type!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.qv_bias and self.qkv_bias:
            raise ValueError("qv_bias (separate q and v biases) replaces qkv_bias; set qkv_bias=False")
        if self.pool_form not in POOL_FORMS or (self.pool_form != "latent" and self.pooling != "map"):
            raise ValueError(f"pool_form must be one of {', '.join(POOL_FORMS)} (a form other than 'latent' needs "
                             f"pooling 'map'), got {self.pool_form!r} with pooling {self.pooling!r}")
        if self.sincos_pos_embed and (self.abs_pos_embed or self.hidden_size % 4):
            raise ValueError("sincos_pos_embed replaces the learned table (abs_pos_embed=False) and needs a "
                             f"hidden size divisible by 4, got abs_pos_embed={self.abs_pos_embed}, "
                             f"hidden_size={self.hidden_size}")
        if self.pool_heads is not None and (self.pooling != "map" or self.hidden_size % self.pool_heads):
            raise ValueError(f"pool_heads {self.pool_heads} needs pooling 'map' and to divide hidden_size "
                             f"{self.hidden_size}")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a read of a field that moved into a part says where it went.
        if name in _PART_OF:
            raise AttributeError(f"ViTConfig has no attribute {name!r}: it lives in ViTConfig.{_PART_OF[name]} "
                                 f"(config.{_PART_OF[name]}.{name})")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
    def rope_spec(self) -> RopeSpec | None:
        """The RoPE this model applies (None without one)."""
        if self.rope is None:
            return None
        return RopeSpec(self.rope, self.hidden_size // self.num_heads, self.rope_temperature, self.rope_offset,
                        self.rope_indexing, self.rope_ref_grid)

    @property
    def position_scheme(self) -> str:
        """How the model knows where a patch is, in words (inspect, errors)."""
        parts = [f"learned table ({self.pos_embed_resample} resampling)"] if self.abs_pos_embed else []
        if self.sincos_pos_embed:
            parts.append("2-D sin-cos table (computed per grid)")
        if self.rope is not None:
            parts.append(f"2-D RoPE ({self.rope})")
        return " + ".join(parts) or "none"

    @property
    def has_class_token(self) -> bool:
        """Whether the model has a class token (``class_token``, or a pooling that reads one when it is None)."""
        return self.pooling in CLASS_TOKEN_POOLINGS if self.class_token is None else bool(self.class_token)

    @property
    def use_fc_norm(self) -> bool:
        """Whether the final norm follows the pooling (``fc_norm``) rather than preceding it (``norm``)."""
        return self.pooling == "avg" if self.fc_norm is None else bool(self.fc_norm)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, then register tokens, in that order."""
        return int(self.has_class_token) + int(self.distilled) + self.num_reg_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a position embedding (none with ``no_embed_class``)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def num_pooled_prefix_tokens(self) -> int:
        """Leading tokens the head reads when pooling by token (class, and distillation); 0 otherwise
        (``token_avg`` reads every patch token too)."""
        return 1 + int(self.distilled) if self.pooling == "token" else 0

    @property
    def pooled_size(self) -> int:
        """Width of ``pooler_output``: the representation layer's, else twice the hidden size for
        ``token_avg`` (class token and mean patch token side by side), else the hidden size."""
        if self.representation_size:
            return self.representation_size
        return 2 * self.hidden_size if self.pooling == "token_avg" else self.hidden_size

    def default_size_range(self) -> tuple[int, int]:
        """The default validated height/width range: half to twice the native size, both rounded
        inward to multiples of the stride (what exports and the eager runtime accept by default)."""
        return default_size_range(self.image_size, self.stride)

    def seq_len(self, height: int, width: int | None = None) -> int:
        """Number of tokens (prefix tokens included) for an input of ``height`` x ``width``."""
        width = height if width is None else width
        return self.num_prefix_tokens + (height // self.stride) * (width // self.stride)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The flat names :meth:`from_fields` and :meth:`replace` accept (as :meth:`to_fields` gives them): the
        architecture's fields and those of its preprocessing and provenance (which both also take whole)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.name not in _PARTS) | frozenset(_PART_OF)

    @staticmethod
    def _split(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """``fields`` (flat names) as the architecture's and each part's, by name."""
        parts: dict[str, dict[str, Any]] = {part: {} for part in _PARTS}
        architecture: dict[str, Any] = {}
        for key, value in fields.items():
            if key in _PART_OF:
                parts[_PART_OF[key]][key] = value
            else:
                architecture[key] = value
        return architecture, parts

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ViTConfig:
        """A config from flat field names (``mean=``, ``family=`` beside ``depth=``; see :meth:`field_names`),
        the others at their defaults."""
        return cls().replace(**fields)

    def to_fields(self) -> dict[str, Any]:
        """Every field by its flat name (:meth:`field_names`), values as held (not copied)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _PARTS}
        for part in _PARTS:
            nested = getattr(self, part)
            data.update({f.name: getattr(nested, f.name) for f in dataclasses.fields(nested)})
        return data

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data: the architecture's fields, with ``preprocessing`` and
        ``provenance`` nested."""
        data = dataclasses.asdict(self)
        data["preprocessing"]["mean"] = list(self.preprocessing.mean)
        data["preprocessing"]["std"] = list(self.preprocessing.std)
        if self.hybrid is not None:
            data["hybrid"]["layers"] = list(self.hybrid.layers)
        if self.rope_ref_grid is not None:
            data["rope_ref_grid"] = list(self.rope_ref_grid)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """A config from :meth:`to_dict`'s output. Older files keep their meaning: one saved before
        ``pos_embed_resample`` existed keeps the resampling it was made with
        (:data:`vitdeploy.pos_embed.LEGACY_RESAMPLE`), one saved before ``fc_norm`` existed applied the
        final norm to the tokens (``fc_norm=False``), and one saved before the split (``mean``,
        ``family``, ... beside the architecture's fields) has them read into ``preprocessing`` and
        ``provenance``."""
        architecture, flat_parts = cls._split(dict(data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(architecture) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; expected a subset of {sorted(cls.field_names())}")
        for part, flat in flat_parts.items():
            if not flat:
                continue
            if part in architecture:
                raise ValueError(f"ViTConfig fields {sorted(flat)} given both flat and inside {part!r}; "
                                 "expected one or the other")
            architecture[part] = flat
        for part, part_cls in _PARTS.items():
            nested = architecture.get(part)
            if isinstance(nested, dict):
                names = {f.name for f in dataclasses.fields(part_cls)}
                if set(nested) - names:
                    raise ValueError(f"unknown {part} fields {sorted(set(nested) - names)}; expected a subset of "
                                     f"{sorted(names)}")
        legacy: dict[str, Any] = {"pos_embed_resample": LEGACY_RESAMPLE}
        if "fc_norm" not in data:
            legacy["fc_norm"] = False
        return cls(**{**legacy, **architecture})

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> ViTConfig:
        """A copy with ``overrides`` applied (and validated): any of :meth:`field_names` (``crop_pct=``
        edits ``preprocessing``, ``labels=`` ``provenance``), or a whole ``preprocessing=``/``provenance=``."""
        known = self.field_names() | set(_PARTS)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model overrides {unknown}; expected some of {sorted(self.field_names())}")
        architecture, parts = self._split(overrides)
        for part, changes in parts.items():
            if changes:
                base = architecture.get(part, getattr(self, part))
                base = _PARTS[part](**base) if isinstance(base, dict) else base
                architecture[part] = dataclasses.replace(base, **changes)
        return dataclasses.replace(self, **architecture)


def _refuse_flat_keywords(init: Any) -> Any:
    """``ViTConfig.__init__`` refusing the fields that moved into its parts, in one line naming the part."""

    @functools.wraps(init)
    def checked(self: ViTConfig, *args: Any, **kwargs: Any) -> None:
        moved = [key for key in kwargs if key in _PART_OF]
        if moved:
            key = moved[0]
            part = _PART_OF[key]
            raise TypeError(f"ViTConfig takes no {key}=: it lives in ViTConfig.{part} "
                            f"({_PARTS[part].__name__}({key}=...)); ViTConfig.from_fields and .replace take it flat")
        init(self, *args, **kwargs)

    return checked


ViTConfig.__init__ = _refuse_flat_keywords(ViTConfig.__init__)  # type: ignore[method-assign]
