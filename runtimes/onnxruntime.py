"""ONNX Runtime backend: runs a vitdeploy ONNX artifact on CPU, CUDA or onnxruntime's TensorRT EP.

Needs only numpy and onnxruntime (``onnxruntime-gpu`` for the ``cuda`` and ``tensorrt``
providers); it never imports torch or onnx, and it runs the graph of a file as it is.

Thread safety: ``InferenceSession.run`` is documented by onnxruntime as safe to call from
several threads at once on one session, and :class:`OrtRuntime` keeps no per-call state of
its own (each GPU call makes its own IO binding), so one runtime may serve many threads.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.config import snap_to_stride
from vitdeploy.constants import ORT_DTYPES
from vitdeploy.files import sha256_file
from vitdeploy.metadata import CPU_FUSION, CPU_VARIANT, ArtifactMetadata, read_metadata_props

from .base import GraphRuntime, InputSpec

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# "auto": the validated CPU variant beside the file where there is one; "portable": the file itself.
VARIANT_CHOICES = ("auto", "portable")
GRAPH_OPTIMIZATION = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}
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
        return snap_to_stride(int(value), low, high, spec.multiple_of)

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


def _preload_tensorrt() -> None:
    """onnxruntime's TensorRT EP dlopens libnvinfer.so.10 by soname; pip's copy is found only once tensorrt is imported."""
    from vitdeploy.tensorrt_env import TensorRTUnavailable, preload_tensorrt_libraries

    try:
        preload_tensorrt_libraries()
    except TensorRTUnavailable as error:
        raise ValueError(f"provider 'tensorrt': {error}") from None


class OrtRuntime(GraphRuntime):
    """An ONNX file with vitdeploy metadata, run by onnxruntime.

    ``provider`` is ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (onnxruntime's TensorRT EP, with
    CUDA and CPU fallbacks for nodes it cannot take). The input range and dtype come from the
    artifact's metadata; a file without vitdeploy metadata is refused unless ``input_spec``
    is given. Logits are returned as float32 even from graphs with fp16 outputs; the input
    dtype is the graph's (float16 for ``--fp16-io`` graphs, see ``input_spec.dtype``).

    ``variant`` (CPU provider): ``"auto"`` (default) runs the validated onnxruntime-CPU graph
    that ``vitdeploy export`` writes beside the portable one (``model.cpu.onnx``: attention and
    GELU as onnxruntime contrib ops, about 10% faster on CPU) when the portable file's metadata
    names it and its sha256 matches, else the file itself; ``"portable"`` always runs the file
    itself. The graph that runs is always a file that export validated against the eager
    model: nothing is rewritten here. :attr:`graph_path` is the file the session runs.

    ``intra_op_threads``/``inter_op_threads`` and ``graph_optimization`` (``"all"``,
    ``"extended"``, ``"basic"``, ``"disabled"``) go to ``SessionOptions``. ``profile_prefix`` turns
    on onnxruntime's profiler: its JSON trace (per-node kernel times, see :meth:`end_profiling`)
    goes to ``<prefix>_<date>.json``, and the optimized graph whose node names the trace uses to
    :attr:`optimized_graph_path` (``<prefix>.optimized.onnx``). TensorRT-EP only:
    ``fp16`` (default: on when the metadata precision is fp16), ``cache_dir`` for the engine
    and timing caches (default: ``.<stem>.ort_trt_cache/`` beside the ONNX file),
    ``tensorrt_options`` (extra/overriding EP options, see :func:`tensorrt_provider_options`).
    :attr:`session` is the ``onnxruntime.InferenceSession``.

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
        variant: str = "auto",
        profile_prefix: str | os.PathLike[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {str(self.path)!r} does not exist")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise ValueError(
                f"graph_optimization {graph_optimization!r} is not one of {list(GRAPH_OPTIMIZATION)}"
            )
        if variant not in VARIANT_CHOICES:
            raise ValueError(f"variant {variant!r} is not one of {list(VARIANT_CHOICES)}")
        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = onnxruntime's default), got {value}")
        available = list(ort.get_available_providers())
        provider_chain(provider, available)  # fail fast, before the (slow) session creation

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = int(inter_op_threads)
        self.optimized_graph_path: Path | None = None
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
            self.optimized_graph_path = Path(f"{profile_prefix}.optimized.onnx")
            options.optimized_model_filepath = str(self.optimized_graph_path)
            options.log_severity_level = 3  # not the warning that a graph saved with NCHWc layouts fits this CPU only

        # Metadata first (cheap, no session): it decides the graph, the input spec and the TensorRT profile.
        metadata = self._parse_metadata(read_metadata_props(self.path), required=input_spec is None)
        self.graph_path = self.path
        if provider == "cpu" and variant == "auto" and metadata is not None:
            self.graph_path, metadata = self._cpu_variant(metadata)
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
        if provider == "tensorrt":
            _preload_tensorrt()


        self._session = ort.InferenceSession(
            str(self.graph_path), sess_options=options,
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

    def _cpu_variant(self, metadata: ArtifactMetadata) -> tuple[Path, ArtifactMetadata]:
        """The validated onnxruntime-CPU graph beside the file (and its metadata), or the file itself."""
        entry = metadata.variants.get(CPU_VARIANT)
        if not entry:
            return self.path, metadata
        sibling = self.path.with_name(entry["file"])
        if not sibling.is_file():
            return self.path, metadata
        if sha256_file(sibling) != entry.get("sha256"):
            warnings.warn(
                f"{sibling} does not match the sha256 that {self.path.name}'s metadata records for its "
                "validated CPU graph; running the portable graph instead", RuntimeWarning, stacklevel=3,
            )
            return self.path, metadata
        return sibling, ArtifactMetadata.from_props(read_metadata_props(sibling))

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
        """Refuse a graph whose inputs/outputs contradict its metadata (a foreign graph carrying
        copied metadata): names, ranks, dtypes, channels and the logits width must all agree."""
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path} has {len(inputs)} inputs {[i.name for i in inputs]}; expected one image input")
        graph_input = inputs[0]
        spec = self.input_spec
        problems = []
        if graph_input.name != spec.name:
            problems.append(f"its input is named {graph_input.name!r}, the metadata says {spec.name!r}")
        graph_dtype = ORT_DTYPES.get(graph_input.type, graph_input.type)
        if graph_dtype != spec.dtype:
            problems.append(f"its input dtype is {graph_dtype}, the metadata says {spec.dtype}")
        shape = list(graph_input.shape)
        if len(shape) != 4:
            problems.append(f"its input has rank {len(shape)} {shape}, expected [batch, {spec.channels}, height, width]")
        elif isinstance(shape[1], int) and shape[1] != spec.channels:
            problems.append(f"its input has {shape[1]} channels, the metadata says {spec.channels}")
        outputs = self._session.get_outputs()
        self._set_outputs([output.name for output in outputs])
        if self.metadata is not None:
            described = [t.name for t in self.metadata.outputs]
            if self.output_names != described:
                problems.append(f"its outputs are {self.output_names}, the metadata lists {described}")
            else:
                for output, tensor in zip(outputs, self.metadata.outputs, strict=True):
                    problems += _shape_problems(output.name, list(output.shape), list(tensor.shape))
        if problems:
            raise ValueError(f"{self.graph_path} is inconsistent with its own vitdeploy metadata: {'; '.join(problems)}")

    @property
    def fusions(self) -> dict[str, int]:
        """Contrib-op rewrites in the graph that runs (from its metadata; empty for the portable graph)."""
        for transform in (self.metadata.transforms if self.metadata else []):
            if transform.get("name") == CPU_FUSION:
                return dict(transform.get("counts", {}))
        return {}

    # -- inference ------------------------------------------------------------------------

    def _outputs(self, pixel_values: np.ndarray, names: list[str]) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeError(f"OrtRuntime for {self.path} is closed; create a new runtime to run it again")
        pixel_values = np.ascontiguousarray(pixel_values)
        if self.provider == "cpu":
            values = session.run(names, {self.input_spec.name: pixel_values})
        else:
            binding = session.io_binding()
            binding.bind_cpu_input(self.input_spec.name, pixel_values)
            for name in names:
                binding.bind_output(name, "cuda", self.device_id)
            session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        return [np.asarray(value, dtype=np.float32) for value in values]

    def end_profiling(self) -> Path:
        """Stop the profiler (``profile_prefix``) and return its JSON trace (Chrome trace format)."""
        if self._session is None or self.optimized_graph_path is None:
            raise RuntimeError(f"OrtRuntime for {self.path} is closed or was opened without profile_prefix")
        return Path(self._session.end_profiling())

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


def _shape_problems(name: str, graph: list[Any], described: list[Any]) -> list[str]:
    """How the graph's shape of output ``name`` contradicts the metadata's (rank, fixed widths)."""
    if len(graph) != len(described):
        return [f"its {name} output has rank {len(graph)} {graph}, the metadata says {described}"]
    problems = []
    for axis, (got, want) in enumerate(zip(graph, described, strict=True)):
        if isinstance(got, int) and isinstance(want, int) and got != want:
            what = f"{got} classes" if name == "logits" else f"{got} at axis {axis}"
            problems.append(f"its {name} output has {what}, the metadata says {want}")
    return problems
