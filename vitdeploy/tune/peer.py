"""The peer ``tune --compare-nncf`` times beside the candidates: OpenVINO + NNCF int8 of the same fp32 file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PEER = "openvino-nncf-int8 (peer)"
DESCRIPTION = "OpenVINO running NNCF int8 (nncf.quantize, ModelType.TRANSFORMER) of the same fp32 file"


def nncf_peer(fp32: Path, calibration: Any, threads: int, max_batch: int, size: int) -> Callable[[np.ndarray], Any]:
    """OpenVINO running NNCF's int8 quantization of the fp32 graph (transformer preset), OpenVINO's
    default inference precision for the rest (a call: the first output; ``run_outputs``: every output);
    raises ImportError without nncf."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32))
    name = model.inputs[0].get_any_name()
    model.reshape({name: ov.PartialShape([ov.Dimension(1, max_batch), 3, size, size])})
    dataset = nncf.Dataset(list(calibration.batches(1)))
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=calibration.count)
    compiled = core.compile_model(quantized, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    return _PeerRun(compiled.create_infer_request(), compiled.outputs)


class _PeerRun:
    """The peer's compiled model: a call returns its first output (what is timed), ``run_outputs`` every
    output by name (what accuracy is judged on, as for the candidates)."""

    def __init__(self, request: Any, outputs: Any) -> None:
        self.request, self.outputs = request, list(outputs)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: pixels})[self.outputs[0]], copy=True)

    def run_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({0: pixels})
        return {output.get_any_name(): np.array(result[output], copy=True) for output in self.outputs}


def timed_peer(fp32: Path, plan: Any, metadata: Any, threads: int, size: int, say: Callable[[str], None]) -> dict[str, Any]:
    """OpenVINO + NNCF int8 of the same fp32 file and calibration images (NNCF's transformer preset),
    timed beside the candidates as the peer to beat; ``run`` is ``None`` (with ``reason``) without nncf."""
    from vitdeploy.calibration import load_calibration
    from vitdeploy.console import error_line

    description = DESCRIPTION
    calibration = load_calibration(plan.calibration, plan.calibration_size, metadata.preprocessing, log=None)
    say(f"quantizing the peer: {description}, {calibration.describe().get('count', plan.calibration_size)} "
        "calibration images")
    try:
        run = nncf_peer(fp32, calibration, threads, metadata.shape_range.batch[1], size)
    except ImportError as error:
        return {"name": PEER, "description": description, "run": None,
                "reason": f"nncf is not installed ({error}); pip install 'vitdeploy[bench]'"}
    except Exception as error:  # noqa: BLE001 - the peer failing leaves the candidates' figures standing
        return {"name": PEER, "description": description, "run": None, "reason": f"NNCF failed: {error_line(error, 300)}"}
    return {"name": PEER, "description": description, "run": run, "calibration": calibration.describe()}
