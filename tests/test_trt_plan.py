"""Build planning on a real exported ONNX file: profiles from metadata and flags, checks, trtexec command."""

from __future__ import annotations

import shutil

import onnx
import pytest
from trt_artifacts import SHAPE_RANGE, tiny_onnx

from vitdeploy.engine_manifest import OptimizationProfile
from vitdeploy.exporters.trt_plan import (
    BuildOptions,
    default_ranges,
    format_command,
    graph_precision,
    make_profiles,
    parse_size,
    plan_build,
    read_onnx_info,
    trtexec_command,
)
from vitdeploy.metadata import PREFIX


@pytest.fixture(scope="module")
def onnx_path():
    return tiny_onnx()


@pytest.fixture(scope="module")
def info(onnx_path):
    return read_onnx_info(onnx_path)


def test_read_onnx_info(info) -> None:
    assert info.input_name == "pixel_values"
    assert info.output_names == ["logits"]
    assert info.precision == "fp32" and info.opset == 18
    assert info.channels == 3 and info.stride == 8
    assert info.metadata.shape_range == SHAPE_RANGE
    assert info.input_shape[1] == 3 and isinstance(info.input_shape[0], str)


def test_default_profile_rule(info) -> None:
    # min/max: the validated range; opt: smallest validated batch at the native 32x32
    assert default_ranges(info) == {"batch": (1, 1, 8), "height": (16, 32, 64), "width": (16, 32, 64)}
    assert make_profiles(info) == [OptimizationProfile("pixel_values", (1, 3, 16, 16), (1, 3, 32, 32), (8, 3, 64, 64))]


def test_batch_and_resolution_flags(info) -> None:
    [profile] = make_profiles(info, batch=(2, 4, 8), resolution=(32, 48, 64))
    assert (profile.min, profile.opt, profile.max) == ((2, 3, 32, 32), (4, 3, 48, 48), (8, 3, 64, 64))


def test_profile_specs_make_resolution_buckets(info) -> None:
    profiles = make_profiles(info, batch=(1, 2, 4), profile_specs=["res=32", "res=48:56:64,batch=1:1:8", "height=16:16:32,width=64"])
    assert [p.opt for p in profiles] == [(2, 3, 32, 32), (1, 3, 56, 56), (2, 3, 16, 64)]
    assert profiles[1].max == (8, 3, 64, 64) and profiles[2].min == (1, 3, 16, 64)
    [explicit] = make_profiles(info, profile_specs=["min=1x3x16x16,opt=2x3x32x32,max=4x3x32x64"])
    assert explicit.max == (4, 3, 32, 64)


def test_explicit_shapes(info) -> None:
    [profile] = make_profiles(info, min_shape="1x3x16x16", opt_shape="4x3x32x32", max_shape="8x3x64x64")
    assert profile.opt == (4, 3, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": (30, 32, 64)}, "min height 30 is not a multiple of the patch stride 8"),
        ({"batch": (1, 4, 16)}, "batch 1..16 is outside the range 1..8"),
        ({"resolution": (16, 32, 128)}, "height 16..128 is outside the range 16..64"),
        ({"batch": (4, 2, 8)}, "axis 0: expected 0 < min <= opt <= max, got 4 <= 2 <= 8"),
        ({"min_shape": "1x1x16x16", "opt_shape": "1x1x16x16", "max_shape": "1x1x16x16"}, "1 channels, the model takes 3"),
        ({"min_shape": "1x3x16x16"}, "all three of --min-shape"),
        ({"min_shape": "1x3x16x16", "opt_shape": "1x3x16x16", "max_shape": "1x3x16x16", "profile_specs": ["res=32"]},
         "exclusive"),
        ({"min_shape": "1x3x16x16", "opt_shape": "1x3x16x16", "max_shape": "1x3x16x16", "batch": (1, 1, 1)},
         "drop --batch"),
        ({"profile_specs": ["res=32,size=3"]}, r"unknown key\(s\) \['size'\]"),
        ({"profile_specs": ["res=32,height=32"]}, "resolution or height/width"),
        ({"profile_specs": ["min=1x3x16x16,max=1x3x16x16"]}, "all of min, opt and max"),
        ({"profile_specs": ["batch"]}, "is not key=value"),
        ({"profile_specs": ["res=1:2"]}, "not N or MIN:OPT:MAX"),
    ],
)
def test_bad_profiles_are_refused_before_building(info, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_profiles(info, **kwargs)


def test_file_without_metadata_needs_explicit_shapes(onnx_path, tmp_path) -> None:
    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    info = read_onnx_info(bare)
    assert info.metadata is None and info.stride is None and info.channels == 3
    with pytest.raises(ValueError, match="no vitdeploy metadata"):
        make_profiles(info)
    # without metadata, no validated range or stride is known: only order and channels are checked
    [profile] = make_profiles(info, batch=(1, 2, 4), resolution=(20, 30, 40))
    assert profile.max == (4, 3, 40, 40)


def test_parse_size() -> None:
    assert parse_size("4G") == 4 << 30
    assert parse_size("512M") == parse_size("512MiB") == 512 << 20
    assert parse_size("1024") == 1 << 30  # bare numbers are MiB, as in trtexec
    assert parse_size("0.5G") == 1 << 29
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_size("-1G")


def test_build_options_are_checked() -> None:
    with pytest.raises(ValueError, match="optimization level 9"):
        BuildOptions(optimization_level=9)
    with pytest.raises(ValueError, match="precision 'int4'"):
        BuildOptions(precision="int4")
    with pytest.raises(ValueError, match="softmax 'fp32'"):
        BuildOptions(softmax="fp32")
    assert BuildOptions(precision="int8").precision == "int8" and BuildOptions(precision="fp8").precision == "fp8"
    with pytest.raises(ValueError, match="hardware compatibility 'all'"):
        BuildOptions(hardware_compatibility="all")
    assert BuildOptions().to_dict()["strongly_typed"] is True


def test_plan_build_precision_decisions(onnx_path, tmp_path) -> None:
    plan = plan_build(onnx_path, tmp_path / "m.engine")
    assert plan.precision == "fp32" and not plan.convert_to_fp16
    assert plan.manifest_path == tmp_path / "m.engine.json"
    fp16 = plan_build(onnx_path, tmp_path / "m.engine", options=BuildOptions(precision="fp16"))
    assert fp16.precision == "fp16" and fp16.convert_to_fp16
    assert fp16.fp16_onnx_path == tmp_path / "m.fp16.onnx"
    default = plan_build(onnx_path)
    assert default.engine_path == onnx_path.with_suffix(".engine")


def test_fp16_export_builds_an_fp16_engine_without_conversion(tmp_path) -> None:
    path = tiny_onnx("fp16")
    plan = plan_build(path, tmp_path / "half.engine")
    assert plan.onnx.precision == "fp16" and plan.precision == "fp16" and not plan.convert_to_fp16
    assert graph_precision(onnx.load(str(path))) == "fp16"
    with pytest.raises(ValueError, match="is a fp16 graph and a strongly typed engine has the graph's precision"):
        plan_build(path, tmp_path / "half.engine", options=BuildOptions(precision="fp32"))


def test_plan_build_refuses_to_overwrite_the_onnx(onnx_path, tmp_path) -> None:
    copy = tmp_path / "model.onnx"
    shutil.copy(onnx_path, copy)
    with pytest.raises(ValueError, match="would overwrite the ONNX input"):
        plan_build(copy, copy)
    with pytest.raises(FileNotFoundError, match="nope.onnx not found"):
        plan_build(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        plan_build(tmp_path / "junk.onnx")


def test_graph_precision_detects_fp16_weights(onnx_path) -> None:
    model = onnx.load(str(onnx_path))
    assert graph_precision(model) == "fp32"
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(tensor).astype("float16")
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    assert graph_precision(model) == "fp16"


def test_trtexec_command_single_profile(onnx_path, tmp_path) -> None:
    plan = plan_build(onnx_path, tmp_path / "m.engine")
    argv = trtexec_command(plan)
    assert argv == [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={tmp_path / 'm.engine'}", "--stronglyTyped",
        "--minShapes=pixel_values:1x3x16x16", "--optShapes=pixel_values:1x3x32x32",
        "--maxShapes=pixel_values:8x3x64x64", "--profilingVerbosity=detailed",
        f"--exportLayerInfo={tmp_path / 'm.engine.layers.json'}", "--skipInference",
    ]
    plan.options.detailed_profiling = False
    assert "--profilingVerbosity=detailed" not in trtexec_command(plan)


def test_trtexec_command_every_option_and_profiles(onnx_path, tmp_path) -> None:
    options = BuildOptions(workspace=parse_size("1536M"), optimization_level=5, timing_cache=str(tmp_path / "t cache.bin"),
                           hardware_compatibility="ampere+", version_compatible=True, verbose=True,
                           tf32=False)
    plan = plan_build(onnx_path, tmp_path / "m.engine", options=options, profile_specs=["res=32", "res=64"])
    argv = trtexec_command(plan, onnx_path="other.onnx")
    assert argv[1] == "--onnx=other.onnx"
    assert argv.index("--profile=0") < argv.index("--minShapes=pixel_values:1x3x32x32") < argv.index("--profile=1")
    assert "--maxShapes=pixel_values:8x3x64x64" in argv[argv.index("--profile=1"):]
    for flag in ("--memPoolSize=workspace:1536M", "--builderOptimizationLevel=5", "--hardwareCompatibilityLevel=ampere+",
                 "--versionCompatible", "--noTF32", "--verbose", f"--timingCacheFile={tmp_path / 't cache.bin'}"):
        assert flag in argv
    text = format_command(argv)
    assert f"'--timingCacheFile={tmp_path / 't cache.bin'}'" in text  # quoted for the shell
    same_cc = plan_build(onnx_path, options=BuildOptions(hardware_compatibility="same-compute-capability"))
    assert "--hardwareCompatibilityLevel=sameComputeCapability" in trtexec_command(same_cc)


def test_an_unvalidated_file_builds_for_its_declared_range_with_a_warning(onnx_path) -> None:
    # tiny_onnx() was exported with validation off: nothing narrower is known, and the plan says so.
    plan = plan_build(onnx_path)
    assert plan.profiles[0].max == (8, 3, 64, 64)
    assert plan.range_warning.startswith("tiny_fp32.onnx records no validation (exported with --no-validate?): "
                                         "using its declared range (batch 1..8, 16..64)")


def test_deployable_range_is_the_validated_one_unless_overridden(info) -> None:
    import dataclasses

    metadata = dataclasses.replace(info.metadata, validation={"passed": True, "shapes": [[1, 16, 16], [4, 40, 24],
                                                                                          [1, 64, 16], [1, 64, 64]]})
    plain = metadata.deployable_range(name="m.onnx")
    assert (plain.source, plain.warning, plain.shape_range.batch, plain.shape_range.height) == (
        "validated", None, (1, 4), (16, 64))
    wide = metadata.deployable_range(beyond_validated=True, name="m.onnx")
    assert wide.source == "declared" and wide.shape_range == metadata.shape_range
    assert "only batch 1..4, 16..64 was validated" in wide.warning
