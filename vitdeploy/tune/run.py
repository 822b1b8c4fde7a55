"""``vitdeploy tune``: the fastest accurate CPU path for this machine, measured and recorded.

What is fastest differs from CPU to CPU (on an AVX2-only EPYC the 7-bit int8 file on onnxruntime
wins; with VNNI the full-range file; with avx512_bf16/AMX OpenVINO's bf16 may), so nothing is
guessed. Given an export folder (fp32 with its onnxruntime-CPU variant, int8 Q/DQ), tune

1. lists the candidates (:func:`candidate_list`): onnxruntime fp32 (the fused CPU variant), int8
   full range and 7-bit, fp8; OpenVINO fp32, bf16, int8 (f32 or bf16 elsewhere) and int8 7-bit —
   each that cannot run here with its reason;
2. makes the int8 form the folder lacks from its fp32 file (:func:`ensure_int8_forms`, the same
   quantizer and calibration images as the export);
3. measures each candidate's accuracy against eager fp32 (or the fp32 graph when no model is at
   hand): labelled top-1 when a labelled folder is given, else worst cosine and top-1 agreement on
   real photographs;
4. times every candidate side by side in interleaved rounds at each batch size
   (:func:`~vitdeploy.benchmarks.side_by_side.time_rounds`), and in each backend's throughput mode
   (:mod:`vitdeploy.benchmarks.throughput`);
5. picks the fastest within the accuracy gate (:func:`select`) and writes ``tune.json``
   (:mod:`vitdeploy.tune_manifest`), ``tune.md`` and a latency-vs-accuracy plot into the folder.

``runtimes.load(folder)`` and ``vitdeploy predict FOLDER`` then run the choice.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.tune_manifest import Choice, TuneManifest, write_manifest

Log = Callable[[str], None]
RunFn = Callable[[np.ndarray], Any]

PEER = "openvino-nncf-int8 (peer)"
GRAPH_FILES = {"int8": "int8", "int8-7bit": "int8-7bit"}  # graph -> file-name suffix tune writes
OBJECTIVES = ("latency", "throughput")


# ---------------------------------------------------------------------------------------------
# Candidates


@dataclass(frozen=True)
class Candidate:
    """One way to run the model here: a backend, an artifact (``graph``) and a precision hint."""

    name: str
    backend: str  # onnxruntime | openvino
    graph: str  # fp32 | int8 | int8-7bit | fp8
    precision: str  # what the matmuls compute in
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why it cannot run here; None: it can


def candidate_list(flags: frozenset[str], onnxruntime: bool = True, openvino: bool = True) -> list[Candidate]:
    """Every CPU candidate, in a fixed order, each with the reason it cannot run on a CPU with ``flags``.

    ``onnxruntime``/``openvino``: whether those packages are installed.
    """
    from vitdeploy.cpu_features import BF16_FLAGS, INT8_DOT_FLAGS

    no_ort = None if onnxruntime else "onnxruntime is not installed (pip install 'vitdeploy[cpu]')"
    no_ov = None if openvino else "openvino is not installed (pip install 'vitdeploy[openvino]')"
    bf16 = bool(flags & set(BF16_FLAGS))
    no_bf16 = None if bf16 else f"this CPU has no bf16 arithmetic ({'/'.join(BF16_FLAGS)} not in /proc/cpuinfo)"
    dot = sorted(flags & set(INT8_DOT_FLAGS))
    int8_note = f"int8 dot products: {', '.join(dot)}" if dot else "no VNNI/AMX: int8 sums saturate at 16 bits"
    f32 = {"inference_precision": "f32"}
    return [
        Candidate("ort-fp32", "onnxruntime", "fp32", "fp32", "onnxruntime, fp32 graph (fused CPU variant)",
                  reason=no_ort),
        Candidate("ort-int8", "onnxruntime", "int8", "int8", f"onnxruntime, int8 Q/DQ, full-range weights ({int8_note})",
                  reason=no_ort),
        Candidate("ort-int8-7bit", "onnxruntime", "int8-7bit", "int8", "onnxruntime, int8 Q/DQ, 7-bit weights",
                  reason=no_ort),
        Candidate("ort-fp8", "onnxruntime", "fp8", "fp8", "onnxruntime, fp8 E4M3 Q/DQ",
                  reason="no fp8 kernel in onnxruntime's CPU provider: it runs fp8 Q/DQ as an emulation (values "
                         "rounded to E4M3, matmuls in fp32), never faster than fp32; fp8 is for TensorRT on Ada/Hopper"),
        Candidate("openvino-fp32", "openvino", "fp32", "fp32", "OpenVINO, fp32 graph at f32", f32, no_ov),
        Candidate("openvino-bf16", "openvino", "fp32", "bf16", "OpenVINO, fp32 graph at bf16 inference precision",
                  {"inference_precision": "bf16"}, no_ov or no_bf16),
        Candidate("openvino-int8", "openvino", "int8", "int8", f"OpenVINO, int8 Q/DQ, full-range weights, f32 elsewhere "
                  f"({int8_note})", f32, no_ov),
        Candidate("openvino-int8-bf16", "openvino", "int8", "int8", "OpenVINO, int8 Q/DQ, full-range weights, bf16 "
                  "elsewhere", {"inference_precision": "bf16"}, no_ov or no_bf16),
        Candidate("openvino-int8-7bit", "openvino", "int8-7bit", "int8", "OpenVINO, int8 Q/DQ, 7-bit weights, f32 "
                  "elsewhere", f32, no_ov),
    ]


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# The accuracy gate and the selection rule


@dataclass(frozen=True)
class AccuracyGate:
    """How much accuracy a candidate may lose: ``max_drop_points`` of labelled top-1 when labelled
    images are given; else ``min_cosine`` (worst over the photos) and ``min_top1_agreement``
    against eager fp32."""

    max_drop_points: float = 0.5
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.99

    def __post_init__(self) -> None:
        if not self.max_drop_points >= 0:
            raise ValueError(f"max accuracy drop must be >= 0 points, got {self.max_drop_points}")
        for name in ("min_cosine", "min_top1_agreement"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [-1, 1], got {getattr(self, name)}")

    @classmethod
    def parse(cls, text: str) -> AccuracyGate:
        """``"0.5"`` (labelled points) or ``"points=0.5,cosine=0.999,top1=0.99"`` (any subset)."""
        keys = {"points": "max_drop_points", "cosine": "min_cosine", "top1": "min_top1_agreement"}
        values: dict[str, float] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, _, value = item.rpartition("=")
            key = key.strip() or "points"
            if key not in keys:
                raise ValueError(f"--max-accuracy-drop {text!r}: {key!r} is not one of {list(keys)}")
            try:
                values[keys[key]] = float(value)
            except ValueError:
                raise ValueError(f"--max-accuracy-drop {text!r}: {value!r} is not a number") from None
        if not values:
            raise ValueError(f"--max-accuracy-drop {text!r} sets nothing; e.g. 0.5 or cosine=0.99,top1=0.95")
        return cls(**values)

    def failures(self, accuracy: dict[str, Any]) -> list[str]:
        """Why ``accuracy`` (a candidate's figures) is outside the gate; empty when it passes."""
        if accuracy["kind"] == "labelled":
            drop = accuracy["top1_drop_points"]
            return [] if drop <= self.max_drop_points else [
                f"top-1 drops {drop:.2f} points on {accuracy['images']} labelled images (at most "
                f"{self.max_drop_points:g} allowed)"]
        failures = []
        if not accuracy["cosine"] >= self.min_cosine:  # NaN fails too
            failures.append(f"worst cosine {accuracy['cosine']:.5f} vs eager fp32 on {accuracy['images']} photos is "
                            f"below {self.min_cosine:g}")
        if not accuracy["top1_agreement"] >= self.min_top1_agreement:
            failures.append(f"top-1 agreement {accuracy['top1_agreement']:.3f} is below {self.min_top1_agreement:g}")
        return failures

    def describe(self, labelled: bool) -> str:
        if labelled:
            return f"labelled top-1 drop <= {self.max_drop_points:g} points"
        return f"worst cosine >= {self.min_cosine:g} and top-1 agreement >= {self.min_top1_agreement:g} vs eager fp32"


@dataclass
class Selection:
    """The outcome of :func:`select`: the chosen name (or ``None``), the dropped ones with reasons,
    the eligible ones fastest first, and the figure compared."""

    chosen: str | None
    dropped: dict[str, str]
    ranking: list[str]
    key: str


def speed_key(record: Any, objective: str, batch: int) -> float | None:
    """What :func:`select` minimises: p50 ms at ``batch`` (latency), or minus images/s of the
    throughput mode, else at ``batch`` (throughput); ``None`` when not measured."""
    if objective == "latency":
        return record.latency_ms.get(str(batch))
    if record.throughput and record.throughput.get("images_per_s"):
        return -float(record.throughput["images_per_s"])
    ips = record.images_per_s.get(str(batch))
    return -ips if ips else None


def select(records: Sequence[Any], gate: AccuracyGate, objective: str = "latency", batch: int = 1) -> Selection:
    """The fastest timed candidate within ``gate``: records (``CandidateRecord``) with status ``ok``
    and an ``accuracy`` are eligible when the gate passes; ties keep the earlier candidate."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {list(OBJECTIVES)}")
    dropped: dict[str, str] = {}
    eligible: list[tuple[float, int, str]] = []
    for index, record in enumerate(records):
        if record.status != "ok":
            continue
        if record.accuracy is None:
            dropped[record.name] = "accuracy was not measured"
            continue
        failures = gate.failures(record.accuracy)
        if failures:
            dropped[record.name] = "; ".join(failures)
            continue
        key = speed_key(record, objective, batch)
        if key is None or not math.isfinite(key):
            dropped[record.name] = f"no {objective} figure at batch {batch}"
            continue
        eligible.append((key, index, record.name))
    eligible.sort()
    ranking = [name for _, _, name in eligible]
    what = f"p50 latency at batch {batch}" if objective == "latency" else "images/s in throughput mode"
    return Selection(ranking[0] if ranking else None, dropped, ranking, what)


# ---------------------------------------------------------------------------------------------
# Artifacts


def find_artifacts(folder: str | Path) -> dict[str, Path]:
    """The portable ONNX files of ``folder`` by graph kind (``fp32``, ``int8``, ``int8-7bit``, ``fp8``),
    read from their metadata (the ``.cpu.onnx`` variants are found by ``OrtRuntime`` itself)."""
    from vitdeploy.metadata import CPU_VARIANT, read_onnx_metadata

    found: dict[str, Path] = {}
    for path in sorted(Path(folder).glob("*.onnx")):
        try:
            metadata = read_onnx_metadata(path)
        except Exception:  # noqa: BLE001 - a foreign ONNX file is not a candidate
            continue
        if metadata.target == CPU_VARIANT or metadata.precision not in ("fp32", "int8", "fp8"):
            continue
        graph = metadata.precision
        if graph == "int8":
            record = next((t for t in metadata.transforms if t.get("name") == "quantize"), {})
            graph = "int8-7bit" if record.get("reduce_range") else "int8"
        found.setdefault(graph, path)
    return found


def ensure_int8_forms(folder: Path, artifacts: dict[str, Path], wanted: set[str], calibration: str | None,
                      calibration_size: int, log: Log) -> dict[str, str]:
    """Quantize the fp32 file into each int8 form in ``wanted`` that ``artifacts`` lacks (validated
    against the fp32 graph, written into ``folder``); returns ``{graph: why not}`` for those that failed."""
    from vitdeploy.exporters.onnx_export import ExportValidationError
    from vitdeploy.exporters.quantize import QuantizeOptions
    from vitdeploy.exporters.quantize_onnx import quantize_onnx

    failed: dict[str, str] = {}
    fp32 = artifacts["fp32"]
    stem = fp32.stem[:-len("-fp32")] if fp32.stem.endswith("-fp32") else fp32.stem
    for graph in sorted(wanted - set(artifacts)):
        if graph not in GRAPH_FILES:
            continue
        target = folder / f"{stem}-{GRAPH_FILES[graph]}.onnx"
        log(f"quantizing {fp32.name} -> {target.name} ({'7-bit' if graph == 'int8-7bit' else 'full-range'} int8 "
            f"weights, calibration: {calibration or 'bundled photos + crops'})")
        try:
            quantize_onnx(fp32, target, QuantizeOptions(reduce_range=graph == "int8-7bit"), calibration=calibration,
                          calibration_size=calibration_size, max_batch=1)
            artifacts[graph] = target
        except ExportValidationError as error:
            failed[graph] = f"its quantized graph failed the int8 gate: {'; '.join(error.report.failures[:2])}"
    return failed


def export_for_tune(model: Any, folder: Path, name: str, batch: tuple[int, int], source: str = "",
                    source_sha256: str = "", calibration: str | None = None, calibration_size: int = 64,
                    log: Log | None = None) -> dict[str, Path]:
    """Export ``model`` into ``folder`` as deploy does: fp32 with its onnxruntime-CPU variant, and the
    full-range int8 file quantized from it (one trace), each validated against the eager model; files
    of this source already in the folder (same ``source_sha256``) are reused."""
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.exporters.quantize import QuantizeOptions
    from vitdeploy.exporters.quantize_onnx import quantize_onnx
    from vitdeploy.metadata import read_onnx_metadata

    say = log or (lambda message: None)
    artifacts = find_artifacts(folder) if folder.is_dir() else {}
    folder.mkdir(parents=True, exist_ok=True)
    for precision in ("fp32", "int8"):
        existing = artifacts.get(precision)
        if existing is not None and source_sha256 and read_onnx_metadata(existing).source_sha256 == source_sha256:
            say(f"reusing {existing.name} (exported from this source)")
            continue
        path = folder / f"{name}-{precision}.onnx"
        say(f"exporting {path.name} (validated against the eager model)")
        if precision == "fp32":
            export_onnx(model, path, ExportOptions(batch=batch, validation_max_batch=4, source=source,
                                                   source_sha256=source_sha256, preflight=False), progress=say)
        else:
            quantize_onnx(artifacts["fp32"], path, QuantizeOptions(), calibration=calibration,
                          calibration_size=calibration_size, reference=model, max_batch=4, progress=say)
        artifacts[precision] = path
    return artifacts


# ---------------------------------------------------------------------------------------------
# Accuracy


@dataclass
class AccuracyData:
    """The inputs and reference outputs every candidate is judged on (computed once)."""

    kind: str  # labelled | agreement
    chunks: list[np.ndarray]
    reference_logits: np.ndarray
    labels: np.ndarray | None
    source: str

    def figures(self, run: RunFn) -> dict[str, Any]:
        """A candidate's figures on these inputs (:mod:`vitdeploy.parity` metrics)."""
        from vitdeploy.parity import accuracy, compare_logits

        logits = np.concatenate([np.asarray(run(chunk), dtype=np.float32) for chunk in self.chunks])
        parity = compare_logits(self.reference_logits, logits)
        figures: dict[str, Any] = {"kind": self.kind, "images": int(len(logits)), "source": self.source,
                                   "cosine": parity.cosine, "top1_agreement": parity.top1_agreement,
                                   "top5_agreement": parity.top5_agreement, "rel_max_error": parity.rel_max_error}
        if self.labels is not None:
            mine, ref = accuracy(logits, self.labels), accuracy(self.reference_logits, self.labels)
            figures.update(top1=mine.top1, top5=mine.top5, reference_top1=ref.top1,
                           top1_drop_points=100.0 * (ref.top1 - mine.top1))
        return figures


def accuracy_data(reference: RunFn, metadata: Any, max_batch: int, size: int, labelled: str | None = None,
                  images: str | None = None) -> AccuracyData:
    """Labelled images (ImageFolder ``labelled``) or real photos (``images`` folder, default the bundled
    ones) preprocessed once, in chunks the artifacts accept, with the reference's logits."""
    from vitdeploy.parity import InputFactory
    from vitdeploy.preprocessing import load_labels, preprocess_batch

    chunk = max(1, min(32, max_batch))
    if labelled is not None:
        from vitdeploy.datasets import image_folder

        dataset = image_folder(labelled, metadata.num_classes, load_labels(metadata))
        files = [path for path, _ in dataset.items]
        chunks = [np.ascontiguousarray(preprocess_batch(files[i:i + chunk], metadata.preprocessing), dtype=np.float32)
                  for i in range(0, len(files), chunk)]
        labels = np.asarray([label for _, label in dataset.items], dtype=np.int64)
        kind, source = "labelled", f"{dataset.count} labelled images in {labelled}"
    else:
        from vitdeploy.calibration import image_files
        from vitdeploy.preprocessing import bundled_images

        photos = list(image_files(images) if images is not None else bundled_images())
        if not photos:
            raise ValueError(f"no images to measure agreement on in {images!r}")
        chunks = [InputFactory(metadata.preprocessing, images=photos[i:i + chunk], synthetic=False)
                  .batch(len(photos[i:i + chunk]), size, size)[0] for i in range(0, len(photos), chunk)]
        count = len(photos)
        labels, kind = None, "agreement"
        source = f"{count} real photos at {size}x{size} ({images or 'bundled'})"
    reference_logits = np.concatenate([np.asarray(reference(c), dtype=np.float32) for c in chunks])
    return AccuracyData(kind, chunks, reference_logits, labels, source)


def eager_reference(model: Any) -> RunFn:
    """The eager fp32 model as a numpy callable (``torch.inference_mode``)."""
    import torch

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = model(torch.from_numpy(pixels))
        return (output if isinstance(output, torch.Tensor) else output[0]).float().numpy()

    return run


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class TunePlan:
    """What one ``vitdeploy tune`` run does (see the module docstring)."""

    folder: Path
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 5
    iterations: int = 10  # calls per candidate per round at batch 1 (scaled down for larger batches)
    warmup: int = 2
    threads: int | None = None
    gate: AccuracyGate = field(default_factory=AccuracyGate)
    labelled: str | None = None
    images: str | None = None
    objective: str = "latency"
    throughput: bool = True
    throughput_batch: int | None = None  # default: the largest of ``batches``
    throughput_rounds: int | None = None  # default: ``rounds``
    throughput_calls: int = 2  # requests per worker per burst
    calibration: str | None = None
    calibration_size: int = 64
    peer: bool = False  # also time OpenVINO + NNCF int8 (not selectable)
    only: tuple[str, ...] | None = None  # candidate names to consider (the rest are listed as not asked for)
    command: str = ""

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.batches = tuple(int(b) for b in self.batches)
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be integers >= 1, got {list(self.batches)}")
        for name in ("rounds", "iterations", "calibration_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {list(OBJECTIVES)}")
        for name in ("throughput_batch", "throughput_rounds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.throughput_calls < 1:
            raise ValueError(f"throughput_calls must be >= 1, got {self.throughput_calls}")
        if self.labelled is not None and not Path(self.labelled).is_dir():
            raise ValueError(f"labelled folder {self.labelled!r} is not a folder (ImageFolder layout: DIR/<class>/<image>)")
        if self.images is not None and not Path(self.images).is_dir():
            raise ValueError(f"images folder {self.images!r} is not a folder")
        names = {c.name for c in candidate_list(frozenset())}
        unknown = sorted(set(self.only or ()) - names)
        if unknown:
            raise ValueError(f"unknown candidate(s) {unknown}; expected some of {sorted(names)}")

    @property
    def selection_batch(self) -> int:
        return min(self.batches)


@dataclass
class TuneResult:
    manifest: TuneManifest
    manifest_path: Path
    report_path: Path
    plot_path: Path | None


def _open(candidate: Candidate, path: Path, threads: int) -> tuple[Any, list[str]]:
    """The candidate's runtime in latency mode, and the warnings it raised (as notes)."""
    from vitdeploy.runtimes import OpenVINORuntime, OrtRuntime

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if candidate.backend == "onnxruntime":
            runtime = OrtRuntime(path, intra_op_threads=threads, inter_op_threads=1)
        else:
            runtime = OpenVINORuntime(path, threads=threads, **candidate.options)
    return runtime, [" ".join(str(w.message).split()) for w in caught]


def _throughput_runner(candidate: Candidate, path: Path, pixels: np.ndarray, threads: int, calls: int) -> Any:
    from vitdeploy.benchmarks.throughput import onnxruntime_parallel, openvino_throughput

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already noted by the latency-mode runtime
        if candidate.backend == "onnxruntime":
            return onnxruntime_parallel(path, pixels, threads, calls)
        return openvino_throughput(path, pixels, threads, calls,
                                   inference_precision=candidate.options.get("inference_precision", "f32"))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _relative(path: Path, folder: Path) -> str:
    import os

    return os.path.relpath(path, folder)


def _random_pixels(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)


def _time_latency(plan: TunePlan, records: dict[str, Any], runtimes: dict[str, Any], peer: dict[str, Any] | None,
                  size: int, say: Log) -> None:
    """Every runtime (and the peer) side by side in interleaved rounds at each batch size; fills the
    records' ``latency_ms``, ``latency_rounds_ms`` and ``images_per_s`` (the peer's ``latency_ms``)."""
    from vitdeploy.benchmarks.side_by_side import time_rounds

    for batch in plan.batches:
        pixels = _random_pixels(batch, size)
        runners = {name: (lambda run=runtime, x=pixels: run(x)) for name, runtime in runtimes.items()}
        if peer is not None and peer.get("run") is not None:
            runners[PEER] = lambda run=peer["run"], x=pixels: run(x)
        iterations = max(1, plan.iterations // batch)
        say(f"batch {batch}: {len(runners)} candidates x {plan.rounds} rounds x {iterations} calls, interleaved")
        for name, values in time_rounds(runners, plan.rounds, iterations, plan.warmup).items():
            median = float(np.median(values))
            if name == PEER:
                peer.setdefault("latency_ms", {})[str(batch)] = median
                continue
            record = records[name]
            record.latency_ms[str(batch)] = median
            record.latency_rounds_ms[str(batch)] = [round(v, 4) for v in values]
            record.images_per_s[str(batch)] = batch * 1000.0 / median


def _time_throughput(plan: TunePlan, timed: list[tuple[Candidate, Any]], batch: int, size: int, threads: int,
                     say: Log) -> None:
    """Each candidate in its backend's throughput mode, bursts interleaved; fills ``record.throughput``."""
    from vitdeploy.benchmarks.side_by_side import time_rounds

    pixels = _random_pixels(batch, size)
    bursts: dict[str, Any] = {}
    records = {record.name: record for _, record in timed}
    for candidate, record in timed:
        try:
            bursts[record.name] = _throughput_runner(candidate, plan.folder / record.artifact, pixels, threads,
                                                     plan.throughput_calls)
        except Exception as error:  # noqa: BLE001 - the latency figures stand without it
            record.notes.append(f"throughput mode failed: {_one_line(error)}")
    rounds = plan.throughput_rounds or plan.rounds
    say(f"throughput mode at batch {batch}: {len(bursts)} candidates x {rounds} rounds, interleaved")
    try:
        for name, values in time_rounds(dict(bursts), rounds, 1, 0).items():
            burst = bursts[name]
            records[name].throughput = {"batch": batch, "mode": burst.mode, "how": burst.describe,
                                        "images_per_s": burst.images * 1000.0 / float(np.median(values))}
    finally:
        for burst in bursts.values():
            burst.close()


def tune(plan: TunePlan, reference_model: Any = None, log: Log | None = None) -> TuneResult:
    """Run ``plan`` on the export folder ``plan.folder`` (see the module docstring). ``reference_model``
    (the eager model) is the accuracy reference; without it, the fp32 graph on onnxruntime is."""
    from vitdeploy.benchmarks.environment import (
        ARITHMETIC_FLAGS,
        capture_environment,
        cpu_flags,
        cpu_model,
        recording_load,
        usable_cpus,
    )
    from vitdeploy.benchmarks.tune_report import latency_vs_accuracy, render_markdown
    from vitdeploy.files import atomic_write_text, sha256_file
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.tune_manifest import CandidateRecord

    say = log or (lambda message: None)
    folder = plan.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {str(folder)!r} does not exist")
    artifacts = find_artifacts(folder)
    if "fp32" not in artifacts:
        raise ValueError(f"{str(folder)!r} has no fp32 vitdeploy ONNX file; export one (vitdeploy export/deploy) first")
    metadata = read_onnx_metadata(artifacts["fp32"])
    spec = metadata.shape_range
    if max(plan.batches) > spec.batch[1] or min(plan.batches) < spec.batch[0]:
        raise ValueError(f"batch sizes {list(plan.batches)} are outside the artifacts' validated batch range "
                         f"{spec.batch[0]}..{spec.batch[1]}")
    throughput_batch = plan.throughput_batch or max(plan.batches)
    if plan.throughput and not spec.batch[0] <= throughput_batch <= spec.batch[1]:
        raise ValueError(f"throughput batch {throughput_batch} is outside the artifacts' validated batch range "
                         f"{spec.batch[0]}..{spec.batch[1]}")
    native = int(metadata.model_config.get("image_size", spec.height[0]))
    size = min(max(native, spec.height[0], spec.width[0]), spec.height[1], spec.width[1])
    threads = plan.threads or usable_cpus()
    flags = cpu_flags()

    listed = candidate_list(flags, installed("onnxruntime"), installed("openvino"))
    wanted = [c for c in listed if c.reason is None and (plan.only is None or c.name in plan.only)]
    made = ensure_int8_forms(folder, artifacts, {c.graph for c in wanted}, plan.calibration,
                             plan.calibration_size, say) if wanted else {}

    records: dict[str, CandidateRecord] = {}
    runtimes: dict[str, Any] = {}
    for candidate in listed:
        record = CandidateRecord(candidate.name, candidate.backend, candidate.graph, candidate.precision,
                                 candidate.description, "ok", options=dict(candidate.options))
        records[candidate.name] = record
        path = artifacts.get(candidate.graph)
        if candidate.reason is not None:
            record.status, record.reason = "unavailable", candidate.reason
        elif plan.only is not None and candidate.name not in plan.only:
            record.status, record.reason = "skipped", "not asked for (--candidates)"
        elif path is None:
            record.status = "failed" if candidate.graph in made else "unavailable"
            record.reason = made.get(candidate.graph, f"no {candidate.graph} artifact in the folder")
        else:
            record.artifact = _relative(path, folder)
            try:
                runtimes[candidate.name], record.notes = _open(candidate, path, threads)
            except Exception as error:  # noqa: BLE001 - one candidate failing does not stop the others
                record.status, record.reason = "failed", _one_line(error)
    by_name = {c.name: c for c in listed}

    # Accuracy, once per candidate, against the same reference outputs.
    if reference_model is not None:
        reference_fn, reference_name = eager_reference(reference_model), "eager fp32 (PyTorch)"
    else:
        from vitdeploy.runtimes import OrtRuntime

        reference_runtime = OrtRuntime(artifacts["fp32"], variant="portable", intra_op_threads=threads)
        reference_fn = reference_runtime
        reference_name = f"{artifacts['fp32'].name} on onnxruntime (validated against eager fp32 at export)"
    say(f"accuracy reference: {reference_name}")
    data = accuracy_data(reference_fn, metadata, spec.batch[1], size, plan.labelled, plan.images)
    say(f"measuring accuracy of {len(runtimes)} candidates on {data.source}")
    peer = None
    if plan.peer:
        peer = _nncf_peer(artifacts["fp32"], plan, metadata, threads, size, say)
    for name, runtime in list(runtimes.items()):
        try:
            records[name].accuracy = data.figures(runtime)
        except Exception as error:  # noqa: BLE001
            records[name].status, records[name].reason = "failed", _one_line(error)
            runtimes.pop(name).close()
    if peer is not None and peer.get("run") is not None:
        peer["accuracy"] = data.figures(peer["run"])

    with recording_load() as load:
        _time_latency(plan, records, runtimes, peer, size, say)
        # The latency-mode runtimes are closed first: the throughput ones hold more copies of the weights.
        timed = list(runtimes)
        for runtime in runtimes.values():
            runtime.close()
        if plan.throughput and timed:
            _time_throughput(plan, [(by_name[name], records[name]) for name in timed], throughput_batch, size,
                             threads, say)
    if reference_model is None:
        reference_runtime.close()

    selection = select(list(records.values()), plan.gate, plan.objective, plan.selection_batch)
    for name, reason in selection.dropped.items():
        records[name].status, records[name].reason = "dropped", reason
    chosen = None
    if selection.chosen is not None:
        winner = records[selection.chosen]
        options = dict(winner.options)
        if plan.objective == "throughput" and winner.backend == "openvino":
            options["performance_hint"] = "THROUGHPUT"
        labelled = plan.labelled is not None
        chosen = Choice(winner.name, winner.backend, winner.artifact, sha256_file(folder / winner.artifact), options,
                        why=f"fastest {selection.key} of {len(selection.ranking)} candidate(s) within "
                            f"{plan.gate.describe(labelled)}")
        say(f"chose {winner.name}: {winner.description} ({chosen.why})")
    else:
        say(f"no candidate passed the accuracy gate ({plan.gate.describe(plan.labelled is not None)})")
    peer_record = None
    if peer is not None:
        peer_record = {k: v for k, v in peer.items() if k != "run"}
        if chosen is not None and peer.get("latency_ms"):
            peer_record["chosen_vs_peer"] = {b: records[chosen.name].latency_ms[b] / ms
                                             for b, ms in peer["latency_ms"].items()}
    environment = capture_environment(plan.command, threads)
    manifest = TuneManifest(
        chosen=chosen, candidates=list(records.values()),
        cpu={"model": cpu_model(), "usable_cpus": usable_cpus(), "threads": threads,
             "flags": sorted(set(ARITHMETIC_FLAGS) & flags), "flags_checked": list(ARITHMETIC_FLAGS)},
        gate={"rule": plan.gate.describe(plan.labelled is not None), "max_drop_points": plan.gate.max_drop_points,
              "min_cosine": plan.gate.min_cosine, "min_top1_agreement": plan.gate.min_top1_agreement,
              "accuracy_on": data.source},
        objective=f"{plan.objective}: {selection.key}", batches=list(plan.batches), rounds=plan.rounds,
        reference=reference_name, command=plan.command,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions={k: v for k, v in environment["versions"].items() if k in ("vitdeploy", "onnxruntime", "torch")}
        | {"openvino": _version("openvino"), "nncf": _version("nncf")},
        peer=peer_record, load=load.to_dict(),
    )
    manifest_file = write_manifest(folder, manifest)
    plot = None
    try:
        plot = latency_vs_accuracy(manifest, folder / "tune_latency_vs_accuracy.png")
    except ModuleNotFoundError as error:  # matplotlib is the bench extra's
        say(f"no plot: {error}")
    report = folder / "tune.md"
    atomic_write_text(report, render_markdown(manifest, load.describe(), plot.name if plot else None))
    say(f"wrote {manifest_file}, {report}" + (f" and {plot}" if plot else ""))
    return TuneResult(manifest, manifest_file, report, plot)


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _nncf_peer(fp32: Path, plan: TunePlan, metadata: Any, threads: int, size: int, say: Log) -> dict[str, Any]:
    """OpenVINO + NNCF int8 of the same fp32 file and calibration images (NNCF's transformer preset),
    timed beside the candidates as the peer to beat; ``run`` is ``None`` (with ``reason``) without nncf."""
    from vitdeploy.benchmarks.cpu_int8 import nncf_peer
    from vitdeploy.calibration import load_calibration

    description = "OpenVINO running NNCF int8 (nncf.quantize, ModelType.TRANSFORMER) of the same fp32 file"
    calibration = load_calibration(plan.calibration, plan.calibration_size, metadata.preprocessing, log=None)
    say(f"quantizing the peer: {description}, {calibration.describe().get('count', plan.calibration_size)} "
        "calibration images")
    try:
        run = nncf_peer(fp32, calibration, threads, metadata.shape_range.batch[1], size)
    except ImportError as error:
        return {"name": PEER, "description": description, "run": None,
                "reason": f"nncf is not installed ({error}); pip install 'vitdeploy[bench]'"}
    except Exception as error:  # noqa: BLE001 - the peer failing leaves the candidates' figures standing
        return {"name": PEER, "description": description, "run": None, "reason": f"NNCF failed: {_one_line(error)}"}
    return {"name": PEER, "description": description, "run": run, "calibration": calibration.describe()}
