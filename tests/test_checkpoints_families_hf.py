"""Hugging Face DeiT, DINOv2 (with registers), CLIP and SigLIP folders and the original DINOv2
state dict, converted to vitdeploy's (= timm's) names and checked against the REAL timm model of
the same family: small random transformers models, perturbed away from init, saved with
``save_pretrained``, converted, loaded into timm with ``strict=True``; then every output
transformers has is compared with the timm output that vitdeploy's model will give
(relative max error <= 1e-4 at the native size). The contrasts show that the conventions the
conversion handles (class position folded into the class token, CLIP's post-norm) matter.
Then vitdeploy's own model of each folder (and of original DINOv2 files) against the source at the
native size and three others, two of them not square. The builders live in ``family_sources``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from family_sources import (
    TOLERANCE,
    HFCase,
    hf_cases,
    hf_outputs,
    hub_state_dict,
    original_dinov2_outputs,
    original_dinov2_resample,
    parity_grids,
    perturb,
    rel_err,
    timm,
    timm_model,
    timm_state_dict,
)
from timm_without_torchvision import TIMM_MISSING

from vitdeploy.checkpoints import CheckpointError, read_checkpoint
from vitdeploy.checkpoints.conversion import build_config
from vitdeploy.checkpoints.huggingface import convert_hf_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

transformers = pytest.importorskip("transformers")
if timm is None:
    pytest.skip(TIMM_MISSING, allow_module_level=True)

HIDDEN, DEPTH, HEADS = 64, 2, 2
CASES = hf_cases(HIDDEN, DEPTH, HEADS, mlp=128)
T = transformers


def _timm(name: str, img_size: int | tuple[int, int] = 56, **kwargs) -> torch.nn.Module:
    return timm_model(name, HIDDEN, DEPTH, HEADS, img_size=img_size, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[HFCase], tuple[torch.nn.Module, Path]]:
    """Build, perturb and ``save_pretrained`` each case's transformers model once."""
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(case: HFCase) -> tuple[torch.nn.Module, Path]:
        if case.id not in cache:
            torch.manual_seed(0)
            model = perturb(case.hf())
            folder = tmp_path_factory.mktemp(case.id)
            model.save_pretrained(folder)
            cache[case.id] = model, folder
        return cache[case.id]

    return get


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
def test_hf_family_matches_timm(case: HFCase, saved) -> None:
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
    state_dict = timm_state_dict({k: v for k, v in conversion.state_dict.items() if k not in head})
    reference.load_state_dict(state_dict, strict=True)

    size = conversion.fields["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours = timm_outputs(reference, pixels, conversion.fields, head)
    theirs = hf_outputs(hf_model, pixels)
    if conversion.fields.get("distilled"):
        # timm's distilled pre_logits average the two tokens; transformers has no such output.
        ours.pop("pooler_output")
    assert {"last_hidden_state", "patch_tokens"} <= set(theirs), "transformers gave no tokens to compare"
    for name, expected in theirs.items():
        assert rel_err(ours[name], expected) <= TOLERANCE, name


def _case(case_id: str) -> HFCase:
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
    config = T.Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=56,
                            patch_size=14, mlp_ratio=2, num_labels=3,
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
    """Through ``read_checkpoint`` the family fields become the config; a field ViTConfig does not
    have is one error naming it and its value."""
    _, folder = saved(_case("dinov2_reg"))
    checkpoint = read_checkpoint(folder)
    assert checkpoint.format == "huggingface"
    assert checkpoint.config.num_reg_tokens == 4 and checkpoint.config.no_embed_class is True
    assert checkpoint.state_dict["reg_token"].shape == (1, 4, HIDDEN)
    fields = {**checkpoint.config.to_dict(), "family": "dinov2", "register_gate": 0.5}
    with pytest.raises(CheckpointError, match="dinov2 checkpoint needs the ViTConfig fields register_gate=0.5"):
        build_config(fields, "model.safetensors")


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
    """At the two non-square sizes of the parity grid, transformers' ``interpolate_pos_encoding`` equals
    the timm model whose position embeddings vitdeploy's ``resample_pos_embed`` resampled by the
    convention the conversion names, and the other convention misses."""
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
    for grid in parity_grids(side)[2:]:
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
            reference.load_state_dict(timm_state_dict({**conversion.state_dict, "pos_embed": resampled}))
            with torch.no_grad():
                errors[name] = rel_err(reference(pixels) if fields.get("num_classes")
                                       else reference.forward_features(pixels), expected)
        assert errors[method] <= TOLERANCE, (grid, errors)
        assert errors[other] > 10 * TOLERANCE, (grid, errors)


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vitdeploy_model_matches_transformers(case: HFCase, saved) -> None:
    """``load_model`` of the folder, then every output transformers has, at the native size and three
    others (two of them not square). Only DeiT's ``pooler_output`` has no transformers counterpart."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.outputs import available_outputs

    hf_model, folder = saved(case)
    model = load_model(folder)
    patch, side = model.config.patch_size, model.config.image_size // model.config.patch_size
    names = available_outputs(model.config)
    for grid in parity_grids(side):
        pixels = torch.randn(2, 3, grid[0] * patch, grid[1] * patch, generator=torch.Generator().manual_seed(7))
        theirs = hf_outputs(hf_model, pixels)
        with torch.no_grad():
            ours = model.forward_outputs(pixels, names)
        assert set(names) - set(theirs) == ({"pooler_output"} if model.config.distilled else set())
        for name, expected in theirs.items():
            assert rel_err(ours[name], expected) <= TOLERANCE, (grid, name)


def test_cli_format_choices_are_the_checkpoint_formats() -> None:
    from vitdeploy.checkpoints import FORMATS
    from vitdeploy.cli.convert import FORMAT_CHOICES

    assert ("auto", *FORMATS) == FORMAT_CHOICES


@pytest.mark.parametrize("registers", [True, False])
def test_vitdeploy_model_of_an_original_dinov2_file(tmp_path, registers: bool) -> None:
    """``load_model`` of an original DINOv2 ``.pth`` against the original's forward pass (timm's blocks with
    the original's resampled position embeddings) at the native size and three others, two not square."""
    from vitdeploy.checkpoints import load_model

    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    torch.manual_seed(0)
    hub = hub_state_dict(perturb(_timm(name, mlp_ratio=2, num_classes=0, init_values=1.0)))
    path = tmp_path / "dinov2.pth"
    torch.save(hub, path)
    model = load_model(path, num_heads=HEADS)
    assert model.config.pos_embed_resample == ("timm" if registers else "dinov2")
    for grid in parity_grids(4):
        pixels = torch.randn(2, 3, grid[0] * 14, grid[1] * 14, generator=torch.Generator().manual_seed(8))
        theirs = original_dinov2_outputs(
            hub, lambda **kw: _timm(name, mlp_ratio=2, num_classes=0, init_values=1.0, **kw), pixels)
        with torch.no_grad():
            ours = model.forward_outputs(pixels, list(theirs))
        for output, expected in theirs.items():
            assert rel_err(ours[output], expected) <= TOLERANCE, (grid, output)
