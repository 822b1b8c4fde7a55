"""The peer ``tune --compare-nncf`` times beside the candidates: OpenVINO + NNCF int8 of the same fp32 file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vitdeploy.runtimes.openvino import CompiledShapes

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

    from vitdeploy.runtimes.openvino import CompiledShapes

    quantized = nncf_quantized(fp32, calibration, max_batch, size)
    return _PeerRun(CompiledShapes(ov.Core(), quantized, "CPU", peer_config(threads), per_shape=True))


class _PeerRun:
    """The peer's compiled models: a call returns the first output (what is timed), ``run_outputs``
    every output by name (what accuracy is judged on, as for the candidates)."""

    def __init__(self, models: CompiledShapes) -> None:
        self.models = models
        self.names = [output.get_any_name() for output in models.model.outputs]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.models.infer(pixels, self.names[:1])[0]

    def run_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.models.infer(pixels, self.names), strict=True))


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
