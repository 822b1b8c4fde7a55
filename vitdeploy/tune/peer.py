"""The peer ``tune --compare-nncf`` times beside the candidates: OpenVINO + NNCF int8 of the same fp32 file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PEER = "openvino-nncf-int8 (peer)"
DESCRIPTION = ("OpenVINO running NNCF int8 (nncf.quantize, ModelType.TRANSFORMER) of the same fp32 file, compiled "
               "for each input shape (static shapes: the peer at its fastest)")


def nncf_quantized(fp32: Path, calibration: Any, max_batch: int, size: int) -> Any:
    """NNCF's int8 quantization (transformer preset, its defaults otherwise) of the fp32 graph, as an
    ``openvino.Model`` taking batch 1..``max_batch`` at ``size``; raises ImportError without nncf."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    name = model.inputs[0].get_any_name()
    model.reshape({name: ov.PartialShape([ov.Dimension(1, max_batch), 3, size, size])})
    dataset = nncf.Dataset(list(calibration.batches(1)))
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=calibration.count)


def compile_static(core: Any, model: Any, shape: tuple[int, ...], config: dict[str, Any]) -> Any:
    """``model`` compiled for the CPU at one input ``shape``."""
    import openvino as ov

    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    return core.compile_model(model, "CPU", config)


def peer_config(threads: int) -> dict[str, Any]:
    """The OpenVINO compile properties the peer runs with (latency hint; its default inference precision)."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}


def nncf_peer(fp32: Path, calibration: Any, threads: int, max_batch: int, size: int) -> Callable[[np.ndarray], Any]:
    """OpenVINO running NNCF's int8 quantization of the fp32 graph (:func:`nncf_quantized`), OpenVINO's
    default inference precision for the rest, compiled for each input shape on first use: a model compiled
    for a batch range ran 16-20 % slower than a static one (ViT-S/16, batch 1 and 8, AMD EPYC Zen 4), and the
    peer to beat is the fastest (a call: the first output; ``run_outputs``: every output); raises ImportError
    without nncf."""
    import openvino as ov

    core = ov.Core()
    quantized = nncf_quantized(fp32, calibration, max_batch, size)
    config = peer_config(threads)
    return _PeerRun(lambda shape: compile_static(core, quantized, shape, config))


class _PeerRun:
    """The peer's models, compiled per input shape: a call returns the first output (what is timed),
    ``run_outputs`` every output by name (what accuracy is judged on, as for the candidates)."""

    def __init__(self, compile_for: Callable[[tuple[int, ...]], Any]) -> None:
        self.compile_for = compile_for
        self.compiled: dict[tuple[int, ...], tuple[Any, list[Any]]] = {}

    def _request(self, shape: tuple[int, ...]) -> tuple[Any, list[Any]]:
        if shape not in self.compiled:
            compiled = self.compile_for(shape)
            self.compiled[shape] = (compiled.create_infer_request(), list(compiled.outputs))
        return self.compiled[shape]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        request, outputs = self._request(pixels.shape)
        return np.array(request.infer({0: pixels})[outputs[0]], copy=True)

    def run_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        request, outputs = self._request(pixels.shape)
        result = request.infer({0: pixels})
        return {output.get_any_name(): np.array(result[output], copy=True) for output in outputs}


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
