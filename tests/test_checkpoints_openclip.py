"""OpenCLIP checkpoints against open_clip's own model: its folders (open_clip_config.json beside the weights)
and bare weight files, its own VisionTransformer towers and its towers around a timm trunk.

Each folder is written by open_clip itself (its CLIP, a small text tower), its image tower's weights
perturbed (the position table scaled up) so attention depends on position; outputs are compared per
token on real photos at the native size and at a changed, non-square one, where open_clip builds its
model for that size (its own resampling at load time)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from timm_without_torchvision import OPEN_CLIP_MISSING, import_open_clip

from vitdeploy.checkpoints import (
    CheckpointError,
    CheckpointWarning,
    detect_format,
    load_model,
    read_checkpoint,
)
from vitdeploy.exporters.source_check import OpenClipTowers, openclip_outputs, plan_source_check
from vitdeploy.parity import InputFactory

open_clip = import_open_clip()
pytestmark = pytest.mark.skipif(open_clip is None, reason=OPEN_CLIP_MISSING)

TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
VISION = {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16}
NATIVE, CHANGED = (64, 64), (80, 48)


def write_folder(folder: Path, vision: dict, *, quick_gelu: bool = False, embed_dim: int = 40,
                 preprocess: dict | None = None, safetensors: bool = False) -> Path:
    """An OpenCLIP folder as open_clip's Hub uploads are: open_clip_config.json and the whole CLIP's weights."""
    model_cfg = {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": TEXT}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    with torch.no_grad():
        for parameter in model.visual.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        for name, parameter in model.visual.named_parameters():
            if "pos" in name and "embed" in name:
                parameter.mul_(30)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                              "preprocess_cfg": preprocess or {}}))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    else:
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def assert_agrees(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to fp32 rounding: max-abs error against the output's scale, and cosine per token (or row)."""
    ours, theirs = ours.double(), theirs.double()
    assert ours.shape == theirs.shape, what
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min())
    assert error < 1e-4 and cosine > 0.99999, f"{what}: relative max error {error:.2e}, worst cosine {cosine:.7f}"


def compare_with_open_clip(folder: Path, sizes=(NATIVE, CHANGED)) -> list[str]:
    model = load_model(folder).eval()
    towers = OpenClipTowers(folder)
    compared = []
    for height, width in sizes:
        pixels = torch.from_numpy(InputFactory(model.config.preprocessing.at(model.config.image_size),
                                               synthetic=False).batch(2, height, width)[0])
        theirs = openclip_outputs(towers, pixels)
        with torch.no_grad():
            ours = model.forward_outputs(pixels, list(theirs))
        for name, value in theirs.items():
            assert_agrees(ours[name], value, f"{name} at {height}x{width}")
        compared = sorted(theirs)
    return compared


def test_preprocess_cfg_resize_mode_is_read_and_one_not_reproduced_is_said(tmp_path) -> None:
    """open_clip's inference transform: "shortest" resizes the short side and crops, "squash" resizes both
    sides to the size (SigLIP's towers), "longest" letterboxes, which vitdeploy does not."""
    for mode, expected in (("squash", "squash"), ("shortest", "shortest"), (None, "shortest"),
                           ("longest", "shortest")):
        settings = {"mean": [0.5] * 3, "std": [0.5] * 3, **({"resize_mode": mode} if mode else {})}
        checkpoint = read_checkpoint(write_folder(tmp_path / str(mode), VISION, preprocess=settings))
        pre = checkpoint.config.preprocessing
        assert (pre.mean, pre.resize_mode, pre.crop_pct) == ((0.5, 0.5, 0.5), expected, 1.0), mode
        noted = [note for note in checkpoint.notes if "resize_mode" in note]
        assert len(noted) == (mode == "longest"), (mode, noted)


@pytest.mark.parametrize("case", ["gelu", "quick_gelu", "layer_scale", "clipa", "tanh_eps_heads"])
def test_open_clip_vision_transformer_folders_match_open_clip(tmp_path, case) -> None:
    vision, quick_gelu = dict(VISION), False
    if case == "quick_gelu":
        quick_gelu = True
    elif case == "layer_scale":
        vision["ls_init_value"] = 0.1
    elif case == "clipa":  # no ln_pre; the mean patch token, then ln_post
        vision.update(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)
    elif case == "tanh_eps_heads":  # 4 heads of 32 (the width alone suggests 2 of 64)
        vision.update(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6}, head_width=32)
    folder = write_folder(tmp_path / case, vision, quick_gelu=quick_gelu)
    assert detect_format(folder) == "openclip"
    config = read_checkpoint(folder).config
    expected = {"gelu": "gelu", "quick_gelu": "quick_gelu", "layer_scale": "gelu", "clipa": "gelu",
                "tanh_eps_heads": "gelu_tanh"}[case]
    assert config.act == expected
    if case == "tanh_eps_heads":
        assert (config.num_heads, config.layer_norm_eps) == (4, 1e-6)
    assert config.pooling == ("avg" if case == "clipa" else "token")
    assert compare_with_open_clip(folder) == ["image_embeds", "patch_tokens", "pooler_output"]


def test_a_quickgelu_folder_is_named_as_the_registry_names_openai_towers(tmp_path) -> None:
    vision = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}
    folder = tmp_path / "openai"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 512, "quick_gelu": True, "vision_cfg": vision, "text_cfg": TEXT}}))
    with torch.device("meta"):
        state = open_clip.CLIP(embed_dim=512, vision_cfg=vision, text_cfg=TEXT).state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in state.items()}, folder / "open_clip_pytorch_model.bin")
    config = read_checkpoint(folder).config
    assert (config.provenance.name, config.act) == ("vit_base_patch32_clip_quickgelu_224", "quick_gelu")
    assert config.projection_dim == 512 and config.preprocessing.crop_pct == 1.0


@pytest.mark.parametrize("head", ["map", "linear", "mean", "rope"])
def test_towers_around_a_timm_trunk_match_open_clip(tmp_path, head) -> None:
    """SigLIP's kind (timm's attention-pool head, no projection), a linear projection after timm's pooling, the
    mean token of a class-token ViT (open_clip's timm_pool "avg": timm's pooling changed after it was built,
    no fc_norm), and a RoPE trunk (timm's Eva, as EVA-02 and PE are; timm_pool "token" over a model built with
    fc_norm), at the native size and a non-square one (the trunk resized by timm, as open_clip leaves it)."""
    trunk = "eva02_tiny_patch14_224" if head == "rope" else "vit_tiny_patch16_224"
    pool = {"map": "map", "mean": "avg"}.get(head, "token")
    vision = {"image_size": 224, "timm_model_name": trunk, "timm_model_pretrained": False,
              "timm_pool": pool, "timm_proj": "none" if head == "map" else "linear"}
    folder = write_folder(tmp_path / head, vision, embed_dim=192 if head == "map" else 40, safetensors=True)
    assert detect_format(folder) == "openclip"
    checkpoint = read_checkpoint(folder)
    assert checkpoint.format == "openclip"
    assert checkpoint.config.pooling == pool
    assert (checkpoint.config.projection_dim is None) == (head == "map")
    patch = checkpoint.config.patch_size
    compared = compare_with_open_clip(folder, sizes=((224, 224), (224 + 2 * patch, 224 - 2 * patch)))
    assert "pooler_output" in compared and "patch_tokens" in compared
    assert ("image_embeds" in compared) == (head != "map")


def test_a_bare_weight_file_reads_with_a_warning_for_what_only_the_config_shows(tmp_path) -> None:
    folder = write_folder(tmp_path / "quick", VISION, quick_gelu=True)
    checkpoint = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    training = tmp_path / "epoch_3.pt"  # open_clip's training checkpoints: under state_dict, DDP's module. prefix
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in checkpoint.items()}}, training)
    assert detect_format(training) == "openclip"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_checkpoint(training)
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert sum("QuickGELU" in message for message in messages) == 1, messages  # said once, by the reader
    assert read.config.act == "gelu" and any("text tower" in note for note in read.notes)
    tower = tmp_path / "visual.safetensors"  # the tower's own state dict, without visual.
    from safetensors.torch import save_file

    save_file({k[len("visual."):]: v.contiguous() for k, v in checkpoint.items() if k.startswith("visual.")}, tower)
    assert detect_format(tower) == "openclip"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = read_checkpoint(tower)
    assert sum("QuickGELU" in str(w.message) for w in caught) == 1
    assert alone.config == read.config and not any("text tower" in note for note in alone.notes)
    plan = plan_source_check(training, "openclip")
    assert not plan.runs and "open_clip_config.json" in plan.skipped


@pytest.mark.parametrize(("change", "says"), [
    ({"attentional_pool": True}, "attentional_pool"),
    ({"pos_embed_type": "sin_cos_2d"}, "pos_embed_type"),
    ({"pool_type": "avg"}, "pool_type='avg'"),
    ({"act_kwargs": {"approximate": "none", "inplace": True}}, "act_kwargs"),
])
def test_what_vitdeploy_does_not_build_is_refused_in_one_line(tmp_path, change, says) -> None:
    folder = write_folder(tmp_path / "f", VISION)
    path = folder / "open_clip_config.json"
    data = json.loads(path.read_text())
    data["model_cfg"]["vision_cfg"].update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=says) as raised:
        read_checkpoint(folder)
    assert "\n" not in str(raised.value)


def test_a_weight_file_in_its_folder_takes_the_config_beside_it(tmp_path) -> None:
    """The file a user downloaded from an OpenCLIP Hub repo, passed alone: read with the folder's config (QuickGELU,
    not guessed), checked against open_clip where it is the file open_clip loads; another file there is read
    with the config too but not checked (open_clip would load the other one)."""
    folder = write_folder(tmp_path / "quick", VISION, quick_gelu=True)
    weights = folder / "open_clip_pytorch_model.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        checkpoint = read_checkpoint(weights)
    assert checkpoint.config.act == "quick_gelu" and any("beside the file" in note for note in checkpoint.notes)
    assert plan_source_check(weights, "openclip").runs
    assert plan_source_check(folder / "open_clip_config.json", "openclip").runs
    assert read_checkpoint(folder / "open_clip_config.json").config == checkpoint.config
    other = folder / "epoch_1.pt"
    other.write_bytes(weights.read_bytes())
    assert read_checkpoint(other).config.act == "quick_gelu"
    assert not plan_source_check(other, "openclip").runs


def test_a_bare_file_without_ln_pre_is_refused_rather_than_pooled_by_a_guess(tmp_path) -> None:
    folder = write_folder(tmp_path / "clipa", {**VISION, "no_ln_pre": True, "pool_type": "avg",
                                                "final_ln_after_pool": True})
    bare = tmp_path / "clipa.bin"
    (folder / "open_clip_pytorch_model.bin").rename(bare)
    with pytest.raises(CheckpointError, match="ln_pre.*open_clip_config.json"):
        read_checkpoint(bare)


def test_a_folder_with_a_transformers_config_is_still_read_as_transformers(tmp_path) -> None:
    """laion's Hub folders hold both: transformers' config.json and weights, and open_clip's."""
    folder = write_folder(tmp_path / "both", VISION)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert detect_format(folder) == "huggingface"
    (folder / "config.json").write_text(json.dumps({"model_type": "something_else"}))
    assert detect_format(folder) == "openclip"


def test_a_resnet_tower_is_refused(tmp_path) -> None:
    state = {"visual.conv1.weight": torch.zeros(8, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1),
             "visual.attnpool.positional_embedding": torch.zeros(5, 8), "logit_scale": torch.zeros(())}
    path = tmp_path / "rn50.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a ViT"):
        read_checkpoint(path, format="openclip")


RANGE = ["--resolution", "32:96", "--batch", "1:2", "--no-cpu-variant", "--validation-max-batch", "2",
         "--outputs", "image_embeds,pooler_output,patch_tokens"]


def test_an_export_is_checked_against_open_clip_and_a_wrong_one_refused(tmp_path, capsys) -> None:
    """The check is open_clip's own model at each size: a graph resampling the position table as transformers
    does (agreeing with vitdeploy's eager model built the same way) is refused, by how much."""
    from vitdeploy.cli import main

    folder = write_folder(tmp_path / "quick", VISION, quick_gelu=True)
    right = tmp_path / "right.onnx"
    assert main(["export", str(folder), "-o", str(right), "--json", str(tmp_path / "right.json"), *RANGE]) == 0
    check = json.loads((tmp_path / "right.json").read_text())["source_check"]
    assert check["passed"] is True and check["library"] == "open_clip_torch"
    assert check["architecture_from"] == "open_clip_config.json"
    assert sorted(check["outputs"]) == ["image_embeds", "patch_tokens", "pooler_output"]
    sizes = [tuple(size) for size in check["sizes"]]
    assert sizes[0] == NATIVE and any(h != w for h, w in sizes[1:]), sizes
    capsys.readouterr()
    wrong = tmp_path / "wrong.onnx"
    code = main(["export", str(folder), "-o", str(wrong), "--pos-embed-resample", "huggingface", *RANGE])
    out = capsys.readouterr().out
    assert code == 1 and not wrong.exists()
    assert any(line.strip().startswith("image_embeds differs from open_clip_torch") for line in out.splitlines()), out
    assert "was not written" in out and "Traceback" not in out


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::vitdeploy.checkpoints.CheckpointWarning")
def test_a_torchscript_archive_is_refused_with_how_to_resave_it(tmp_path) -> None:
    """OpenAI's original CLIP .pt files are TorchScript archives: refused in one line naming the re-save, whose
    result then reads (the tower's own state dict) and equals open_clip's tower."""
    folder = write_folder(tmp_path / "quick", VISION, quick_gelu=True)
    tower = open_clip.create_model(f"local-dir:{folder}").visual.eval()
    archive = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about open_clip's Python control flow
        traced = torch.jit.trace(tower, torch.zeros(1, 3, *NATIVE), check_trace=False)
    torch.jit.save(traced, str(archive))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warnings about TorchScript archives are not repeated at users
        with pytest.raises(CheckpointError, match="TorchScript archive") as refused:
            read_checkpoint(archive)
    message = str(refused.value)
    assert "\n" not in message and "vitdeploy does not run" in message and ".state_dict()" in message, message
    resaved = tmp_path / "state_dict.pt"
    torch.save(torch.jit.load(str(archive), map_location="cpu").state_dict(), resaved)
    model = load_model(resaved, act="quick_gelu").eval()
    pixels = torch.from_numpy(InputFactory(model.config.preprocessing.at(64), synthetic=False).batch(2, 64, 64)[0])
    with torch.no_grad():
        assert_agrees(model.forward_outputs(pixels, ["image_embeds"])["image_embeds"], tower(pixels), "image_embeds")


def test_importing_open_clip_first_leaves_transformers_vision_models_importable() -> None:
    """open_clip imports transformers while torchvision's stand-in exists; transformers must still know that
    torchvision is absent afterwards (it asks once), or none of its vision models import in that process."""
    import subprocess
    import sys

    script = ("from vitdeploy.timm_import import import_open_clip\n"
              "import_open_clip()\n"
              "import transformers\n"
              "from transformers.utils import is_torchvision_available\n"
              "print(is_torchvision_available(), transformers.Dinov2Model.__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "Dinov2Model"]
