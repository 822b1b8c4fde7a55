"""The plan of one ``vitdeploy tune`` run and its steps in order (see :mod:`vitdeploy.tune`)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vitdeploy.calibration import DEFAULT_CALIBRATION_SIZE
from vitdeploy.console import error_line
from vitdeploy.tune.accuracy import AccuracyData, AccuracyGate, accuracy_data, eager_reference
from vitdeploy.tune.candidates import (
    candidate_list,
    ensure_int8_forms,
    find_artifacts,
    installed,
    open_runtime,
)
from vitdeploy.tune.selection import OBJECTIVES, Selection, StabilityRule, select
from vitdeploy.tune_manifest import Candidate, Choice, TuneManifest, write_manifest

Log = Callable[[str], None]


DEFAULT_BATCHES = (1, 8)  # the batch sizes tune times unless told


@dataclass
class TunePlan:
    """What one ``vitdeploy tune`` run does (see the module docstring)."""

    folder: Path
    batches: tuple[int, ...] = DEFAULT_BATCHES
    rounds: int = 5
    iterations: int = 10  # calls per candidate per round at batch 1 (scaled down for larger batches)
    warmup: int = 2
    threads: int | None = None
    gate: AccuracyGate = field(default_factory=AccuracyGate)
    stability: StabilityRule = field(default_factory=StabilityRule)
    labelled: str | None = None
    images: str | None = None
    objective: str = "latency"
    throughput: bool = True
    throughput_batch: int | None = None  # default: the largest of ``batches``
    throughput_rounds: int | None = None  # default: ``rounds``
    throughput_calls: int = 2  # requests per worker per burst
    calibration: str | None = None
    calibration_size: int = DEFAULT_CALIBRATION_SIZE
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


@dataclass
class _Setup:
    """What the folder's fp32 artifact fixes for the run: the files, the image size, the threads."""

    artifacts: dict[str, Path]
    metadata: Any
    size: int
    threads: int
    throughput_batch: int


def _check(plan: TunePlan) -> _Setup:
    """The folder's artifacts, and every batch size checked against their validated range."""
    from vitdeploy.cpu_features import usable_cpus
    from vitdeploy.metadata import read_onnx_metadata

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
    return _Setup(artifacts, metadata, size, plan.threads or usable_cpus(), throughput_batch)


def _open_candidates(plan: TunePlan, setup: _Setup, say: Log) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """Every candidate as a record, the int8 forms the folder lacks made, and the runnable ones opened."""
    import os

    from vitdeploy.cpu_features import cpu_flags

    listed = candidate_list(cpu_flags(), installed("onnxruntime"), installed("openvino"))
    wanted = [c for c in listed if c.status == "ok" and (plan.only is None or c.name in plan.only)]
    failed = ensure_int8_forms(plan.folder, setup.artifacts, {c.graph for c in wanted}, plan.calibration,
                               plan.calibration_size, say) if wanted else {}
    records = {c.name: c for c in listed}
    runtimes: dict[str, Any] = {}
    for record in listed:
        path = setup.artifacts.get(record.graph)
        if record.status != "ok":
            continue
        if plan.only is not None and record.name not in plan.only:
            record.status, record.reason = "skipped", "not asked for (--candidates)"
        elif path is None:
            record.status = "failed" if record.graph in failed else "unavailable"
            record.reason = failed.get(record.graph, f"no {record.graph} artifact in the folder")
        else:
            record.artifact = os.path.relpath(path, plan.folder)
            try:
                runtimes[record.name], record.notes = open_runtime(record, path, setup.threads)
            except Exception as error:  # noqa: BLE001 - one candidate failing does not stop the others
                record.status, record.reason = "failed", error_line(error, 300)
    return records, runtimes


def _accuracy(plan: TunePlan, setup: _Setup, reference_model: Any, records: dict[str, Candidate],
              runtimes: dict[str, Any], say: Log) -> tuple[AccuracyData, AccuracyGate, str, dict[str, Any] | None]:
    """Each open candidate's (and the peer's) accuracy against one reference, every output of the artifact
    judged by its kind; a candidate that fails to run is closed and marked. Returns the data, the gate
    naming the reference actually used, the reference's description and the peer."""
    from vitdeploy.parity import output_kind
    from vitdeploy.tune.report import output_figures_text, output_verdict

    names = setup.metadata.output_names
    if reference_model is not None:
        reference, reference_name, close = eager_reference(reference_model, names), "eager fp32 (PyTorch)", None
        gate = replace(plan.gate, reference="eager fp32")
    else:
        from vitdeploy.runtimes import OrtRuntime

        reference = close = OrtRuntime(setup.artifacts["fp32"], variant="portable", intra_op_threads=setup.threads)
        gate = replace(plan.gate, reference=f"{setup.artifacts['fp32'].name} (fp32 graph on onnxruntime)")
        reference_name = f"{gate.reference}, itself validated against eager fp32 at export"
    precisions = [records[name].precision for name in runtimes]
    rule = gate.describe(plan.labelled is not None, [output_kind(name) for name in names], precisions)
    say(f"accuracy reference of every gate: {reference_name}; gate: {rule}")
    try:
        data = accuracy_data(reference, setup.metadata, setup.metadata.shape_range.batch[1], setup.size,
                             plan.labelled, plan.images)
    finally:
        if close is not None:
            close.close()
    say(f"measuring accuracy of {len(runtimes)} candidates on {data.source}"
        + (f", every output: {', '.join(f'{n} ({k})' for n, k in data.kinds.items())}" if len(data.kinds) > 1 else ""))
    peer = None
    if plan.peer:
        from vitdeploy.tune.peer import timed_peer

        peer = timed_peer(setup.artifacts["fp32"], plan, setup.metadata, setup.threads, setup.size, say)
    for name, runtime in list(runtimes.items()):
        try:
            records[name].accuracy = figures = data.figures(runtime, records[name].precision, gate)
            say(f"  {name}: " + (f"top-1 drop {figures['top1_drop_points']:.2f} points" if "top1_drop_points" in figures
                                 else f"worst cosine {figures['cosine']:.5f}" + (
                                     "" if figures["top1_agreement"] is None
                                     else f", top-1 agreement {figures['top1_agreement']:.3f}"))
                + f" vs {gate.reference}")
            if len(figures["outputs"]) > 1 or figures["primary"] != "logits":
                for output, entry in figures["outputs"].items():
                    verdict = output_verdict(output, entry)
                    say(f"    {output} ({entry['kind']}): {output_figures_text(entry)}: "
                        + ("within the gate" if verdict == "pass" else f"OUTSIDE the gate: {verdict}"))
        except Exception as error:  # noqa: BLE001
            records[name].status, records[name].reason = "failed", error_line(error, 300)
            runtimes.pop(name).close()
    if peer is not None and peer.get("run") is not None:
        peer["accuracy"] = data.figures(peer["run"], "int8", gate)
    return data, gate, reference_name, peer


def _rule(plan: TunePlan, gate: AccuracyGate, records: dict[str, Candidate], kinds: dict[str, str]) -> str:
    """The gate's rule for this run's outputs and the precisions of the candidates it measured."""
    precisions = [r.precision for r in records.values() if r.accuracy is not None]
    return gate.describe(plan.labelled is not None, kinds.values(), precisions)


def _time(plan: TunePlan, setup: _Setup, records: dict[str, Candidate], runtimes: dict[str, Any],
          peer: dict[str, Any] | None, say: Log) -> Any:
    """Latency rounds, then throughput mode; returns the machine load recorded meanwhile."""
    from vitdeploy.benchmarks.environment import recording_load
    from vitdeploy.tune.timing import time_latency, time_throughput

    with recording_load() as load:
        time_latency(plan, records, runtimes, peer, setup.size, say)
        # The latency-mode runtimes are closed first: the throughput ones hold more copies of the weights.
        timed = list(runtimes)
        for runtime in runtimes.values():
            runtime.close()
        if plan.throughput and timed:
            time_throughput(plan, [records[name] for name in timed], setup.throughput_batch, setup.size,
                            setup.threads, say)
    return load


def _choose(plan: TunePlan, gate: AccuracyGate, records: dict[str, Candidate], kinds: dict[str, str],
            say: Log) -> tuple[Selection, Choice | None]:
    """The selection within ``gate``, the dropped candidates marked, and the choice the runtimes will follow."""
    from vitdeploy.files import sha256_file

    selection = select(list(records.values()), gate, plan.objective, plan.selection_batch, plan.stability)
    for name, reason in selection.dropped.items():
        records[name].status, records[name].reason = "dropped", reason
    rule = _rule(plan, gate, records, kinds)
    if selection.chosen is None:
        say(f"no candidate passed the accuracy gate ({rule})")
        return selection, None
    winner = records[selection.chosen]
    options = dict(winner.options)
    if plan.objective == "throughput" and winner.backend == "openvino":
        options["performance_hint"] = "THROUGHPUT"
    why = f"fastest {selection.key} of {len(selection.ranking)} candidate(s) within {rule}"
    if selection.steadiness is not None:
        say(selection.steadiness["why"])
        if selection.steadiness["preferred"] is not None:
            why = f"steady, and within {100 * plan.stability.close_margin:g} % of the fastest {selection.key} " \
                  f"of {len(selection.ranking)} candidate(s) within {rule}: {selection.steadiness['why']}"
    chosen = Choice(winner.name, winner.backend, winner.artifact, sha256_file(plan.folder / winner.artifact), options,
                    why=why)
    say(f"chose {winner.name}: {winner.description} ({chosen.why})")
    return selection, chosen


def _manifest(plan: TunePlan, setup: _Setup, records: dict[str, Candidate], selection: Selection,
              chosen: Choice | None, data: AccuracyData, gate: AccuracyGate, reference_name: str,
              peer: dict[str, Any] | None, load: Any) -> TuneManifest:
    from vitdeploy.benchmarks.environment import package_versions
    from vitdeploy.cpu_features import ARITHMETIC_FLAGS, arithmetic_flags, cpu_model, usable_cpus

    peer_record = None
    if peer is not None:
        peer_record = {k: v for k, v in peer.items() if k != "run"}
        if chosen is not None and peer.get("latency_ms"):
            peer_record["chosen_vs_peer"] = {b: records[chosen.name].latency_ms[b] / ms
                                             for b, ms in peer["latency_ms"].items()}
    return TuneManifest(
        chosen=chosen, candidates=list(records.values()),
        cpu={"model": cpu_model(), "usable_cpus": usable_cpus(), "threads": setup.threads,
             "flags": arithmetic_flags(), "flags_checked": list(ARITHMETIC_FLAGS)},
        gate={"rule": _rule(plan, gate, records, data.kinds), "max_drop_points": gate.max_drop_points,
              "min_cosine": gate.min_cosine, "min_top1_agreement": gate.min_top1_agreement,
              "accuracy_on": data.source, "outputs": data.kinds, "min_token_cosine": gate.min_token_cosine,
              "max_token_share": gate.max_token_share,
              "token_gates": {p: gate.token_gate(p) for p in sorted({r.precision for r in records.values()
                                                                     if r.accuracy is not None})}
              if "tokens" in data.kinds.values() else {}},
        objective=f"{plan.objective}: {selection.key}", batches=list(plan.batches), rounds=plan.rounds,
        reference=reference_name, command=plan.command,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(("vitdeploy", "onnxruntime", "torch", "openvino", "nncf")),
        peer=peer_record, load=load.to_dict(),
        stability={**plan.stability.to_dict(), "decision": selection.steadiness},
    )


def _write(folder: Path, manifest: TuneManifest, load: Any, say: Log) -> TuneResult:
    """``tune.json``, the plot (with the bench extra's matplotlib) and ``tune.md``."""
    from vitdeploy.files import atomic_write_text
    from vitdeploy.tune.report import latency_vs_accuracy, render_markdown

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


def tune(plan: TunePlan, reference_model: Any = None, log: Log | None = None) -> TuneResult:
    """Run ``plan`` on the export folder ``plan.folder`` (see :mod:`vitdeploy.tune`). ``reference_model``
    (the eager model) is the accuracy reference; without it, the fp32 graph on onnxruntime is."""
    say = log or (lambda message: None)
    setup = _check(plan)
    records, runtimes = _open_candidates(plan, setup, say)
    try:
        data, gate, reference_name, peer = _accuracy(plan, setup, reference_model, records, runtimes, say)
        load = _time(plan, setup, records, runtimes, peer, say)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    selection, chosen = _choose(plan, gate, records, data.kinds, say)
    manifest = _manifest(plan, setup, records, selection, chosen, data, gate, reference_name, peer, load)
    return _write(plan.folder, manifest, load, say)
