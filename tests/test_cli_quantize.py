"""int8/fp8 end to end on a real labelled data set: the small ViT trained on scikit-learn's digits,
exported, quantized (`vitdeploy quantize`, `vitdeploy export --precision int8`) and verified for accuracy
(`vitdeploy verify --labelled`) on onnxruntime and OpenVINO; and the commands' one-line errors."""

from __future__ import annotations

import json

import pytest
from digits import WEIGHTS, write_image_folder

from vitdeploy.cli import main
from vitdeploy.cpu_features import int8_dot_flags
from vitdeploy.metadata import CPU_FUSION, CPU_VARIANT, read_onnx_metadata

pytest.importorskip("sklearn")
# 7-bit weights where the CPU has no VNNI/AMX (OpenVINO's int8 sums saturate there otherwise).
REDUCE = [] if int8_dot_flags() else ["--reduce-range"]


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    test_images = write_image_folder(root / "test", "test")
    calibration = write_image_folder(root / "calibration", "train", limit=200)
    fp32 = root / "digits.onnx"
    assert main(["export", str(WEIGHTS), "-o", str(fp32), "--batch", "1:64", "--resolution", "32:32"]) == 0
    int8 = root / "digits-int8.onnx"
    assert main(["quantize", str(fp32), "-o", str(int8), "--calibration", str(calibration),
                 "--calibration-size", "64", *REDUCE]) == 0
    return {"root": root, "test": test_images, "calibration": calibration, "fp32": fp32, "int8": int8}


def _accuracy(files, artifact, *extra):
    out = files["root"] / f"{artifact.stem}-{'-'.join(extra) or 'ort'}.json"
    status = main(["verify", str(artifact), "--reference", str(WEIGHTS), "--labelled", str(files["test"]),
                   "--json", str(out), *extra])
    return status, json.loads(out.read_text())


def test_int8_stays_within_one_point_of_fp32_on_digits(digits_files, capsys):
    status, report = _accuracy(digits_files, digits_files["int8"], "--max-accuracy-drop", "1")
    assert status == 0, report["failures"]
    assert report["images"] == 360
    assert report["accuracy"]["reference"]["top1"] >= 0.9  # the model really learned the digits
    assert report["top1_drop_points"] <= 1.0
    assert report["parity"]["cosine"] >= 0.99
    printed = capsys.readouterr().out
    assert "accuracy on 360 labelled images" in printed and "drop (points)" in printed
    metadata = read_onnx_metadata(digits_files["int8"])
    record = next(t for t in metadata.transforms if t["name"] == "quantize")
    assert metadata.precision == "int8" and metadata.validation["passed"] is True
    assert record["calibration"]["count"] == 64 and record["calibration"]["source"] == str(digits_files["calibration"])
    # quantize writes the validated onnxruntime-CPU variant beside the file (what the accuracy above ran on).
    variant = digits_files["int8"].with_name("digits-int8.cpu.onnx")
    assert metadata.variants[CPU_VARIANT]["file"] == variant.name
    variant_metadata = read_onnx_metadata(variant)
    assert variant_metadata.precision == "int8" and variant_metadata.validation["passed"] is True
    assert variant_metadata.validation["reference"] == metadata.validation["reference"] == "digits.onnx (fp32 graph)"
    assert any(t["name"] == CPU_FUSION for t in variant_metadata.transforms)


def test_int8_accuracy_on_openvino(digits_files):
    pytest.importorskip("openvino")
    status, report = _accuracy(digits_files, digits_files["int8"], "--backend", "openvino", "--max-accuracy-drop", "1")
    assert status == 0, report["failures"]
    assert report["runtime"] == "openvino" and report["top1_drop_points"] <= 1.0


def test_fp32_artifact_accuracy_equals_eager(digits_files):
    status, report = _accuracy(digits_files, digits_files["fp32"])
    assert status == 0 and report["top1_drop_points"] == 0.0 and report["parity"]["rel_max_error"] < 1e-4


def test_fp8_emulation_accuracy_and_labels_file(digits_files):
    fp8 = digits_files["root"] / "digits-fp8.onnx"
    assert main(["quantize", str(digits_files["fp32"]), "-o", str(fp8), "--precision", "fp8",
                 "--calibration", str(digits_files["calibration"]), "--calibration-size", "32"]) == 0
    metadata = read_onnx_metadata(fp8)
    assert metadata.precision == "fp8" and metadata.opset >= 19
    listed = sorted(digits_files["test"].rglob("*.png"))[::4]
    labels = digits_files["root"] / "labels.txt"
    labels.write_text("# path label\n" + "".join(f"{p.relative_to(digits_files['test'])} {p.parent.name}\n"
                                                 for p in listed))
    out = digits_files["root"] / "fp8.json"
    status = main(["verify", str(fp8), "--reference", str(WEIGHTS), "--labels", str(labels),
                   "--labelled", str(digits_files["test"]), "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0 and report["images"] == len(listed)
    assert report["top1_drop_points"] <= 2.0 and report["tolerance"]["name"] == "fp8_vs_fp32"


def test_export_precision_int8(digits_files):
    out = digits_files["root"] / "exported-int8.onnx"
    report = digits_files["root"] / "export.json"
    assert main(["export", str(WEIGHTS), "-o", str(out), "--batch", "1:8", "--resolution", "32:32",
                 "--precision", "int8", "--calibration", str(digits_files["calibration"]),
                 "--calibration-size", "32", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["precision"] == "int8"
    assert data["quantization"]["quantized_nodes"]["MatMul"] > 0
    references = data["validation"]["cases"]
    assert {case["reference"] for case in references} == {"eager fp32"}
    assert {case["tolerance"]["name"] for case in references} == {"int8_vs_fp32"}
    # Beside it, its validated onnxruntime-CPU variant (int8 linear layers kept, attention and GELU fused).
    assert data["cpu_variant"] == str(out.with_name("exported-int8.cpu.onnx"))
    assert data["cpu_variant_validation"]["passed"]


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{int8}", "-o", "{root}/x.onnx"], "is an int8 graph; quantize the fp32 export"),
    (["quantize", "{fp32}", "-o", "{root}/x.txt"], "must end in .onnx"),
    (["quantize", "{fp32}", "-o", "{root}/x.onnx", "--calibration", "{root}/missing"], "is not a folder"),
    (["quantize", "{fp32}", "-o", "{root}/x.onnx", "--keep-float", "Attention"],
     "argument --keep-float: unknown role(s) Attention; expected some of Conv"),
    (["export", "vit_tiny_patch16_224", "-o", "{root}/x.onnx", "--calibration", "{root}"], "applies to --precision int8"),
    (["export", "vit_tiny_patch16_224", "-o", "{root}/x.onnx", "--fp32-ops", "Gelu"],
     "argument --fp32-ops: unknown op(s) Gelu; expected some of LayerNormalization, Softmax"),
    (["export", "vit_tiny_patch16_224", "-o", "{root}/x.onnx", "--fp16-io"], "--fp16-io applies to --precision fp16"),
    (["quantize", "{fp32}", "-o", "{root}/x.onnx", "--smooth-alpha", "2"],
     "argument --smooth-alpha: must be a strength in [0, 1]"),
    (["quantize", "{fp32}", "-o", "{root}/x.onnx", "--percentile", "40"],
     "argument --percentile: must be a percentile in (50, 100]"),
    (["verify", "{fp32}", "--reference", "vit_tiny_patch16_224", "--max-accuracy-drop", "1"], "needs --labelled"),
])
def test_one_line_errors(digits_files, capsys, argv, message):
    argv = [a.format(**{k: str(v) for k, v in digits_files.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"vitdeploy {argv[0]}: error:") and message in err, err
