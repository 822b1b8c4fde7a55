"""Self-description of exported artifacts (ONNX ``metadata_props``), importable without torch.

Every ONNX file vitdeploy writes carries an :class:`ArtifactMetadata`. Runtimes read it to
know the input range they may accept and the preprocessing the model expects.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

PREFIX = "vitdeploy."

# How an image is resized before its centre crop: the short side to ``resize_size`` (aspect kept; timm's
# "center", open_clip's "shortest", transformers' ``shortest_edge``), or both sides to it (aspect lost;
# timm's and open_clip's "squash", transformers' ``{"height", "width"}`` sizes).
RESIZE_MODES = ("shortest", "squash")


def check_resize_mode(mode: str) -> None:
    """Raise ``ValueError`` naming ``mode`` unless it is one of :data:`RESIZE_MODES`."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")


@dataclass
class Preprocessing:
    """How an image becomes ``pixel_values``: resize (the short side, or both sides with ``resize_mode``
    ``"squash"``) to ``resize_size``, centre-crop ``crop_size``, normalise."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize_size: int = 248
    crop_size: int = 224
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        check_resize_mode(self.resize_mode)

    def describe(self) -> str:
        """``resize the short side to 248 (bicubic), centre-crop 224, mean 0.485/0.456/0.406, std ...``."""
        sides = "both sides" if self.resize_mode == "squash" else "the short side"

        def values(numbers: tuple[float, ...]) -> str:
            return "/".join(f"{v:g}" for v in numbers)

        return (f"resize {sides} to {self.resize_size} ({self.interpolation}), centre-crop {self.crop_size}, "
                f"mean {values(self.mean)}, std {values(self.std)}")

    @classmethod
    def for_model(cls, image_size: int, crop_pct: float, mean, std, interpolation: str,
                  resize_mode: str = "shortest") -> Preprocessing:
        """timm's eval transform: resize to ``floor(size / crop_pct)`` (the short side, or both with
        ``"squash"``), then crop."""
        return cls(
            mean=tuple(mean), std=tuple(std), resize_size=int(image_size / crop_pct),
            crop_size=image_size, interpolation=interpolation, resize_mode=resize_mode,
        )


@dataclass
class ShapeRange:
    """Inclusive ranges of batch size, height and width an artifact was validated on."""

    batch: tuple[int, int] = (1, 64)
    height: tuple[int, int] = (112, 448)
    width: tuple[int, int] = (112, 448)

    def __post_init__(self) -> None:
        for axis in ("batch", "height", "width"):
            low, high = (int(v) for v in getattr(self, axis))
            if not 0 < low <= high:
                raise ValueError(f"{axis} range {low}:{high} is invalid; expected 0 < min <= max")
            setattr(self, axis, (low, high))

    def describe(self) -> str:
        """``batch 1..4, 112..448`` when height and width share a range, else ``batch 1..4, height .., width ..``."""
        def span(values: tuple[int, int]) -> str:
            return f"{values[0]}..{values[1]}"

        sizes = span(self.height) if self.height == self.width else f"height {span(self.height)}, width {span(self.width)}"
        return f"batch {span(self.batch)}, {sizes}"

    @classmethod
    def covering(cls, shapes: Any) -> ShapeRange | None:
        """The smallest range holding every ``(batch, height, width)`` in ``shapes``; ``None`` when there are none."""
        shapes = [tuple(int(v) for v in shape) for shape in shapes or []]
        if not shapes:
            return None
        batches, heights, widths = zip(*shapes, strict=True)
        return cls((min(batches), max(batches)), (min(heights), max(heights)), (min(widths), max(widths)))


@dataclass(frozen=True)
class DeployableRange:
    """The shape range artifacts built from a file may claim (:meth:`ArtifactMetadata.deployable_range`):
    ``source`` is ``"validated"`` or ``"declared"``; ``warning`` says why a declared range is used."""

    shape_range: ShapeRange
    source: str
    warning: str | None = None


# ArtifactMetadata.optimizations entry: the last block is computed for the class token only
# (VisionTransformer.forward_features(x, class_token_last_block=True)).
CLASS_TOKEN_LAST_BLOCK = "class_token_last_block"
# ArtifactMetadata.target: a graph any ONNX runtime (TensorRT's parser included) runs, or one
# rewritten for onnxruntime's CPU provider (contrib ops).
PORTABLE = "portable"
CPU_VARIANT = "onnxruntime-cpu"
# ArtifactMetadata.transforms entry name of the onnxruntime CPU contrib-op fusion.
CPU_FUSION = "ort_cpu_fusion"
# ArtifactMetadata.transforms entry name of a quantization (exporters/quantize.py writes it).
QUANTIZE_TRANSFORM = "quantize"


def model_provenance(model_config: dict[str, Any]) -> dict[str, Any]:
    """``family``, ``name`` and ``labels`` of a serialised :class:`~vitdeploy.config.ViTConfig` (None where
    absent), nested under ``provenance`` or, in files written before the config was split, flat."""
    nested = model_config.get("provenance")
    source = nested if isinstance(nested, dict) else model_config
    return {key: source.get(key) for key in ("family", "name", "labels")}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class ArtifactMetadata:
    """What an exported model says about itself."""

    model_config: dict[str, Any]
    preprocessing: Preprocessing
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    shape_range: ShapeRange
    precision: str = "fp32"
    fp32_ops: list[str] = field(default_factory=list)
    opset: int = 18
    source: str = ""
    source_sha256: str = ""
    # How ``source`` was read: a checkpoint format, or "variant" for a registry name (random weights).
    source_format: str = ""
    vitdeploy_version: str = ""
    labels: list[str] | None = None
    validation: dict[str, Any] | None = None
    # Output-preserving rewrites baked into the graph, e.g. "class_token_last_block".
    optimizations: list[str] = field(default_factory=list)
    # Which runtimes the graph is for: PORTABLE, or CPU_VARIANT for onnxruntime-only contrib ops.
    target: str = PORTABLE
    # Graph-to-graph transforms applied after tracing, in order: {"name": ..., details}.
    transforms: list[dict[str, Any]] = field(default_factory=list)
    # Validated graphs derived from this one, written beside it: {target: {"file": name, "sha256": hex}}.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def stride(self) -> int:
        """Input sizes must be multiples of this (patch size x backbone stride)."""
        from vitdeploy.config import HybridConfig

        hybrid = self.model_config.get("hybrid")
        backbone = HybridConfig(**hybrid).stride if hybrid else 1
        return int(self.model_config["patch_size"]) * backbone

    @property
    def num_classes(self) -> int:
        return int(self.model_config["num_classes"])

    @property
    def model_provenance(self) -> dict[str, Any]:
        """``family``, ``name`` and ``labels`` from :attr:`model_config` (None where absent): nested under
        ``provenance``, or flat beside the architecture in files written before that split."""
        return model_provenance(self.model_config)

    @property
    def class_labels(self) -> list[str] | None:
        """The class names: :attr:`labels`, else the model config's, else None."""
        return self.labels or self.model_provenance["labels"]

    @property
    def output_names(self) -> list[str]:
        """The graph's outputs (:mod:`vitdeploy.outputs` names), in graph order."""
        return [tensor.name for tensor in self.outputs]

    @property
    def primary_output(self) -> str:
        """The output a runtime returns when called: ``logits``, else the embedding (see
        :func:`vitdeploy.outputs.primary_output`)."""
        from vitdeploy.outputs import primary_output

        return primary_output(self.output_names)

    def output(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of output ``name``; ``KeyError`` naming the outputs there are."""
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(f"the artifact has no output {name!r}; it has {', '.join(self.output_names)}")

    @property
    def validated_range(self) -> ShapeRange | None:
        """The range the parity check covered (its shapes' extent), ``None`` when it did not run.

        It can be narrower than :attr:`shape_range` (the declared range the graph accepts): the
        export caps the validation batch to keep it cheap.
        """
        return ShapeRange.covering((self.validation or {}).get("shapes"))

    def deployable_range(self, beyond_validated: bool = False, name: str = "the file") -> DeployableRange:
        """The range an engine profile or a serving config may claim: the validated one.

        ``beyond_validated`` (an explicit, warned override) gives the declared range instead; a
        file that records no validation (exported with ``--no-validate``) gives its declared range
        with a warning saying nothing checked it.
        """
        validated, declared = self.validated_range, self.shape_range
        if validated is None:
            return DeployableRange(declared, "declared", f"{name} records no validation (exported with --no-validate?): "
                                   f"using its declared range ({declared.describe()}), which nothing has checked")
        validated = ShapeRange(*((max(v[0], d[0]), min(v[1], d[1])) for v, d in zip(
            (validated.batch, validated.height, validated.width), (declared.batch, declared.height, declared.width),
            strict=True)))
        if beyond_validated and validated != declared:
            return DeployableRange(declared, "declared", f"beyond the validated range: using {name}'s declared range "
                                   f"({declared.describe()}) although only {validated.describe()} was validated; "
                                   "shapes outside it were never compared with the eager model")
        return DeployableRange(validated, "validated")

    def range_text(self) -> str:
        """``validated: batch 1..4, 112..448; declared: batch 1..64, 112..448`` (how every report shows ranges)."""
        validated = self.validated_range
        return (f"validated: {validated.describe() if validated else 'not checked'}; "
                f"declared: {self.shape_range.describe()}")

    @property
    def random_weights(self) -> bool:
        """Whether the graph was exported from a variant name (random weights, meaningless classes).

        Files written before ``source_format`` existed are judged by their source: a variant name.
        """
        if self.source_format:
            return self.source_format == "variant"
        from vitdeploy.variants import VARIANTS

        return self.source in VARIANTS

    def to_props(self) -> dict[str, str]:
        """Flatten into string key/value pairs for ONNX ``metadata_props``."""
        data = asdict(self)
        return {PREFIX + key: json.dumps(value, sort_keys=True) for key, value in data.items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ArtifactMetadata:
        """Inverse of :meth:`to_props`; raises ``ValueError`` naming a missing key."""
        data: dict[str, Any] = {}
        for key, text in props.items():
            if key.startswith(PREFIX):
                data[key[len(PREFIX):]] = json.loads(text)
        if "outputs" not in data and "model_config" in data:
            # Files from before outputs were recorded held logits alone.
            data["outputs"] = [{"name": "logits", "dtype": "float32",
                                "shape": ["batch", int(data["model_config"].get("num_classes", 0))]}]
        required = ("model_config", "preprocessing", "inputs", "outputs", "shape_range")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(
                f"artifact has no vitdeploy metadata {[PREFIX + k for k in missing]}; "
                "was it written by `vitdeploy export`?"
            )
        known = set(cls.__dataclass_fields__)
        data = {key: value for key, value in data.items() if key in known}
        data["preprocessing"] = Preprocessing(**data["preprocessing"])
        data["shape_range"] = ShapeRange(**data["shape_range"])
        data["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
        data["outputs"] = [TensorInfo(**t) for t in data["outputs"]]
        return cls(**data)


# ModelProto field numbers (onnx.proto): graph = 7, metadata_props = 14.
_GRAPH_FIELD = 7
_METADATA_PROPS_FIELD = 14


def _read_varint(stream: BinaryIO) -> int:
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ValueError("truncated protobuf varint")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _parse_entry(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (key = field 1, value = field 2)."""
    stream = io.BytesIO(data)
    fields = {1: "", 2: ""}
    while stream.tell() < len(data):
        tag = _read_varint(stream)
        if tag & 7 != 2:
            raise ValueError("malformed metadata_props entry")
        fields[tag >> 3] = stream.read(_read_varint(stream)).decode("utf-8")
    return fields[1], fields[2]


def check_onnx_path(path: str | os.PathLike[str]) -> None:
    """Refuse, naming ``path``, what cannot be an ONNX file before reading it: a folder, nothing, an empty file.

    The one wording every command uses for these (``check``, ``predict``, ``inspect``, ...).
    """
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an ONNX file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty, not an ONNX file")


def read_metadata_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read without parsing (or loading) the graph.

    Walks the top-level fields of the ``ModelProto`` and seeks over the graph, so it costs
    the same for a 10 MB and a 2 GB model and needs neither ``onnx`` nor ``onnxruntime``.
    Raises ``ValueError`` if the file is not a protobuf ``ModelProto`` with a graph.
    """
    check_onnx_path(path)
    props: dict[str, str] = {}
    seen_graph = False
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        try:
            while stream.tell() < size:
                tag = _read_varint(stream)
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _read_varint(stream)
                elif wire == 1:
                    stream.seek(8, io.SEEK_CUR)
                elif wire == 5:
                    stream.seek(4, io.SEEK_CUR)
                elif wire == 2:
                    length = _read_varint(stream)
                    if stream.tell() + length > size:
                        raise ValueError(f"field {field} runs past the end of the file")
                    if field == _METADATA_PROPS_FIELD:
                        key, value = _parse_entry(stream.read(length))
                        props[key] = value
                    else:
                        seen_graph = seen_graph or field == _GRAPH_FIELD
                        stream.seek(length, io.SEEK_CUR)
                else:
                    raise ValueError(f"unexpected protobuf wire type {wire}")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a readable ONNX model ({error})") from None
    if not seen_graph:
        raise ValueError(f"{path} is not an ONNX model (no graph found)")
    return props


def quantization_record(metadata: Any) -> dict[str, Any] | None:
    """The ``quantize`` entry of an artifact's ``transforms`` (``None`` for a float graph)."""
    for transform in getattr(metadata, "transforms", []) or []:
        if transform.get("name") == QUANTIZE_TRANSFORM:
            return transform
    return None


def read_onnx_metadata(path: str | os.PathLike[str]) -> ArtifactMetadata:
    """The :class:`ArtifactMetadata` of a vitdeploy ONNX file, read without loading the graph.

    Raises ``ValueError`` if the file is not an ONNX model or carries no vitdeploy metadata.
    """
    return ArtifactMetadata.from_props(read_metadata_props(path))
