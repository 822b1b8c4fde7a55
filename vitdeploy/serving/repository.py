"""A Triton Inference Server model repository written from vitdeploy artifacts' self-description.

``write_repository(["model.onnx"], "repo")`` writes, per artifact, up to three models:

- ``<name>_onnxruntime``: Triton's ONNX Runtime backend on the portable graph (optionally
  with the TensorRT execution accelerator and profiles from the validated range);
- ``<name>_tensorrt``: an engine as a ``tensorrt_plan`` model, its manifest beside it, and
  the Triton release whose TensorRT can load it (a warning when none is known);
- ``<name>_python``: Triton's Python backend running vitdeploy's own onnxruntime runtime
  (:mod:`vitdeploy.serving.python_model`), which also ships the validated ``.cpu.onnx``
  variant. It is the model that runs on the ``tritonserver`` PyPI bundles (Python backend
  only) and the CPU fallback anywhere.

Every model takes ``pixel_values`` with dims ``[3, -1, -1]`` (the batch dimension is Triton's,
``max_batch_size`` is the validated maximum), returns each output of the artifact with its dims
(``logits [C]``, ``pooler_output [D]``, ``patch_tokens [-1, D]`` ...), batches dynamically with a
queue delay and carries the preprocessing in its ``parameters`` (``vitdeploy.*`` keys) so a
client can read it from the model config. Nothing here imports torch, onnx or tritonclient.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vitdeploy import __version__
from vitdeploy.constants import INPUT_NAME, LOGITS_NAME
from vitdeploy.engine_manifest import EngineManifest, envelope, manifest_path_for
from vitdeploy.files import sha256_file
from vitdeploy.metadata import CPU_VARIANT, ArtifactMetadata, ShapeRange, read_onnx_metadata
from vitdeploy.outputs import OUTPUT_NAMES
from vitdeploy.runtimes import ENGINE_SUFFIXES, ONNX_SUFFIXES
from vitdeploy.serving.pbtxt import Enum, to_text
from vitdeploy.serving.releases import release_advice

PYTHON, ONNXRUNTIME, TENSORRT = "python", "onnxruntime", "tensorrt"
KINDS = (PYTHON, ONNXRUNTIME, TENSORRT)
# numpy dtype name -> Triton data type.
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                 "int64": "TYPE_INT64", "int32": "TYPE_INT32", "uint8": "TYPE_UINT8"}
PARAMETER_PREFIX = "vitdeploy."
PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent / "python_model.py"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class RepositoryOptions:
    """How the models are configured. ``kinds=None``: every kind the artifact can be served as."""

    name: str | None = None
    max_batch: int | None = None
    instances: int = 1
    max_queue_delay_us: int = 2000
    ort_tensorrt: bool = False
    kinds: tuple[str, ...] | None = None
    overwrite: bool = False
    tensorrt_workspace_bytes: int = 1 << 30
    # Serve an ONNX file's declared range instead of its validated one (warned; recorded in the config).
    beyond_validated: bool = False

    def __post_init__(self) -> None:
        if self.name is not None and not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} must start with a letter or digit and contain only "
                             "letters, digits, '_', '-' and '.'")
        if self.max_batch is not None and int(self.max_batch) < 1:
            raise ValueError(f"max batch {self.max_batch} must be >= 1")
        if int(self.instances) < 1:
            raise ValueError(f"instances {self.instances} must be >= 1")
        if int(self.max_queue_delay_us) < 0:
            raise ValueError(f"max queue delay {self.max_queue_delay_us} us must be >= 0")
        unknown = sorted(set(self.kinds or ()) - set(KINDS))
        if unknown:
            raise ValueError(f"model kinds {unknown} are not among {list(KINDS)}")


@dataclass
class ModelEntry:
    """One model written into the repository."""

    name: str
    kind: str
    path: Path
    artifact: str
    max_batch_size: int
    files: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass
class _Tensor:
    name: str
    dtype: str
    dims: list[int]  # without the batch dimension; -1 where dynamic


@dataclass
class _Artifact:
    """What a config needs, read from an ONNX file's metadata or an engine's manifest."""

    path: Path
    kind: str  # "onnx" | "engine"
    metadata: ArtifactMetadata | None
    inputs: list[_Tensor]
    outputs: list[_Tensor]
    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    manifest: EngineManifest | None = None
    onnx_for_python: Path | None = None  # the ONNX file the python model runs
    warnings: list[str] = field(default_factory=list)
    range_source: str = "engine profiles"  # an ONNX file's: "validated" or "declared" (DeployableRange.source)


def _dims(shape: list[Any]) -> list[int]:
    return [int(d) if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def _triton_dtype(dtype: str, where: str) -> str:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"{where} has dtype {dtype!r}, which has no Triton data type here ({sorted(TRITON_DTYPES)})")
    return TRITON_DTYPES[dtype]


def _onnx_artifact(path: Path, beyond_validated: bool = False) -> _Artifact:
    """An ONNX file served over its validated range (the declared one with ``beyond_validated``)."""
    metadata = read_onnx_metadata(path)
    inputs = [_Tensor(t.name, t.dtype, _dims(t.shape)) for t in metadata.inputs]
    outputs = [_Tensor(t.name, t.dtype, _dims(t.shape)) for t in metadata.outputs]
    allowed = metadata.deployable_range(beyond_validated, path.name)
    rng = allowed.shape_range
    return _Artifact(path, "onnx", metadata, inputs, outputs, rng.batch, rng.height, rng.width, onnx_for_python=path,
                     warnings=[allowed.warning] if allowed.warning else [], range_source=allowed.source)


def _source_onnx(engine: Path, manifest: EngineManifest) -> Path | None:
    """The ONNX file the engine was built from, if it is still where the manifest says (sha256 checked)."""
    recorded = Path(manifest.onnx_file)
    for candidate in (recorded, engine.parent / recorded.name):
        if candidate.is_file() and sha256_file(candidate) == manifest.onnx_sha256:
            return candidate
    return None


def _engine_artifact(path: Path) -> _Artifact:
    manifest = EngineManifest.read(manifest_path_for(path))
    if sha256_file(path) != manifest.engine_sha256:
        raise ValueError(f"{path} does not match the sha256 in its manifest {manifest_path_for(path).name}; "
                         "the engine was replaced after it was built")
    (batch, height, width) = envelope(manifest.profiles)
    inputs = [_Tensor(t.name, t.dtype, [int(d) for d in t.shape[1:]]) for t in manifest.inputs]
    outputs = [_Tensor(t.name, t.dtype, [int(d) for d in t.shape[1:]]) for t in manifest.outputs]
    artifact = _Artifact(path, "engine", manifest.artifact_metadata(), inputs, outputs, batch, height, width,
                         manifest=manifest, onnx_for_python=_source_onnx(path, manifest))
    low_batches = sorted({p.min[0] for p in manifest.profiles if p.min[0] > 1})
    if low_batches:
        artifact.warnings.append(
            f"the engine's profiles start at batch {low_batches[0]}, but Triton sends batches from 1: "
            "requests Triton does not batch up will fail; rebuild with a profile from batch 1"
        )
    if artifact.metadata is None:
        artifact.warnings.append("the engine's manifest carries no ONNX metadata, so the model has no "
                                 "preprocessing parameters for clients")
    return artifact


def describe(path: str | os.PathLike[str], beyond_validated: bool = False) -> _Artifact:
    """Read an ONNX file or an engine (by suffix); ``ValueError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return _onnx_artifact(path, beyond_validated)
    if suffix in ENGINE_SUFFIXES:
        return _engine_artifact(path)
    raise ValueError(f"artifact {str(path)!r} is neither an ONNX file ({', '.join(ONNX_SUFFIXES)}) nor a TensorRT "
                     f"engine ({', '.join(ENGINE_SUFFIXES)}); export or build one first")


def client_parameters(metadata: ArtifactMetadata | None, artifact: _Artifact) -> dict[str, str]:
    """The ``vitdeploy.*`` model parameters a client reads to preprocess and check its requests."""
    params = {
        "shape_range": json.dumps({"batch": list(artifact.batch), "height": list(artifact.height),
                                   "width": list(artifact.width)}),
        "shape_range_source": artifact.range_source,
        "vitdeploy_version": __version__,
    }
    if metadata is not None:
        params.update({
            "preprocessing": json.dumps(asdict(metadata.preprocessing)),
            "stride": str(metadata.stride),
            "num_classes": str(metadata.num_classes),
            "precision": metadata.precision,
            "model": str(metadata.model_provenance["name"] or ""),
            "source_sha256": metadata.source_sha256,
            "outputs": json.dumps(metadata.output_names),
        })
        labels = metadata.class_labels
        if labels:
            params["labels"] = json.dumps([str(label) for label in labels])
    return {PARAMETER_PREFIX + key: value for key, value in params.items()}


def _parameters(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def _io(tensors: list[_Tensor], where: str, labels: bool) -> list[dict[str, Any]]:
    entries = []
    for tensor in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "data_type": Enum(_triton_dtype(tensor.dtype, f"{where} "
                                                                                      f"{tensor.name!r}")),
                                 "dims": tensor.dims}
        if labels and tensor.name == LOGITS_NAME:
            entry["label_filename"] = "labels.txt"
        entries.append(entry)
    return entries


def _check_io(artifact: _Artifact) -> None:
    if [t.name for t in artifact.inputs] != [INPUT_NAME]:
        names = [t.name for t in artifact.inputs]
        raise ValueError(f"{artifact.path}: expected one input {INPUT_NAME!r}, found {names}")
    dims = artifact.inputs[0].dims
    if len(dims) != 3 or dims[1:] != [-1, -1]:
        raise ValueError(f"{artifact.path}: input {INPUT_NAME!r} must be [batch, channels, height, width] with dynamic "
                         f"height and width, got dims {dims} after the batch")
    names = [t.name for t in artifact.outputs]
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if not names or unknown:
        raise ValueError(f"{artifact.path}: outputs {names} are not vitdeploy outputs; expected some of "
                         f"{', '.join(OUTPUT_NAMES)}")


def _max_batch(artifact: _Artifact, options: RepositoryOptions) -> int:
    validated = artifact.batch[1]
    if options.max_batch is None:
        return validated
    if options.max_batch > validated:
        hint = "; --beyond-validated serves its declared range" if artifact.range_source == "validated" else ""
        raise ValueError(f"--max-batch {options.max_batch} is above the batch size {artifact.path.name} was "
                         f"validated (or built) for, {validated}{hint}")
    return int(options.max_batch)


def model_config(artifact: _Artifact, kind: str, name: str, files: list[str], options: RepositoryOptions,
                 metadata: ArtifactMetadata | None) -> dict[str, Any]:
    """The ``ModelConfig`` of one model as nested dicts (see :func:`vitdeploy.serving.pbtxt.to_text`)."""
    labels = bool(metadata and metadata.class_labels)
    config: dict[str, Any] = {"name": name}
    if kind == ONNXRUNTIME:
        config["platform"] = "onnxruntime_onnx"
    elif kind == TENSORRT:
        config["platform"] = "tensorrt_plan"
    else:
        config["backend"] = "python"
    config["max_batch_size"] = _max_batch(artifact, options)
    if kind != PYTHON:
        config["default_model_filename"] = files[0]
    config["input"] = _io(artifact.inputs, "input", labels=False)
    config["output"] = _io(artifact.outputs, "output", labels=labels)
    config["dynamic_batching"] = {"max_queue_delay_microseconds": int(options.max_queue_delay_us)}
    group_kind = {PYTHON: "KIND_CPU", ONNXRUNTIME: "KIND_AUTO", TENSORRT: "KIND_GPU"}[kind]
    config["instance_group"] = [{"count": int(options.instances), "kind": Enum(group_kind)}]
    if kind == ONNXRUNTIME and options.ort_tensorrt:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": _ort_tensorrt_parameters(artifact, options, metadata)}
        ]}}
    params = client_parameters(metadata, artifact)
    if kind == PYTHON:
        params[PARAMETER_PREFIX + "artifact"] = files[0]
    config["parameters"] = _parameters(params)
    return config


def _ort_tensorrt_parameters(artifact: _Artifact, options: RepositoryOptions,
                             metadata: ArtifactMetadata | None) -> list[dict[str, str]]:
    """Triton's ONNX Runtime backend keys for the TensorRT EP: precision and min/opt/max profile shapes."""
    from vitdeploy.runtimes.base import InputSpec
    from vitdeploy.runtimes.onnxruntime import profile_shapes

    spec = InputSpec.from_metadata(metadata) if metadata else InputSpec()
    spec = replace(spec, batch=artifact.batch, height=artifact.height, width=artifact.width)  # what is served
    shapes = profile_shapes(spec, opt_batch=min(spec.batch[1], max(spec.batch[0], _max_batch(artifact, options) // 2)))
    precision = "FP16" if metadata is not None and metadata.precision == "fp16" else "FP32"
    values = {
        "precision_mode": precision,
        "max_workspace_size_bytes": str(int(options.tensorrt_workspace_bytes)),
        "trt_engine_cache_enable": "1",
        "trt_profile_min_shapes": shapes["min"],
        "trt_profile_opt_shapes": shapes["opt"],
        "trt_profile_max_shapes": shapes["max"],
    }
    return [{"key": key, "value": value} for key, value in values.items()]


def _header(artifact: _Artifact, kind: str, extra: list[str]) -> list[str]:
    lines = [f"Written by vitdeploy {__version__} (`vitdeploy triton`) from {artifact.path.name}."]
    if kind == PYTHON:
        lines.append("Python backend: runs vitdeploy's onnxruntime runtime; needs `pip install 'vitdeploy[cpu]'` "
                     "in the server's Python.")
    if kind == ONNXRUNTIME:
        lines.append("ONNX Runtime backend on the portable graph (vitdeploy's CPU-fused variant is for the "
                     "python model only).")
    lines.append(_range_line(artifact))
    lines.append("Triton batches only requests of the same shape: send one resolution per request stream.")
    return lines + extra


def _range_line(artifact: _Artifact) -> str:
    """The validated and the declared (or built) shape ranges, told apart: parity may cover less."""
    validated = artifact.metadata.validated_range if artifact.metadata else None
    validated_text = validated.describe() if validated else "not checked"
    accepted = ShapeRange(artifact.batch, artifact.height, artifact.width).describe()
    if artifact.kind == "engine":
        return f"Shapes: validated (ONNX parity): {validated_text}; engine profiles: {accepted}."
    declared = artifact.metadata.shape_range.describe() if artifact.metadata else accepted
    served = "the validated range" if artifact.range_source == "validated" else (
        "the DECLARED range, beyond the validated one (--beyond-validated)" if validated else
        "the declared range (the file records no validation)")
    return f"Shapes: validated: {validated_text}; declared: {declared}; served: {accepted}, {served}."


def _copy(source: Path, target_dir: Path) -> str:
    target = target_dir / source.name
    shutil.copy2(source, target)
    return source.name


def _onnx_files(onnx: Path, metadata: ArtifactMetadata | None,
                include_cpu_variant: bool) -> tuple[list[Path], list[str]]:
    """The ONNX file, its external data and (for the python model) the validated CPU variant."""
    files, warnings = [onnx], []
    data = onnx.with_name(onnx.name + ".data")
    if data.is_file():
        files.append(data)
    if include_cpu_variant and metadata is not None:
        entry = metadata.variants.get(CPU_VARIANT)
        if entry:
            sibling = onnx.with_name(entry["file"])
            if sibling.is_file() and sha256_file(sibling) == entry.get("sha256"):
                files.append(sibling)
            else:
                warnings.append(f"{sibling.name} (the validated onnxruntime-CPU variant) is missing or does not match "
                                f"its sha256; the python model will run the portable graph")
    return files, warnings


def _kinds_for(artifact: _Artifact, requested: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    possible = [PYTHON, ONNXRUNTIME] if artifact.kind == "onnx" else [TENSORRT]
    warnings = []
    if artifact.kind == "engine":
        if artifact.onnx_for_python is not None:
            possible.append(PYTHON)
        else:
            warnings.append(f"no python model: the ONNX file the engine was built from ({artifact.manifest.onnx_file}) "
                            "is not beside it with the sha256 its manifest records")
    if requested is None:
        return possible, warnings
    missing = [kind for kind in requested if kind not in possible]
    if missing:
        raise ValueError(f"{artifact.path.name} cannot be served as {missing}: a {artifact.kind} artifact gives "
                         f"{possible}" + (f" ({warnings[0]})" if warnings else ""))
    return [kind for kind in possible if kind in requested], []


def _stage_model(staging: Path, artifact: _Artifact, kind: str, name: str, options: RepositoryOptions) -> ModelEntry:
    model_dir = staging / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    metadata = artifact.metadata
    warnings = list(artifact.warnings)
    extra_header: list[str] = []
    if kind == TENSORRT:
        files = [_copy(artifact.path, version_dir), _copy(manifest_path_for(artifact.path), version_dir)]
        matches, advice = release_advice(artifact.manifest)
        extra_header.append(f"TensorRT: {advice}.")
        if not matches:
            warnings.append(advice)
    else:
        onnx = artifact.onnx_for_python
        if onnx is None:
            raise ValueError(f"no ONNX file to serve for {artifact.path}")
        onnx_metadata = read_onnx_metadata(onnx)
        metadata = metadata or onnx_metadata
        sources, notes = _onnx_files(onnx, onnx_metadata, include_cpu_variant=kind == PYTHON)
        warnings += notes
        files = [_copy(source, version_dir) for source in sources]
        if kind == PYTHON:
            shutil.copy2(PYTHON_MODEL_SOURCE, version_dir / "model.py")
            files.append("model.py")
    labels = metadata.class_labels if metadata else None
    if labels:
        (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    config = model_config(artifact, kind, name, files, options, metadata)
    (model_dir / "config.pbtxt").write_text(to_text(config, _header(artifact, kind, extra_header)), encoding="utf-8")
    return ModelEntry(name=name, kind=kind, path=model_dir, artifact=str(artifact.path),
                      max_batch_size=int(config["max_batch_size"]), files=files, warnings=warnings)


def model_name(artifact: str | os.PathLike[str], kind: str, base: str | None = None) -> str:
    """``<base or the artifact's file stem>_<kind>``, with characters Triton names avoid replaced."""
    stem = base or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(artifact).stem) or "model"
    return f"{stem}_{kind}"


def write_repository(artifacts: list[str | os.PathLike[str]], repository: str | os.PathLike[str],
                     options: RepositoryOptions | None = None) -> list[ModelEntry]:
    """Write the models for ``artifacts`` into ``repository`` (created if needed) and return them.

    Each model is assembled in a staging folder beside the repository and moved in whole, so a
    failure leaves no half-written model. An existing model folder of the same name is an
    error unless ``options.overwrite``.
    """
    options = options or RepositoryOptions()
    if not artifacts:
        raise ValueError("no artifact given; pass at least one .onnx file or engine")
    if options.name is not None and len(artifacts) > 1:
        raise ValueError(f"--name {options.name!r} needs exactly one artifact, got {len(artifacts)}")
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise NotADirectoryError(f"repository {str(repository)!r} exists and is not a folder")
    described = [describe(path, options.beyond_validated) for path in artifacts]
    plan: list[tuple[_Artifact, str, str]] = []
    notes: dict[str, list[str]] = {}
    for artifact in described:
        _check_io(artifact)
        kinds, skipped = _kinds_for(artifact, options.kinds)
        for kind in kinds:
            name = model_name(artifact.path, kind, options.name)
            # An engine's python model runs the ONNX file it was built from, with that file's validated range.
            from_engine = kind == PYTHON and artifact.kind == "engine"
            served = _onnx_artifact(artifact.onnx_for_python, options.beyond_validated) if from_engine else artifact
            plan.append((served, kind, name))
            notes[name] = skipped
    names = [name for _, _, name in plan]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two artifacts would be written as the same model {duplicates}; rename one or pass --name")
    existing = [name for name in names if (repository / name).exists()]
    if existing and not options.overwrite:
        raise ValueError(f"{repository} already holds model(s) {existing}; pass --overwrite to replace them")

    created = not repository.exists()
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.staging-", dir=repository.parent))
    try:
        entries = []
        for artifact, kind, name in plan:
            entry = _stage_model(staging, artifact, kind, name, options)
            entry.warnings += notes[name]
            entries.append(entry)
        for entry in entries:
            final = repository / entry.name
            if final.exists():
                retired = staging / f".{entry.name}.replaced"
                os.replace(final, retired)
            os.replace(entry.path, final)
            entry.path = final
        return entries
    except BaseException:
        if created and not any(repository.iterdir()):
            repository.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
