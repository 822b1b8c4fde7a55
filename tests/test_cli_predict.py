"""`vitdeploy predict` on a real exported ONNX file and real photographs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings

import numpy as np
import pytest
from conftest import make_model, tiny_config
from onnx_artifacts import export_onnx, make_metadata

from vitdeploy.cli import predict
from vitdeploy.cli.common import CLIError
from vitdeploy.preprocessing import bundled_images, preprocess_batch
from vitdeploy.runtimes import OrtRuntime

LABELS = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def labelled_onnx(tmp_path_factory):
    config = tiny_config(labels=LABELS)
    return export_onnx(make_model(config), tmp_path_factory.mktemp("predict") / "tiny.onnx",
                       make_metadata(config, labels=LABELS))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    predict.register(parser.add_subparsers())
    return parser.parse_args(["predict", *argv])


def expected_probabilities(onnx_path) -> np.ndarray:
    with OrtRuntime(onnx_path) as rt:
        logits = rt(preprocess_batch(bundled_images(), rt.metadata.preprocessing)).astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_prints_top_k_with_labels_and_writes_json(labelled_onnx, tmp_path, capsys):
    images = [str(p) for p in bundled_images()]
    out_json = tmp_path / "out" / "predictions.json"
    args = parse(str(labelled_onnx), *images, "--top-k", "3", "--json", str(out_json))
    assert args.func(args) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert len(stdout) == len(images) * 4
    probabilities = expected_probabilities(labelled_onnx)
    report = json.loads(out_json.read_text())
    assert report["runtime"] == "onnxruntime" and len(report["predictions"]) == len(images)
    for row, (image, prediction) in enumerate(zip(images, report["predictions"], strict=True)):
        assert stdout[row * 4] == image and prediction["image"] == image
        best = np.argsort(-probabilities[row])[:3]
        assert [entry["index"] for entry in prediction["top_k"]] == best.tolist()
        assert [entry["label"] for entry in prediction["top_k"]] == [LABELS[i] for i in best]
        np.testing.assert_allclose([e["probability"] for e in prediction["top_k"]], probabilities[row, best], rtol=1e-6)
        first = stdout[row * 4 + 1].split()
        assert first[0] == "1." and first[2] == LABELS[best[0]]
        assert float(first[1]) == pytest.approx(probabilities[row, best[0]], abs=5e-5)


def test_without_labels_shows_class_indices_and_clamps_k(tmp_path, capsys):
    config = tiny_config()
    path = export_onnx(make_model(config), tmp_path / "nolabels.onnx", make_metadata(config))
    image = str(bundled_images()[0])
    args = parse(str(path), image, "--top-k", "25")
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + config.num_classes  # k clamped to the 10 classes
    assert sorted(line.split()[2] for line in lines[1:]) == sorted(str(i) for i in range(config.num_classes))
    total = sum(float(line.split()[1]) for line in lines[1:])
    assert total == pytest.approx(1.0, abs=1e-3)


def test_bad_inputs_give_one_line_errors(labelled_onnx, tmp_path, capsys):
    image = str(bundled_images()[0])
    from vitdeploy.cli import main

    assert main(["predict", str(labelled_onnx), image, "--top-k", "0"]) == 2  # refused while parsing
    assert capsys.readouterr().err.strip() == ("vitdeploy predict: error: argument --top-k: must be an integer >= 1, "
                                               "got 0 (see vitdeploy predict --help)")
    with pytest.raises(CLIError, match="artifact '.*nothing.onnx' does not exist"):
        args = parse(str(tmp_path / "nothing.onnx"), image)
        args.func(args)
    with pytest.raises(CLIError, match="--provider tensorrt does not apply to a torch artifact"):
        args = parse("vit_tiny_patch16_224", image, "--provider", "tensorrt")
        args.func(args)


def test_predicts_with_the_eager_model_from_a_variant_name(capsys):
    image = str(bundled_images()[0])
    args = parse("vit_tiny_patch16_224", image, "--top-k", "2", "--provider", "cpu")
    with pytest.warns(UserWarning, match="vit_tiny_patch16_224 is a variant name, not a checkpoint: its weights are RANDOM"):
        assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == image and len(lines) == 3
    assert float(lines[1].split()[1]) >= float(lines[2].split()[1])


def test_main_reports_a_bad_image_in_one_line_with_status_2(labelled_onnx, tmp_path, capsys):
    from vitdeploy.cli import main

    try:
        status = main(["predict", str(labelled_onnx), str(tmp_path / "gone.jpg")])
    except ModuleNotFoundError as error:  # another command's module is not written yet
        pytest.skip(f"vitdeploy CLI incomplete: {error}")
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[vitdeploy] ")]  # progress
    assert status == 2
    assert len(err) == 1 and err[0].startswith("vitdeploy predict: error: image") and "gone.jpg" in err[0]


def test_several_images_give_results_for_the_good_ones_and_one_line_per_bad_one(labelled_onnx, tmp_path, capsys):
    photos = [str(p) for p in bundled_images()[:2]]
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    bad = {str(tmp_path / "gone.jpg"): "image '{}' does not exist",
           str(tmp_path / "notes.png"): "'{}' is not an image Pillow can read",
           str(tmp_path / "empty.jpg"): "'{}' is not an image Pillow can read",
           str(tmp_path / "folder.jpg"): "image '{}' is a folder, not an image file"}
    images = [photos[0], *bad, photos[1]]
    out_json = tmp_path / "p.json"
    args = parse(str(labelled_onnx), *images, "--top-k", "2", "--json", str(out_json))
    assert args.func(args) == 2
    captured = capsys.readouterr()
    stdout = captured.out.splitlines()
    assert stdout[0] == photos[0] and stdout[3] == photos[1] and len(stdout) == 6
    errors = [line for line in captured.err.splitlines() if not line.startswith("[vitdeploy] ")]
    assert len(errors) == len(bad)
    for line, (path, message) in zip(errors, bad.items(), strict=True):
        assert line.startswith("vitdeploy predict: error: " + message.format(path)), line
    predictions = json.loads(out_json.read_text())["predictions"]
    assert [p["image"] for p in predictions] == images
    assert [("error" in p) for p in predictions] == [False, True, True, True, True, False]
    # The good images get what they get alone.
    alone = parse(str(labelled_onnx), *photos, "--top-k", "2", "--json", str(tmp_path / "alone.json"))
    assert alone.func(alone) == 0
    expected = json.loads((tmp_path / "alone.json").read_text())["predictions"]
    assert [predictions[0], predictions[-1]] == expected


def test_says_which_runtime_and_graph_ran_and_at_what_size(tmp_path, capsys):
    from serving_artifacts import tiny_served_onnx  # the session's export with its onnxruntime-CPU variant

    onnx_path = tiny_served_onnx()
    image = str(bundled_images()[0])
    args = parse(str(onnx_path), image, "--json", str(tmp_path / "p.json"))
    assert args.func(args) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[vitdeploy] ")]
    assert progress == ["[vitdeploy] onnxruntime (CPUExecutionProvider) ran tiny.cpu.onnx "
                        "(its validated onnxruntime-cpu variant), fp32, input 3x32x32"]
    ran = json.loads((tmp_path / "p.json").read_text())["ran"]
    assert ran["graph"] == str(onnx_path.with_name("tiny.cpu.onnx")) and ran["input"] == [3, 32, 32]
    assert ran["random_weights"] is False


def test_warns_when_the_artifact_has_random_weights(labelled_onnx, tmp_path, capsys):
    import shutil

    from onnx_artifacts import attach_metadata

    from vitdeploy.metadata import read_onnx_metadata

    image = str(bundled_images()[0])
    args = parse(str(labelled_onnx), image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint's export: no warning
        assert args.func(args) == 0
    random = shutil.copy(labelled_onnx, tmp_path / "random.onnx")
    metadata = read_onnx_metadata(random)
    metadata.source, metadata.source_format = "vit_tiny_patch16_224", "variant"
    attach_metadata(random, metadata)
    args = parse(str(random), image)
    with pytest.warns(UserWarning, match="random.onnx was exported from the variant name 'vit_tiny_patch16_224': "
                                         "its weights are RANDOM"):
        assert args.func(args) == 0


@pytest.mark.skipif(not importlib.util.find_spec("openvino"), reason="openvino (the openvino extra) is not installed")
def test_a_tuned_folder_names_the_backend_precision_hint_and_file_that_ran(labelled_onnx, tmp_path, capsys):
    """tune.json chose OpenVINO with a precision hint: predict says so, not "tuned ... fp32"."""
    import shutil

    from vitdeploy.cpu_features import has_bf16
    from vitdeploy.files import sha256_file
    from vitdeploy.tune_manifest import Choice, TuneManifest, write_manifest

    folder = tmp_path / "tuned"
    folder.mkdir()
    shutil.copy(labelled_onnx, folder / "tiny.onnx")
    hint = "bf16" if has_bf16() else "f32"
    name = f"openvino-{'bf16' if hint == 'bf16' else 'fp32'}"
    write_manifest(folder, TuneManifest(
        chosen=Choice(name, "openvino", "tiny.onnx", sha256_file(folder / "tiny.onnx"), {"inference_precision": hint}),
        candidates=[], cpu={}, gate={}, objective="latency: p50", batches=[1], rounds=1, reference="eager fp32"))
    args = parse(str(folder), str(bundled_images()[0]), "--json", str(tmp_path / "p.json"))
    assert args.func(args) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[vitdeploy] ")]
    assert progress == [f"[vitdeploy] tune's choice {name}: openvino (CPU) ran tiny.onnx, fp32 graph at inference "
                        f"precision {hint}, input 3x32x32"]
    ran = json.loads((tmp_path / "p.json").read_text())["ran"]
    assert (ran["runtime"], ran["tuned_choice"], ran["precision_hint"]) == ("openvino", name, hint)
    assert ran["graph"] == str(folder / "tiny.onnx")
