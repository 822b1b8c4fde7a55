"""Hugging Face DeiT, DINOv2 (with registers), CLIP and SigLIP folders and the original DINOv2
state dict, converted to vitdeploy's (= timm's) names and checked against the REAL timm model of
the same family: small random transformers models, perturbed away from init, saved with
``save_pretrained``, converted, loaded into timm with ``strict=True``; then every output
transformers has is compared with the timm output that vitdeploy's model will give
(relative max error <= 1e-4 at the native size). The contrasts show that the conventions the
conversion handles (class position folded into the class token, CLIP's post-norm) matter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from timm_without_torchvision import import_timm

from vitdeploy.checkpoints import CheckpointError, read_checkpoint
from vitdeploy.checkpoints.hf_families import CLIP_MEAN, CLIP_STD
from vitdeploy.checkpoints.huggingface import convert_hf_folder
from vitdeploy.config import ViTConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

timm = import_timm()
transformers = pytest.importorskip("transformers")
if timm is None:
    pytest.skip("timm is not installed (CI: pip install --no-deps timm)", allow_module_level=True)

TOLERANCE = 1e-4
HIDDEN, DEPTH, HEADS = 64, 2, 2
SMALL = dict(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=128,
             image_size=56, layer_norm_eps=1e-6)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved away from its init (zero tokens, unit norms and layer scales included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


@dataclass
class Case:
    """One transformers class: how to build it small, and the timm model of its family."""

    id: str
    hf: Callable[[], torch.nn.Module]
    timm: Callable[[], torch.nn.Module] | None
    fields: dict


def _timm(name: str, img_size: int | tuple[int, int] = 56, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, embed_dim=HIDDEN, depth=DEPTH, num_heads=HEADS,
                             img_size=img_size, **kwargs).eval()


T = transformers
CASES = [
    Case("deit_teacher",
         lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**SMALL, patch_size=8, num_labels=5)),
         lambda **kw: _timm("deit_tiny_distilled_patch16_224", patch_size=8, mlp_ratio=2, num_classes=5, **kw),
         dict(family="deit", distilled=True, class_token=True, num_classes=5, pos_embed_resample="huggingface")),
    Case("deit_classifier", lambda: T.DeiTForImageClassification(T.DeiTConfig(**SMALL, patch_size=8, num_labels=5)),
         lambda **kw: _timm("deit_tiny_distilled_patch16_224", patch_size=8, mlp_ratio=2, num_classes=5, **kw),
         dict(family="deit", distilled=True, num_classes=5)),
    Case("deit_model", lambda: T.DeiTModel(T.DeiTConfig(**SMALL, patch_size=8)),
         lambda **kw: _timm("deit_tiny_distilled_patch16_224", patch_size=8, mlp_ratio=2, num_classes=0, **kw),
         dict(family="deit", distilled=True, num_classes=0)),
    Case("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2)),
         lambda **kw: _timm("vit_small_patch14_dinov2", mlp_ratio=2, num_classes=0, init_values=1.0, **kw),
         dict(family="dinov2", num_reg_tokens=0, no_embed_class=False, layer_scale=1.0, pooling="token",
              pos_embed_resample="huggingface", image_size=56, patch_size=14)),
    Case("dinov2_classifier",
         lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2, num_labels=3)),
         lambda **kw: _timm("vit_small_patch14_dinov2", mlp_ratio=2, num_classes=0, init_values=1.0, **kw),
         dict(family="dinov2", pooling="token_avg", num_classes=3)),
    Case("dinov2_reg", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
             **SMALL, patch_size=14, mlp_ratio=2, num_register_tokens=4)),
         lambda **kw: _timm("vit_small_patch14_reg4_dinov2", mlp_ratio=2, num_classes=0, init_values=1.0, **kw),
         dict(family="dinov2", num_reg_tokens=4, no_embed_class=True, pos_embed_resample="timm")),
    Case("dinov2_reg_classifier", lambda: T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(
             **SMALL, patch_size=14, mlp_ratio=2, num_register_tokens=4, num_labels=3)),
         lambda **kw: _timm("vit_small_patch14_reg4_dinov2", mlp_ratio=2, num_classes=0, init_values=1.0, **kw),
         dict(family="dinov2", num_reg_tokens=4, pooling="token_avg", num_classes=3)),
    Case("clip_vision",
         lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**{**SMALL, "layer_norm_eps": 1e-5}, patch_size=8)),
         lambda **kw: _timm("vit_base_patch16_clip_quickgelu_224", patch_size=8, mlp_ratio=2, num_classes=0, **kw),
         dict(family="clip", pre_norm=True, patch_bias=False, act="quick_gelu", projection_dim=None,
              layer_norm_eps=1e-5, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0)),
    Case("clip_vision_projection", lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(
             **{**SMALL, "layer_norm_eps": 1e-5}, patch_size=8, projection_dim=32)),
         lambda **kw: _timm("vit_base_patch16_clip_quickgelu_224", patch_size=8, mlp_ratio=2, num_classes=32, **kw),
         dict(family="clip", projection_dim=32)),
    Case("clip_full", lambda: T.CLIPModel(T.CLIPConfig(
             vision_config=dict(**{**SMALL, "layer_norm_eps": 1e-5}, patch_size=8),
             text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
             projection_dim=32)),
         lambda **kw: _timm("vit_base_patch16_clip_quickgelu_224", patch_size=8, mlp_ratio=2, num_classes=32, **kw),
         dict(family="clip", projection_dim=32, act="quick_gelu")),
    Case("siglip_vision", lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, patch_size=8)),
         lambda **kw: _timm("vit_base_patch16_siglip_224", patch_size=8, mlp_ratio=2, num_classes=0, act_layer="gelu_tanh", **kw),
         dict(family="siglip", class_token=False, pooling="map", act="gelu_tanh", mean=(0.5, 0.5, 0.5))),
    Case("siglip_full", lambda: T.SiglipModel(T.SiglipConfig(
             vision_config=dict(**SMALL, patch_size=8),
             text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))),
         lambda **kw: _timm("vit_base_patch16_siglip_224", patch_size=8, mlp_ratio=2, num_classes=0, act_layer="gelu_tanh", **kw),
         dict(family="siglip", pooling="map")),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[Case], tuple[torch.nn.Module, Path]]:
    """Build, perturb and ``save_pretrained`` each case's transformers model once."""
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(case: Case) -> tuple[torch.nn.Module, Path]:
        if case.id not in cache:
            torch.manual_seed(0)
            model = perturb(case.hf())
            folder = tmp_path_factory.mktemp(case.id)
            model.save_pretrained(folder)
            cache[case.id] = model, folder
        return cache[case.id]

    return get


def timm_state_dict(state_dict: dict[str, torch.Tensor], case: Case) -> dict[str, torch.Tensor]:
    """vitdeploy's names for timm's model: CLIP's projection is timm's bias-free-by-zero ``head``."""
    state_dict = dict(state_dict)
    if "proj.weight" in state_dict:
        weight = state_dict.pop("proj.weight")
        state_dict.update({"head.weight": weight, "head.bias": torch.zeros(weight.shape[0])})
    return state_dict


def hf_outputs(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' outputs of one model under vitdeploy's output names (with
    ``interpolate_pos_encoding`` where the model takes it; DINOv2 always interpolates).

    CLIP's ``last_hidden_state`` is before ``post_layernorm``, vitdeploy's (= timm's) after it:
    the norm is applied here, so the names mean the same thing on both sides."""
    import inspect

    vision = getattr(model, "vision_model", model)
    with torch.no_grad():
        if isinstance(model, (T.CLIPModel, T.SiglipModel)):
            result = vision(pixel_values=pixels, interpolate_pos_encoding=True)
            outputs = {"pooler_output": result.pooler_output, "last_hidden_state": result.last_hidden_state}
            if isinstance(model, T.CLIPModel):
                features = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
                outputs["image_embeds"] = getattr(features, "pooler_output", features)
        else:
            takes = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
            result = model(pixel_values=pixels, **({"interpolate_pos_encoding": True} if takes else {}))
            outputs = {name: getattr(result, name) for name in ("logits", "pooler_output", "image_embeds",
                                                                "last_hidden_state")
                       if getattr(result, name, None) is not None}
        if isinstance(model, (T.CLIPModel, T.CLIPVisionModel, T.CLIPVisionModelWithProjection)):
            outputs["last_hidden_state"] = vision.post_layernorm(outputs["last_hidden_state"])
        if isinstance(model, T.DeiTModel):
            # transformers' DeiT pooler (tanh(dense(class token))) is dropped: no vitdeploy counterpart.
            outputs.pop("pooler_output", None)
    return outputs


def timm_outputs(model: torch.nn.Module, pixels: torch.Tensor, fields: dict,
                 head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What vitdeploy's model gives for each output name, computed by timm's model (the contract);
    ``head`` holds the converted ``head.*`` tensors (timm has no concatenating pooling to load them into)."""
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        prefix = model.num_prefix_tokens
        outputs = {"last_hidden_state": tokens, "patch_tokens": tokens[:, prefix:]}
        if fields["pooling"] == "token_avg":  # Dinov2ForImageClassification: cls ++ mean(patch tokens)
            pooled = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)
            outputs["pooler_output"] = pooled
            outputs["logits"] = torch.nn.functional.linear(pooled, head["head.weight"], head["head.bias"])
        else:
            outputs["pooler_output"] = model.forward_head(tokens, pre_logits=True)
            if fields["num_classes"]:
                outputs["logits"] = model.forward_head(tokens)
            if fields.get("projection_dim"):
                outputs["image_embeds"] = model.forward_head(tokens)
    return outputs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hf_family_matches_timm(case: Case, saved) -> None:
    hf_model, folder = saved(case)
    conversion, _ = convert_hf_folder(folder)
    assert conversion.unexpected == []
    for key, value in case.fields.items():
        assert conversion.fields[key] == value, key
    for key in ("hidden_size", "depth", "num_heads"):
        assert conversion.fields[key] == {"hidden_size": HIDDEN, "depth": DEPTH, "num_heads": HEADS}[key]

    reference = case.timm()
    concatenated = conversion.fields["pooling"] == "token_avg"
    head = {k: v for k, v in conversion.state_dict.items() if concatenated and k.startswith("head.")}
    state_dict = timm_state_dict({k: v for k, v in conversion.state_dict.items() if k not in head}, case)
    reference.load_state_dict(state_dict, strict=True)

    size = conversion.fields["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours = timm_outputs(reference, pixels, conversion.fields, head)
    theirs = hf_outputs(hf_model, pixels)
    if conversion.fields.get("distilled"):
        # timm's distilled pre_logits average the two tokens; transformers has no such output.
        ours.pop("pooler_output")
    assert theirs, "transformers gave no output to compare"
    for name, expected in theirs.items():
        assert rel_err(ours[name], expected) <= TOLERANCE, name
    if "last_hidden_state" in theirs:
        fields = conversion.fields
        prefix = int(fields["class_token"]) + int(fields.get("distilled", False)) + fields.get("num_reg_tokens", 0)
        assert rel_err(ours["patch_tokens"], theirs["last_hidden_state"][:, prefix:]) <= TOLERANCE


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def test_conventions_the_conversion_handles_matter(saved) -> None:
    """Without the class-position fold DINOv2-reg misses; transformers' CLIP last_hidden_state is pre-norm."""
    case = _case("dinov2_reg")
    hf_model, folder = saved(case)
    conversion, _ = convert_hf_folder(folder)
    reference = case.timm()
    unfolded = {**conversion.state_dict, "cls_token": hf_model.embeddings.cls_token.detach()}
    reference.load_state_dict(unfolded, strict=True)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels).last_hidden_state
        assert rel_err(reference.forward_features(pixels), expected) > 100 * TOLERANCE

    case = _case("clip_vision")
    hf_model, folder = saved(case)
    conversion, _ = convert_hf_folder(folder)
    reference = case.timm()
    reference.load_state_dict(conversion.state_dict, strict=True)
    with torch.no_grad():
        raw = hf_model(pixel_values=pixels).last_hidden_state
        assert rel_err(reference.forward_features(pixels), raw) > 100 * TOLERANCE


def hub_state_dict(model: torch.nn.Module, chunks: int = 0) -> dict[str, torch.Tensor]:
    """A timm DINOv2 model's weights under facebookresearch/dinov2's names (the opposite way from the
    reader): registers renamed, a class-token position embedding split off, a mask token added,
    and optionally ``block_chunks`` names ``blocks.C.N``."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hidden = state["cls_token"].shape[-1]
    generator = torch.Generator().manual_seed(5)
    if "reg_token" in state:
        class_pos = torch.randn(1, 1, hidden, generator=generator)
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


@pytest.mark.parametrize(("name", "registers", "chunks"), [
    ("vit_small_patch14_dinov2", False, 0), ("vit_small_patch14_reg4_dinov2", True, 2)])
def test_original_dinov2_state_dict(tmp_path, name, registers, chunks) -> None:
    from vitdeploy.checkpoints.detect import detect_format
    from vitdeploy.checkpoints.dinov2 import convert_dinov2_hub, read_dinov2_tensors

    torch.manual_seed(0)
    source = perturb(_timm(name, mlp_ratio=2, num_classes=0, init_values=1.0))
    path = tmp_path / "dinov2.pth"
    torch.save(hub_state_dict(source, chunks), path)
    assert detect_format(path) == "dinov2"
    tensors, _ = read_dinov2_tensors(path)
    conversion = convert_dinov2_hub(tensors, str(path))
    assert conversion.fields["num_reg_tokens"] == (4 if registers else 0)
    assert conversion.fields["no_embed_class"] is registers
    assert conversion.fields["pos_embed_resample"] == ("timm" if registers else "dinov2")
    assert (conversion.fields["num_heads"], conversion.fields["layer_scale"]) == (1, 1.0)  # 64 wide: one 64-wide head
    reference = _timm(name, mlp_ratio=2, num_classes=0, init_values=1.0)
    reference.load_state_dict(conversion.state_dict, strict=True)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(reference.forward_features(pixels), source.forward_features(pixels)) <= TOLERANCE
    # A plain timm DINOv2 state dict (no mask_token, no register_tokens) stays timm's.
    plain = tmp_path / "timm.pth"
    torch.save(source.state_dict(), plain)
    assert detect_format(plain) == "timm"


def test_preprocessing_and_labels_come_from_the_folder(tmp_path) -> None:
    torch.manual_seed(0)
    config = T.Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2, num_labels=3,
                            id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2})
    T.Dinov2ForImageClassification(config).save_pretrained(tmp_path)
    conversion, _ = convert_hf_folder(tmp_path)
    assert conversion.fields["labels"] == ["cat", "dog", "fish"]
    assert (conversion.fields["mean"], conversion.fields["crop_pct"]) == ((0.485, 0.456, 0.406), 0.875)
    processor = T.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=2,
                                     image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    processor.save_pretrained(tmp_path)
    conversion, _ = convert_hf_folder(tmp_path)
    assert conversion.fields["mean"] == (0.1, 0.2, 0.3)
    assert conversion.fields["std"] == (0.4, 0.5, 0.6)
    assert conversion.fields["crop_pct"] == 56 / 64
    assert conversion.fields["interpolation"] == "bilinear"


def test_unmapped_tensors_are_all_listed(saved, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _, folder = saved(_case("siglip_vision"))
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    tensors["extra_head.weight"] = torch.zeros(2)
    del tensors["encoder.layers.1.self_attn.k_proj.weight"]
    for name in ("config.json",):
        (tmp_path / name).write_text((folder / name).read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    conversion, _ = convert_hf_folder(tmp_path)
    assert conversion.unexpected == sorted([
        "encoder.layers.0.self_attn.rotary.weight", "extra_head.weight",
        "encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.self_attn.v_proj.weight"])
    assert "blocks.1.attn.qkv.weight" not in conversion.state_dict  # reported missing by strict loading


def test_read_checkpoint_builds_the_config_in_one_place(saved) -> None:
    """Through ``read_checkpoint``: a Checkpoint once ViTConfig has the family fields, until then one
    error naming the fields the checkpoint needs."""
    _, folder = saved(_case("dinov2_reg"))
    known = set(ViTConfig.__dataclass_fields__)
    needed = {"class_token", "num_reg_tokens", "no_embed_class", "layer_scale"}
    if needed <= known:
        checkpoint = read_checkpoint(folder)
        assert checkpoint.format == "huggingface"
        assert checkpoint.config.num_reg_tokens == 4 and checkpoint.config.no_embed_class is True
        assert checkpoint.state_dict["reg_token"].shape == (1, 4, HIDDEN)
    else:
        with pytest.raises(CheckpointError, match="dinov2 checkpoint needs the ViTConfig fields") as error:
            read_checkpoint(folder)
        for name in needed - known:
            assert name in str(error.value)


def test_hf_folders_are_detected_by_model_type_or_architecture(saved, tmp_path) -> None:
    from vitdeploy.checkpoints.detect import detect_format

    _, folder = saved(_case("clip_full"))
    assert detect_format(folder) == "huggingface"
    data = json.loads((folder / "config.json").read_text())
    data.pop("model_type")
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert detect_format(tmp_path) == "huggingface"
    data["architectures"] = ["SwinModel"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="closest supported layout is Hugging Face CLIP image tower") as error:
        detect_format(tmp_path)
    assert "\n" not in str(error.value)


def test_closest_layout_names_the_family_and_the_differing_keys() -> None:
    from vitdeploy.checkpoints.detect import closest_layout, match_layout

    keys = list(_timm("vit_small_patch14_reg4_dinov2", num_classes=0, init_values=1.0).state_dict())
    assert match_layout(keys).exact and match_layout(keys).label == "timm DINOv2 with registers"
    keys = [k.replace("ls1.gamma", "gamma_1") for k in keys] + ["rope.freqs"]
    line = closest_layout(keys)
    assert line.startswith("closest supported layout is timm DINOv2 with registers")
    assert "missing blocks.N.ls1.gamma" in line
    assert "unexpected blocks.N.gamma_1, rope.freqs" in line
    assert "\n" not in line
    assert "share nothing" in closest_layout(["encoder.conv1.weight"])


def test_unrecognised_state_dict_file_gets_the_closest_layout(tmp_path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"embed.weight": torch.zeros(2), "blocks.0.norm1.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="closest supported layout is .*missing .*unexpected embed.weight"):
        read_checkpoint(path)


RESAMPLED = ["deit_teacher", "dinov2", "dinov2_reg", "clip_vision", "siglip_vision"]


@pytest.mark.parametrize("case_id", RESAMPLED)
def test_each_source_resamples_by_its_named_convention(case_id: str, saved) -> None:
    """At other (non-square) sizes, transformers' ``interpolate_pos_encoding`` equals the timm model
    whose position embeddings vitdeploy's ``resample_pos_embed`` resampled by the convention the
    conversion names, and the other convention misses."""
    import inspect

    from vitdeploy.pos_embed import resample_pos_embed

    case = _case(case_id)
    hf_model, folder = saved(case)
    conversion, _ = convert_hf_folder(folder)
    fields, pos = conversion.fields, conversion.state_dict["pos_embed"]
    patch, side = fields["patch_size"], fields["image_size"] // fields["patch_size"]
    prefix = pos.shape[1] - side * side
    method = fields["pos_embed_resample"]
    other = "timm" if method == "huggingface" else "huggingface"
    kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(
        hf_model.forward).parameters else {}
    for grid in [(side - 1, side + 2)]:  # non-square: one axis shrinks, the other grows
        pixels = torch.randn(1, 3, grid[0] * patch, grid[1] * patch, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            result = hf_model(pixel_values=pixels, **kwargs)
        expected = result.logits if fields.get("num_classes") else result.last_hidden_state
        if case_id.startswith("clip"):
            expected = getattr(hf_model, "vision_model", hf_model).post_layernorm(expected)
        errors = {}
        for name in (method, other):
            reference = case.timm(img_size=(grid[0] * patch, grid[1] * patch))
            resampled = resample_pos_embed(pos, grid, (side, side), prefix, method=name)
            reference.load_state_dict(timm_state_dict({**conversion.state_dict, "pos_embed": resampled}, case))
            with torch.no_grad():
                errors[name] = rel_err(reference(pixels) if fields.get("num_classes")
                                       else reference.forward_features(pixels), expected)
        assert errors[method] <= TOLERANCE, (grid, errors)
        assert errors[other] > 10 * TOLERANCE, (grid, errors)


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


@pytest.mark.parametrize("registers", [True, False])
def test_original_dinov2_convention(registers: bool) -> None:
    """The convention named for the original DINOv2 reproduces its resampling (the register models:
    antialiased, exact size = ``timm``; the others: no antialias, offset scale factors = ``dinov2``)."""
    from vitdeploy.checkpoints.dinov2 import convert_dinov2_hub
    from vitdeploy.pos_embed import RESAMPLE_METHODS, resample_pos_embed

    torch.manual_seed(0)
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    conversion = convert_dinov2_hub(hub_state_dict(perturb(_timm(name, num_classes=0, init_values=1.0))), "test")
    method = conversion.fields["pos_embed_resample"]
    if method not in RESAMPLE_METHODS:
        pytest.skip(f"vitdeploy.pos_embed has no {method!r} convention yet")
    pos = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(6))  # class position + 4x4 grid
    for grid in [(3, 5), (9, 4), (4, 7), (4, 4)]:
        expected = original_dinov2_resample(pos, grid, 0.0 if registers else 0.1, antialias=registers)
        assert rel_err(resample_pos_embed(pos, grid, (4, 4), 1, method=method), expected) <= 1e-5, grid
    other = "huggingface" if registers else "timm"
    assert rel_err(resample_pos_embed(pos, (3, 5), (4, 4), 1, method=other),
                   original_dinov2_resample(pos, (3, 5), 0.0 if registers else 0.1, antialias=registers)) > 1e-3


@pytest.mark.parametrize("case", [c for c in CASES if c.fields.get("pooling") != "token_avg"], ids=lambda c: c.id)
def test_vitdeploy_model_matches_transformers(case: Case, saved) -> None:
    """``load_model`` of the folder, then every output transformers has, at the native size and a
    non-square one (runs once ViTConfig and the model have the family fields)."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.outputs import available_outputs

    if not {"class_token", "num_reg_tokens", "pre_norm", "act"} <= set(ViTConfig.__dataclass_fields__):
        pytest.skip("ViTConfig has no family fields yet (helper 'families')")
    hf_model, folder = saved(case)
    model = load_model(folder)
    patch, side = model.config.patch_size, model.config.image_size // model.config.patch_size
    for grid in [(side, side), (side - 1, side + 2)]:
        pixels = torch.randn(2, 3, grid[0] * patch, grid[1] * patch, generator=torch.Generator().manual_seed(7))
        theirs = hf_outputs(hf_model, pixels)
        with torch.no_grad():
            ours = model.forward_outputs(pixels, available_outputs(model.config))
        assert theirs
        for name, expected in theirs.items():
            assert rel_err(ours[name], expected) <= TOLERANCE, (grid, name)


def test_cli_format_choices_are_the_checkpoint_formats() -> None:
    from vitdeploy.checkpoints import FORMATS
    from vitdeploy.cli.convert import FORMAT_CHOICES

    assert ("auto", *FORMATS) == FORMAT_CHOICES


@pytest.mark.parametrize("registers", [True, False])
def test_vitdeploy_model_of_an_original_dinov2_file(tmp_path, registers: bool) -> None:
    """``load_model`` of an original DINOv2 ``.pth`` against the original's forward pass at the native and
    a non-square size (timm's blocks with the original's resampled position embeddings); runs once
    ViTConfig and the model have the family fields."""
    from vitdeploy.checkpoints import load_model

    if not {"class_token", "num_reg_tokens", "no_embed_class"} <= set(ViTConfig.__dataclass_fields__):
        pytest.skip("ViTConfig has no family fields yet (helper 'families')")
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    torch.manual_seed(0)
    hub = hub_state_dict(perturb(_timm(name, mlp_ratio=2, num_classes=0, init_values=1.0)))
    path = tmp_path / "dinov2.pth"
    torch.save(hub, path)
    model = load_model(path, num_heads=HEADS)
    for grid in [(4, 4), (3, 6)]:
        pos = original_dinov2_resample(hub["pos_embed"], grid, 0.0 if registers else 0.1, antialias=registers)
        reference_sd = {k: v for k, v in hub.items() if k not in ("mask_token", "register_tokens")}
        if registers:  # the original adds the class position before inserting the registers: fold it
            reference_sd.update(reg_token=hub["register_tokens"], cls_token=hub["cls_token"] + pos[:, :1],
                                pos_embed=pos[:, 1:])
        else:
            reference_sd["pos_embed"] = pos
        reference = _timm(name, img_size=(grid[0] * 14, grid[1] * 14), mlp_ratio=2, num_classes=0, init_values=1.0)
        reference.load_state_dict(reference_sd, strict=True)
        pixels = torch.randn(2, 3, grid[0] * 14, grid[1] * 14, generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            ours = model.forward_outputs(pixels, ["last_hidden_state"])["last_hidden_state"]
            assert rel_err(ours, reference.forward_features(pixels)) <= TOLERANCE, grid
