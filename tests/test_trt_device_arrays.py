"""Pure parts of the TensorRT runtime: DLPack / __cuda_array_interface__ parsing, dtype names, shape checks."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from vitdeploy.engine_manifest import OptimizationProfile
from vitdeploy.runtimes.base import InputSpec
from vitdeploy.runtimes.tensorrt import (
    DeviceTensor,
    TensorRTUnavailable,
    as_device_tensor,
    check_input_shape,
    dltensor_from_capsule,
    dtype_name,
    from_cuda_array_interface,
    from_dlpack,
    import_cudart,
    import_tensorrt,
)


class CaiObject:
    def __init__(self, **interface) -> None:
        self.__cuda_array_interface__ = interface


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8"])
def test_dlpack_capsule_is_read_like_the_producer_sees_it(dtype) -> None:
    array = np.arange(2 * 3 * 4 * 5).astype(dtype).reshape(2, 3, 4, 5)
    capsule = array.__dlpack__()  # numpy's real DLPack export (CPU device)
    device, ptr, shape, parsed = dltensor_from_capsule(capsule)
    assert (device, ptr, shape, parsed) == (1, array.ctypes.data, (2, 3, 4, 5), dtype)


def test_dlpack_rejects_strided_views_and_cpu_producers() -> None:
    array = np.zeros((4, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="not C-contiguous"):
        dltensor_from_capsule(array[:, :, ::2].__dlpack__())
    with pytest.raises(ValueError, match="device type 1, not CUDA; pass a numpy array instead"):
        from_dlpack(array, stream=None)


def test_dlpack_from_a_cuda_producer() -> None:
    array = np.ones((1, 3, 16, 16), np.float32)

    class CudaLike:  # a producer that reports kDLCUDA; its capsule is numpy's
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            self.stream = stream
            return array.__dlpack__()

    producer = CudaLike()
    tensor = as_device_tensor(producer, stream=1234)
    assert (tensor.ptr, tensor.shape, tensor.dtype) == (array.ctypes.data, (1, 3, 16, 16), "float32")
    assert producer.stream == 1234  # our stream is handed over so the producer can order its work


def test_dlpack_is_preferred_over_the_array_interface() -> None:
    array = np.ones((1, 3, 8, 8), np.float16)

    class Both:  # like a CUDA torch tensor: __cuda_array_interface__ v2 (no stream) and DLPack
        __cuda_array_interface__ = {"shape": (1, 3, 8, 8), "typestr": "<f2", "data": (1, False), "version": 2}

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            self.stream = stream
            return array.__dlpack__()

    both = Both()
    tensor = as_device_tensor(both, stream=99)
    assert tensor.ptr == array.ctypes.data and tensor.dtype == "float16" and both.stream == 99


def test_cuda_array_interface() -> None:
    tensor = from_cuda_array_interface(CaiObject(shape=(2, 3, 8, 8), typestr="<f2", data=(4096, False), version=3,
                                                 strides=None, stream=7))
    assert (tensor.ptr, tensor.shape, tensor.dtype, tensor.stream) == (4096, (2, 3, 8, 8), "float16", 7)
    contiguous_strides = (3 * 8 * 8 * 4, 8 * 8 * 4, 8 * 4, 4)
    assert from_cuda_array_interface(CaiObject(shape=(2, 3, 8, 8), typestr="<f4", data=(64, False),
                                               strides=contiguous_strides)).stream is None
    with pytest.raises(ValueError, match="not C-contiguous"):
        from_cuda_array_interface(CaiObject(shape=(2, 3, 8, 8), typestr="<f4", data=(64, False), strides=(4, 8, 24, 192)))
    with pytest.raises(ValueError, match="masked"):
        from_cuda_array_interface(CaiObject(shape=(1,), typestr="<f4", data=(64, False), mask=object()))
    with pytest.raises(ValueError, match="got list"):
        as_device_tensor([1.0])
    same = DeviceTensor(1, (1,), "float32")
    assert as_device_tensor(same) is same


def test_dtype_names_follow_tensorrt_members() -> None:
    member = types.SimpleNamespace(name="HALF")
    assert dtype_name(member) == "float16"
    assert dtype_name(types.SimpleNamespace(name="FLOAT")) == "float32"
    with pytest.raises(ValueError, match="FP8 has no numpy equivalent"):
        dtype_name(types.SimpleNamespace(name="FP8"))


def test_device_input_checks_are_the_runtime_checks() -> None:
    spec = InputSpec(batch=(1, 8), height=(16, 64), width=(16, 64), multiple_of=8)
    profiles = [OptimizationProfile("pixel_values", (1, 3, 16, 16), (1, 3, 32, 32), (8, 3, 32, 32)),
                OptimizationProfile("pixel_values", (1, 3, 48, 48), (1, 3, 64, 64), (4, 3, 64, 64))]
    assert check_input_shape(spec, profiles, (2, 3, 64, 48), "float32") == 1
    with pytest.raises(ValueError, match="width 30 is not a multiple"):
        check_input_shape(spec, profiles, (2, 3, 32, 30), "float32")
    with pytest.raises(ValueError, match="dtype float32, got float16"):
        check_input_shape(spec, profiles, (2, 3, 32, 32), "float16")
    with pytest.raises(ValueError, match="fits none"):
        check_input_shape(spec, profiles, (2, 3, 40, 40), "float32")


def test_import_errors_say_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"^TensorRT is not installed here .*pip install 'vitdeploy\[gpu\]'"):
        import_tensorrt()
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TensorRTUnavailable, match="^cuda-python is not installed here"):
        import_cudart()


def test_runtime_module_imports_without_torch_or_tensorrt() -> None:
    import subprocess

    code = ("import sys, vitdeploy.runtimes.tensorrt, vitdeploy.engine_manifest; "
            "assert not {'torch', 'tensorrt', 'onnx'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
