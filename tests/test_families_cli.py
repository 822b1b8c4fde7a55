"""docs/families.md's "The families from the command line", run as written: every command of its table and of
the serving block below it, on tiny real checkpoints of each family in each format.

The commands are read from docs/families.md, so the table cannot promise what no test ran. They run in one
folder where each file or folder name of the table is a tiny checkpoint of that family in that
format (one block, width 64, weights perturbed): a real timm model's state dict or Hub folder
(``vit_small_patch14_reg4_dinov2``, ``vit_base_patch16_siglip_224``, DINOv3, EVA-02, PE, AIMv2, DINOv2
giant, built small with timm's kwargs by the builders of ``tests/family_sources.py`` and
``tests/rope_sources.py``), a ``save_pretrained`` folder of transformers' ``Dinov2WithRegistersModel`` /
``SiglipVisionModel`` / ``DINOv3ViTModel`` / ``Siglip2VisionModel``, that DINOv2 folder's weights under
facebookresearch/dinov2's names and a timm DINOv3 S+ under facebookresearch/dinov3's (the original
formats: their graphs must give what the same network gives in its library). Small shape ranges (and,
for ``deploy``, no benchmark and one tune round) are added to each command. What a user would check is
checked: exit 0, each file's precision and outputs, the check against the source library that
``export`` itself runs for a Hub or HF folder, every graph against the source library's own model on
real photos at three sizes (one not square), RoPE computed from the input's shape in every RoPE file,
the deploy report's outputs, stages and tune, the Triton configs' outputs and dims, ``predict``'s
embedding line and ``inspect``'s position scheme. Every command runs once for the module; one deploy
runs tune (one round), the other is told ``--no-tune`` and must say it skipped it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from family_sources import hf_outputs, perturb, timm_dinov2_giant, timm_outputs
from rope_sources import (
    CASES,
    assert_rope_from_the_input_shape,
    hf_dinov3,
    hf_dinov3_outputs,
    hf_siglip2,
    original_dinov3_state_dict,
    save_timm_rope,
    timm_rope_model,
)
from timm_without_torchvision import TIMM_MISSING, import_timm

from vitdeploy.cli import main
from vitdeploy.metadata import read_onnx_metadata
from vitdeploy.outputs import OUTPUT_NAMES
from vitdeploy.preprocessing import bundled_images, preprocess

timm = import_timm()
transformers = pytest.importorskip("transformers")
if timm is None:
    pytest.skip(TIMM_MISSING, allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAMILIES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "families.md"
SECTION = "## The families from the command line"
HIDDEN = 64
TOLERANCE = 1e-4  # relative max error of an fp32 graph against the source library's model
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Row:
    """One row of the families table."""

    family: str
    source: str
    argv: tuple[str, ...]  # after "vitdeploy"
    outputs: tuple[str, ...]
    precisions: tuple[str, ...]

    @property
    def command(self) -> str:
        return self.argv[0]

    @property
    def checkpoint(self) -> str:
        return self.argv[1]

    @property
    def target(self) -> str:
        return self.argv[self.argv.index("-o") + 1]


def readme_section() -> str:
    text = FAMILIES_PAGE.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n### ", start)
    return text[start:end]


def table_rows(section: str) -> list[Row]:
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[2].startswith("`vitdeploy "):
            continue
        argv = shlex.split(cells[2].strip("`"))
        outputs = tuple(re.findall(r"`(\w+)`", cells[3]))
        precisions = tuple(p for p, mark in zip(PRECISIONS, cells[4:], strict=True) if mark == "✓")
        rows.append(Row(cells[0], cells[1], tuple(argv[1:]), outputs, precisions))
    return rows


def serving_commands(section: str) -> list[tuple[str, ...]]:
    block = section[section.index("```bash"):]
    block = block[:block.index("```", 3)]
    return [tuple(shlex.split(line)[1:]) for line in block.splitlines() if line.startswith("vitdeploy ")]


SECTION_TEXT = readme_section()
ROWS = table_rows(SECTION_TEXT)
SERVING = serving_commands(SECTION_TEXT)


# -- the tiny checkpoints, under the table's names ------------------------------------------------

@dataclass
class Checkpoint:
    """A tiny checkpoint, its native size and its source library's own outputs for pixels."""

    native: int
    reference: Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _small_timm(name: str, img_size: int, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # hidden 64 with one head: a bare state dict does not record heads, and the loader takes hidden // 64
    return perturb(timm.create_model(name, pretrained=False, embed_dim=HIDDEN, depth=1, num_heads=1, mlp_ratio=2,
                                     img_size=img_size, num_classes=num_classes, dynamic_img_size=True), seed)


def _timm_file(name: str, img_size: int, path: Path, num_classes: int = 0, seed: int = 0) -> Checkpoint:
    """timm's ``name``, tiny, saved as timm saves weights; its reference is timm's own outputs."""
    from safetensors.torch import save_file

    model = _small_timm(name, img_size, num_classes, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Checkpoint(img_size, lambda pixels: timm_outputs(model, pixels, OUTPUT_NAMES))


def _hf_folder(model: torch.nn.Module, native: int, path: Path) -> Checkpoint:
    """``model`` saved with ``save_pretrained``; its reference is transformers' own outputs."""
    model.save_pretrained(path)
    return Checkpoint(native, lambda pixels: hf_outputs(model, pixels))


def timm_dinov2(path: Path) -> Checkpoint:
    return _timm_file("vit_small_patch14_reg4_dinov2", 56, path)


def timm_siglip(path: Path) -> Checkpoint:
    return _timm_file("vit_base_patch16_siglip_224", 64, path)


def timm_deit(path: Path) -> Checkpoint:
    return _timm_file("deit_small_distilled_patch16_224", 64, path, num_classes=5)


def timm_deit3(path: Path) -> Checkpoint:
    return _timm_file("deit3_small_patch16_224", 64, path, num_classes=5)


HF_DINOV2 = "dinov2-with-registers-small"


def hf_dinov2(path: Path) -> Checkpoint:
    torch.manual_seed(1)
    model = perturb(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        # one 64-wide head: the original format does not record heads, and DINOv2's are 64 wide
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=1, mlp_ratio=2, image_size=56, patch_size=14,
        num_register_tokens=4, layer_norm_eps=1e-6)))
    return _hf_folder(model, 56, path)


def original_dinov2(path: Path) -> Checkpoint:
    """The HF folder's network under facebookresearch/dinov2's names: ``register_tokens``, a class-token
    position embedding (zero, so the reader's folding gives back the same tensors) and a ``mask_token``."""
    from vitdeploy.checkpoints import load_model

    hf = transformers.Dinov2WithRegistersModel.from_pretrained(path.parent / HF_DINOV2).eval()
    state = dict(load_model(path.parent / HF_DINOV2).state_dict())
    state["register_tokens"] = state.pop("reg_token")
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, HIDDEN), state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, HIDDEN)
    torch.save(state, path)
    return Checkpoint(56, lambda pixels: hf_outputs(hf, pixels))


def hf_siglip(path: Path) -> Checkpoint:
    torch.manual_seed(2)
    model = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=64,
        patch_size=16)))
    return _hf_folder(model, 64, path)


def hf_clip(path: Path) -> Checkpoint:
    torch.manual_seed(3)
    model = perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=64,
        patch_size=16, projection_dim=32, layer_norm_eps=1e-5)))
    return _hf_folder(model, 64, path)


# -- the 2025-26 families: RoPE, SwiGLU, RMSNorm, storage tokens (tests/rope_sources.py's builders) --

ONE_BLOCK = dict(embed_dim=HIDDEN, depth=1, num_heads=1)
UNSTORED = 224  # the native size vitdeploy gives DINOv3 weights, which store no position table


def _timm_rope(case_id: str, path: Path, hub: bool = False, native: int | None = None,
               size: dict[str, int] = ONE_BLOCK) -> Checkpoint:
    """``tests/rope_sources.py``'s timm model of ``case_id`` with one block, as a bare state dict or a Hub folder."""
    case = CASES[case_id]
    model = timm_rope_model(case, size=size)
    save_timm_rope(model, case, path.parent, hub=hub, size=size, name=path.name)
    return Checkpoint(native or case.image, lambda pixels: timm_outputs(model, pixels, case.outputs))


def timm_dinov3(path: Path) -> Checkpoint:
    return _timm_rope("dinov3", path, native=UNSTORED)


def original_dinov3(path: Path) -> Checkpoint:
    """DINOv3 S+ (SwiGLU, q/v biases) under facebookresearch/dinov3's names; timm's model is its reference."""
    case = CASES["dinov3_plus_qkvb"]
    model = timm_rope_model(case, size=ONE_BLOCK)
    torch.save(original_dinov3_state_dict(model), path)
    return Checkpoint(UNSTORED, lambda pixels: timm_outputs(model, pixels, case.outputs))


def hf_dinov3_folder(path: Path) -> Checkpoint:
    model = hf_dinov3(True, path, layers=1)
    return Checkpoint(64, lambda pixels: hf_dinov3_outputs(model, pixels))


def timm_eva02(path: Path) -> Checkpoint:
    return _timm_rope("eva02", path)


def timm_pe_core(path: Path) -> Checkpoint:
    return _timm_rope("pe", path, hub=True)


def timm_pe_spatial(path: Path) -> Checkpoint:
    """A bare PE state dict (refused alone: its names fit a ViT without RoPE too), read with ``--model``,
    which gives the variant's 3 heads: PE-T's own width, 192 (3 heads of 64)."""
    return _timm_rope("pe_spatial", path, size=dict(embed_dim=192, depth=1, num_heads=3))


def timm_aimv2(path: Path) -> Checkpoint:
    return _timm_rope("aimv2", path)


def hf_siglip2_folder(path: Path) -> Checkpoint:
    model = hf_siglip2(path, layers=1)
    return Checkpoint(64, lambda pixels: hf_outputs(model, pixels))


def timm_siglip2(path: Path) -> Checkpoint:
    """timm's SigLIP 2 weights (``.v2_webli``) are SigLIP's architecture: the SigLIP builder, other weights."""
    return _timm_file("vit_base_patch16_siglip_224", 64, path, seed=4)


def timm_dinov2_giant_file(path: Path) -> Checkpoint:
    from safetensors.torch import save_file

    model = timm_dinov2_giant(False, size=ONE_BLOCK)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Checkpoint(56, lambda pixels: timm_outputs(model, pixels, OUTPUT_NAMES))


CHECKPOINTS: dict[str, Callable[[Path], Checkpoint]] = {
    "vit_small_patch14_reg4_dinov2.safetensors": timm_dinov2,
    HF_DINOV2: hf_dinov2,
    "dinov2_vits14_reg4_pretrain.pth": original_dinov2,  # after the folder it is made from
    "siglip-base-patch16-224": hf_siglip,
    "vit_base_patch16_siglip_224.safetensors": timm_siglip,
    "deit_small_distilled_patch16_224.safetensors": timm_deit,
    "deit3_small_patch16_224.safetensors": timm_deit3,
    "clip-vit-base-patch16": hf_clip,
    "vit_small_patch16_dinov3.safetensors": timm_dinov3,
    "dinov3-vits16plus-pretrain-lvd1689m": hf_dinov3_folder,
    "dinov3_vits16plus_pretrain_lvd1689m.pth": original_dinov3,
    "eva02_tiny_patch14_224.safetensors": timm_eva02,
    "vit_pe_core_tiny_patch16_384": timm_pe_core,
    "vit_pe_spatial_tiny_patch16_512.safetensors": timm_pe_spatial,
    "aimv2_large_patch14_224.safetensors": timm_aimv2,
    "siglip2-base-patch16-naflex": hf_siglip2_folder,
    "vit_base_patch16_siglip_224.v2_webli.safetensors": timm_siglip2,
    "vit_giant_patch14_dinov2.safetensors": timm_dinov2_giant_file,
}


# Tune runs in one deploy (one round); the other deploy skips it (and must say so), to keep the module short.
TUNED = "vit_small_patch14_reg4_dinov2.safetensors"


def fast(row: Row, native: int) -> list[str]:
    """The small shape ranges (and the short deploy) the test adds to a table command."""
    options = ["--batch", "1:2", "--resolution", f"{native // 2}:{native * 3 // 2}", "--validation-max-batch", "1"]
    if row.command == "deploy":
        options += ["--bench-batch", "1", "--no-bench", "--tune-rounds", "1"]
        options += [] if row.checkpoint == TUNED else ["--no-tune"]
    return options


@dataclass
class Run:
    status: int
    out: str
    err: str


def run(argv: list[str] | tuple[str, ...]) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return Run(status, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Every table command, then every serving command, run in one folder of tiny checkpoints."""
    folder = tmp_path_factory.mktemp("families-cli")
    checkpoints = {name: make(folder / name) for name, make in CHECKPOINTS.items()}
    shutil.copy(bundled_images()[0], folder / "photo.jpg")
    runs: dict[tuple[str, ...], Run] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for row in ROWS:
            runs[row.argv] = run([*row.argv, *fast(row, checkpoints[row.checkpoint].native)])
        for argv in SERVING:
            runs[argv] = run(argv)
    return folder, checkpoints, runs


def _ok(result: Run) -> None:
    assert result.status == 0, result.err[-3000:]


def _artifacts(row: Row, folder: Path) -> dict[str, Path]:
    """The ONNX file of each precision a row wrote."""
    target = folder / row.target
    if row.command == "export":
        (precision,) = row.precisions
        return {precision: target}
    stem = Path(row.checkpoint).name
    return {precision: target / f"{stem}-{precision}.onnx" for precision in row.precisions}


# -- the table ------------------------------------------------------------------------------------

NEW_FAMILIES = {  # the 2025-26 families: every source each is read from
    "DINOv3": ("timm state dict", "HF folder", "original"), "EVA-02": ("timm",), "Perception Encoder core": ("timm",),
    "Perception Encoder spatial": ("timm",), "AIMv2": ("timm",), "SigLIP 2": ("timm", "HF folder"),
    "DINOv2 giant": ("timm",)}


def test_the_table_covers_every_family_both_in_full_every_format_and_precision():
    assert {row.checkpoint for row in ROWS} == set(CHECKPOINTS)
    assert {row.family for row in ROWS} == {"DeiT (distilled)", "DeiT III", "DINOv2 with registers", "CLIP", "SigLIP",
                                            *NEW_FAMILIES}
    for family, sources in NEW_FAMILIES.items():
        rows = [row for row in ROWS if row.family == family]
        assert all(any(source in row.source for row in rows) for source in sources), family
    rope = {row.family for row in ROWS if "int8" in row.precisions} & {"DINOv3", "EVA-02", "Perception Encoder core"}
    assert rope and any("fp16" in row.precisions for row in ROWS if row.family in NEW_FAMILIES)
    assert {row.source for row in ROWS if row.family == "CLIP"} == {"HF folder (`CLIPVisionModelWithProjection`)"}
    for family, sources in (("DINOv2 with registers", ("timm", "HF folder", "original")),
                            ("SigLIP", ("timm", "HF folder"))):
        rows = [row for row in ROWS if row.family == family]
        assert {p for row in rows for p in row.precisions} == set(PRECISIONS), family
        assert all(any(source in row.source for row in rows) for source in sources), family
        assert {row.command for row in rows} == {"deploy", "export"}, family
    dinov2 = {row.outputs for row in ROWS if row.family.startswith("DINOv2")}
    assert dinov2 == {("pooler_output",), ("pooler_output", "patch_tokens")}  # the default, and the dense features
    for row in ROWS:  # the precision marks say what the command writes
        asked = row.argv[row.argv.index("--precision") + 1] if "--precision" in row.argv else "fp32"
        assert row.precisions == (PRECISIONS if row.command == "deploy" else (asked,))
    assert {argv[0] for argv in SERVING} == {"triton", "predict", "inspect"}


@pytest.mark.parametrize("row", ROWS, ids=lambda row: " ".join(row.argv[:2]) + (" int8" if "int8" in row.argv else ""))
def test_each_command_writes_the_precisions_and_outputs_the_table_says(ran, row):
    folder, _, runs = ran
    _ok(runs[row.argv])
    for precision, path in _artifacts(row, folder).items():
        metadata = read_onnx_metadata(path)
        assert metadata.precision == precision
        assert tuple(metadata.output_names) == row.outputs
        assert metadata.validation["passed"] is True
    if row.command == "export" and "folder" in row.source:  # its config.json names what to check it against
        library = "timm" if "timm" in row.source else "transformers"
        said = [line for line in runs[row.argv].out.splitlines() if line.startswith("source check:")]
        assert said and f"checked against {library}" in said[0] and "passed" in said[0], runs[row.argv].out


@pytest.mark.parametrize("row", [row for row in ROWS if row.command == "deploy"], ids=lambda row: row.checkpoint)
def test_deploy_reports_the_outputs_and_what_ran(ran, row):
    folder, _, _ = ran
    out = folder / row.target
    report = json.loads((out / "report.json").read_text())
    written = {a["precision"]: a for a in report["artifacts"] if a["kind"] == "onnx"}
    assert sorted(written) == sorted(PRECISIONS)
    for artifact in written.values():
        assert artifact["passed"] is True
        assert [o["name"] for o in artifact["outputs"]] == list(row.outputs)
    assert written["fp32"]["outputs"][0] == {"name": "pooler_output", "shape": ["batch", HIDDEN]}
    stages = {stage["name"]: stage for stage in report["stages"]}
    assert stages["export int8"]["status"] == "ok" and "TensorRT pre-flight: 0 error(s)" in " ".join(
        written["int8"]["notes"])
    assert stages["benchmark"] == {"name": "benchmark", "status": "skipped", "seconds": 0.0, "detail": "--no-bench"}
    if row.checkpoint == TUNED:
        assert stages["tune"]["status"] == "ok" and report["tune"]["document"]["chosen"] is not None
        assert (out / "tune.json").is_file() and "## Fastest accurate CPU path (tune)" in (out / "report.md").read_text()
    else:
        assert stages["tune"]["status"] == "skipped" and stages["tune"]["detail"] == "--no-tune"
    assert f"`pooler_output` [batch, {HIDDEN}]" in (out / "report.md").read_text()
    assert (out / "build_engine.sh").is_file()


COSINE = {"fp16": 0.999, "int8": 0.99}  # worst cosine of a reduced-precision graph's vectors (each token's too)


def _sizes(native: int, patch: int) -> list[tuple[int, int]]:
    """The native size, a larger square one and a non-square one, all inside the exported range."""
    return [(native, native), (native + patch, native + patch), (native - patch, native + 2 * patch)]


def test_graphs_give_what_the_source_library_gives(ran, record_property):
    """Every file against the source library's own model on real photos at three sizes (one not square):
    fp32 within 1e-4 relative, fp16 and int8 by the worst cosine of any vector (image or token)."""
    from vitdeploy.parity import InputFactory
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    folder, checkpoints, _ = ran
    checked = set()
    for row in ROWS:
        checkpoint = checkpoints[row.checkpoint]
        for precision, path in _artifacts(row, folder).items():
            metadata = read_onnx_metadata(path)
            assert preprocess(bundled_images()[1], metadata.preprocessing).shape[-1] == checkpoint.native
            photos = InputFactory(metadata.preprocessing, synthetic=False)
            worst = 0.0 if precision == "fp32" else 1.0
            with OrtRuntime(path) as runtime:
                for size in _sizes(checkpoint.native, metadata.model_config["patch_size"]):
                    pixels = photos.batch(2, *size)[0]
                    expected = checkpoint.reference(torch.from_numpy(pixels))
                    got = runtime.run_outputs(pixels)
                    for name in row.outputs:
                        reference, actual = expected[name].double().numpy(), got[name].astype(np.float64)
                        if precision == "fp32":
                            worst = max(worst, float(np.abs(actual - reference).max() / np.abs(reference).max()))
                        else:
                            cosine = (actual * reference).sum(-1) / (np.linalg.norm(actual, axis=-1)
                                                                     * np.linalg.norm(reference, axis=-1))
                            worst = min(worst, float(cosine.min()))
            record_property(f"{row.checkpoint} {precision}", worst)
            if precision == "fp32":
                assert worst <= TOLERANCE, (row.checkpoint, worst)
            else:
                assert worst >= COSINE[precision], (row.checkpoint, precision, worst)
            checked.add(row.checkpoint)
    assert checked == set(CHECKPOINTS)


def test_rope_files_compute_sin_and_cos_from_the_input_shape(ran):
    """Every RoPE file of the table (DINOv3 from its three formats, EVA-02 int8, PE core and spatial) has
    no ``If`` node, and its sin/cos are computed from the input's ``Shape``, never a frozen size's table."""
    import onnx

    folder, _, _ = ran
    walked = set()
    for row in ROWS:
        for path in _artifacts(row, folder).values():
            config = read_onnx_metadata(path).model_config
            if config.get("rope") is None:
                continue
            assert_rope_from_the_input_shape(onnx.load(str(path)).graph, config["hidden_size"], config["num_heads"],
                                             config["patch_size"])
            walked.add(row.family)
    assert walked == {"DINOv3", "EVA-02", "Perception Encoder core", "Perception Encoder spatial"}


def test_triton_configs_list_each_output_with_its_dims(ran):
    folder, _, runs = ran
    repositories, served = set(), set()
    for argv in SERVING:
        if argv[0] != "triton":
            continue
        _ok(runs[argv])
        repository = folder / argv[argv.index("-o") + 1]
        repositories.add(repository)
        for artifact in argv[1:argv.index("-o")]:
            outputs = read_onnx_metadata(folder / artifact).output_names
            served.update(outputs)
            for kind in ("python", "onnxruntime"):
                config = (repository / f"{Path(artifact).stem}_{kind}" / "config.pbtxt").read_text()
                listed = re.findall(r'output \{\s*name: "(\w+)"\s*data_type: TYPE_FP32\s*dims: \[ ([-\d, ]+) \]', config)
                expected = {"pooler_output": f"{HIDDEN}", "patch_tokens": f"-1, {HIDDEN}"}
                assert listed == [(name, expected[name]) for name in outputs], config
    assert len(repositories) == 1 and served == {"pooler_output", "patch_tokens"}


def test_predict_prints_the_embedding_line(ran):
    from vitdeploy import runtimes

    folder, _, runs = ran
    for argv in SERVING:
        if argv[0] != "predict":
            continue
        result = runs[argv]
        _ok(result)
        artifact, image = folder / argv[1], argv[2]
        with runtimes.load(artifact) as runtime:  # a deploy folder: the path tune chose
            metadata = runtime.metadata
            pixels = preprocess(folder / image, metadata.preprocessing)[None].astype(np.float32)
            norm = float(np.linalg.norm(runtime.run_outputs(pixels)["pooler_output"]))
        assert f"{image}\n  pooler_output [{HIDDEN}], L2 norm {norm:.4f}\n" in result.out, result.out


POSITIONS = {"dinov3.onnx": ("fp32", "2-D RoPE (dinov3)"),
             "eva02-int8.onnx": ("int8", "learned table (timm resampling) + 2-D RoPE (eva)")}


def test_inspect_shows_the_position_scheme(ran):
    folder, _, runs = ran
    inspected = [argv for argv in SERVING if argv[0] == "inspect"]
    assert {argv[1] for argv in inspected} == set(POSITIONS)
    for argv in inspected:
        result = runs[argv]
        _ok(result)
        precision, positions = POSITIONS[argv[1]]
        lines = {key.strip(): value.strip() for key, value in
                 (line.split(" : ", 1) for line in result.out.splitlines() if " : " in line)}
        assert lines["positions"].split(";")[0] == positions, result.out
        assert lines["precision"] == precision, result.out
