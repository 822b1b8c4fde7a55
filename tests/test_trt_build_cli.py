"""``vitdeploy build`` end to end through its ``run()``: --print-trtexec and the "TensorRT missing" path.

Neither needs TensorRT. To be deterministic on a machine that has TensorRT, the missing-TensorRT
test hides the module (``sys.modules["tensorrt"] = None`` makes ``import tensorrt`` fail).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import pytest
from trt_artifacts import tiny_onnx
from trt_double import Doubles

from vitdeploy.cli import build as build_cli
from vitdeploy.cli.common import CLIError


def run_build(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vitdeploy")
    build_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build", *argv])
    return args.func(args)


def main(argv: list[str]) -> int:
    from vitdeploy import cli

    return cli.main(argv)


@pytest.fixture(scope="module")
def onnx_path():
    return tiny_onnx()


def test_print_trtexec_from_metadata_defaults(onnx_path, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # must not need TensorRT
    engine = tmp_path / "m.engine"
    assert run_build([str(onnx_path), "-o", str(engine), "--print-trtexec"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv == [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}", "--stronglyTyped",
        "--minShapes=pixel_values:1x3x16x16", "--optShapes=pixel_values:1x3x32x32",
        "--maxShapes=pixel_values:8x3x64x64", "--profilingVerbosity=detailed",
        f"--exportLayerInfo={engine}.layers.json", "--skipInference",
    ]
    assert not engine.exists()


def test_print_trtexec_with_profiles_and_options(onnx_path, tmp_path, capsys) -> None:
    argv = [str(onnx_path), "-o", str(tmp_path / "m.engine"), "--print-trtexec", "--batch", "1:4:8",
            "--profile", "res=16:16:32", "--profile", "res=48:64:64", "--workspace", "2G", "--opt-level", "5",
            "--timing-cache", str(tmp_path / "cache.bin"), "--hardware-compat", "ampere+", "--version-compatible",
            "--verbose"]
    assert run_build(argv) == 0
    printed = shlex.split(capsys.readouterr().out.strip())
    assert printed[printed.index("--profile=0") + 1:printed.index("--profile=1")] == [
        "--minShapes=pixel_values:1x3x16x16", "--optShapes=pixel_values:4x3x16x16", "--maxShapes=pixel_values:8x3x32x32"]
    for flag in ("--memPoolSize=workspace:2G", "--builderOptimizationLevel=5", f"--timingCacheFile={tmp_path / 'cache.bin'}",
                 "--hardwareCompatibilityLevel=ampere+", "--versionCompatible", "--verbose"):
        assert flag in printed


def test_print_trtexec_for_fp16_converts_the_graph_and_says_so(onnx_path, tmp_path, capsys) -> None:
    engine = tmp_path / "h.engine"
    assert run_build([str(onnx_path), "-o", str(engine), "--precision", "fp16", "--print-trtexec"]) == 0
    captured = capsys.readouterr()
    converted = tmp_path / "h.fp16.onnx"
    assert f"--onnx={converted}" in shlex.split(captured.out.strip())
    assert "converting the fp32 graph" in captured.err and str(converted) in captured.err
    from vitdeploy.exporters.trt_plan import read_onnx_info

    assert read_onnx_info(converted).input_name == "pixel_values"


def test_bad_shapes_are_refused_before_tensorrt_is_needed(onnx_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ValueError, match="not a multiple of the patch stride 8"):
        run_build([str(onnx_path), "-o", str(tmp_path / "m.engine"), "--resolution", "20:32:64"])
    assert main(["build", str(onnx_path), "--batch", "1:x:8"]) == 2  # refused when parsed (tests/test_cli_parsing.py)


def test_missing_tensorrt_is_one_line_pointing_to_print_trtexec(onnx_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    with pytest.raises(CLIError) as caught:
        run_build([str(onnx_path), "-o", str(engine)])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("TensorRT is not installed here")
    assert "pip install 'vitdeploy[gpu]'" in message and "--print-trtexec" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_gpu_is_one_line(onnx_path, tmp_path, monkeypatch) -> None:
    Doubles(device_count=0).install(monkeypatch)  # TensorRT "imports" (test double) but no CUDA device
    with pytest.raises(CLIError, match=r"^no CUDA GPU is visible .*\(cudaGetDeviceCount failed: cudaErrorNoDevice"):
        run_build([str(onnx_path), "-o", str(tmp_path / "m.engine")])
    assert list(tmp_path.iterdir()) == []


def test_build_with_the_double_writes_engine_and_manifest(onnx_path, tmp_path, monkeypatch, capsys) -> None:
    Doubles().install(monkeypatch)
    engine = tmp_path / "m.engine"
    assert run_build([str(onnx_path), "-o", str(engine), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(engine)
    assert "TensorRT 10.13.0.35 on Fake GPU (test double)" in captured.err
    assert engine.is_file() and (tmp_path / "m.engine.json").is_file()


def test_main_exits_2_with_one_line(onnx_path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build", str(onnx_path), "-o", str(tmp_path / "m.engine")]) == 2
    # tiny_onnx() was exported with --no-validate: a "[vitdeploy] warning:" line says its declared range is used.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[vitdeploy] ")]
    assert len(err) == 1 and err[0].startswith("vitdeploy build: error: TensorRT is not installed here")


def test_inspect_shows_layers_and_attention_fusion(tmp_path, monkeypatch, capsys) -> None:
    from vitdeploy.cli import inspect as inspect_cli

    Doubles().install(monkeypatch)
    engine = tmp_path / "h.engine"
    assert run_build([str(tiny_onnx("fp16")), "-o", str(engine), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: TensorRT did not fuse attention in this fp16 engine (try --softmax fp16" in err
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # inspect reads files only

    def inspect(*extra: str) -> str:
        parser = argparse.ArgumentParser(prog="vitdeploy")
        inspect_cli.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["inspect", str(engine), *extra])
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = inspect()
    assert "attention    : fused? no: no fused attention kernel" in out and "2 separate softmax layer(s)" in out
    assert "layers       : " in out and "--layers lists them" in out
    listed = inspect("--layers", "--json", str(tmp_path / "r.json"))
    assert "Softmax" in listed and "Normalization" in listed
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["artifact"]["attention"]["fused"] is False and len(report["artifact"]["layers"]) > 10
    engine_fused = tmp_path / "f.engine"
    monkeypatch.undo()
    Doubles().install(monkeypatch)
    assert run_build([str(tiny_onnx("fp16")), "-o", str(engine_fused), "--no-progress", "--softmax", "fp16"]) == 0
    assert "did not fuse" not in capsys.readouterr().err
    engine = engine_fused
    assert "attention    : fused? yes: 2 fused attention layer(s) for 2 attention block(s)" in inspect()


def test_precision_and_softmax_choices(onnx_path, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="a int8 engine cannot be built from it: quantize it first"):
        run_build([str(onnx_path), "-o", str(tmp_path / "q.engine"), "--precision", "int8", "--print-trtexec"])
    with pytest.raises(ValueError, match="--softmax fp16 applies to fp16 engines"):
        run_build([str(onnx_path), "-o", str(tmp_path / "s.engine"), "--softmax", "fp16", "--print-trtexec"])
    engine = tmp_path / "s.engine"
    assert run_build([str(onnx_path), "-o", str(engine), "--precision", "fp16", "--softmax", "fp16",
                      "--print-trtexec"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    rewritten = tmp_path / "s.fp16-softmax.onnx"
    assert argv[1] == f"--onnx={rewritten}" and rewritten.is_file()  # rewritten, parity-checked, kept for trtexec
    assert "--int8" not in argv and "--fp16" not in argv and "--stronglyTyped" in argv


@pytest.fixture(scope="module")
def validated_onnx(tmp_path_factory):
    """A real export declared for batch 1..8 whose parity check covered batch 1..2 (and sizes 16..64)."""
    from onnx_artifacts import validated_tiny_export

    return validated_tiny_export(tmp_path_factory.mktemp("validated"), batch=(1, 8), validation_max_batch=2)


def test_profiles_come_from_the_validated_range_not_the_declared_one(validated_onnx, tmp_path, capsys,
                                                                      monkeypatch) -> None:
    from vitdeploy.metadata import read_onnx_metadata

    metadata = read_onnx_metadata(validated_onnx)
    assert metadata.shape_range.batch == (1, 8) and metadata.validated_range.batch == (1, 2)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "v.engine"
    assert run_build([str(validated_onnx), "-o", str(engine), "--print-trtexec"]) == 0
    captured = capsys.readouterr()
    argv = shlex.split(captured.out.strip())
    assert "--minShapes=pixel_values:1x3x16x16" in argv and "--maxShapes=pixel_values:2x3x64x64" in argv
    assert "warning" not in captured.err

    # A batch beyond the validated 2 is refused, naming the override; with it, the declared range is allowed, warned.
    with pytest.raises(ValueError, match=r"batch 1\.\.8 is outside the range 1\.\.2 .*--beyond-validated builds up "
                                         r"to the declared range \(batch 1\.\.8, 16\.\.64\)"):
        run_build([str(validated_onnx), "-o", str(engine), "--print-trtexec", "--batch", "1:1:8"])
    assert run_build([str(validated_onnx), "-o", str(engine), "--print-trtexec", "--beyond-validated"]) == 0
    captured = capsys.readouterr()
    assert "--maxShapes=pixel_values:8x3x64x64" in shlex.split(captured.out.strip())
    assert "[vitdeploy] warning: beyond the validated range: using validated.onnx's declared range (batch 1..8, " \
           "16..64) although only batch 1..2, 16..64 was validated" in captured.err


def test_the_override_is_recorded_in_the_engine_manifest(validated_onnx, tmp_path, monkeypatch, capsys) -> None:
    from vitdeploy.engine_manifest import EngineManifest, manifest_path_for

    Doubles().install(monkeypatch)
    plain, wide = tmp_path / "plain.engine", tmp_path / "wide.engine"
    assert run_build([str(validated_onnx), "-o", str(plain), "--no-progress"]) == 0
    assert run_build([str(validated_onnx), "-o", str(wide), "--no-progress", "--beyond-validated"]) == 0
    plain_manifest = EngineManifest.read(manifest_path_for(plain))
    wide_manifest = EngineManifest.read(manifest_path_for(wide))
    assert [p.max for p in plain_manifest.profiles] == [(2, 3, 64, 64)]
    assert plain_manifest.build_options["beyond_validated"] is False
    assert [p.max for p in wide_manifest.profiles] == [(8, 3, 64, 64)]
    assert wide_manifest.build_options["beyond_validated"] is True
