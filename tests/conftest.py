"""Shared fixtures: small real models that keep the suite fast on 2 cores."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# Several workers share the cores: torch's OpenMP pool and numpy's OpenBLAS pool in each would take every
# core and spin-wait on the ones the other workers are using (measured on 2 cores, 2 workers: the suite's
# CPU time fell by a fifth with one OpenMP thread each, and by another minute, back to back, with one
# OpenBLAS thread). Set before torch and numpy are imported, so their pools and subprocesses see them.
SHARED_CORES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
if SHARED_CORES:
    for pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(pool, "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from temp_folder import pytest_configure, pytest_sessionfinish, pytest_unconfigure  # noqa: E402, F401 - hooks

from vitdeploy.config import HybridConfig, ViTConfig  # noqa: E402
from vitdeploy.model import VisionTransformer  # noqa: E402

_session_temp: pytest.TempPathFactory | None = None


@pytest.fixture(scope="session", autouse=True)
def _session_temp_factory(tmp_path_factory: pytest.TempPathFactory) -> None:
    global _session_temp
    _session_temp = tmp_path_factory


def session_folder(prefix: str) -> Path:
    """A new folder in the session's basetemp, for helpers that build once per session without a fixture
    (pytest removes it with the basetemp)."""
    if _session_temp is None:
        raise RuntimeError("session_folder() is for tests and fixtures (no pytest session has started)")
    return _session_temp.mktemp(prefix)


# The studies (studies/*.py) are scripts, not part of the package: tests import them as their own folder.
STUDIES = Path(__file__).resolve().parents[1] / "studies"
if str(STUDIES) not in sys.path:
    sys.path.insert(0, str(STUDIES))


def tiny_config(**overrides) -> ViTConfig:
    """A ViT with the real structure but small sizes: 32x32 input, patch 8, 2 blocks, 10 classes."""
    base = dict(
        name="test_vit_tiny", image_size=32, patch_size=8, hidden_size=64, depth=2, num_heads=4,
        mlp_size=128, num_classes=10, crop_pct=1.0,
    )
    base.update(overrides)
    return ViTConfig.from_fields(base)


def tiny_hybrid_config(**overrides) -> ViTConfig:
    """A hybrid ViT with a one-block-per-stage ResNet-v2 (stride 16) and 1x1 patches, 64x64 input."""
    base = dict(
        name="test_vit_tiny_r", image_size=64, patch_size=1, hidden_size=64, depth=2, num_heads=4,
        mlp_size=128, num_classes=10, hybrid=HybridConfig(layers=(1, 1, 1)), crop_pct=1.0,
    )
    base.update(overrides)
    return ViTConfig.from_fields(base)


def make_model(config: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A model in eval mode whose every parameter is random (the head and cls token too)."""
    torch.manual_seed(seed)
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")):
                param.uniform_(0.5, 1.5)
            elif param.ndim == 1 or name in ("cls_token", "pos_embed"):
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture
def tiny_model() -> VisionTransformer:
    return make_model(tiny_config())


@pytest.fixture
def tiny_hybrid_model() -> VisionTransformer:
    return make_model(tiny_hybrid_config())


def _trace_key(model: VisionTransformer, options) -> str:
    """What a trace depends on, as a digest: the weights, the config, the precision state, the trace options."""
    import hashlib

    # What the graph does not depend on (name, family, labels, preprocessing) stays out of the key.
    described = {k: v for k, v in model.config.to_dict().items() if k not in ("provenance", "preprocessing")}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    # The trace always uses the explicit attention, so whether a module is fused stays out too.
    state = [(type(m).__name__, str(getattr(m, "softmax_dtype", None)), str(getattr(m, "compute_dtype", None)))
             for m in model.modules()]
    traced = "fp16" if options.precision == "fp16" else "fp32"  # int8/fp8 are quantized from the fp32 trace
    fp32_ops = list(options.fp32_ops) if traced == "fp16" else []
    fields = [traced, fp32_ops, options.fp16_io, list(options.output_names(model.config)),
              options.class_token_last_block, int(options.opset), str(next(model.parameters()).dtype), state]
    digest.update(json.dumps(fields).encode())
    return digest.hexdigest()


TRACE_LOG = os.environ.get("VITDEPLOY_TRACE_LOG")  # a file: one line per real trace (seconds, test, key, model)


def _log_trace(seconds: float, key: str, model: VisionTransformer, options) -> None:
    if TRACE_LOG:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(TRACE_LOG, "a") as log:
            log.write(f"{seconds:.2f}\t{test}\t{key[:12]}\t{model.config.provenance.name}\t{options.precision}\t"
                      f"{','.join(options.output_names(model.config))}\n")


@pytest.fixture(scope="session", autouse=True)
def one_runtime_thread_per_worker():
    """Under several workers, an onnxruntime session or OpenVINO compiled model given no thread count gets
    one, as torch and OpenBLAS do above: neither reads such a variable, and each default pool takes every
    core and spin-waits on the one the other worker uses (the suite's CPU fell by a few per cent with each,
    back to back: docs/testing.md). A count the caller sets is kept."""
    if not SHARED_CORES:
        yield
        return
    import onnxruntime as ort

    patch = pytest.MonkeyPatch()
    create_session = ort.InferenceSession.__init__

    def session_one_thread(self, path_or_bytes, sess_options=None, *args, **kwargs):
        sess_options = sess_options if sess_options is not None else ort.SessionOptions()
        if sess_options.intra_op_num_threads == 0:
            sess_options.intra_op_num_threads = 1
        create_session(self, path_or_bytes, sess_options, *args, **kwargs)

    patch.setattr(ort.InferenceSession, "__init__", session_one_thread)
    with contextlib.suppress(ImportError):
        import openvino as ov

        compile_model = ov.Core.compile_model

        def compile_one_thread(self, model, device_name=None, config=None, **kwargs):
            return compile_model(self, model, device_name, {"INFERENCE_NUM_THREADS": 1, **(config or {})}, **kwargs)

        patch.setattr(ov.Core, "compile_model", compile_one_thread)
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def trace_once_per_model(tmp_path_factory):
    """Trace each (model, options) once per test session: ``torch.onnx.export`` costs seconds of fixed
    overhead even for the tiny models, and tests in several modules export the same few. Every key is a
    real trace, kept in memory and in a folder the xdist workers share (a lock per key: a worker that
    asks for a trace another is making waits for it); callers get a fresh copy, so what they do to the
    graph never leaks into another test."""
    import copy
    import fcntl

    import onnx

    from vitdeploy.exporters import onnx_export

    real = onnx_export.trace_to_onnx
    cache: dict[str, object] = {}
    # Under xdist each worker's basetemp is a folder of the controller's, which pytest removes with it.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    shared = shared / "traces"
    shared.mkdir(exist_ok=True)

    def cached(model, options):
        key = _trace_key(model, options)
        if key not in cache:
            path = shared / f"{key}.onnx"
            with open(shared / f"{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if path.is_file():
                    cache[key] = onnx.load_from_string(path.read_bytes())
                else:
                    start = time.perf_counter()
                    # torch.export makes a few hundred thousand short-lived objects; the collections they
                    # trigger while it runs (each full one walks the worker's whole heap) wait until it ends.
                    collecting = gc.isenabled()
                    gc.disable()
                    try:
                        cache[key] = real(model, options)
                    finally:
                        if collecting:
                            gc.enable()
                    _log_trace(time.perf_counter() - start, key, model, options)
                    partial = path.with_suffix(".partial")
                    partial.write_bytes(cache[key].SerializeToString())
                    partial.replace(path)
        return copy.deepcopy(cache[key])

    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_export, "trace_to_onnx", cached)
    _build_exporter_registry_once(patch)
    yield cache
    patch.undo()


def _build_exporter_registry_once(patch: pytest.MonkeyPatch) -> None:
    """``torch.onnx.export`` rebuilds its table of ONNX functions from torchlib on every call (about half a
    second of each tiny trace here); build it once per opset and hand each export its own copy. The graphs
    are byte-for-byte the same. Private API: where this torch has none, every export builds its own."""
    import copy
    import functools

    try:
        from torch.onnx._internal.exporter import _constants, _registration

        build = _registration.ONNXRegistry.from_torchlib
        default_opset = _constants.TORCHLIB_OPSET
    except (ImportError, AttributeError):
        return

    @functools.cache
    def built(opset_version: int):
        return build(opset_version)

    def from_torchlib(opset_version: int = default_opset):
        registry = copy.copy(built(opset_version))
        registry.functions = {target: list(functions) for target, functions in registry.functions.items()}
        return registry

    patch.setattr(_registration.ONNXRegistry, "from_torchlib", staticmethod(from_torchlib))


_NO_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter in which importing torch raises (what an application that
    embeds the runtimes without torch sees); returns the finished process."""
    return subprocess.run([sys.executable, "-c", _NO_TORCH + textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=timeout)


# Workers take whole modules (--dist loadfile) in collection order (--no-loadscope-reorder), so the modules
# that take longest go first and the many short ones fill the end: started last, one of these would
# leave the other worker idle for its length. Measured on 2 cores in a clean clone (where test_serve builds
# the serve venv), longest first; the rest keep their order.
LONGEST_FIRST = (
    "test_families_cli.py", "test_export_onnx.py", "test_serve.py", "test_trained_weights.py", "test_deploy.py",
    "test_families_onnx_parity.py", "test_source_check.py", "test_bench.py", "test_families_rope_onnx.py",
    "test_ort_overheads.py", "test_gpu_check.py", "test_families_precision_study.py", "test_tune.py",
    "test_families_tune.py", "test_outputs_export.py", "test_cli_quantize.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
