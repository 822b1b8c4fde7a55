"""How ``tune`` times its candidates: side by side, in interleaved rounds at each batch size
(:func:`vitdeploy.benchmarks.timing.time_rounds`), then each in its backend's throughput mode; each
figure with its spread across the rounds, and a candidate whose speed is unstable flagged
(:class:`~vitdeploy.tune.selection.StabilityRule`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vitdeploy.tune.candidates import throughput_runner
from vitdeploy.tune.peer import PEER
from vitdeploy.tune_manifest import Candidate

Log = Callable[[str], None]


def random_pixels(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)


def spread_figures(rounds_ms: list[float]) -> dict[str, float]:
    """The spread of per-round figures as the manifest records it (ms, 4 decimals)."""
    from vitdeploy.benchmarks.stats import round_spread

    return {key: round(value, 4) for key, value in round_spread(rounds_ms).to_dict().items()}


def round_line(what: str, rounds: int, say: Log) -> Callable[[int, dict[str, list[float]]], None]:
    """A progress line after each interleaved round: every candidate's p50 of that round."""
    def on_round(index: int, p50s: dict[str, list[float]]) -> None:
        say(f"  {what}, round {index + 1}/{rounds}: " + ", ".join(f"{name} {values[-1]:.2f} ms"
                                                                 for name, values in p50s.items()))
    return on_round


def flag(record: Candidate, which: str, rounds_ms: list[float], rule: Any, say: Log) -> None:
    """Record (and say) why ``record``'s speed at ``which`` (a batch, or ``"throughput"``) is unstable."""
    why = rule.judge(rounds_ms)
    if why is not None:
        record.unstable[which] = why
        where = "in throughput mode" if which == "throughput" else f"at batch {which}"
        say(f"{record.name} is unstable {where}: {why}")


def time_latency(plan: Any, records: dict[str, Candidate], runtimes: dict[str, Any], peer: dict[str, Any] | None,
                 size: int, say: Log) -> None:
    """Every runtime (and the peer) side by side in interleaved rounds at each batch size; fills the
    records' ``latency_ms``, ``latency_rounds_ms``, ``latency_spread``, ``unstable`` and ``images_per_s``
    (the peer's ``latency_ms`` and ``latency_spread``)."""
    from vitdeploy.benchmarks.timing import time_rounds

    for batch in plan.batches:
        pixels = random_pixels(batch, size)
        runners = {name: (lambda run=runtime, x=pixels: run(x)) for name, runtime in runtimes.items()}
        if peer is not None and peer.get("run") is not None:
            runners[PEER] = lambda run=peer["run"], x=pixels: run(x)
        iterations = max(1, plan.iterations // batch)
        say(f"batch {batch}: {len(runners)} candidates x {plan.rounds} rounds x {iterations} calls, interleaved")
        for name, values in time_rounds(runners, plan.rounds, iterations, plan.warmup,
                                        round_line(f"batch {batch}", plan.rounds, say)).items():
            median = float(np.median(values))
            if name == PEER:
                peer.setdefault("latency_ms", {})[str(batch)] = median
                peer.setdefault("latency_spread", {})[str(batch)] = spread_figures(values)
                continue
            record = records[name]
            record.latency_ms[str(batch)] = median
            record.latency_rounds_ms[str(batch)] = [round(v, 4) for v in values]
            record.latency_spread[str(batch)] = spread_figures(values)
            record.images_per_s[str(batch)] = batch * 1000.0 / median
            flag(record, str(batch), values, plan.stability, say)


def time_throughput(plan: Any, timed: list[Candidate], batch: int, size: int, threads: int, say: Log) -> None:
    """Each candidate in its backend's throughput mode, bursts interleaved; fills ``record.throughput``."""
    from vitdeploy.benchmarks.timing import time_rounds
    from vitdeploy.console import error_line

    pixels = random_pixels(batch, size)
    bursts: dict[str, Any] = {}
    records = {record.name: record for record in timed}
    for record in timed:
        try:
            bursts[record.name] = throughput_runner(record, plan.folder / record.artifact, pixels, threads,
                                                    plan.throughput_calls)
        except Exception as error:  # noqa: BLE001 - the latency figures stand without it
            record.notes.append(f"throughput mode failed: {error_line(error, 300)}")
    rounds = plan.throughput_rounds or plan.rounds
    say(f"throughput mode at batch {batch}: {len(bursts)} candidates x {rounds} rounds, interleaved")
    try:
        for name, values in time_rounds(dict(bursts), rounds, 1, 0,
                                        round_line(f"throughput batch {batch}", rounds, say)).items():
            burst = bursts[name]
            records[name].throughput = {"batch": batch, "mode": burst.mode, "how": burst.describe,
                                        "images_per_s": burst.images * 1000.0 / float(np.median(values)),
                                        "spread": spread_figures(values)}
            flag(records[name], "throughput", values, plan.stability, say)
    finally:
        for burst in bursts.values():
            burst.close()
