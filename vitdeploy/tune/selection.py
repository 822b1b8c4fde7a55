"""How ``tune`` chooses: the fastest timed candidate within the accuracy gate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vitdeploy.tune.accuracy import AccuracyGate

OBJECTIVES = ("latency", "throughput")


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
    """The fastest timed candidate within ``gate``: records (:class:`~vitdeploy.tune_manifest.Candidate`) with status ``ok``
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
