"""Summary statistics of latency samples (pure Python, so tests can check them by hand)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks.

    This is numpy's default (``method="linear"``, Hyndman & Fan type 7): the value at rank
    ``(n - 1) * q / 100`` of the sorted samples, interpolated between its neighbours.
    """
    if not samples:
        raise ValueError("percentile of an empty sample list is undefined; measure at least one iteration")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


@dataclass(frozen=True)
class LatencyStats:
    """Latency summary in milliseconds; ``stdev`` is the sample standard deviation (n - 1)."""

    n: int
    mean: float
    stdev: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Summarise per-iteration latencies (ms); raises ``ValueError`` on no samples or a bad value."""
    if not samples_ms:
        raise ValueError("no latency samples to summarise; measure at least one iteration")
    values = [float(v) for v in samples_ms]
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"latency samples must be finite and >= 0, got {bad[:3]}")
    n = len(values)
    mean = math.fsum(values) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return LatencyStats(
        n=n, mean=mean, stdev=stdev, min=min(values), max=max(values),
        p50=percentile(values, 50), p90=percentile(values, 90), p99=percentile(values, 99),
    )


def throughput(batch: int, mean_latency_ms: float) -> float:
    """Images per second when one call of ``mean_latency_ms`` processes ``batch`` images."""
    if mean_latency_ms <= 0:
        raise ValueError(f"mean latency must be > 0 ms, got {mean_latency_ms}")
    return batch * 1000.0 / mean_latency_ms


def achieved_gflops(flops_per_image: int, batch: int, mean_latency_ms: float) -> float:
    """GFLOP/s achieved: ``flops_per_image * batch`` FLOPs in ``mean_latency_ms``."""
    if mean_latency_ms <= 0:
        raise ValueError(f"mean latency must be > 0 ms, got {mean_latency_ms}")
    return flops_per_image * batch / (mean_latency_ms * 1e-3) / 1e9


@dataclass(frozen=True)
class RoundSpread:
    """How one contender's per-round figures spread across interleaved rounds (ms): the quartiles,
    and the interquartile range relative to the median (0.05: the middle half of the rounds lies
    within 5 % of the median)."""

    rounds: int
    min: float
    p25: float
    median: float
    p75: float
    max: float
    iqr_over_median: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def round_spread(values: Sequence[float]) -> RoundSpread:
    """The :class:`RoundSpread` of per-round figures (at least one)."""
    if not values:
        raise ValueError("no rounds to describe; time at least one round")
    median = percentile(values, 50)
    p25, p75 = percentile(values, 25), percentile(values, 75)
    return RoundSpread(len(values), min(values), p25, median, p75, max(values),
                       (p75 - p25) / median if median > 0 else 0.0)


def two_modes(values: Sequence[float], min_ratio: float, min_count: int = 2) -> tuple[list[float], list[float]] | None:
    """The rounds split in two where consecutive sorted values jump by at least ``min_ratio``
    (e.g. 1.3: the slow mode is 30 % slower than the fast one), when each side holds at least
    ``min_count`` rounds; ``None`` when there is no such gap. The largest jump is the split."""
    ordered = sorted(float(v) for v in values)
    best, split = 0.0, None
    for index in range(min_count, len(ordered) - min_count + 1):
        low, high = ordered[index - 1], ordered[index]
        ratio = high / low if low > 0 else math.inf
        if ratio >= min_ratio and ratio > best:
            best, split = ratio, index
    return None if split is None else (ordered[:split], ordered[split:])
