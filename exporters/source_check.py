"""Check an artifact against the source library's own model, not only against vitdeploy's.

Parity with vitdeploy's eager model proves the export; it cannot prove the model. A checkpoint whose
architecture or position convention the loader mis-reads gives an eager model and a graph that agree
with each other and both differ from what the checkpoint's own library computes. So when the
checkpoint is in a library's format and that library is importable, the artifact is also run against
the library's own forward pass of the same weights:

- timm: a timm Hub folder (``config.json`` naming the ``architecture``) or a bare state dict whose
  architecture ``--model NAME`` (or else the file name) gives, built with ``timm.create_model(NAME,
  dynamic_img_size=True)`` and loaded strictly;
- transformers: a ``save_pretrained`` folder, built with the class its ``config.json`` names
  (``architectures``) and run with ``interpolate_pos_encoding=True`` where the model takes it;
- open_clip: an OpenCLIP folder, built from its ``open_clip_config.json`` (``local-dir:``), one
  model per size (:class:`OpenClipTowers`);
- JAX: an original google-research/vision_transformer ``.npz``, loaded into timm's model of the
  architecture ``--model`` (or else the registry variant its shapes match) names by timm's own npz loader
  (``load_pretrained``: how PyTorch users load these files; the JAX code itself is not a library here),
  with the depth, classes and size the archive shows.

All run on real photographs at the native size and at a changed, non-square size (one side larger,
one smaller: both up- and downsampling of a position grid), with the tolerance of the artifact's
precision against fp32; every output the source gives is judged (tokens per token through
:func:`vitdeploy.parity.verify`). Formats with no source library here (the original DINOv2 weights,
vitdeploy's own safetensors, a variant name's random weights) are skipped, and the record says why.
:func:`timm_outputs`, :func:`hf_outputs` and :func:`openclip_outputs` are each library's own view of
every output under vitdeploy's names; the parity tests use them too. A transformers folder's
preprocessing is also compared with its own image processor (:func:`check_preprocessing`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.config import snap_to_stride
from vitdeploy.parity import CaseResult, InputFactory, ParityReport, Reference, tolerance_for, verify

PHOTOS_PER_SIZE = 2

# Why a format is not checked against a source library.
NO_SOURCE_LIBRARY = {
    "dinov2": "the original DINOv2 format: facebookresearch/dinov2 is torch.hub code, not an installed library",
    "native": "vitdeploy's own safetensors format: there is no other library's model to check against",
    "variant": "a variant name: random weights vitdeploy made itself, so there is no source checkpoint",
}


class SourceModelError(RuntimeError):
    """The source library cannot build or load the checkpoint as the architecture it names."""


def _error_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the type alone where the message is empty)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


# --------------------------------------------------------------------------- each library's outputs


def timm_outputs(model: Any, pixels: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """timm's own view of each output: ``forward_head`` (``logits``; ``image_embeds``, a CLIP tower's
    projection), ``forward_head(pre_logits=True)`` (``pooler_output``) and ``forward_features``
    (``last_hidden_state``; ``patch_tokens`` without the model's prefix tokens)."""
    import torch

    with torch.no_grad():
        tokens = model.forward_features(pixels)
        pooled = model.forward_head(tokens, pre_logits=True)
        head = model.forward_head(tokens)
    values = {"logits": head, "image_embeds": head, "pooler_output": pooled, "last_hidden_state": tokens,
              "patch_tokens": tokens[:, model.num_prefix_tokens:]}
    return {name: values[name] for name in (names or values)}


def _takes_interpolation(module: Any) -> dict[str, bool]:
    """``interpolate_pos_encoding=True`` where ``module.forward`` takes it (transformers' DINOv2 always
    interpolates; RoPE models recompute their positions)."""
    return {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(
        module.forward).parameters else {}


def _patch_size(model: Any) -> int:
    config = getattr(model.config, "vision_config", model.config)
    patch = config.patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def siglip2_patches(pixels: Any, patch: int) -> Any:
    """``[N, C, H, W]`` images as transformers' SigLIP 2 takes them: ``[N, rows * cols, patch * patch * C]``,
    each patch's pixels in (row, column, channel) order, as its image processor writes them."""
    batch, channels, height, width = pixels.shape
    grid = pixels.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), -1)


def hf_outputs(model: Any, pixels: Any) -> dict[str, Any]:
    """transformers' own outputs of ``model`` under vitdeploy's output names (``interpolate_pos_encoding``
    on where taken), each from the model that gives it: a classifier's ``logits`` from its forward, the
    tokens from its backbone (``model.base_model``), a tower's pooled and projected embeddings from
    ``vision_model`` and the projection. ``patch_tokens`` is ``last_hidden_state`` without the prefix
    rows (as many as the sequence holds beyond the patch grid).

    Where the names mean different things on the two sides, the source's values are turned into
    what vitdeploy's name means, by the source's own modules: CLIP's ``last_hidden_state`` is
    before ``post_layernorm`` (vitdeploy's = timm's after it), so the norm is applied; a DINOv2
    classifier's ``pooler_output`` is what its head reads, ``cat(class token, mean of the patch
    tokens)`` of its backbone's output (its own ``linear_input``); a ViT/DeiT pooler
    (``tanh(dense(class token))``) has no vitdeploy counterpart and is left out.
    """
    import torch
    import transformers as T

    def classes(*names: str) -> tuple[type, ...]:
        return tuple(getattr(T, name) for name in names if hasattr(T, name))

    clip = classes("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
    siglip = classes("SiglipModel", "SiglipVisionModel")
    siglip2 = classes("Siglip2Model", "Siglip2VisionModel")
    dinov2_classifiers = classes("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
    mae = classes("ViTMAEModel", "ViTMAEForPreTraining")
    grid = (pixels.shape[-2] // _patch_size(model)) * (pixels.shape[-1] // _patch_size(model))
    with torch.no_grad():
        if isinstance(model, siglip2):  # NaFlex towers take patch sequences: each whole image as one, unpadded
            batch, patch = pixels.shape[0], _patch_size(model)
            rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
            tower = getattr(model, "vision_model", model)(
                pixel_values=siglip2_patches(pixels, patch), pixel_attention_mask=torch.ones(batch, rows * cols),
                spatial_shapes=torch.tensor([[rows, cols]] * batch))
            outputs = {"pooler_output": tower.pooler_output, "last_hidden_state": tower.last_hidden_state}
        elif isinstance(model, mae):  # the encoder alone, every patch kept, in order (MAE masks config.mask_ratio
            encoder = getattr(model, "vit", model)  # of them and shuffles the rest by random noise)
            ratio, encoder.config.mask_ratio = encoder.config.mask_ratio, 0.0
            try:
                in_order = torch.arange(grid, dtype=torch.float32).expand(pixels.shape[0], grid)
                tokens = encoder(pixel_values=pixels, noise=in_order, interpolate_pos_encoding=True).last_hidden_state
            finally:
                encoder.config.mask_ratio = ratio
            outputs = {"last_hidden_state": tokens}
        elif isinstance(model, clip + siglip):  # image towers, alone or in their full models
            vision = getattr(model, "vision_model", model)  # transformers 5's CLIPVisionModel is the tower itself
            tower = vision(pixel_values=pixels, interpolate_pos_encoding=True)
            outputs = {"pooler_output": tower.pooler_output, "last_hidden_state": tower.last_hidden_state}
            if clip and isinstance(model, T.CLIPModel):
                features = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
                outputs["image_embeds"] = getattr(features, "pooler_output", features)
            elif clip and isinstance(model, T.CLIPVisionModelWithProjection):
                outputs["image_embeds"] = model(pixel_values=pixels, interpolate_pos_encoding=True).image_embeds
            if isinstance(model, clip):
                outputs["last_hidden_state"] = vision.post_layernorm(outputs["last_hidden_state"])
        else:  # a backbone, or a classifier over one
            result = model(pixel_values=pixels, **_takes_interpolation(model))
            backbone = model.base_model
            if "pixel_values" not in inspect.signature(backbone.forward).parameters:
                backbone = model  # DINOv3ViTModel's base_model is its encoder, which takes tokens
            tokens = (result if backbone is model else
                      backbone(pixel_values=pixels, **_takes_interpolation(backbone))).last_hidden_state
            outputs = {"last_hidden_state": tokens}
            if getattr(result, "logits", None) is not None:
                outputs["logits"] = result.logits
            prefix = tokens.shape[1] - grid
            if isinstance(model, dinov2_classifiers):
                outputs["pooler_output"] = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)
            elif (backbone is model and getattr(result, "pooler_output", None) is not None
                  and not hasattr(getattr(model, "pooler", None), "dense")):
                outputs["pooler_output"] = result.pooler_output
    tokens = outputs["last_hidden_state"]
    outputs["patch_tokens"] = tokens[:, tokens.shape[1] - grid:]
    # a tower without its pooling head (SigLIP's vision_use_head false) returns pooler_output None: not compared
    return {name: value for name, value in outputs.items() if value is not None}


# --------------------------------------------------------------------------- the source model


@dataclass
class SourceModel:
    """The source library's own model of a checkpoint, and how to read its outputs."""

    library: str  # "timm" or "transformers"
    version: str
    architecture: str  # timm model name or transformers class name
    module: Any
    view: Callable[[Any, Any], dict[str, Any]]

    @property
    def name(self) -> str:
        return f"{self.library} {self.version} {self.architecture}"


def _read_timm_weights(files: list[Path]) -> dict[str, Any]:
    from vitdeploy.checkpoints.common import read_weight_files, strip_prefixes

    return strip_prefixes(read_weight_files(files))[0]


def _create_timm(timm: Any, architecture: str, kwargs: dict[str, Any]) -> Any:
    """timm's ``architecture`` with ``kwargs`` and ``dynamic_img_size=True``, untrained."""
    try:
        return timm.create_model(architecture, pretrained=False, **{**kwargs, "dynamic_img_size": True})
    except Exception as error:  # noqa: BLE001 - any failure of timm's constructor is a one-line reason
        raise SourceModelError(f"timm cannot build {architecture} with {kwargs}: {error}") from None


def build_timm(files: list[Path], architecture: str, kwargs: dict[str, Any]) -> SourceModel:
    """timm's ``architecture`` with ``dynamic_img_size=True`` and ``kwargs``, the weights in ``files``
    loaded strictly (read as data: safetensors or a weights-only pickle)."""
    from vitdeploy.timm_import import import_timm

    timm = import_timm()
    state = _read_timm_weights(files)
    if "num_classes" not in kwargs:
        head = state.get("head.weight")
        kwargs = {**kwargs, "num_classes": int(head.shape[0]) if head is not None else 0}
    import torch

    def load(module: Any, meta: bool = False) -> Any:
        try:
            missing, unexpected = module.load_state_dict(state, strict=False, assign=meta)
        except RuntimeError as error:  # shapes that do not fit: the first line says which
            raise SourceModelError(f"timm's {architecture} does not take these weights: "
                                   f"{' '.join(str(error).split())[:300]}") from None
        if missing or unexpected:
            raise SourceModelError(
                f"timm's {architecture} does not take these weights: missing {sorted(missing)[:4]}"
                f"{'...' if len(missing) > 4 else ''}, unexpected {sorted(unexpected)[:4]}"
                f"{'...' if len(unexpected) > 4 else ''}")
        return module

    with torch.device("meta"):  # the names and shapes first: weights that do not fit cost no full-size init
        load(_create_timm(timm, architecture, kwargs), meta=True)
    module = load(_create_timm(timm, architecture, kwargs))
    return SourceModel("timm", timm.__version__, architecture, module.float().eval(), timm_outputs)


def build_timm_npz(path: Path, architecture: str, kwargs: dict[str, Any]) -> SourceModel:
    """timm's ``architecture`` (``dynamic_img_size=True``, ``kwargs``) with the JAX ``.npz`` at ``path``
    loaded by timm's own loader (``load_pretrained``), which copies each array it knows into place."""
    from vitdeploy.timm_import import import_timm

    timm = import_timm()
    module = _create_timm(timm, architecture, kwargs)
    try:
        module.load_pretrained(str(path))
    except Exception as error:  # noqa: BLE001 - an array timm's loader looks for and does not find, or a shape
        raise SourceModelError(f"timm's npz loader cannot load {path.name} into {architecture}: "
                               f"{_error_line(error)[:300]}") from None
    return SourceModel("timm", timm.__version__, architecture, module.float().eval(), timm_outputs)


def build_transformers(folder: Path, architecture: str) -> SourceModel:
    """The transformers class ``architecture`` (else ``AutoModel``) from the ``save_pretrained`` ``folder``."""
    import transformers

    cls = getattr(transformers, architecture, None) or transformers.AutoModel
    try:
        module = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - a one-line reason
        raise SourceModelError(f"transformers cannot load {folder} as {cls.__name__}: {error}") from None
    return SourceModel("transformers", transformers.__version__, cls.__name__, module.float().eval(), hf_outputs)


@dataclass
class SourceProcessor:
    """A library's own preprocessing: ``run(images)`` gives its ``pixel_values`` for RGB PIL images."""

    name: str
    run: Callable[[list[Any]], np.ndarray]


def transformers_processor(folder: Path) -> SourceProcessor:
    """The image processor ``preprocessor_config.json`` names, with Pillow where transformers has it (as
    vitdeploy's preprocessing resizes), else the one transformers picks."""
    from transformers import AutoImageProcessor

    try:
        try:
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, backend="pil")
        except (TypeError, ValueError):  # no Pillow variant of this processor, or a transformers without backends
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - a one-line reason
        raise SourceModelError(f"transformers cannot load the image processor of {folder}: "
                               f"{_error_line(error)}") from None

    def run(images: list[Any]) -> np.ndarray:
        return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)

    return SourceProcessor(type(processor).__name__, run)


@dataclass
class PreprocessingCheck:
    """The artifact's preprocessing against the source library's own on the same photos: passed, failed
    (by how much, or with the shapes that differ) or not compared (``reason``)."""

    processor: str
    photos: int = 0
    mean_abs: float | None = None
    max_abs: float | None = None
    failure: str | None = None
    reason: str | None = None  # why it was not compared
    size_note: str = ""  # the processor's size, where it is not the artifact's (the method compared at it)

    @property
    def passed(self) -> bool | None:
        if self.reason is not None:
            return None
        return self.failure is None

    def line(self) -> str:
        if self.reason is not None:
            return f"preprocessing not compared with {self.processor}: {self.reason}"
        if self.failure is not None:
            return f"preprocessing differs from {self.processor}'s on {self.photos} real photos: {self.failure}"
        return (f"preprocessing equals {self.processor}'s on {self.photos} real photos (mean |diff| "
                f"{self.mean_abs:.2g}, max {self.max_abs:.2g}){'; ' + self.size_note if self.size_note else ''}")

    def to_dict(self) -> dict[str, Any]:
        return {"processor": self.processor, "passed": self.passed, "photos": self.photos, "mean_abs": self.mean_abs,
                "max_abs": self.max_abs, "failure": self.failure, "reason": self.reason, "size_note": self.size_note}


def check_preprocessing(processor: SourceProcessor, preprocessing: Any, images: Sequence[Any] | None = None
                        ) -> PreprocessingCheck:
    """``preprocessing`` (an artifact's :class:`~vitdeploy.metadata.Preprocessing`) against ``processor`` on
    ``images`` (the bundled photos by default), in normalised units: within
    :data:`~vitdeploy.preprocessing.RESIZE_MEAN_ABS_BOUND` on average and
    :data:`~vitdeploy.preprocessing.RESIZE_MAX_ABS_BOUND` anywhere (Pillow against torch's antialiased
    resize); a crop where the source squashes is far outside both."""
    from vitdeploy.metadata import Preprocessing
    from vitdeploy.preprocessing import (
        RESIZE_MAX_ABS_BOUND,
        RESIZE_MEAN_ABS_BOUND,
        bundled_images,
        load_image,
        preprocess,
    )

    photos = [load_image(image) for image in (images if images is not None else bundled_images())]
    try:
        theirs = processor.run(photos)
    except Exception as error:  # noqa: BLE001 - the library's own failure, in one line
        return PreprocessingCheck(processor.name, reason=f"it failed: {_error_line(error)}")
    if theirs.ndim != 4:
        return PreprocessingCheck(processor.name, reason=f"it gives {theirs.ndim}-D pixel_values "
                                  f"{list(theirs.shape)} (patch sequences, not whole images)")
    size_note = ""
    side, crop = theirs.shape[-1], int(preprocessing.crop_size)
    if theirs.shape[-2] == side != crop:
        # a processor that feeds another square size than the model's native one (transformers' DINOv2: 224
        # crops into a model whose table is 518's): the same resize and crop, compared at the processor's size
        size_note = (f"compared at the processor's {side}x{side}; the artifact's preprocessing gives {crop}x{crop}, "
                     "its native size")
        preprocessing = Preprocessing.for_model(side, crop / preprocessing.resize_size, preprocessing.mean,
                                                preprocessing.std, preprocessing.interpolation,
                                                preprocessing.resize_mode)
    ours = np.stack([preprocess(photo, preprocessing) for photo in photos])
    if ours.shape != theirs.shape:
        return PreprocessingCheck(processor.name, len(photos), failure=f"it gives {list(theirs.shape)} pixel_values, "
                                  f"vitdeploy {list(ours.shape)}")
    diff = np.abs(ours.astype(np.float64) - theirs)
    check = PreprocessingCheck(processor.name, len(photos), float(diff.mean()), float(diff.max()), size_note=size_note)
    if check.mean_abs > RESIZE_MEAN_ABS_BOUND or check.max_abs > RESIZE_MAX_ABS_BOUND:
        check.failure = (f"mean |diff| {check.mean_abs:.3g} (bound {RESIZE_MEAN_ABS_BOUND}), max {check.max_abs:.3g} "
                         f"(bound {RESIZE_MAX_ABS_BOUND}) in normalised units; vitdeploy "
                         f"{preprocessing.describe()}")
    return check


class OpenClipTowers:
    """open_clip's image tower of an OpenCLIP folder at each input size, each built as open_clip builds a
    model for that size (``create_model("local-dir:...", force_image_size=...)``: its position table
    resampled when the weights are loaded, open_clip's only way to run at another size; a tower around a
    timm trunk is resized by timm after loading, ``set_input_size``: its table resampled, a RoPE grid
    changed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        tower = self._build(None)
        trunk = getattr(tower, "trunk", None)  # a timm model keeps its own size, whatever the config says
        size = trunk.patch_embed.img_size if trunk is not None else tower.image_size
        self.native: tuple[int, int] = (int(size[0]), int(size[1]))
        self._towers: dict[tuple[int, int], Any] = {self.native: tower}

    def _build(self, size: tuple[int, int] | None) -> Any:
        from vitdeploy.timm_import import import_open_clip

        try:
            model = import_open_clip().create_model(f"local-dir:{self.folder}", force_image_size=size)
        except Exception as error:  # noqa: BLE001 - any failure of open_clip's loader is a one-line reason
            where = f" at {size[0]}x{size[1]}" if size else ""
            raise SourceModelError(f"open_clip cannot load {self.folder}{where}: "
                                   f"{' '.join(str(error).split())[:300]}") from None
        return model.visual.float().eval()

    def at(self, size: tuple[int, int]) -> Any:
        if size not in self._towers:
            self._towers[size] = self._build(size)
        return self._towers[size]


def openclip_outputs(towers: OpenClipTowers, pixels: Any) -> dict[str, Any]:
    """open_clip's own view of each output: a timm trunk's outputs as timm gives them (:func:`timm_outputs`),
    with its tower's projection as ``image_embeds``; open_clip's VisionTransformer's projected embedding
    (``image_embeds``), the pooled vector its forward gives without the projection (``pooler_output``)
    and the patch tokens it returns with ``output_tokens``."""
    import torch

    tower = towers.at((int(pixels.shape[-2]), int(pixels.shape[-1])))
    with torch.no_grad():
        trunk = getattr(tower, "trunk", None)
        if trunk is not None:
            outputs = timm_outputs(trunk, pixels)
            del outputs["image_embeds"]
            logits = outputs.pop("logits")
            if len(tower.head):
                outputs["image_embeds"] = tower(pixels)
            elif trunk.num_classes:  # the trunk's head is the tower's projection (with a bias): its logits
                outputs["logits"] = logits
            return outputs
        tower.output_tokens = True
        projection = tower.proj
        try:
            embeds, tokens = tower(pixels)
            tower.proj = None
            pooled, _ = tower(pixels)
        finally:
            tower.proj = projection
            tower.output_tokens = False
    return {"image_embeds": embeds, "pooler_output": pooled, "patch_tokens": tokens}


def build_openclip(folder: Path) -> SourceModel:
    """open_clip's model of the OpenCLIP ``folder`` (its config and weights, loaded strictly), image tower only."""
    from vitdeploy.timm_import import import_open_clip

    towers = OpenClipTowers(folder)
    tower = towers.at(towers.native)
    return SourceModel("open_clip", import_open_clip().__version__, f"{type(tower).__name__} of local-dir:{folder}",
                       towers, openclip_outputs)


def native_size_only(model: SourceModel) -> str | None:
    """Why the source model runs at its native size only (None: it takes other sizes): transformers'
    AIMv2 with ``is_native`` false adds its learned table as it is, without resizing it."""
    config = getattr(model.module, "config", None)
    if getattr(config, "model_type", None) == "aimv2_vision_model" and not getattr(config, "is_native", True):
        return f"{model.architecture} (is_native false) runs at its native size only"
    return None


# --------------------------------------------------------------------------- what to check against


@dataclass
class SourcePlan:
    """What an artifact is checked against (a library and architecture, built on first use), or why not."""

    source: str
    format: str
    library: str | None = None
    architecture: str | None = None
    architecture_from: str = ""  # where the architecture name came from
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    build: Callable[[], SourceModel] | None = None
    lenient: bool = False  # a name not from the checkpoint's own config: a load failure skips the check
    # the library's own image → pixel_values for the checkpoint (transformers' image processor), if it has one
    processor: Callable[[], SourceProcessor] | None = None
    _model: SourceModel | None = field(default=None, repr=False)
    _processor: SourceProcessor | None = field(default=None, repr=False)
    _memo: dict[tuple[Any, ...], dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def runs(self) -> bool:
        return self.skipped is None and self.build is not None

    def model(self) -> SourceModel:
        """The source model, built once (an export of several precisions checks each against it)."""
        if self._model is None:
            assert self.build is not None
            self._model = self.build()
        return self._model

    def image_processor(self) -> SourceProcessor:
        """The source's own preprocessing, built once (each precision's artifact is compared with it)."""
        if self._processor is None:
            assert self.processor is not None
            self._processor = self.processor()
        return self._processor

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The source model's outputs for an fp32 ``[N, 3, H, W]`` batch, computed once per batch."""
        import torch

        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        key = (pixels.shape, hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest())
        if key not in self._memo:
            model = self.model()
            values = model.view(model.module, torch.from_numpy(pixels))
            self._memo[key] = {name: value.detach().float().numpy() for name, value in values.items()}
        return self._memo[key]

    def describe(self) -> str:
        return f"{self.library} {self.version()} ({self.architecture}, named by {self.architecture_from})"

    def version(self) -> str:
        """The source library's version (of the installed package until the model is built)."""
        if self._model is not None:
            return self._model.version
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            return package_version(self.library or "")
        except PackageNotFoundError:
            return "?"


def _importable(name: str) -> bool:
    import importlib.util

    if name in ("timm", "open_clip"):  # imported beside the torchvision stand-in
        from vitdeploy.timm_import import import_open_clip, import_timm

        try:
            return (import_timm if name == "timm" else import_open_clip)() is not None
        except Exception:  # noqa: BLE001 - a broken install (a missing dependency) is "not importable"
            return False
    return importlib.util.find_spec(name) is not None


def _library_plan(source: str, format: str, library: str, module: str) -> SourcePlan:
    """A plan against ``library`` (the package; ``module`` its import name), skipped, saying so, where it
    cannot be imported here."""
    plan = SourcePlan(source, format, library=library)
    if not _importable(module):
        plan.skipped = f"{module} is not importable here (pip install {library})"
    return plan


def plan_source_check(source: str | Path, format: str, *, model: str | None = None, image_size: int | None = None,
                      variant: str | None = None, enabled: bool = True) -> SourcePlan:
    """What the checkpoint ``source`` (read as ``format``, :class:`~vitdeploy.checkpoints.ResolvedModel`'s)
    is checked against. ``model`` is the architecture ``--model`` forced (used as the timm name of a
    bare state dict), ``image_size`` the native size the weights were read at, ``variant`` the registry
    name the loader read them as (a JAX archive's timm name when ``model`` gives none); ``enabled=False``
    records that ``--no-source-check`` skipped it."""
    source = str(source)
    if not enabled:
        return SourcePlan(source, format, skipped="--no-source-check")
    if format == "timm":
        return _timm_plan(source, model, image_size)
    if format == "jax":
        return _jax_plan(source, model, variant, image_size)
    if format == "huggingface":
        return _transformers_plan(source)
    if format == "openclip":
        return _openclip_plan(source)
    return SourcePlan(source, format, skipped=NO_SOURCE_LIBRARY.get(
        format, f"the {format} format has no source library vitdeploy can run"))


def _timm_plan(source: str, model: str | None, image_size: int | None) -> SourcePlan:
    from vitdeploy.checkpoints.common import CheckpointError, folder_weight_files, name_in_file_name

    plan = _library_plan(source, "timm", "timm", "timm")
    if plan.skipped:
        return plan
    from vitdeploy.timm_import import import_timm

    timm = import_timm()
    path = Path(source).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    kwargs: dict[str, Any] = {}
    if path.is_dir():
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        plan.architecture, plan.architecture_from = str(data["architecture"]).split(".")[0], "config.json"
        kwargs = dict(data.get("model_args") or {})
        if data.get("num_classes") is not None and "num_classes" not in kwargs:
            kwargs["num_classes"] = int(data["num_classes"])
        input_size = (data.get("pretrained_cfg") or {}).get("input_size")
        if "img_size" not in kwargs and input_size:
            kwargs["img_size"] = tuple(int(s) for s in input_size[-2:])
        if model and model != plan.architecture:
            plan.notes.append(f"checked as {plan.architecture} (config.json), not --model {model}")
        try:
            files = folder_weight_files(path)
        except CheckpointError as error:
            plan.skipped = str(error)
            return plan
    else:
        files = [path]
        if model:
            plan.architecture, plan.architecture_from, plan.lenient = model, "--model", True
        elif timm.is_model(name_in_file_name(path)):  # NAME[.tag].safetensors, as the loader reads it
            plan.architecture, plan.architecture_from, plan.lenient = name_in_file_name(path), "the file name", True
        else:
            plan.skipped = ("a bare timm state dict names no architecture: pass --model NAME (a timm model name) "
                            "to check it against timm's own model")
            return plan
    if not timm.is_model(plan.architecture):
        plan.skipped = f"timm {timm.__version__} has no model named {plan.architecture!r}"
        return plan
    if "img_size" not in kwargs and image_size:
        kwargs["img_size"] = int(image_size)
    plan.build = lambda: build_timm(files, str(plan.architecture), dict(kwargs))
    return plan


def _jax_plan(source: str, model: str | None, variant: str | None, image_size: int | None) -> SourcePlan:
    import re

    plan = _library_plan(source, "jax", "timm", "timm")
    if plan.skipped:
        return plan
    from vitdeploy.timm_import import import_timm

    timm = import_timm()
    path = Path(source).expanduser()
    if model:
        plan.architecture, plan.architecture_from = model, "--model"
    elif variant and timm.is_model(variant):
        plan.architecture, plan.architecture_from = variant, "the registry variant its shapes match"
    else:
        plan.skipped = (f"no timm model is named for this JAX archive (read as {variant!r}): pass --model NAME, a "
                        "timm model of its architecture, to check it against timm's own npz loader")
        return plan
    plan.lenient = True  # the archive names no architecture: a name its arrays do not fit skips the check
    if not timm.is_model(plan.architecture):
        plan.skipped = f"timm {timm.__version__} has no model named {plan.architecture!r}"
        return plan
    with np.load(path, allow_pickle=False) as archive:  # the names, and the head's shape: no other array read
        names = {re.sub(r"^(opt/target/|params/)", "", name): name for name in archive.files}
        head = archive[names["head/kernel"]].shape if "head/kernel" in names else None
    if any(name.startswith("pre_logits/") for name in names):
        plan.skipped = ("timm's npz loader leaves out the representation layer (pre_logits) this archive has, so "
                        "timm's model is not this checkpoint")
        return plan
    blocks = {int(m[1]) for name in names if (m := re.match(r"Transformer/encoderblock_(\d+)/", name))}
    kwargs: dict[str, Any] = {"depth": len(blocks), "num_classes": int(head[-1]) if head else 0}
    if image_size:
        kwargs["img_size"] = int(image_size)
    plan.notes.append("loaded by timm's own npz loader (load_pretrained), with the depth and classes the archive "
                      "shows")
    plan.build = lambda: build_timm_npz(path, str(plan.architecture), kwargs)
    return plan


def _transformers_plan(source: str) -> SourcePlan:
    plan = _library_plan(source, "huggingface", "transformers", "transformers")
    if plan.skipped:
        return plan
    folder = Path(source).expanduser()
    if folder.is_file():
        folder = folder.parent
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    names = data.get("architectures") or []
    plan.architecture = str(names[0]) if names else "AutoModel"
    plan.architecture_from = "config.json" if names else "config.json's model_type (AutoModel)"
    plan.build = lambda: build_transformers(folder, str(plan.architecture))
    if (folder / "preprocessor_config.json").is_file():
        plan.processor = lambda: transformers_processor(folder)
    return plan


def _openclip_plan(source: str) -> SourcePlan:
    from vitdeploy.checkpoints.common import CheckpointError
    from vitdeploy.checkpoints.openclip import CONFIG_FILE, folder_files

    plan = _library_plan(source, "openclip", "open_clip_torch", "open_clip")
    if plan.skipped:
        return plan
    folder = Path(source).expanduser()
    if folder.name == CONFIG_FILE:
        folder = folder.parent
    if folder.is_file() and (folder.parent / CONFIG_FILE).is_file():
        try:  # the file open_clip itself loads from its folder (another file there is not what it would check)
            if folder_files(folder.parent) == [folder]:
                folder = folder.parent
        except CheckpointError:
            pass
    if not (folder.is_dir() and (folder / CONFIG_FILE).is_file()):
        plan.skipped = (f"a bare OpenCLIP weight file: open_clip builds its model from {CONFIG_FILE}; pass the "
                        "folder that holds both to check it against open_clip")
        return plan
    plan.architecture, plan.architecture_from = f"local-dir:{folder}", CONFIG_FILE
    plan.build = lambda: build_openclip(folder)
    return plan


# --------------------------------------------------------------------------- the check


def check_sizes(native: int, height: tuple[int, int], width: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """The native size and a changed, non-square one (one side larger, one smaller where the range
    allows), both inside the ranges and multiples of ``stride``."""

    def fit(value: int, bounds: tuple[int, int]) -> int:
        return snap_to_stride(value, bounds[0], bounds[1], stride, nearest=True)

    base = (fit(native, height), fit(native, width))
    sizes = [base]
    for dh, dw in ((2, -2), (-2, 2), (1, -1), (2, 1), (1, 2), (-1, -2), (-2, -1), (3, 0), (0, 3)):
        size = (fit(native + dh * stride, height), fit(native + dw * stride, width))
        if size[0] != size[1] and size != base:
            sizes.append(size)
            break
    return sizes


class _SourceRun:
    """The source model as a :mod:`vitdeploy.parity` reference callable (outputs by name)."""

    def __init__(self, plan: SourcePlan) -> None:
        self.plan = plan

    def __call__(self, pixel_values: np.ndarray) -> Mapping[str, np.ndarray]:
        try:
            return self.plan.outputs(pixel_values)
        except Exception as error:  # noqa: BLE001 - the source library's own failure, reported in one line
            shape = "x".join(str(d) for d in pixel_values.shape)
            raise SourceModelError(f"{self.plan.model().name} failed on a {shape} input: "
                                   f"{_error_line(error)}") from error


@dataclass
class SourceCheckResult:
    """The check of one artifact against its source library, or why it did not run."""

    plan: SourcePlan
    report: ParityReport | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    tolerance: str = ""
    not_compared: list[str] = field(default_factory=list)
    reason: str | None = None  # why the check did not run
    error: str | None = None  # the source model could not be built or loaded as named
    size_note: str = ""  # why fewer sizes were checked than the range allows (a source that runs at one size)
    photos: int = PHOTOS_PER_SIZE  # per size: fewer where the artifact's batch range ends below it
    preprocessing: PreprocessingCheck | None = None  # against the library's own processor, where it has one

    @property
    def checked(self) -> bool:
        return self.report is not None or self.error is not None

    @property
    def passed(self) -> bool | None:
        """True or False when it ran, None when it was skipped."""
        if self.error is not None:
            return False
        if self.report is None:
            return None
        return self.report.passed and (self.preprocessing is None or self.preprocessing.passed is not False)

    @property
    def reference(self) -> str:
        return self.plan.describe()

    def failure_lines(self) -> list[str]:
        """One line per output that disagrees, with its worst case and by how much."""
        if self.error is not None:
            return [self.error]
        if self.report is None:
            return []
        lines = []
        for output in self.report.outputs:
            failing = [c for c in self.report.cases if c.output == output and not c.passed]
            if failing:
                worst = max(failing, key=_badness)
                lines.append(f"{output} differs from {self.reference} at {worst.height}x{worst.width} "
                             f"({worst.inputs}): {'; '.join(worst.failures)}")
        if self.preprocessing is not None and self.preprocessing.passed is False:
            lines.append(self.preprocessing.line())
        return lines

    def summary_line(self) -> str:
        if not self.checked:
            return f"source check skipped: {self.reason}"
        if self.error is not None:
            return f"source check: FAILED: {self.error}"
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        limited = f" ({self.size_note})" if self.size_note else ""
        where = f"checked against {self.reference} at {sizes}{limited} on real photos"
        if self.passed:
            unchecked = f"; not compared: {', '.join(self.not_compared)}, which the source does not give" if (
                self.not_compared) else ""
            pixels = f"; {self.preprocessing.line()}" if self.preprocessing is not None else ""
            return (f"source check: {where}: passed ({', '.join(self.report.outputs)}; tolerance {self.tolerance})"
                    f"{unchecked}{pixels}")
        return f"source check: {where}: FAILED: " + " | ".join(self.failure_lines())

    def to_dict(self) -> dict[str, Any]:
        if not self.checked:
            return {"checked": False, "reason": self.reason, "format": self.plan.format}
        data: dict[str, Any] = {
            "checked": True, "passed": self.passed, "library": self.plan.library, "version": self.plan.version(),
            "architecture": self.plan.architecture, "architecture_from": self.plan.architecture_from,
            "sizes": [list(size) for size in self.sizes], "images": f"{self.photos} photo{'s' if self.photos != 1 else ''} per size",
            "tolerance": self.tolerance, "not_compared": list(self.not_compared), "failures": self.failure_lines(),
            "notes": list(self.plan.notes) + ([self.size_note] if self.size_note else []),
        }
        if self.report is not None:
            data["outputs"] = self.report.summary()["outputs"]
        if self.preprocessing is not None:
            data["preprocessing"] = self.preprocessing.to_dict()
        return data


def _badness(case: CaseResult) -> float:
    value = getattr(case.metrics, "rel_max_error", 0.0)
    return float("inf") if value != value else float(value)  # NaN first


def not_checked(reason: str, plan: SourcePlan | None = None) -> SourceCheckResult:
    """A result that records why no check ran."""
    return SourceCheckResult(plan or SourcePlan("", "", skipped=reason), reason=reason)


def run_source_check(candidate: Any, plan: SourcePlan, metadata: Any, *, height: tuple[int, int],
                     width: tuple[int, int], images: Sequence[Any] | None = None,
                     on_case: Callable[[CaseResult], None] | None = None) -> SourceCheckResult:
    """Run ``candidate`` (a runtime or callable, see :func:`vitdeploy.parity.verify`) and ``plan``'s source
    model on :data:`PHOTOS_PER_SIZE` real photos (fewer or more where the artifact's batch range says so)
    at the native and a changed, non-square size within ``height``/``width``; judge every output both
    give with the tolerance of ``metadata.precision`` against fp32. An architecture the checkpoint's own config names that its library cannot build or
    load fails the check; a name from ``--model`` or the file name skips it, saying why."""
    if not plan.runs:
        return not_checked(plan.skipped or "no source model", plan)
    try:
        plan.model()
    except SourceModelError as error:
        if plan.lenient:
            return not_checked(f"{error} (the name came from {plan.architecture_from}, not from the checkpoint)", plan)
        return SourceCheckResult(plan, error=f"{error} (--no-source-check skips this check)")
    native = int(metadata.model_config["image_size"])
    sizes = check_sizes(native, tuple(height), tuple(width), metadata.stride)
    fixed = native_size_only(plan.model())
    if fixed:
        sizes = sizes[:1]
    tolerance = tolerance_for(metadata.precision, against_fp32=True)
    inputs = InputFactory(metadata.preprocessing, images=images, synthetic=False)
    reference = Reference(plan.model().name, _SourceRun(plan), tolerance)
    low, high = metadata.shape_range.batch  # a batch the artifact takes (an engine of batch 1 takes one photo)
    photos = min(max(PHOTOS_PER_SIZE, low), high)
    try:
        report = verify(candidate, [reference], [(photos, h, w) for h, w in sizes], inputs,
                        candidate_name="artifact vs source", on_case=on_case)
    except SourceModelError as error:
        return SourceCheckResult(plan, sizes=sizes, error=f"{error} (--no-source-check skips this check)")
    compared = set(report.outputs)
    result = SourceCheckResult(plan, report=report, sizes=sizes, tolerance=tolerance.name,
                               not_compared=[n for n in metadata.output_names if n not in compared], photos=photos)
    if not report.cases:
        given = sorted(next(iter(plan._memo.values()), {}))
        hint = f"; it gives {', '.join(given)} (export those with --outputs to check them)" if given else ""
        return not_checked(f"{plan.model().name} gives none of the artifact's outputs "
                           f"({', '.join(metadata.output_names)}){hint}", plan)
    if fixed:
        result.size_note = fixed
    elif len(sizes) < 2:
        report.notes.append("no changed non-square size fits the artifact's range; checked at the native size only")
    if plan.processor is not None:
        try:
            processor = plan.image_processor()
        except SourceModelError as error:
            result.preprocessing = PreprocessingCheck("the source's image processor", reason=str(error))
        else:
            result.preprocessing = check_preprocessing(processor, metadata.preprocessing, images)
    return result
