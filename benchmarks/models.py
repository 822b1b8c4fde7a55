"""What to benchmark: a variant name, a checkpoint, or an exported artifact, and the files made from it.

Timing does not depend on the weights, so an ONNX artifact can still be compared with torch:
the torch baseline is then built from the artifact's recorded model config with random
weights (recorded as ``random_weights``). ONNX files for onnxruntime and TensorRT are exported
on first use into a cache folder and reused while they cover the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.config import ViTConfig
from vitdeploy.constants import with_article
from vitdeploy.files import slug
from vitdeploy.metadata import ArtifactMetadata, read_onnx_metadata

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


@dataclass(frozen=True)
class Sweep:
    """The shapes a sweep needs an artifact to accept."""

    batches: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]

    @property
    def batch_range(self) -> tuple[int, int]:
        return min(self.batches), max(self.batches)

    @property
    def height_range(self) -> tuple[int, int]:
        return min(h for h, _ in self.sizes), max(h for h, _ in self.sizes)

    @property
    def width_range(self) -> tuple[int, int]:
        return min(w for _, w in self.sizes), max(w for _, w in self.sizes)

    def covered_by(self, metadata: ArtifactMetadata) -> bool:
        rng = metadata.shape_range
        return all(lo <= need_lo and need_hi <= hi for (lo, hi), (need_lo, need_hi) in (
            (rng.batch, self.batch_range), (rng.height, self.height_range), (rng.width, self.width_range)))


@dataclass
class BenchModel:
    """One model under test and the artifacts made from it for the runtimes."""

    name: str
    source: str
    kind: str  # "variant" | "checkpoint" | "onnx" | "engine"
    config: ViTConfig
    cache_dir: Path
    random_weights: bool
    artifact: Path | None = None
    artifact_metadata: ArtifactMetadata | None = None
    _model: Any = field(default=None, repr=False)
    _onnx: dict[str, Path] = field(default_factory=dict, repr=False)
    _engines: dict[str, Path] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, source: str, cache_dir: str | Path, model_override: str | None = None) -> BenchModel:
        """Resolve ``source`` (variant name, checkpoint file/folder, ``.onnx`` or ``.engine``); a checkpoint is
        loaded with the architecture of the variant ``model_override`` if given (``resolve_source``'s ``model=``)."""
        from vitdeploy.variants import VARIANTS, get_config

        cache = Path(cache_dir)
        path = Path(source)
        if model_override is not None and (path.suffix.lower() in (*ONNX_SUFFIXES, *ENGINE_SUFFIXES)
                                           or (source in VARIANTS and not path.exists())):
            raise ValueError(f"model_override={model_override!r} forces an architecture on a checkpoint; "
                             f"{source!r} is a variant name or an artifact")
        if source in VARIANTS and not path.exists():
            return cls(source, source, "variant", get_config(source), cache, random_weights=True)
        if not path.exists():
            raise FileNotFoundError(
                f"model {source!r} is neither a known variant name (see `vitdeploy inspect --variants`) "
                "nor an existing checkpoint, .onnx or .engine path"
            )
        suffix = path.suffix.lower()
        if suffix in ONNX_SUFFIXES:
            metadata = read_onnx_metadata(path)
            config = ViTConfig.from_dict(metadata.model_config)
            model = cls(slug(source), source, "onnx", config, cache, random_weights=True,
                        artifact=path, artifact_metadata=metadata)
            model._onnx[metadata.precision] = path
            return model
        if suffix in ENGINE_SUFFIXES:
            config = _engine_config(path)
            model = cls(slug(source), source, "engine", config, cache, random_weights=True, artifact=path)
            model._engines[_engine_precision(path)] = path
            return model
        from vitdeploy.checkpoints import resolve_source

        resolved = resolve_source(source, model=model_override)
        model = cls(slug(source), source, "checkpoint", resolved.model.config, cache,
                    random_weights=bool(getattr(resolved, "random_weights", False)))
        model._model = resolved.model.eval()
        return model

    @classmethod
    def from_model(cls, name: str, source: str, model: Any, cache_dir: str | Path, random_weights: bool,
                   onnx: dict[str, Path] | None = None, engines: dict[str, Path] | None = None) -> BenchModel:
        """A loaded eager model plus artifacts already made from it (``vitdeploy deploy`` uses this)."""
        bench = cls(name, source, "checkpoint", model.config, Path(cache_dir), random_weights, _model=model.eval())
        bench._onnx.update(onnx or {})
        bench._engines.update(engines or {})
        return bench

    def torch_model(self) -> Any:
        """The eager fp32 CPU model (loaded or built once; random weights for artifacts and variants)."""
        if self._model is None:
            import torch

            from vitdeploy.model import VisionTransformer

            torch.manual_seed(0)
            self._model = VisionTransformer(self.config).eval()
        return self._model

    def onnx(self, precision: str, sweep: Sweep, log: Any = None) -> Path:
        """An ONNX file of this model in ``precision`` accepting the sweep's shapes (exported if needed)."""
        if precision in self._onnx:
            path = self._onnx[precision]
            if self.kind == "onnx" and path == self.artifact:
                return path  # a given artifact is used as is; out-of-range points fail with its reason
            if sweep.covered_by(read_onnx_metadata(path)):
                return path
        if self.kind == "onnx":
            raise ValueError(
                f"{self.source} is {with_article(self.artifact_metadata.precision)} artifact; "
                f"benchmark its own precision or pass the checkpoint to export {precision}"
            )
        if self.kind == "engine":
            raise ValueError(f"{self.source} is a TensorRT engine; onnxruntime needs an ONNX model")
        from vitdeploy.benchmarks.artifacts import artifact_plan
        from vitdeploy.exporters.artifact_set import build_artifact

        plan = artifact_plan(self.name, sweep, source=self.source)
        path = plan.path(self.cache_dir, precision)
        if path.exists():
            try:
                metadata = read_onnx_metadata(path)
                if metadata.precision == precision and sweep.covered_by(metadata) \
                        and metadata.model_config == self.config.to_dict() and self.kind != "checkpoint" \
                        and _int8_form_fits(metadata, plan):
                    self._onnx[precision] = path
                    return path
            except Exception:  # a foreign or broken file under our name is simply replaced
                pass
        if log is not None:
            log(f"exporting {self.name} {precision} ONNX for batch {sweep.batch_range}, "
                f"height {sweep.height_range}, width {sweep.width_range} -> {path}")
        build_artifact(self.torch_model(), plan, precision, self.cache_dir)
        self._onnx[precision] = path
        return path

    def engine(self, precision: str, sweep: Sweep, log: Any = None) -> Path:
        """A TensorRT engine in ``precision`` for the sweep (built from the ONNX file if needed)."""
        if precision in self._engines:
            return self._engines[precision]
        if self.kind == "engine":
            raise ValueError(f"{self.source} is a single engine; benchmark it with its own precision")
        onnx_path = self.onnx(precision, sweep, log)
        path = self.cache_dir / f"{self.name}-{precision}.engine"
        from vitdeploy.benchmarks.artifacts import build_engine_for_bench

        if log is not None:
            log(f"building TensorRT {precision} engine from {onnx_path} -> {path}")
        build_engine_for_bench(onnx_path, path, sweep, log)
        self._engines[precision] = path
        return path


def _engine_config(path: Path) -> ViTConfig:
    """The model config recorded in an engine's manifest (``vitdeploy build`` writes it)."""
    from vitdeploy.engine_manifest import EngineManifest, manifest_path_for

    metadata = EngineManifest.read(manifest_path_for(path)).artifact_metadata()
    if metadata is None:
        raise ValueError(f"the manifest of {path} records no model config; cannot count FLOPs or build a baseline")
    return ViTConfig.from_dict(metadata.model_config)


def _engine_precision(path: Path) -> str:
    from vitdeploy.engine_manifest import EngineManifest, manifest_path_for

    return EngineManifest.read(manifest_path_for(path)).precision


def _int8_form_fits(metadata: Any, plan: Any) -> bool:
    """Whether a cached file's int8 weight range is the one ``plan`` exports
    (:data:`~vitdeploy.exporters.artifact_set.INT8_POLICY`); true for other precisions."""
    from vitdeploy.metadata import quantization_record

    quantize = quantization_record(metadata)
    return quantize is None or bool(quantize.get("reduce_range")) == plan.int8.reduce_range
