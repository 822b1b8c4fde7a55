"""The exported graph of every family, from every source, against the source library's own model.

For each family x source (timm, transformers, the original DINOv2 format): the source's own model at
a small size (width 32, one block), its weights perturbed away from their init, written in the
source's own format, loaded by ``vitdeploy.checkpoints.load_model``, exported by the real exporter
(``export_onnx``: every output the model has, validated against eager as every export is, on a
range just wide enough) and run with onnxruntime at the native size and three others, two of them
not square. Every output of the file, and of the eager model it was exported from, must equal the
source library's own (timm ``dynamic_img_size=True``, transformers ``interpolate_pos_encoding=True``,
the original DINOv2's own resampling) within 1e-4 relative max error; the file's metadata must name the source's resampling convention, and
vitdeploy's eager model under the other convention must miss the source at the changed sizes.

The trace is what costs (seconds each), so each distinct model is exported once, and only where no
other test runs that family from that source through the exporter: the sources of docs/families.md's
table (DeiT, DeiT III, SigLIP and CLIP from their table sources, DINOv2 with registers from all three)
are checked as files against their source library by ``tests/test_families_cli.py``, so here their
eager model is (at all four sizes) and their loaded config's convention. timm's, transformers' and the
original's DINOv2-with-registers files all use the timm convention, so they are written from the same
weights and their loaded models are asserted equal.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from family_sources import (
    FAMILIES,
    TOLERANCE,
    hf_cases,
    hf_outputs,
    hub_state_dict,
    original_dinov2_outputs,
    parity_sizes,
    perturb,
    perturbed_timm_model,
    rel_err,
    save_timm,
    timm,
    timm_model,
    timm_outputs,
)
from safetensors.torch import save_file
from timm_without_torchvision import TIMM_MISSING

from vitdeploy.model import VisionTransformer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.skipif(timm is None, reason=TIMM_MISSING)]
transformers = pytest.importorskip("transformers")

WIDTH, DEPTH, HEADS, MLP = 32, 1, 2, 64
TIMM_SMALL = dict(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
# The convention each check says misses the source: the other bicubic (for the original DINOv2's offset
# bicubic, the plain one it is closest to).
OTHER = {"timm": "huggingface", "huggingface": "timm", "dinov2": "huggingface"}
Reference = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Source:
    """One family from one source: the export it is checked on, and the convention it resamples by."""

    family: str
    source: str  # timm | huggingface | dinov2 (the original's own format)
    graph: str  # sources whose loaders give the same model share an export
    convention: str
    missing: frozenset[str] = frozenset()  # graph outputs the source library has no counterpart of
    onnx: bool = False  # exported here (the rest are exported by tests/test_families_cli.py's table commands)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.source}"


SOURCES = [
    Source("deit", "timm", "deit/timm", "timm"),
    # transformers' DeiT has no pooled output (its pooler is tanh(dense(class token)), not vitdeploy's)
    Source("deit", "huggingface", "deit/huggingface", "huggingface", frozenset({"pooler_output"}), onnx=True),
    Source("deit3", "timm", "deit3/timm", "timm"),
    Source("dinov2", "huggingface", "dinov2/huggingface", "huggingface", onnx=True),  # Dinov2ForImageClassification
    Source("dinov2", "dinov2", "dinov2/dinov2", "dinov2", onnx=True),
    Source("dinov2_reg", "timm", "dinov2_reg", "timm"),
    Source("dinov2_reg", "huggingface", "dinov2_reg", "timm"),
    Source("dinov2_reg", "dinov2", "dinov2_reg", "timm"),
    Source("clip", "timm", "clip/timm", "timm", onnx=True),
    Source("clip", "huggingface", "clip/huggingface", "huggingface"),  # CLIPVisionModelWithProjection
    Source("siglip", "timm", "siglip/timm", "timm"),
    Source("siglip", "huggingface", "siglip/huggingface", "huggingface"),
]
IDS = [source.id for source in SOURCES]
# timm families and transformers classes by the source they stand for
TIMM = {"deit": "deit_distilled", "deit3": "deit3", "clip": "clip_quickgelu", "siglip": "siglip"}
HF = {"deit": "deit_teacher", "dinov2": "dinov2_classifier", "clip": "clip_vision_projection",
      "siglip": "siglip_vision"}
# Config fields that do not shape the graph (they name things, or are an init value), and the two whose
# None means "as the pooling implies" (compared by what they come to).
NOT_IN_THE_GRAPH = ("preprocessing", "provenance", "layer_scale", "class_token", "fc_norm")


def graph_fields(config: Any) -> dict[str, Any]:
    """What of ``config`` the exported graph depends on."""
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_THE_GRAPH}
    return {**fields, "has_class_token": config.has_class_token, "use_fc_norm": config.use_fc_norm}


@dataclass
class Loaded:
    """A source's checkpoint as vitdeploy loads it, and the source library's own outputs."""

    model: VisionTransformer
    reference: Reference


def _from_timm(family: str, folder: Path) -> Loaded:
    from vitdeploy.checkpoints import load_model

    spec = FAMILIES[TIMM[family]]
    source = perturbed_timm_model(spec, TIMM_SMALL)
    path = save_timm(source, spec, folder, TIMM_SMALL)
    heads = {} if spec.load.get("hub_folder") else {"num_heads": HEADS}
    return Loaded(load_model(path, **heads), lambda x: timm_outputs(source, x, spec.outputs))


def _from_transformers(family: str, folder: Path) -> Loaded:
    from vitdeploy.checkpoints import load_model

    case = next(c for c in hf_cases(WIDTH, DEPTH, HEADS, MLP) if c.id == HF[family])
    torch.manual_seed(0)
    source = perturb(case.hf())
    source.save_pretrained(folder)
    return Loaded(load_model(folder), lambda x: hf_outputs(source, x))


def _dinov2_builder(name: str) -> Callable[..., torch.nn.Module]:
    return lambda **kw: timm_model(name, WIDTH, DEPTH, HEADS, mlp_ratio=MLP // WIDTH, num_classes=0,
                                   init_values=1.0, **kw)


def _from_original_dinov2(folder: Path) -> Loaded:
    from vitdeploy.checkpoints import load_model

    build = _dinov2_builder("vit_small_patch14_dinov2")
    torch.manual_seed(0)
    hub = hub_state_dict(perturb(build(img_size=56)))
    torch.save(hub, folder / "dinov2_vits14.pth")
    return Loaded(load_model(folder / "dinov2_vits14.pth", num_heads=HEADS),
                  lambda x: original_dinov2_outputs(hub, build, x))


def _dinov2_with_registers(folder: Path) -> dict[str, Loaded]:
    """One DINOv2-with-registers model written by transformers, as timm saves it and as the original
    does (the timm model gets the converted transformers weights; the original file splits the class
    position off as transformers stores it), each loaded by vitdeploy."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.checkpoints.huggingface import convert_hf_folder

    T = transformers
    torch.manual_seed(0)
    hf = perturb(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=MLP // WIDTH,
        image_size=56, patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6)))
    hf.save_pretrained(folder / "hf")
    conversion, _ = convert_hf_folder(folder / "hf")
    build = _dinov2_builder("vit_small_patch14_reg4_dinov2")
    tm = build(img_size=56, dynamic_img_size=True)
    tm.load_state_dict(conversion.state_dict, strict=True)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(folder / "timm.safetensors"))
    class_pos = hf.embeddings.position_embeddings.detach()[:, :1]
    hub = hub_state_dict(tm, class_pos=class_pos)
    torch.save(hub, folder / "dinov2_vits14_reg4.pth")
    outputs = ("pooler_output", "last_hidden_state", "patch_tokens")
    return {
        "huggingface": Loaded(load_model(folder / "hf"), lambda x: hf_outputs(hf, x)),
        "timm": Loaded(load_model(folder / "timm.safetensors", num_heads=HEADS), lambda x: timm_outputs(tm, x, outputs)),
        "dinov2": Loaded(load_model(folder / "dinov2_vits14_reg4.pth", num_heads=HEADS),
                         lambda x: original_dinov2_outputs(hub, build, x)),
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Callable[[Source], Loaded]:
    """Each source's checkpoint written and loaded once."""
    cache: dict[str, Loaded] = {}

    def get(source: Source) -> Loaded:
        if source.id not in cache:
            folder = tmp_path_factory.mktemp(source.id.replace("/", "-"))
            if source.family == "dinov2_reg":
                cache.update({f"dinov2_reg/{k}": v for k, v in _dinov2_with_registers(folder).items()})
            elif source.source == "timm":
                cache[source.id] = _from_timm(source.family, folder)
            elif source.source == "huggingface":
                cache[source.id] = _from_transformers(source.family, folder)
            else:
                cache[source.id] = _from_original_dinov2(folder)
        return cache[source.id]

    return get


def sizes(model: VisionTransformer) -> list[tuple[int, int]]:
    return parity_sizes(model.config.image_size, model.config.patch_size)


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory) -> Callable[[Source], Any]:
    """Each graph exported once, with every output its model has, by the real exporter (validated)."""
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.outputs import available_outputs

    cache: dict[str, Any] = {}

    def get(source: Source) -> Any:
        if source.graph not in cache:
            model = loaded(source).model
            heights, widths = zip(*sizes(model), strict=True)
            options = ExportOptions(outputs=available_outputs(model.config), batch=(1, 2),
                                    height=(min(heights), max(heights)), width=(min(widths), max(widths)),
                                    validation_max_batch=1, cpu_variant=False, preflight=False,
                                    source=source.id)
            folder = tmp_path_factory.mktemp("onnx")
            cache[source.graph] = export_onnx(model, folder / f"{source.graph.replace('/', '-')}.onnx", options)
        return cache[source.graph]

    return get


def pixels_at(size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_eager_and_onnx_match_the_source_library(source: Source, loaded, exported, record_property) -> None:
    """Every output at every size, from the eager model and (where this module exports it) from its file
    (onnxruntime); the worst errors are recorded (``pytest --junitxml=FILE`` lists them per case)."""
    from vitdeploy import runtimes
    from vitdeploy.outputs import available_outputs

    ours = loaded(source)
    errors: dict[tuple[str, tuple[int, int], str], float] = {}
    with contextlib.ExitStack() as stack:
        runtime = None
        if source.onnx:
            result = exported(source)
            assert result.report.passed
            runtime = stack.enter_context(runtimes.load(result.path))
        names = runtime.output_names if runtime else list(available_outputs(ours.model.config))
        for index, size in enumerate(sizes(ours.model)):
            pixels = pixels_at(size, index)
            expected = ours.reference(pixels)
            assert set(names) - set(expected) == source.missing, size  # every output the source library has
            compared = [name for name in names if name in expected]
            got = runtime.run_outputs(pixels.numpy()) if runtime else {}
            with torch.no_grad():
                eager = ours.model.forward_outputs(pixels, compared)
            for name in compared:
                if runtime:
                    errors[("onnx", size, name)] = rel_err(got[name], expected[name])
                errors[("eager", size, name)] = rel_err(eager[name], expected[name])
    for path in ("onnx", "eager") if source.onnx else ("eager",):
        record_property(f"{path}_worst_rel_err", max(v for k, v in errors.items() if k[0] == path))
    assert max(errors.values()) <= TOLERANCE, {k: v for k, v in errors.items() if v > TOLERANCE}


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_the_convention_is_recorded_and_the_other_one_misses(source: Source, loaded, exported,
                                                                  record_property) -> None:
    from vitdeploy.metadata import read_onnx_metadata

    ours = loaded(source)
    if source.onnx:
        metadata = read_onnx_metadata(exported(source).path)
        assert metadata.model_config["pos_embed_resample"] == source.convention
    assert ours.model.config.pos_embed_resample == source.convention
    wrong = copy.deepcopy(ours.model)
    wrong.config = wrong.config.replace(pos_embed_resample=OTHER[source.convention])
    misses = []
    for index, size in enumerate(sizes(ours.model)[1:]):
        pixels = pixels_at(size, 10 + index)
        with torch.no_grad():
            tokens = wrong.forward_outputs(pixels, ["patch_tokens"])["patch_tokens"]
        misses.append(rel_err(tokens, ours.reference(pixels)["patch_tokens"]))
    record_property("other_convention_least_rel_err", min(misses))
    assert min(misses) > 10 * TOLERANCE, misses


def test_the_sources_that_share_an_export_load_the_same_model(loaded) -> None:
    """timm's, transformers' and the original's DINOv2-with-registers files of the same weights load as
    one model (the same graph-shaping config, the same tensors), so one export stands for all three."""
    models = [loaded(source).model for source in SOURCES if source.graph == "dinov2_reg"]
    assert len(models) == 3
    first = models[0]
    for model in models[1:]:
        assert graph_fields(model.config) == graph_fields(first.config)
        state, reference_state = model.state_dict(), first.state_dict()
        assert state.keys() == reference_state.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, reference_state[name], rtol=0, atol=1e-6, msg=name)
