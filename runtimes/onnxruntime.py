"""ONNX Runtime backend: runs a vitdeploy ONNX artifact on CPU, CUDA or onnxruntime's TensorRT EP.

Needs only numpy and onnxruntime (``onnxruntime-gpu`` for the ``cuda`` and ``tensorrt``
providers); it never imports torch or onnx.

Thread safety: ``InferenceSession.run`` is documented by onnxruntime as safe to call from
several threads at once on one session, and :class:`OrtRuntime` keeps no per-call state of
its own (each GPU call makes its own IO binding), so one runtime may serve many threads.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vitdeploy.metadata import ArtifactMetadata

from .base import InputSpec, Runtime
from .ort_fusion import fuse_for_cpu

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GRAPH_OPTIMIZATION = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}
# ModelProto field numbers (onnx.proto): graph = 7, metadata_props = 14.
_GRAPH_FIELD = 7
_METADATA_PROPS_FIELD = 14
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _read_varint(stream: BinaryIO) -> int:
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ValueError("truncated protobuf varint")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _parse_entry(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (key = field 1, value = field 2)."""
    stream = io.BytesIO(data)
    fields = {1: "", 2: ""}
    while stream.tell() < len(data):
        tag = _read_varint(stream)
        if tag & 7 != 2:
            raise ValueError("malformed metadata_props entry")
        fields[tag >> 3] = stream.read(_read_varint(stream)).decode("utf-8")
    return fields[1], fields[2]


def read_metadata_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read without parsing (or loading) the graph.

    Walks the top-level fields of the ``ModelProto`` and seeks over the graph, so it costs
    the same for a 10 MB and a 2 GB model and needs neither ``onnx`` nor ``onnxruntime``.
    Raises ``ValueError`` if the file is not a protobuf ``ModelProto`` with a graph.
    """
    props: dict[str, str] = {}
    seen_graph = False
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        try:
            while stream.tell() < size:
                tag = _read_varint(stream)
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _read_varint(stream)
                elif wire == 1:
                    stream.seek(8, io.SEEK_CUR)
                elif wire == 5:
                    stream.seek(4, io.SEEK_CUR)
                elif wire == 2:
                    length = _read_varint(stream)
                    if stream.tell() + length > size:
                        raise ValueError(f"field {field} runs past the end of the file")
                    if field == _METADATA_PROPS_FIELD:
                        key, value = _parse_entry(stream.read(length))
                        props[key] = value
                    else:
                        seen_graph = seen_graph or field == _GRAPH_FIELD
                        stream.seek(length, io.SEEK_CUR)
                else:
                    raise ValueError(f"unexpected protobuf wire type {wire}")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a readable ONNX model ({error})") from None
    if not seen_graph:
        raise ValueError(f"{path} is not an ONNX model (no graph found)")
    return props


def _flag(value: bool) -> str:
    # onnxruntime parses boolean provider options from the strings "True"/"False".
    return "True" if value else "False"


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def profile_shapes(spec: InputSpec, opt_batch: int | None = None, opt_height: int | None = None,
                   opt_width: int | None = None) -> dict[str, str]:
    """TensorRT EP profile strings (``"pixel_values:1x3x112x112"``) for the spec's min/opt/max shapes.

    The optimum defaults to batch = the smallest batch and the largest size of the range that
    is not above the range's low end doubled, i.e. a typical single-image request; pass
    ``opt_*`` to tune for another shape (clamped into the range, rounded down to the stride).
    """
    def opt_side(requested: int | None, low: int, high: int) -> int:
        value = requested if requested is not None else min(high, 2 * low)
        value = _clamp(int(value), low, high)
        return max(low, value - value % spec.multiple_of)

    shapes = {
        "min": (spec.batch[0], spec.height[0], spec.width[0]),
        "opt": (
            _clamp(int(opt_batch if opt_batch is not None else spec.batch[0]), *spec.batch),
            opt_side(opt_height, *spec.height),
            opt_side(opt_width, *spec.width),
        ),
        "max": (spec.batch[1], spec.height[1], spec.width[1]),
    }
    return {
        key: f"{spec.name}:{batch}x{spec.channels}x{height}x{width}"
        for key, (batch, height, width) in shapes.items()
    }


def tensorrt_provider_options(
    spec: InputSpec,
    *,
    precision: str = "fp32",
    fp16: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device_id: int = 0,
    opt_batch: int | None = None,
    opt_height: int | None = None,
    opt_width: int | None = None,
    max_workspace_size: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Options for onnxruntime-gpu's ``TensorrtExecutionProvider`` built from an input spec.

    Sets FP16 (``fp16``, or by default when the graph's ``precision`` is ``"fp16"``), explicit
    optimization-profile shapes covering the spec's validated range, and (when ``cache_dir`` is
    given) the engine and timing caches in that folder. ``extra`` entries (any option from the
    onnxruntime TensorRT EP docs) override the rest.
    """
    if fp16 is None:
        fp16 = precision == "fp16"
    shapes = profile_shapes(spec, opt_batch, opt_height, opt_width)
    options: dict[str, str] = {
        "device_id": str(int(device_id)),
        "trt_fp16_enable": _flag(fp16),
        "trt_profile_min_shapes": shapes["min"],
        "trt_profile_opt_shapes": shapes["opt"],
        "trt_profile_max_shapes": shapes["max"],
    }
    if cache_dir is not None:
        cache = str(Path(cache_dir))
        options.update({
            "trt_engine_cache_enable": _flag(True),
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": _flag(True),
            "trt_timing_cache_path": cache,
        })
    if max_workspace_size is not None:
        options["trt_max_workspace_size"] = str(int(max_workspace_size))
    for key, value in (extra or {}).items():
        options[key] = _flag(value) if isinstance(value, bool) else str(value)
    return options


def provider_chain(provider: str, available: list[str], trt_options: Mapping[str, str] | None = None,
                   device_id: int = 0) -> list[tuple[str, dict[str, str]]]:
    """The ``(name, options)`` providers to hand onnxruntime, best first, with CUDA/CPU fallbacks.

    Raises ``ValueError`` for an unknown provider or one this onnxruntime build lacks.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in available:
        package = "onnxruntime" if provider == "cpu" else "onnxruntime-gpu"
        extra = " and the TensorRT libraries" if provider == "tensorrt" else ""
        raise ValueError(
            f"provider {provider!r} needs {package}{extra}; installed providers: {available}"
        )
    chain: list[tuple[str, dict[str, str]]] = []
    if provider == "tensorrt":
        chain.append((PROVIDERS["tensorrt"], dict(trt_options or {})))
    if provider in ("cuda", "tensorrt") and PROVIDERS["cuda"] in available:
        chain.append((PROVIDERS["cuda"], {"device_id": str(int(device_id))}))
    chain.append((PROVIDERS["cpu"], {}))
    return chain


def _has_external_data(model: Any) -> bool:
    return any(init.data_location == 1 for init in model.graph.initializer)  # TensorProto.EXTERNAL


class OrtRuntime(Runtime):
    """An ONNX file with vitdeploy metadata, run by onnxruntime.

    ``provider`` is ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (onnxruntime's TensorRT EP, with
    CUDA and CPU fallbacks for nodes it cannot take). The input range and dtype come from the
    artifact's metadata; a file without vitdeploy metadata is refused unless ``input_spec``
    is given. Logits are returned as float32 even from graphs with fp16 outputs; the input
    dtype is the graph's (float16 for ``--fp16-io`` graphs, see ``input_spec.dtype``).

    ``intra_op_threads``/``inter_op_threads`` and ``graph_optimization`` (``"all"``,
    ``"extended"``, ``"basic"``, ``"disabled"``) go to ``SessionOptions``. TensorRT-EP only:
    ``fp16`` (default: on when the metadata precision is fp16), ``cache_dir`` for the engine
    and timing caches (default: ``.<stem>.ort_trt_cache/`` beside the ONNX file),
    ``tensorrt_options`` (extra/overriding EP options, see :func:`tensorrt_provider_options`).

    ``contrib_fusion`` (CPU provider only): before the session is created, rewrite the graph in
    memory with :func:`fuse_for_cpu` (attention and GELU become onnxruntime contrib ops;
    ViT-S/16 at batch 1 runs ~10% faster on a 2-core CPU). ``None`` (default)
    applies it when it can (CPU provider, ``graph_optimization`` not ``"disabled"``, the ``onnx`` package importable, weights inside the
    file) and otherwise runs the file as it is; ``True`` insists (raises where it cannot);
    ``False`` runs the file as it is. The file on disk never changes; :attr:`fusions` counts
    the rewrites. :attr:`session` is the ``onnxruntime.InferenceSession``.

    On GPU providers inputs and outputs go through an IO binding (output allocated on the
    device, copied back once). That path follows onnxruntime's documented API but has not been
    run on a GPU here. See the module docstring for thread safety.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        provider: str = "cpu",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        check_finite: bool = False,
        tensorrt_options: Mapping[str, Any] | None = None,
        fp16: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device_id: int = 0,
        input_spec: InputSpec | None = None,
        contrib_fusion: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {str(self.path)!r} does not exist")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise ValueError(
                f"graph_optimization {graph_optimization!r} is not one of {list(GRAPH_OPTIMIZATION)}"
            )
        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = onnxruntime's default), got {value}")
        if contrib_fusion and provider != "cpu":
            raise ValueError(f"contrib_fusion applies to provider 'cpu' only, not {provider!r}")
        available = list(ort.get_available_providers())
        provider_chain(provider, available)  # fail fast, before the (slow) session creation

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = int(inter_op_threads)

        # Metadata first (cheap, no session): it decides the input spec and the TensorRT profile.
        metadata = self._parse_metadata(read_metadata_props(self.path), required=input_spec is None)
        trt_options: dict[str, str] | None = None
        if provider == "tensorrt":
            spec = input_spec or self._spec_from(metadata)
            trt_options = tensorrt_provider_options(
                spec, precision=metadata.precision if metadata else "fp32", fp16=fp16,
                cache_dir=cache_dir if cache_dir is not None else self.path.parent / f".{self.path.stem}.ort_trt_cache",
                device_id=device_id, extra=tensorrt_options,
            )
        else:
            given = [name for name, value in (("tensorrt_options", tensorrt_options), ("fp16", fp16),
                                              ("cache_dir", cache_dir)) if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to provider 'tensorrt', not {provider!r}")
        chain = provider_chain(provider, available, trt_options, device_id)
        use_fusion = provider == "cpu" and (
            contrib_fusion or (contrib_fusion is None and graph_optimization != "disabled"))
        model_source, self.fusions = self._fused_graph(required=bool(contrib_fusion)) if use_fusion else (None, {})

        self._session = ort.InferenceSession(
            model_source if model_source is not None else str(self.path), sess_options=options,
            providers=[name for name, _ in chain], provider_options=[opts for _, opts in chain],
        )
        active = self._session.get_providers()
        if PROVIDERS[provider] not in active:
            raise RuntimeError(
                f"onnxruntime could not enable provider {provider!r} for {self.path} (active: {active}); "
                "check that the CUDA/TensorRT libraries match this onnxruntime-gpu build"
            )
        self.provider = provider
        self.device_id = int(device_id)
        self.metadata = metadata
        self.input_spec = input_spec or self._spec_from(self.metadata)
        self.check_finite = bool(check_finite)
        self._check_graph_io()

    # -- construction helpers -------------------------------------------------------------

    def _fused_graph(self, required: bool) -> tuple[bytes | None, dict[str, int]]:
        """The serialized graph after :func:`fuse_for_cpu`, or ``(None, {})`` to run the file as is."""
        try:
            import onnx
        except ImportError:
            if required:
                raise ValueError("contrib_fusion=True needs the onnx package (pip install onnx)") from None
            return None, {}
        model = onnx.load(str(self.path), load_external_data=False)
        if _has_external_data(model):
            if required:
                raise ValueError(f"{self.path} keeps its weights in an external file; contrib_fusion needs them inside")
            return None, {}
        try:
            counts = fuse_for_cpu(model)
        except ValueError as error:  # a pattern this rewrite mishandles: run the file unchanged
            if required:
                raise
            warnings.warn(f"{self.path}: contrib-op fusion skipped ({error})", RuntimeWarning, stacklevel=3)
            return None, {}
        if not any(counts.values()):
            return None, counts
        return model.SerializeToString(), counts

    def _parse_metadata(self, props: Mapping[str, str], required: bool) -> ArtifactMetadata | None:
        try:
            return ArtifactMetadata.from_props(dict(props))
        except ValueError as error:
            if required:
                raise ValueError(
                    f"{self.path}: {error} (pass input_spec=InputSpec(...) to run a foreign ONNX file)"
                ) from None
            return None

    def _spec_from(self, metadata: ArtifactMetadata | None) -> InputSpec:
        if metadata is None:
            raise ValueError(
                f"{self.path} has no vitdeploy metadata; pass input_spec=InputSpec(...) to run it"
            )
        return InputSpec.from_metadata(metadata)

    def _check_graph_io(self) -> None:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path} has {len(inputs)} inputs {[i.name for i in inputs]}; expected one image input")
        graph_input = inputs[0]
        if graph_input.name != self.input_spec.name:
            raise ValueError(
                f"{self.path}: graph input is named {graph_input.name!r} but the metadata says {self.input_spec.name!r}"
            )
        graph_dtype = _ORT_DTYPES.get(graph_input.type, graph_input.type)
        if graph_dtype != self.input_spec.dtype:
            raise ValueError(
                f"{self.path}: graph input dtype is {graph_dtype} but the metadata says {self.input_spec.dtype}"
            )
        self.output_name = self._session.get_outputs()[0].name

    # -- inference ------------------------------------------------------------------------

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise RuntimeError(f"OrtRuntime for {self.path} is closed; create a new runtime to run it again")
        pixel_values = np.ascontiguousarray(pixel_values)
        if self.provider == "cpu":
            logits = session.run([self.output_name], {self.input_spec.name: pixel_values})[0]
        else:
            binding = session.io_binding()
            binding.bind_cpu_input(self.input_spec.name, pixel_values)
            binding.bind_output(self.output_name, "cuda", self.device_id)
            session.run_with_iobinding(binding)
            logits = binding.copy_outputs_to_cpu()[0]
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        """Release the session; later calls raise ``RuntimeError``."""
        self._session = None

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` (read-only); ``None`` after :meth:`close`."""
        return self._session

    @property
    def providers(self) -> list[str]:
        """The providers onnxruntime actually enabled for this session."""
        if self._session is None:
            return []
        return list(self._session.get_providers())

    def __repr__(self) -> str:
        return f"OrtRuntime({str(self.path)!r}, provider={self.provider!r})"
