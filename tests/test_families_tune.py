"""`vitdeploy tune` on the RoPE families, end to end from a checkpoint: a tiny DINOv3 and a tiny EVA-02
(one block; timm Hub folders, weights perturbed as the parity tests perturb them) are exported, quantized, timed
(one round, onnxruntime fp32 and int8) and the manifest written; ``runtimes.load`` of the folder runs the
chosen candidate, which agrees with timm's own model on the bundled photos at the native size and at a
non-square one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rope_sources import CASES, save_timm_rope, timm, timm_rope_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.skipif(timm is None, reason="timm is not installed (CI: pip install --no-deps timm)")]


ONE_BLOCK = dict(embed_dim=64, depth=1, num_heads=4)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("case_id", ["dinov3", "eva02"])
def test_tune_runs_on_a_rope_family_and_load_follows_its_manifest(case_id, tmp_path, capsys):
    import vitdeploy.cli as cli
    from vitdeploy import runtimes
    from vitdeploy.exporters.source_check import timm_outputs
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.parity import InputFactory
    from vitdeploy.tune_manifest import read_manifest

    case = CASES[case_id]
    # EVA-02 with one 64-wide head: tests/test_families_cli.py's EVA-02 checkpoint, so one trace serves both
    size = ONE_BLOCK if case_id == "dinov3" else dict(ONE_BLOCK, num_heads=1)
    source = timm_rope_model(case, size=size)
    hub = save_timm_rope(source, case, tmp_path, hub=True, size=size)
    out = tmp_path / "tuned"
    status = cli.main(["tune", str(hub), "-o", str(out), "--batch", "1", "--rounds", "1", "--iterations", "1",
                       "--warmup", "0", "--threads", "1", "--calibration-size", "8", "--no-throughput",
                       "--candidates", "ort-fp32,ort-int8", "-q"])
    assert status == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    records = {record.name: record for record in manifest.candidates}
    assert records["ort-fp32"].status in ("ok", "dropped") and records["ort-int8"].status in ("ok", "dropped")
    assert records["ort-fp32"].latency_ms["1"] > 0 and records["ort-fp32"].accuracy["cosine"] > 0.9999
    assert manifest.chosen.name in ("ort-fp32", "ort-int8") and records[manifest.chosen.name].status == "ok"
    metadata = read_onnx_metadata(out / records["ort-fp32"].artifact)
    assert metadata.model_provenance["family"] == case.family

    photos = InputFactory(metadata.preprocessing, synthetic=False)
    with runtimes.load(out) as runtime:
        assert runtimes.runtime_kind(out) == "tuned" and runtime.path == out / manifest.chosen.artifact
        for size in case.sizes[::2]:  # the native size and the non-square one
            pixels = photos.batch(4, *size)[0]
            got = runtime.run_outputs(pixels)["pooler_output"]
            expected = timm_outputs(source, torch.from_numpy(pixels), ["pooler_output"])["pooler_output"].numpy()
            assert _cosines(got, expected).min() > 0.99, (size, manifest.chosen.name)  # the int8 gate's cosine
