"""The runtime install has no torch: in the serve venv (``pip install '.[cpu,serve]'``, not editable),
``import torch`` fails, while ``vitdeploy.runtimes.load`` and ``vitdeploy predict`` run an exported ONNX
file on a bundled photo and agree with the eager PyTorch model of this (development) venv.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config
from serving_artifacts import LABELS, SERVE_VENV_REASON, serve_python, tiny_served_onnx

from vitdeploy.metadata import read_onnx_metadata
from vitdeploy.preprocessing import bundled_images, preprocess_batch

pytestmark = pytest.mark.skipif(bool(SERVE_VENV_REASON), reason=SERVE_VENV_REASON)

RUNTIME_SCRIPT = """
import json, sys
import numpy as np
import vitdeploy
from vitdeploy import runtimes
from vitdeploy.preprocessing import preprocess_batch
with runtimes.load(sys.argv[1]) as runtime:
    logits = runtime(preprocess_batch([sys.argv[2]], runtime.metadata.preprocessing))
print(json.dumps({"logits": logits.tolist(), "module": vitdeploy.__file__, "graph": runtime.graph_path.name}))
"""


def run_serve_python(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(serve_python()), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_torch_free_install_runs_the_runtime_and_predict_like_eager(tmp_path) -> None:
    no_torch = run_serve_python("-c", "import torch", cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    onnx_path, photo = tiny_served_onnx(), str(bundled_images()[0])
    model = make_model(tiny_config())  # the weights tiny_served_onnx() was exported from
    pixels = preprocess_batch([photo], read_onnx_metadata(onnx_path).preprocessing)
    with torch.no_grad():
        eager = model(torch.from_numpy(pixels)).numpy().astype(np.float64)

    runtime = run_serve_python("-c", RUNTIME_SCRIPT, str(onnx_path), photo, cwd=tmp_path)
    assert runtime.returncode == 0, runtime.stderr
    answer = json.loads(runtime.stdout)
    assert "site-packages" in answer["module"]  # the installed package, not this checkout
    assert answer["graph"] == "tiny.cpu.onnx"
    scale = np.abs(eager).max()
    assert np.abs(np.asarray(answer["logits"]) - eager).max() / scale < 1e-4

    report = tmp_path / "predict.json"
    predict = run_serve_python("-m", "vitdeploy", "predict", str(onnx_path), photo, "--top-k", "3", "--json",
                               str(report), cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr
    (prediction,) = json.loads(report.read_text())["predictions"]
    probabilities = np.exp(eager[0] - eager[0].max())
    probabilities /= probabilities.sum()
    best = np.argsort(-probabilities)[:3]
    assert [entry["label"] for entry in prediction["top_k"]] == [LABELS[i] for i in best]
    np.testing.assert_allclose([e["probability"] for e in prediction["top_k"]], probabilities[best], rtol=1e-4)

