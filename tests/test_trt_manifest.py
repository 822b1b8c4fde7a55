"""Engine manifest, optimization profiles, profile selection and every compatibility mismatch (pure Python)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from conftest import tiny_config
from trt_artifacts import tiny_metadata

from vitdeploy.engine_manifest import (
    EngineManifest,
    EngineTensor,
    Environment,
    GpuInfo,
    OptimizationProfile,
    check_compatibility,
    envelope,
    manifest_path_for,
    parse_shape,
    parse_version,
    select_profile,
    validate_profiles,
)
from vitdeploy.metadata import ArtifactMetadata, ShapeRange

NAME = "pixel_values"


def profile(low, best, high) -> OptimizationProfile:
    return OptimizationProfile(NAME, low, best, high)


def buckets() -> list[OptimizationProfile]:
    return [
        profile((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
        profile((1, 3, 384, 384), (4, 3, 384, 384), (16, 3, 384, 384)),
        profile((1, 3, 224, 224), (1, 3, 320, 320), (8, 3, 384, 384)),
    ]


def make_manifest(**overrides) -> EngineManifest:
    fields = dict(
        engine_file="model.engine", engine_sha256="a" * 64, engine_bytes=123, onnx_file="model.onnx",
        onnx_sha256="b" * 64, tensorrt_version="10.13.0.35", gpu=GpuInfo("NVIDIA L4", "8.9"), precision="fp16",
        profiles=buckets()[:2],
        inputs=[EngineTensor(NAME, "float32", (-1, 3, -1, -1), "input")],
        outputs=[EngineTensor("logits", "float32", (-1, 1000), "output")],
        build_options={"workspace_bytes": 1 << 30}, metadata={"precision": "fp16"},
    )
    fields.update(overrides)
    return EngineManifest(**fields)


def test_parse_shape_and_manifest_path() -> None:
    assert parse_shape("8x3x224x224") == (8, 3, 224, 224)
    assert parse_shape("1,3,32,48") == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="'1x3xAx4'"):
        parse_shape("1x3xAx4")
    with pytest.raises(ValueError, match="positive"):
        parse_shape("0x3x224x224")
    assert manifest_path_for("out/model.engine").as_posix() == "out/model.engine.json"


def test_validate_profiles_accepts_valid_buckets() -> None:
    validate_profiles(buckets(), channels=3, multiple_of=16, shape_range=ShapeRange((1, 32), (224, 384), (224, 384)))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (profile((1, 3, 224, 224), (64, 3, 224, 224), (32, 3, 224, 224)), "axis 0: expected 0 < min <= opt <= max"),
        (profile((1, 3, 224, 224), (1, 3, 232, 224), (8, 3, 384, 384)), "opt height 232 is not a multiple of the patch stride 16"),
        (profile((1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 384, 392)), "max width 392 is not a multiple"),
        (profile((1, 1, 224, 224), (1, 1, 224, 224), (8, 1, 224, 224)), "1 channels, the model takes 3"),
        (profile((1, 3, 224, 224), (1, 3, 224, 224), (64, 3, 224, 224)), "batch 1..64 is outside the range 1..32"),
        (profile((1, 3, 160, 160), (1, 3, 224, 224), (8, 3, 224, 224)), "height 160..224 is outside the range 224..384"),
        (profile((1, 3, 224), (1, 3, 224), (1, 3, 224)), "expected 4-D NCHW"),
        (OptimizationProfile(NAME, (1, 3, 224, 224), (1, 3, 224), (1, 3, 224, 224)), "mixes ranks"),
    ],
)
def test_validate_profiles_names_the_bad_value(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        validate_profiles([buckets()[0], bad], channels=3, multiple_of=16,
                          shape_range=ShapeRange((1, 32), (224, 384), (224, 384)))


def test_validate_profiles_needs_one_profile_and_one_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        validate_profiles([])
    other = OptimizationProfile("images", (1, 3, 224, 224), (1, 3, 224, 224), (1, 3, 224, 224))
    with pytest.raises(ValueError, match="same input"):
        validate_profiles([buckets()[0], other])


def test_select_profile_picks_the_closest_fitting_profile() -> None:
    profiles = buckets()
    assert select_profile(profiles, (8, 3, 224, 224)) == 0  # exactly profile 0's opt
    assert select_profile(profiles, (4, 3, 384, 384)) == 1  # only profiles 1 and 2 fit; 1's opt matches
    assert select_profile(profiles, (1, 3, 320, 320)) == 2  # only profile 2 holds 320
    assert select_profile(profiles, (1, 3, 224, 224)) == 2  # 0 and 2 fit; log-distance to opt: 0→2.08, 2→0.73
    assert select_profile(profiles, (16, 3, 224, 224)) == 0  # profile 2 stops at batch 8


def test_select_profile_breaks_ties_by_tighter_range_then_index() -> None:
    wide = profile((1, 3, 224, 224), (4, 3, 224, 224), (32, 3, 448, 448))
    tight = profile((1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224))
    assert select_profile([wide, tight], (4, 3, 224, 224)) == 1
    assert select_profile([tight, tight], (4, 3, 224, 224)) == 0


def test_select_profile_error_lists_the_profiles() -> None:
    with pytest.raises(ValueError, match=r"64x3x224x224 fits none.*0: 1x3x224x224 \.\. 32x3x224x224"):
        select_profile(buckets(), (64, 3, 224, 224))
    with pytest.raises(ValueError, match="fits none"):
        select_profile(buckets(), (1, 3, 224))


def test_envelope_covers_every_profile() -> None:
    assert envelope(buckets()) == ((1, 32), (224, 384), (224, 384))


def test_manifest_round_trips_through_json(tmp_path) -> None:
    manifest = make_manifest()
    path = tmp_path / "model.engine.json"
    manifest.write(path)
    data = json.loads(path.read_text())
    assert data["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9"}
    assert data["profiles"][1]["max"] == [16, 3, 384, 384]
    assert data["inputs"][0]["shape"] == [-1, 3, -1, -1]
    assert EngineManifest.read(path) == manifest
    assert not [p for p in tmp_path.iterdir() if p.name != "model.engine.json"]  # no temp file left behind


def test_manifest_read_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        EngineManifest.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        EngineManifest.read(tmp_path / "bad.json")
    data = make_manifest().to_dict()
    del data["engine_sha256"]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks \\['engine_sha256'\\]"):
        EngineManifest.read(tmp_path / "partial.json")
    data = make_manifest().to_dict() | {"format": 99}
    with pytest.raises(ValueError, match="format 99 is newer"):
        EngineManifest.from_dict(data)


def test_manifest_rejects_unknown_precision_and_compat_level() -> None:
    with pytest.raises(ValueError, match="precision 'int4'"):
        make_manifest(precision="int4")
    assert make_manifest(precision="int8").precision == "int8" and make_manifest(precision="fp8").precision == "fp8"
    with pytest.raises(ValueError, match=r"hardware compatibility 'turing\+'"):
        make_manifest(hardware_compatibility="turing+")


def test_manifest_restores_artifact_metadata() -> None:
    metadata = tiny_metadata(tiny_config(), precision="fp16")
    restored = make_manifest(metadata=asdict(metadata)).artifact_metadata()
    assert isinstance(restored, ArtifactMetadata)
    assert restored.stride == 8 and restored.precision == "fp16" and restored.num_classes == 10
    assert make_manifest(metadata=None).artifact_metadata() is None


def test_parse_version() -> None:
    assert parse_version("10.13.0.35") == (10, 13, 0, 35)
    assert parse_version("11.0.0rc1") == (11, 0, 0)
    with pytest.raises(ValueError, match="'dev'"):
        parse_version("dev")


HERE = Environment("10.13.0.35", GpuInfo("NVIDIA L4", "8.9"))


def test_matching_engine_has_no_problems() -> None:
    assert check_compatibility(make_manifest(), HERE, engine_sha256="a" * 64) == []


def test_sha256_mismatch_is_reported() -> None:
    problems = check_compatibility(make_manifest(), engine_sha256="c" * 64)
    assert len(problems) == 1 and "sha256 cccccccccccc" in problems[0] and "replaced or corrupted" in problems[0]


@pytest.mark.parametrize("running", ["10.13.1.2", "10.14.0.1", "11.0.0.5", "10.12.0.36"])
def test_other_tensorrt_version_is_refused(running) -> None:
    problems = check_compatibility(make_manifest(), Environment(running, HERE.gpu))
    assert len(problems) == 1 and f"TensorRT {running} is installed" in problems[0]


def test_same_release_with_other_build_number_is_accepted() -> None:
    assert check_compatibility(make_manifest(), Environment("10.13.0.99", HERE.gpu)) == []


@pytest.mark.parametrize(
    ("built", "running", "ok"),
    [("10.13.0.35", "10.14.1.0", True), ("10.13.0.35", "10.13.0.35", True), ("10.13.0.35", "11.2.0.1", True),
     ("10.13.0.35", "10.12.0.1", False), ("11.1.0.1", "12.0.0.1", False), ("11.1.0.1", "11.0.0.1", False)],
)
def test_version_compatible_engines(built, running, ok) -> None:
    manifest = make_manifest(tensorrt_version=built, version_compatible=True)
    problems = check_compatibility(manifest, Environment(running, HERE.gpu))
    assert (problems == []) is ok
    if not ok:
        assert "version-compatible engine" in problems[0]


def test_other_compute_capability_is_refused() -> None:
    problems = check_compatibility(make_manifest(), Environment(HERE.tensorrt_version, GpuInfo("NVIDIA H100", "9.0")))
    assert len(problems) == 1
    assert "compute capability 8.9 (NVIDIA L4)" in problems[0] and "has 9.0" in problems[0]
    assert "--hardware-compat ampere+" in problems[0]


def test_same_compute_capability_level_still_needs_the_same_cc() -> None:
    manifest = make_manifest(hardware_compatibility="same-compute-capability")
    assert check_compatibility(manifest, Environment(HERE.tensorrt_version, GpuInfo("NVIDIA RTX 4090", "8.9"))) == []
    assert check_compatibility(manifest, Environment(HERE.tensorrt_version, GpuInfo("NVIDIA A100", "8.0")))


def test_ampere_plus_engines_run_on_newer_gpus_only() -> None:
    manifest = make_manifest(hardware_compatibility="ampere+")
    assert check_compatibility(manifest, Environment(HERE.tensorrt_version, GpuInfo("NVIDIA H100", "9.0"))) == []
    problems = check_compatibility(manifest, Environment(HERE.tensorrt_version, GpuInfo("Tesla T4", "7.5")))
    assert len(problems) == 1 and ">= 8.0" in problems[0] and "Tesla T4" in problems[0]


def test_every_problem_is_listed_at_once() -> None:
    problems = check_compatibility(make_manifest(), Environment("11.0.0.1", GpuInfo("Tesla T4", "7.5")), "d" * 64)
    assert len(problems) == 3
