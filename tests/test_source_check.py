"""Exports and ``verify`` are checked against the checkpoint's own library, not only against vitdeploy.

Tiny real checkpoints in each library's own format, weights perturbed away from their init and a
smooth position grid (``family_sources``): a timm Hub folder of DeiT (``config.json`` naming the
architecture) and a transformers ``save_pretrained`` folder of DINOv2. Their exports pass the check
against timm's / transformers' own model on real photos at the native and a non-square size, and
record it (CLI JSON and the ONNX metadata). A wrong artifact is built the way a loader that mis-reads
a checkpoint's position convention would build it (``--pos-embed-resample`` forcing the other
library's resampling): it agrees with vitdeploy's eager model, which is built the same wrong way,
at every size, and with the source only at the native size; the check refuses it with the numbers,
``--no-source-check`` lets it through and says so, and ``verify`` runs the same check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from family_sources import Family, perturb, perturbed_timm_model, save_timm, timm

from vitdeploy.cli import main
from vitdeploy.exporters import source_check
from vitdeploy.exporters.source_check import check_sizes, plan_source_check, run_source_check
from vitdeploy.metadata import read_onnx_metadata

transformers = pytest.importorskip("transformers")
if timm is None:
    pytest.skip("timm is not installed (CI: pip install --no-deps timm)", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SMALL = dict(embed_dim=32, depth=1, num_heads=2)
DEIT = Family("deit_tiny_patch16_224", dict(img_size=64, num_classes=10), {}, ("logits",), load=dict(hub_folder=True))
TIMM_RANGE = ["--resolution", "32:96", "--batch", "1:2", "--no-cpu-variant", "--validation-max-batch", "2"]
HF_RANGE = ["--resolution", "28:84", "--batch", "1:2", "--no-cpu-variant", "--validation-max-batch", "2"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def timm_hub(tmp_path_factory) -> Path:
    """A timm Hub folder of a tiny DeiT (one block) whose config.json names the architecture."""
    model = perturbed_timm_model(DEIT, SMALL)
    return save_timm(model, DEIT, tmp_path_factory.mktemp("timm"), SMALL)


@pytest.fixture(scope="module")
def hf_dinov2(tmp_path_factory) -> Path:
    """A transformers DINOv2 folder (56 px, patch 14), saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, mlp_ratio=2, image_size=56, patch_size=14,
                                       layer_norm_eps=1e-6)
    model = perturb(transformers.Dinov2Model(config))
    with torch.no_grad():  # a smooth position grid, so that resampling it matters
        pos = model.embeddings.position_embeddings
        grid = torch.linspace(-1, 1, 4)
        smooth = torch.stack([torch.sin(3 * grid[:, None] + k * grid[None, :]) for k in range(pos.shape[-1])], -1)
        pos[:, 1:] = smooth.reshape(1, 16, -1)
    folder = tmp_path_factory.mktemp("hf") / "dinov2"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_export(timm_hub, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("timm-export")
    code = main(["export", str(timm_hub), "-o", str(out / "deit.onnx"), "--json", str(out / "deit.json"), *TIMM_RANGE])
    assert code == 0
    return out / "deit.onnx", json.loads((out / "deit.json").read_text())


def test_timm_export_passes_the_check_against_timm_and_records_it(timm_export) -> None:
    path, report = timm_export
    check = report["source_check"]
    assert check["checked"] and check["passed"] is True
    assert (check["library"], check["version"], check["architecture"]) == ("timm", timm.__version__,
                                                                           "deit_tiny_patch16_224")
    assert check["architecture_from"] == "config.json"
    sizes = [tuple(size) for size in check["sizes"]]
    assert sizes[0] == (64, 64) and any(h != w for h, w in sizes[1:]), sizes
    assert "logits" in check["outputs"] and check["failures"] == []
    stored = read_onnx_metadata(path).validation["source_check"]
    assert stored["passed"] is True and stored["version"] == timm.__version__


def test_a_wrong_convention_is_refused_with_the_numbers(timm_hub, tmp_path, capsys) -> None:
    target = tmp_path / "wrong.onnx"
    code, out = run(capsys, "export", str(timm_hub), "-o", str(target), "--pos-embed-resample", "huggingface",
                    "--json", str(tmp_path / "wrong.json"), *TIMM_RANGE)
    assert code == 1 and not target.exists()
    refusal = [line for line in out.splitlines() if line.strip().startswith("logits differs from timm")]
    assert len(refusal) == 1 and "allows 0.0001" in refusal[0], out
    assert "was not written" in out and "--no-source-check" in out
    check = json.loads((tmp_path / "wrong.json").read_text())["source_check"]
    assert check["passed"] is False
    worst = next(iter(check["outputs"]["logits"].values()))
    assert worst["rel_max_error"] > 1e-4  # the worst case, at the non-square size, is off by more than fp32 allows


def test_a_source_model_that_fails_to_run_refuses_in_one_line(timm_hub, tmp_path, capsys, monkeypatch) -> None:
    def fails(self, pixels):
        raise RuntimeError("shape mismatch in block 0\nsecond line of the library's message")

    monkeypatch.setattr(source_check.SourcePlan, "outputs", fails)
    target = tmp_path / "model.onnx"
    code, out = run(capsys, "export", str(timm_hub), "-o", str(target), *TIMM_RANGE)
    assert code == 1 and not target.exists()
    failed = [line for line in out.splitlines() if "failed on a" in line]
    assert len(failed) == 1 and "RuntimeError: shape mismatch in block 0" in failed[0], out
    assert "second line" not in out and "Traceback" not in out and "--no-source-check" in out


@pytest.fixture(scope="module")
def hf_export(hf_dinov2, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hf-export")
    code = main(["export", str(hf_dinov2), "-o", str(out / "dinov2.onnx"), "--json", str(out / "dinov2.json"),
                 "--outputs", "pooler_output,last_hidden_state", *HF_RANGE])
    assert code == 0
    return out / "dinov2.onnx", json.loads((out / "dinov2.json").read_text())


def test_hf_export_passes_the_check_against_transformers_per_token(hf_export) -> None:
    path, report = hf_export
    check = report["source_check"]
    assert check["passed"] is True and check["library"] == "transformers"
    assert (check["version"], check["architecture"]) == (transformers.__version__, "Dinov2Model")
    assert set(check["outputs"]) == {"pooler_output", "last_hidden_state"} and check["not_compared"] == []
    assert [56, 56] in check["sizes"] and any(h != w for h, w in check["sizes"])
    assert read_onnx_metadata(path).validation["source_check"]["architecture"] == "Dinov2Model"


def test_no_source_check_skips_it_and_says_so_and_verify_catches_the_wrong_artifact(hf_dinov2, tmp_path, capsys) -> None:
    target = tmp_path / "wrong.onnx"
    code, out = run(capsys, "export", str(hf_dinov2), "-o", str(target), "--pos-embed-resample", "timm",
                    "--outputs", "last_hidden_state", "--no-source-check", "--json", str(tmp_path / "w.json"),
                    *HF_RANGE)
    assert code == 0 and target.is_file()  # only the source check would have refused it
    assert "source check skipped: --no-source-check" in out
    assert json.loads((tmp_path / "w.json").read_text())["source_check"] == {
        "checked": False, "reason": "--no-source-check", "format": "huggingface"}
    assert read_onnx_metadata(target).validation["source_check"]["checked"] is False

    code, out = run(capsys, "verify", str(target), "--reference", str(hf_dinov2), "--batch", "1",
                    "--json", str(tmp_path / "v.json"))
    assert code == 1
    check = json.loads((tmp_path / "v.json").read_text())["source_check"]
    assert check["passed"] is False and check["library"] == "transformers"
    assert any(line.startswith("last_hidden_state differs from transformers") for line in check["failures"])


def test_verify_runs_the_check_and_passes_a_right_artifact(timm_export, timm_hub, tmp_path, capsys) -> None:
    path, _ = timm_export
    code, out = run(capsys, "verify", str(path), "--reference", str(timm_hub), "--batch", "1",
                    "--json", str(tmp_path / "v.json"))
    assert code == 0, out
    check = json.loads((tmp_path / "v.json").read_text())["source_check"]
    assert check["passed"] is True and check["library"] == "timm"
    assert "source check: checked against timm" in out

    code, out = run(capsys, "verify", str(path), "--reference", str(timm_hub), "--batch", "1", "--no-source-check")
    assert code == 0 and "source check skipped: --no-source-check" in out


@pytest.fixture(scope="module")
def jax_archive(tmp_path_factory) -> Path:
    """An original-layout ``.npz`` of ViT-Ti/16 at 224 (vitdeploy's model with every weight perturbed, written
    in Flax's layout by ``jax_archives``): its shapes are the registry's vit_tiny_patch16_224, a timm name."""
    from conftest import make_model
    from jax_archives import jax_arrays

    from vitdeploy.variants import get_config

    model = perturb(make_model(get_config("vit_tiny_patch16_224", num_classes=10)), seed=3)
    path = tmp_path_factory.mktemp("jax") / "ViT-Ti_16.npz"
    np.savez(path, **jax_arrays(model))
    return path


def test_a_jax_archive_is_checked_against_timms_own_npz_loader(jax_archive) -> None:
    """The paper's own format: timm's model loaded by timm's npz loader, at the native and a non-square size.
    vitdeploy's reading of the archive (its eager model: an export is checked against its eager model
    anyway, and 12 blocks cost a long trace) passes; the position table resampled as the JAX code's scipy
    zoom (an export with --pos-embed-resample jax) is refused by how much."""
    from onnx_artifacts import make_metadata

    from vitdeploy.checkpoints import resolve_source
    from vitdeploy.metadata import ShapeRange

    for convention, passes in ((None, True), ("jax", False)):
        model = resolve_source(str(jax_archive), **({"pos_embed_resample": convention} if convention else {})).model
        model.eval()

        def run_eager(pixels, model=model):
            with torch.no_grad():
                return {"logits": model(torch.from_numpy(pixels)).numpy()}

        plan = plan_source_check(jax_archive, "jax", image_size=224, variant=model.config.provenance.name)
        assert (plan.architecture, plan.architecture_from) == ("vit_tiny_patch16_224",
                                                               "the registry variant its shapes match")
        metadata = make_metadata(model.config, ShapeRange(batch=(1, 2), height=(192, 256), width=(192, 256)))
        result = run_source_check(run_eager, plan, metadata, height=(192, 256), width=(192, 256))
        assert result.passed is passes, result.summary_line()
        assert any(h != w for h, w in result.sizes)
        if not passes:
            assert result.failure_lines()[0].startswith("logits differs from timm"), result.failure_lines()


def test_an_export_of_a_jax_archive_records_its_check_or_why_not(tmp_path, capsys) -> None:
    """The export's plan gets the variant the archive was read as: a one-block archive no timm name fits is
    skipped, and the record says to pass --model."""
    from conftest import make_model, tiny_config
    from jax_archives import jax_arrays

    archive = tmp_path / "tiny.npz"
    np.savez(archive, **jax_arrays(make_model(tiny_config())))
    record = tmp_path / "tiny.json"
    code, out = run(capsys, "export", str(archive), "-o", str(tmp_path / "tiny.onnx"), "--json", str(record),
                    *TIMM_RANGE)
    assert code == 0, out
    check = json.loads(record.read_text())["source_check"]
    assert check["checked"] is False and "pass --model NAME" in check["reason"] and "'vit_d64" in check["reason"]


# -- what is checked against what, without running anything ----------------------------------------


@pytest.mark.parametrize("format, words", [("dinov2", "original DINOv2"), ("native", "own"),
                                            ("variant", "random weights")])
def test_formats_without_a_source_library_are_skipped_with_the_reason(format, words) -> None:
    plan = plan_source_check("anything", format)
    assert not plan.runs and words in plan.skipped
    result = run_source_check(None, plan, None, height=(1, 2), width=(1, 2))
    assert result.passed is None and result.to_dict() == {"checked": False, "reason": plan.skipped, "format": format}


def test_a_jax_archive_with_a_representation_layer_is_skipped_with_the_reason(tmp_path) -> None:
    from conftest import make_model, tiny_config
    from jax_archives import jax_arrays

    representation = tmp_path / "pre_logits.npz"
    np.savez(representation, **jax_arrays(make_model(tiny_config(representation_size=48))))
    plan = plan_source_check(representation, "jax", model="vit_tiny_patch16_224", image_size=32)
    assert not plan.runs and "representation layer (pre_logits)" in plan.skipped


def test_a_bare_timm_state_dict_is_checked_under_the_name_it_is_given(tmp_path) -> None:
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")  # the plan reads no tensors
    unnamed = plan_source_check(weights, "timm")
    assert not unnamed.runs and "--model NAME" in unnamed.skipped
    named = plan_source_check(weights, "timm", model="vit_small_patch14_dinov2")
    assert named.runs and (named.architecture, named.architecture_from) == ("vit_small_patch14_dinov2", "--model")
    by_file = plan_source_check(tmp_path / "deit_tiny_patch16_224.safetensors", "timm")
    assert by_file.runs and by_file.architecture_from == "the file name" and by_file.lenient
    tagged = plan_source_check(tmp_path / "deit_tiny_patch16_224.my_finetune.safetensors", "timm")
    assert tagged.runs and tagged.architecture == "deit_tiny_patch16_224"  # a tag timm does not know is no obstacle
    unknown = plan_source_check(weights, "timm", model="vit_no_such_model")
    assert not unknown.runs and "has no model named 'vit_no_such_model'" in unknown.skipped


def test_a_name_that_does_not_fit_the_weights_skips_unless_the_checkpoint_gave_it(timm_hub, tmp_path) -> None:
    small = tmp_path / "deit_tiny_patch16_224.safetensors"  # timm's name, but 32 wide: timm's default is 192
    small.write_bytes((timm_hub / "model.safetensors").read_bytes())
    result = run_source_check(None, plan_source_check(small, "timm"), None, height=(32, 96), width=(32, 96))
    assert result.passed is None and "does not take these weights" in result.reason
    assert "the file name" in result.reason
    config = json.loads((timm_hub / "config.json").read_text())
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "model.safetensors").write_bytes((timm_hub / "model.safetensors").read_bytes())
    (hub / "config.json").write_text(json.dumps({**config, "model_args": {}}))  # the config no longer fits
    result = run_source_check(None, plan_source_check(hub, "timm"), None, height=(32, 96), width=(32, 96))
    assert result.passed is False and "does not take these weights" in result.failure_lines()[0]
    assert "--no-source-check" in result.summary_line()


def test_a_library_that_cannot_be_imported_is_said_so(monkeypatch, hf_dinov2) -> None:
    monkeypatch.setattr(source_check, "_importable", lambda name: False)
    assert plan_source_check(hf_dinov2, "huggingface").skipped.startswith("transformers is not importable")
    assert plan_source_check(hf_dinov2, "timm").skipped.startswith("timm is not importable")


@pytest.mark.parametrize("native, height, width, stride", [(224, (112, 448), (112, 448), 16), (64, (32, 96), (32, 96), 16),
                                                            (56, (28, 84), (28, 84), 14), (224, (224, 224), (160, 288), 16)])
def test_check_sizes_are_the_native_and_a_changed_non_square_one(native, height, width, stride) -> None:
    sizes = check_sizes(native, height, width, stride)
    (h0, w0), (h1, w1) = sizes
    assert (h0, w0) == (native, native) and h1 != w1 and (h1, w1) != (native, native)
    assert all(height[0] <= h <= height[1] and width[0] <= w <= width[1] and not h % stride and not w % stride
               for h, w in sizes)
    if height[1] > native > height[0] and width[1] > native > width[0]:
        assert (h1 > native) != (w1 > native)  # one side up-, the other downsampled


def test_a_tower_without_its_pooling_head_is_checked_on_the_outputs_its_library_gives(tmp_path, capsys) -> None:
    """SigLIP with vision_use_head false (a VLM's image tower): transformers gives no pooler_output, so it is
    not compared (never reported as a disagreement); alone it skips the check, naming what can be checked."""
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, image_size=56, patch_size=14, vision_use_head=False)
    folder = tmp_path / "siglip"
    perturb(transformers.SiglipVisionModel(config)).save_pretrained(folder)
    code, out = run(capsys, "export", str(folder), "-o", str(tmp_path / "pooled.onnx"), *HF_RANGE)
    assert code == 0 and "source check skipped: " in out
    assert "gives none of the artifact's outputs (pooler_output); it gives last_hidden_state, patch_tokens" in out
    code, out = run(capsys, "export", str(folder), "-o", str(tmp_path / "both.onnx"), "--outputs",
                    "pooler_output,last_hidden_state", "--json", str(tmp_path / "both.json"), *HF_RANGE)
    assert code == 0
    assert "passed (last_hidden_state; tolerance fp32); not compared: pooler_output, which the source does not" in out
    record = json.loads((tmp_path / "both.json").read_text())["source_check"]
    assert record["passed"] is True and record["not_compared"] == ["pooler_output"]


def test_an_artifact_of_batch_one_is_checked_one_photo_per_size(timm_hub, tmp_path, capsys) -> None:
    """--batch 1:1 (an edge deployment): the check feeds the batch the artifact takes, not two photos at once,
    and verify's default batches do the same."""
    code, out = run(capsys, "export", str(timm_hub), "-o", str(tmp_path / "one.onnx"), "--json", str(tmp_path / "one.json"),
                    "--resolution", "32:96", "--batch", "1:1", "--no-cpu-variant")
    assert code == 0 and "source check: checked against timm" in out and ": passed (logits" in out
    record = json.loads((tmp_path / "one.json").read_text())["source_check"]
    assert record["passed"] is True and record["images"] == "1 photo per size"
    # verify's default batches (1 and 4) stay inside the artifact's range too
    code, out = run(capsys, "verify", str(tmp_path / "one.onnx"), "--reference", str(timm_hub))
    assert code == 0 and "4x3x" not in out and "1x3x" in out and ": passed (logits" in out
