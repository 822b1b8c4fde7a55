"""How ``tune`` chooses: the fastest timed candidate within the accuracy gate, unless its speed is
unstable on this machine and a steady candidate is nearly as fast.

On a shared machine a candidate's speed can flip between two levels for minutes at a time (seen:
onnxruntime int8 at 20.5 ms for a while, 41 ms for another, same file and options), so the median
of a few rounds records whichever moment it caught. :class:`StabilityRule` flags such a candidate
from the spread of its interleaved rounds, and :func:`select` then prefers a steady one whose
figure is within :attr:`StabilityRule.close_margin`, recording the figures behind the preference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vitdeploy.tune.accuracy import AccuracyGate

OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class StabilityRule:
    """When a candidate's speed counts as unstable: its interleaved rounds fall into two modes (the
    slow rounds at least ``mode_ratio`` times the fast ones, two rounds or more in each), or their
    interquartile range exceeds ``spread_limit`` of the median; judged from ``min_rounds`` rounds
    on. A steady candidate whose figure is within ``close_margin`` of an unstable faster one is chosen
    over it."""

    spread_limit: float = 0.20
    mode_ratio: float = 1.3
    close_margin: float = 0.10
    min_rounds: int = 3

    def __post_init__(self) -> None:
        if not self.spread_limit > 0:
            raise ValueError(f"spread limit must be > 0, got {self.spread_limit}")
        if not self.mode_ratio > 1:
            raise ValueError(f"mode ratio must be > 1, got {self.mode_ratio}")
        if not self.close_margin >= 0:
            raise ValueError(f"close margin must be >= 0, got {self.close_margin}")
        if self.min_rounds < 3:
            raise ValueError(f"stability needs at least 3 rounds to judge, got min_rounds={self.min_rounds}")

    def judge(self, rounds_ms: Sequence[float]) -> str | None:
        """Why these per-round figures (ms) are unstable; ``None`` when steady or too few to judge."""
        from vitdeploy.benchmarks.stats import percentile, round_spread, two_modes

        if len(rounds_ms) < self.min_rounds:
            return None
        modes = two_modes(rounds_ms, self.mode_ratio)
        if modes is not None:
            fast, slow = modes
            return (f"two modes: {len(fast)} of {len(rounds_ms)} rounds at ~{percentile(fast, 50):.4g} ms, "
                    f"{len(slow)} at ~{percentile(slow, 50):.4g} ms")
        spread = round_spread(rounds_ms)
        if spread.iqr_over_median > self.spread_limit:
            return (f"rounds spread {spread.p25:.4g}-{spread.p75:.4g} ms around a median of {spread.median:.4g} "
                    f"(IQR {100 * spread.iqr_over_median:.0f} % of it, above {100 * self.spread_limit:.0f} %)")
        return None

    def describe(self) -> str:
        return (f"unstable: two modes {self.mode_ratio:g}x apart (>= 2 rounds each) or IQR above "
                f"{100 * self.spread_limit:g} % of the median, from {self.min_rounds} rounds; a steady candidate "
                f"within {100 * self.close_margin:g} % of an unstable faster one is preferred")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.describe(), **asdict(self)}


@dataclass
class Selection:
    """The outcome of :func:`select`: the chosen name (or ``None``), the dropped ones with reasons,
    the eligible ones fastest first, and the figure compared."""

    chosen: str | None
    dropped: dict[str, str]
    ranking: list[str]
    key: str
    steadiness: dict[str, Any] | None = field(default=None)  # when stability changed or questioned the choice


def speed_key(record: Any, objective: str, batch: int) -> float | None:
    """What :func:`select` minimises: p50 ms at ``batch`` (latency), or minus images/s of the
    throughput mode, else at ``batch`` (throughput); ``None`` when not measured."""
    if objective == "latency":
        return record.latency_ms.get(str(batch))
    if record.throughput and record.throughput.get("images_per_s"):
        return -float(record.throughput["images_per_s"])
    ips = record.images_per_s.get(str(batch))
    return -ips if ips else None


def stability_key(objective: str, batch: int) -> str:
    """Which of a record's ``unstable`` entries the objective's figure depends on."""
    return str(batch) if objective == "latency" else "throughput"


def select(records: Sequence[Any], gate: AccuracyGate, objective: str = "latency", batch: int = 1,
           stability: StabilityRule | None = None) -> Selection:
    """The fastest timed candidate within ``gate``: records (:class:`~vitdeploy.tune_manifest.Candidate`)
    with status ``ok`` and an ``accuracy`` are eligible when the gate passes; ties keep the earlier
    candidate. With ``stability``, a fastest candidate flagged unstable (its ``unstable`` entry for
    the figure compared) gives way to the fastest steady one within the rule's ``close_margin``."""
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
    selection = Selection(ranking[0] if ranking else None, dropped, ranking, what)
    if stability is not None and ranking:
        _prefer_steady(selection, {r.name: r for r in records}, {name: key for key, _, name in eligible},
                       stability, stability_key(objective, batch))
    return selection


def _prefer_steady(selection: Selection, records: dict[str, Any], keys: dict[str, float], rule: StabilityRule,
                   which: str) -> None:
    """Apply the stability rule to ``selection`` (fastest first in its ranking), recording why."""
    fastest = selection.ranking[0]
    why_unstable = records[fastest].unstable.get(which)
    if why_unstable is None:
        return

    def gap(name: str) -> float:  # how much worse than the fastest, as a fraction (keys: ms, or -images/s)
        best, other = abs(keys[fastest]), abs(keys[name])
        return (other / best - 1.0) if keys[fastest] > 0 else (best / other - 1.0)

    def figures(name: str) -> dict[str, Any]:
        record = records[name]
        spread = (record.latency_spread.get(which) if which != "throughput" else
                  (record.throughput or {}).get("spread"))
        return {"figure": abs(keys[name]), "spread": spread, "unstable": record.unstable.get(which),
                "slower_than_fastest": round(gap(name), 4)}

    steady = [name for name in selection.ranking[1:] if records[name].unstable.get(which) is None]
    close = [name for name in steady if gap(name) <= rule.close_margin]
    decision: dict[str, Any] = {"fastest": fastest, "fastest_unstable": why_unstable,
                                "close_margin": rule.close_margin,
                                "figures": {name: figures(name) for name in [fastest, *steady[:1]]}}
    if close:
        selection.chosen = close[0]
        decision["preferred"] = close[0]
        decision["why"] = (f"{fastest} was fastest but unstable ({why_unstable}); {close[0]} is steady and only "
                           f"{100 * gap(close[0]):.1f} % slower (within {100 * rule.close_margin:g} %)")
    else:
        decision["preferred"] = None
        nearest = f"the nearest steady one, {steady[0]}, is {100 * gap(steady[0]):.1f} % slower" if steady else \
            "no eligible candidate is steady"
        decision["why"] = (f"{fastest} is fastest but unstable ({why_unstable}); kept, as {nearest} "
                           f"(beyond {100 * rule.close_margin:g} %)")
    selection.steadiness = decision
