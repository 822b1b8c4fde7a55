"""The contract every ``Runtime`` keeps, checked once over all of them.

torch (the eager reference), onnxruntime (a real session on a real exported file) and TensorRT
(through the TensorRT TEST DOUBLE, ``tests/trt_double.py``: no TensorRT can be installed here)
must refuse the same bad inputs with the same messages, honour ``check_finite``, return
``[N, num_classes]`` float32 logits, describe themselves through ``metadata``/``input_spec``, fail
clearly once closed, and give the same answers from several threads as from one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
from conftest import make_model, tiny_config
from trt_artifacts import SHAPE_RANGE, tiny_onnx
from trt_double import Doubles

from vitdeploy.runtimes import Runtime
from vitdeploy.runtimes.base import InputSpec

RNG = np.random.default_rng(7)
KINDS = ["torch", "onnxruntime", "tensorrt-double"]
NUM_CLASSES = tiny_config().num_classes


@pytest.fixture(scope="module", autouse=True)
def exported() -> None:
    tiny_onnx()  # export (torch) before any double stands in for tensorrt


@pytest.fixture(params=KINDS)
def make_runtime(request, monkeypatch, tmp_path) -> Callable[..., Runtime]:
    """A factory for the runtime under test; every runtime accepts batch 1..8 and 16..64 px, stride 8."""
    kind = request.param
    if kind == "torch":
        from vitdeploy.runtimes.torch import TorchRuntime

        model = make_model(tiny_config())
        bounds = {"batch": SHAPE_RANGE.batch, "height": SHAPE_RANGE.height, "width": SHAPE_RANGE.width}
        return lambda **options: TorchRuntime(model, **bounds, **options)
    if kind == "onnxruntime":
        from vitdeploy.runtimes.onnxruntime import OrtRuntime

        return lambda **options: OrtRuntime(tiny_onnx(), **options)
    from vitdeploy.exporters import tensorrt_build
    from vitdeploy.exporters.trt_plan import plan_build
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    Doubles().install(monkeypatch)
    plan = plan_build(tiny_onnx(), tmp_path / "tiny.engine", profile_specs=["batch=1:2:8,res=16:32:64"])
    tensorrt_build.run_build(plan, show_progress=False)
    return lambda **options: TensorRTRuntime(plan.engine_path, **options)


def pixels(batch: int, height: int, width: int, dtype=np.float32) -> np.ndarray:
    return RNG.normal(size=(batch, 3, height, width)).astype(dtype)


BAD_INPUTS = [
    ("not an array", lambda: [[0.0]], r"numpy\.ndarray.*, got list"),
    ("rank 3", lambda: pixels(1, 32, 32)[0], "must have 4 dimensions"),
    ("1 channel", lambda: RNG.normal(size=(1, 1, 32, 32)).astype(np.float32), "must have 3 channels, got 1"),
    ("4 channels", lambda: RNG.normal(size=(1, 4, 32, 32)).astype(np.float32), "must have 3 channels, got 4"),
    ("float64", lambda: pixels(1, 32, 32, np.float64), "must have dtype float32, got float64"),
    ("float16", lambda: pixels(1, 32, 32, np.float16), "must have dtype float32, got float16"),
    ("batch 9", lambda: pixels(9, 32, 32), "batch size 9 is outside the validated range 1..8"),
    ("batch 0", lambda: pixels(0, 32, 32), "batch size 0 is outside the validated range 1..8"),
    ("height 36", lambda: pixels(1, 36, 32), "height 36 is not a multiple of the patch stride 8"),
    ("width 20", lambda: pixels(1, 32, 20), "width 20 is not a multiple of the patch stride 8"),
    ("height 72", lambda: pixels(1, 72, 32), "height 72 is outside the validated range 16..64"),
    ("width 8", lambda: pixels(1, 32, 8), "width 8 is outside the validated range 16..64"),
]


@pytest.mark.parametrize("make, message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_are_refused_with_the_value_named(make_runtime, make, message):
    with make_runtime() as runtime, pytest.raises(ValueError, match=message):
        runtime(make())


def test_logits_shape_dtype_and_self_description(make_runtime):
    with make_runtime() as runtime:
        spec = runtime.input_spec
        assert isinstance(spec, InputSpec) and spec == InputSpec.from_metadata(runtime.metadata)
        assert (spec.batch, spec.height, spec.width) == (SHAPE_RANGE.batch, SHAPE_RANGE.height, SHAPE_RANGE.width)
        assert spec.multiple_of == 8 and spec.channels == 3 and spec.name == "pixel_values"
        assert runtime.metadata.num_classes == NUM_CLASSES
        for shape in [(1, 16, 16), (3, 48, 24), (8, 64, 64)]:
            x = pixels(*shape)
            logits = runtime(x)
            assert logits.shape == (shape[0], NUM_CLASSES) and logits.dtype == np.float32
            assert np.isfinite(logits).all()
            np.testing.assert_array_equal(runtime.run_outputs(x)["logits"], logits)
            np.testing.assert_array_equal(runtime(x), logits)  # deterministic


def test_non_finite_inputs_are_refused_only_when_asked(make_runtime):
    x = pixels(2, 32, 32)
    x[1, 0, 3, 4] = np.nan
    x[0, 2, 0, 0] = np.inf
    with make_runtime() as runtime:
        runtime(x)  # check_finite off: garbage in, garbage out, no error
    with make_runtime(check_finite=True) as checked, pytest.raises(ValueError, match="contains 2 NaN or Inf values"):
        checked(x)


def test_close_is_idempotent_and_later_calls_fail_clearly(make_runtime):
    runtime = make_runtime()
    runtime(pixels(1, 32, 32))
    runtime.close()
    runtime.close()  # harmless twice
    with pytest.raises(RuntimeError, match="closed"):
        runtime(pixels(1, 32, 32))
    with make_runtime() as scoped:
        scoped(pixels(1, 16, 16))
    with pytest.raises(RuntimeError, match="closed"):
        scoped(pixels(1, 16, 16))


def test_concurrent_calls_match_serial_calls(make_runtime):
    inputs = [pixels(1 + i % 3, 16 + 8 * (i % 4), 32) for i in range(12)]
    with make_runtime() as runtime:
        serial = [runtime(x) for x in inputs]
        results: list[np.ndarray | None] = [None] * len(inputs)
        errors: list[BaseException] = []

        def worker(offset: int) -> None:
            try:
                for index in range(offset, len(inputs), 4):
                    for _ in range(3):
                        results[index] = runtime(inputs[index])
            except BaseException as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for got, expected in zip(results, serial, strict=True):
        np.testing.assert_array_equal(got, expected)
