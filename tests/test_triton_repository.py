"""`vitdeploy triton`: every generated config.pbtxt is a valid Triton ModelConfig that matches its artifact.

The schema check is Triton's own: ``tritonclient.grpc.model_config_pb2.ModelConfig`` parsed with
``google.protobuf.text_format`` (unknown fields and bad enum values are errors). Engines are
represented by their manifests beside a stand-in file (no TensorRT here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving_artifacts import LABELS, tiny_served_onnx

from vitdeploy.cli import main
from vitdeploy.engine_manifest import (
    EngineManifest,
    EngineTensor,
    GpuInfo,
    OptimizationProfile,
    manifest_path_for,
)
from vitdeploy.files import sha256_file
from vitdeploy.metadata import read_onnx_metadata
from vitdeploy.serving.pbtxt import Enum, to_text
from vitdeploy.serving.releases import known_releases, matching_releases
from vitdeploy.serving.repository import RepositoryOptions, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (dev extra)")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse_config(model_dir: Path):
    """The model's config.pbtxt as Triton's ModelConfig message (raises on any schema error)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def parameters(config) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def fake_engine(folder: Path, onnx_path: Path, tensorrt_version: str = "10.11.0.33", version_compatible: bool = False,
                min_batch: int = 1) -> Path:
    """A stand-in engine file and the manifest `vitdeploy build` would write beside it (TensorRT cannot run here)."""
    engine = folder / "tiny.engine"
    engine.write_bytes(b"not a real TensorRT plan: the manifest is what the repository writer reads")
    metadata = read_onnx_metadata(onnx_path)
    manifest = EngineManifest(
        engine_file=engine.name, engine_sha256=sha256_file(engine), engine_bytes=engine.stat().st_size,
        onnx_file=str(onnx_path), onnx_sha256=sha256_file(onnx_path), tensorrt_version=tensorrt_version,
        gpu=GpuInfo("NVIDIA L4", "8.9"), precision="fp16",
        profiles=[OptimizationProfile("pixel_values", (min_batch, 3, 16, 16), (4, 3, 32, 32), (16, 3, 48, 64))],
        inputs=[EngineTensor("pixel_values", "float32", (-1, 3, -1, -1), "input")],
        outputs=[EngineTensor("logits", "float16", (-1, 10), "output")],
        version_compatible=version_compatible,
        metadata={key.removeprefix("vitdeploy."): json.loads(value) for key, value in metadata.to_props().items()},
    )
    manifest.write(manifest_path_for(engine))
    return engine


def test_onnx_artifact_gives_python_and_onnxruntime_models_that_parse(tmp_path) -> None:
    onnx_path = tiny_served_onnx()
    metadata = read_onnx_metadata(onnx_path)
    entries = write_repository([onnx_path], tmp_path / "repo", RepositoryOptions(max_queue_delay_us=500, instances=2))
    assert [(e.name, e.kind) for e in entries] == [("tiny_python", "python"), ("tiny_onnxruntime", "onnxruntime")]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny_onnxruntime", "tiny_python"]
    for entry in entries:
        config = parse_config(entry.path)
        assert config.name == entry.name
        assert config.max_batch_size == metadata.shape_range.batch[1] == 8
        (single_input,) = config.input
        assert single_input.name == "pixel_values"
        assert single_input.data_type == model_config_pb2.TYPE_FP32
        assert list(single_input.dims) == [3, -1, -1]
        (logits,) = config.output
        assert (logits.name, list(logits.dims), logits.data_type) == ("logits", [10], model_config_pb2.TYPE_FP32)
        assert logits.label_filename == "labels.txt"
        assert (entry.path / "labels.txt").read_text().splitlines() == LABELS
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [group.count for group in config.instance_group] == [2]
        params = parameters(config)
        assert json.loads(params["vitdeploy.preprocessing"])["crop_size"] == metadata.preprocessing.crop_size == 32
        assert params["vitdeploy.stride"] == "8" and params["vitdeploy.num_classes"] == "10"
        assert json.loads(params["vitdeploy.labels"]) == LABELS
        assert json.loads(params["vitdeploy.shape_range"]) == {"batch": [1, 8], "height": [16, 64], "width": [16, 64]}

    python, onnxruntime = (parse_config(e.path) for e in entries)
    assert python.backend == "python" and python.platform == ""
    assert python.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parameters(python)["vitdeploy.artifact"] == "tiny.onnx"
    version_dir = entries[0].path / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.py", "tiny.cpu.onnx", "tiny.onnx"]
    # The validated CPU variant travels with the python model, byte for byte as its sha256 says.
    assert sha256_file(version_dir / "tiny.cpu.onnx") == metadata.variants["onnxruntime-cpu"]["sha256"]
    assert (version_dir / "model.py").read_text().count("class TritonPythonModel") == 1

    assert onnxruntime.platform == "onnxruntime_onnx"
    assert onnxruntime.default_model_filename == "tiny.onnx"
    assert onnxruntime.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert sorted(p.name for p in (entries[1].path / "1").iterdir()) == ["tiny.onnx"]  # the portable graph only
    assert not onnxruntime.optimization.execution_accelerators.gpu_execution_accelerator


def test_ort_tensorrt_accelerator_has_profiles_from_the_validated_range(tmp_path) -> None:
    entries = write_repository([tiny_served_onnx()], tmp_path / "repo",
                               RepositoryOptions(kinds=("onnxruntime",), ort_tensorrt=True, max_batch=4))
    (entry,) = entries
    config = parse_config(entry.path)
    assert config.max_batch_size == 4
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    assert params["precision_mode"] == "FP32"  # an fp32 graph: precision lives in the graph
    assert params["trt_profile_min_shapes"] == "pixel_values:1x3x16x16"
    assert params["trt_profile_max_shapes"] == "pixel_values:8x3x64x64"
    assert params["trt_profile_opt_shapes"].startswith("pixel_values:2x3x")


def test_fp16_graph_gets_fp16_tensorrt_accelerator(tmp_path) -> None:
    from trt_artifacts import tiny_onnx

    fp16 = tiny_onnx("fp16")
    (entry,) = write_repository([fp16], tmp_path / "repo", RepositoryOptions(kinds=("onnxruntime",), ort_tensorrt=True))
    config = parse_config(entry.path)
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert dict(accelerator.parameters)["precision_mode"] == "FP16"
    assert parameters(config)["vitdeploy.precision"] == "fp16"
    metadata = read_onnx_metadata(fp16)
    expected = {"float32": model_config_pb2.TYPE_FP32, "float16": model_config_pb2.TYPE_FP16}[metadata.inputs[0].dtype]
    assert config.input[0].data_type == expected


def test_engine_gives_tensorrt_plan_model_with_its_manifest_and_release(tmp_path, capsys) -> None:
    onnx_path = tiny_served_onnx()
    engine = fake_engine(tmp_path, onnx_path)
    entries = write_repository([engine], tmp_path / "repo")
    assert [(e.name, e.kind) for e in entries] == [("tiny_tensorrt", "tensorrt"), ("tiny_python", "python")]
    trt_dir = entries[0].path
    config = parse_config(trt_dir)
    assert config.platform == "tensorrt_plan"
    assert config.default_model_filename == "tiny.engine"
    assert config.max_batch_size == 16  # from the engine's profiles, not the ONNX file's range
    assert list(config.input[0].dims) == [3, -1, -1]
    assert (config.output[0].data_type, list(config.output[0].dims)) == (model_config_pb2.TYPE_FP16, [10])
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert json.loads(parameters(config)["vitdeploy.shape_range"]) == {"batch": [1, 16], "height": [16, 48],
                                                                        "width": [16, 64]}
    assert sorted(p.name for p in (trt_dir / "1").iterdir()) == ["tiny.engine", "tiny.engine.json"]
    assert EngineManifest.read(trt_dir / "1" / "tiny.engine.json").engine_sha256 == sha256_file(engine)
    header = (trt_dir / "config.pbtxt").read_text().splitlines()
    trt_line = next(line for line in header if line.startswith("# TensorRT:"))
    assert "tritonserver:25.10-trtllm-python-py3 (TensorRT 10.11.0.33)" in trt_line
    assert not entries[0].warnings
    # The python model runs the ONNX the engine was built from, with that file's validated batch range.
    python = parse_config(entries[1].path)
    assert python.max_batch_size == 8 and parameters(python)["vitdeploy.artifact"] == "tiny.onnx"

    assert main(["triton", str(engine), "-o", str(tmp_path / "repo2"), "--kinds", "tensorrt"]) == 0
    assert capsys.readouterr().out.startswith("tiny_tensorrt  tensorrt model, max_batch_size 16")


def test_engine_without_a_known_release_warns_and_batch_gap_warns(tmp_path, capsys) -> None:
    engine = fake_engine(tmp_path, tiny_served_onnx(), tensorrt_version="10.99.1.2", min_batch=2)
    (entry,) = write_repository([engine], tmp_path / "repo", RepositoryOptions(kinds=("tensorrt",)))
    assert any("no Triton release in vitdeploy's table ships TensorRT 10.99.1.2" in w for w in entry.warnings)
    assert any("start at batch 2" in w for w in entry.warnings)
    assert "Frameworks Support Matrix" in (entry.path / "config.pbtxt").read_text()
    assert main(["triton", str(engine), "-o", str(tmp_path / "repo2"), "--kinds", "tensorrt"]) == 0
    assert "warning: tiny_tensorrt: no Triton release" in capsys.readouterr().err


def test_release_table_has_sources_and_version_compatible_engines_match_newer_releases(tmp_path) -> None:
    releases = known_releases()
    assert releases and all(r.source.startswith("https://") and r.tensorrt[0].isdigit() for r in releases)
    exact = EngineManifest.read(manifest_path_for(fake_engine(tmp_path, tiny_served_onnx(), "10.8.0.43")))
    assert [r.release for r in matching_releases(exact)] == ["25.02", "25.01"]
    compatible = EngineManifest.read(manifest_path_for(
        fake_engine(tmp_path, tiny_served_onnx(), "10.8.0.43", version_compatible=True)))
    newer = [r.release for r in matching_releases(compatible)]
    assert "26.07" in newer and "25.01" in newer and "24.12" not in newer


def test_python_model_needs_the_engines_onnx(tmp_path) -> None:
    copy = tmp_path / "elsewhere" / "tiny.onnx"
    copy.parent.mkdir()
    copy.write_bytes(tiny_served_onnx().read_bytes())
    engine = fake_engine(tmp_path, copy)
    copy.write_bytes(b"changed after the build")  # sha256 no longer matches the manifest
    entries = write_repository([engine], tmp_path / "repo")
    assert [e.kind for e in entries] == ["tensorrt"]
    assert any("no python model" in w for w in entries[0].warnings)
    with pytest.raises(ValueError, match=r"cannot be served as \['python'\]"):
        write_repository([engine], tmp_path / "repo3", RepositoryOptions(kinds=("python",)))


def test_bad_inputs_are_one_line_errors_and_leave_nothing_behind(tmp_path, capsys) -> None:
    onnx_path = tiny_served_onnx()
    repo = tmp_path / "repo"
    write_repository([onnx_path], repo)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cases = [
        (["triton", str(onnx_path), "-o", str(repo)], "already holds model(s) ['tiny_python', 'tiny_onnxruntime']"),
        (["triton", str(onnx_path), "-o", str(repo), "--max-batch", "9", "--overwrite"], "--max-batch 9 is above"),
        (["triton", str(onnx_path), "-o", str(repo), "--kinds", "python,jax"], "model kinds ['jax'] are not among"),
        (["triton", str(onnx_path), "-o", str(repo), "--name", "bad name"], "model name 'bad name' must start"),
        (["triton", str(onnx_path), str(onnx_path), "-o", str(repo), "--name", "x"], "needs exactly one artifact"),
        (["triton", str(tmp_path / "missing.onnx"), "-o", str(repo)], "does not exist"),
        (["triton", str(onnx_path.with_suffix(".txt")), "-o", str(repo)], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("vitdeploy triton: error: ") and message in err and "\n" not in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no staging folder or partial model left

    not_artifact = tmp_path / "notes.txt"
    not_artifact.write_text("hello")
    with pytest.raises(ValueError, match="neither an ONNX file"):
        write_repository([not_artifact], tmp_path / "other")


def test_overwrite_replaces_models_whole(tmp_path) -> None:
    repo = tmp_path / "repo"
    write_repository([tiny_served_onnx()], repo, RepositoryOptions(max_batch=2))
    (repo / "tiny_python" / "1" / "stale.txt").write_text("from the earlier write")
    write_repository([tiny_served_onnx()], repo, RepositoryOptions(overwrite=True, max_batch=3))
    assert parse_config(repo / "tiny_python").max_batch_size == 3
    assert not (repo / "tiny_python" / "1" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_text_format_writer_escapes_strings_for_protobuf() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t unicode é ✓ bell \x07'
    text = to_text({"name": tricky, "max_batch_size": 3, "input": [{"name": "a", "data_type": Enum("TYPE_FP16"),
                                                                   "dims": [3, -1, -1]}],
                    "parameters": [{"key": "k", "value": {"string_value": tricky}}]}, header=["two\nlines"])
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == tricky and config.parameters["k"].string_value == tricky
    assert list(config.input[0].dims) == [3, -1, -1] and config.input[0].data_type == model_config_pb2.TYPE_FP16
    assert text.startswith("# two\n# lines\n")
    with pytest.raises(ValueError, match="not an identifier"):
        Enum("TYPE FP32")


def test_config_comments_tell_the_validated_range_from_the_declared_one(tmp_path) -> None:
    import shutil

    from onnx_artifacts import attach_metadata

    onnx_path = Path(shutil.copy(tiny_served_onnx(), tmp_path / "tiny.onnx"))
    metadata = read_onnx_metadata(onnx_path)
    metadata.validation = {"passed": True, "shapes": [[1, 16, 16], [2, 40, 24], [1, 64, 64]]}
    metadata.variants = {}
    attach_metadata(onnx_path, metadata)
    (entry,) = write_repository([onnx_path], tmp_path / "repo", RepositoryOptions(kinds=("onnxruntime",)))
    comments = [line for line in (entry.path / "config.pbtxt").read_text().splitlines() if line.startswith("#")]
    assert ("# Shapes: validated: batch 1..2, 16..64; declared: batch 1..8, 16..64; served: batch 1..2, 16..64, "
            "the validated range.") in comments
    config = parse_config(entry.path)
    assert config.max_batch_size == 2 and not entry.warnings  # what was validated, not what the graph declares
    assert json.loads(parameters(config)["vitdeploy.shape_range"])["batch"] == [1, 2]
    assert parameters(config)["vitdeploy.shape_range_source"] == "validated"
    with pytest.raises(ValueError, match="above the batch size tiny.onnx was validated .* 2; --beyond-validated"):
        write_repository([onnx_path], tmp_path / "repo-8", RepositoryOptions(kinds=("onnxruntime",), max_batch=8))
    # The explicit override serves the declared range, warns, and says so in the config.
    (wide,) = write_repository([onnx_path], tmp_path / "repo-wide",
                               RepositoryOptions(kinds=("onnxruntime",), beyond_validated=True, ort_tensorrt=True))
    wide_config = parse_config(wide.path)
    assert wide_config.max_batch_size == 8 and parameters(wide_config)["vitdeploy.shape_range_source"] == "declared"
    assert any("beyond the validated range" in warning for warning in wide.warnings)
    assert ("# Shapes: validated: batch 1..2, 16..64; declared: batch 1..8, 16..64; served: batch 1..8, 16..64, the "
            "DECLARED range, beyond the validated one (--beyond-validated).") in (wide.path / "config.pbtxt").read_text()

    engine = fake_engine(tmp_path, onnx_path)
    (trt,) = write_repository([engine], tmp_path / "repo-trt", RepositoryOptions(kinds=("tensorrt",)))
    comments = (trt.path / "config.pbtxt").read_text()
    assert ("# Shapes: validated (ONNX parity): batch 1..2, 16..64; engine profiles: batch 1..16, height 16..48, "
            "width 16..64.") in comments


def test_cli_serves_a_real_export_over_its_validated_range(tmp_path_factory, capsys) -> None:
    """`vitdeploy triton` on an export declared for batch 1..8 whose parity covered 1..2."""
    from onnx_artifacts import validated_tiny_export

    onnx_path = validated_tiny_export(tmp_path_factory.mktemp("validated"), batch=(1, 8), validation_max_batch=2)
    repo = tmp_path_factory.mktemp("repos")
    assert main(["triton", str(onnx_path), "-o", str(repo / "a"), "--kinds", "onnxruntime", "--ort-tensorrt"]) == 0
    captured = capsys.readouterr()
    assert "validated_onnxruntime  onnxruntime model, max_batch_size 2" in captured.out and "warning" not in captured.err
    config = parse_config(repo / "a" / "validated_onnxruntime")
    accelerator = dict(config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert accelerator["trt_profile_max_shapes"] == "pixel_values:2x3x64x64"
    assert "# Shapes: validated: batch 1..2, 16..64" in (repo / "a" / "validated_onnxruntime" / "config.pbtxt").read_text()
    assert main(["triton", str(onnx_path), "-o", str(repo / "b"), "--kinds", "onnxruntime", "--beyond-validated"]) == 0
    captured = capsys.readouterr()
    assert "max_batch_size 8" in captured.out
    assert "[vitdeploy] warning: validated_onnxruntime: beyond the validated range" in captured.err
