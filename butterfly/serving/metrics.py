"""Serving metrics: per-hop transfer time, requests running and waiting.

The figures are measured where they happen (hops in the stage that receives a frame; running and
waiting at the entry, which may be another node and is another process than the HTTP API), so this
module keeps them in a ``ServingStats`` the engine updates, and the API renders them with
``serving_families``: the engine child reports its hop samples and queue lengths to the supervisor
(``butterfly.serving.process``), whose ``ServingStats`` the API's collector reads at scrape time.

Names: ``butterfly_pipeline_hop_seconds`` (histogram: from a stage sending a step's activations or
tokens to the next stage receiving them, observed by the receiver),
``butterfly_pipeline_requests_running`` / ``butterfly_pipeline_requests_waiting`` (gauges: sequences in
the batch and queued for KV cache at the entry stage, 0 on the other nodes; the API's
``butterfly_num_requests_*`` count what this node's API admitted), ``butterfly_kv_cache_usage_ratio``
(this node's stage), ``butterfly_pipeline_step_failures_total`` (counter: steps this node's stage failed
with an unexpected error -- in its forward pass, sampling or scheduler -- each ending the requests it
carried with a 5xx). ``ServingCollector`` renders them for the API's registry.

Must not: do I/O or touch the global prometheus registry.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

__all__ = ["HOP_BUCKETS", "ServingCollector", "ServingStats", "serving_families"]

HOP_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


@dataclass
class ServingStats:
    """Thread-safe counters behind the serving metrics of one process."""

    running: int = 0
    waiting: int = 0
    kv_bytes_in_use: int = 0
    kv_bytes_total: int = 0
    hop_counts: list[int] = field(default_factory=lambda: [0] * (len(HOP_BUCKETS) + 1))
    hop_sum: float = 0.0
    step_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pending: list[float] = field(default_factory=list, repr=False)
    _pending_failures: int = field(default=0, repr=False)

    def observe_hop(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        with self._lock:
            self.hop_counts[bisect.bisect_left(HOP_BUCKETS, seconds)] += 1
            self.hop_sum += seconds
            if len(self._pending) < 4096:
                self._pending.append(seconds)

    def observe_hops(self, samples: Iterable[float]) -> None:
        for s in samples:
            self.observe_hop(s)

    def take_pending_hops(self) -> list[float]:
        """Samples observed since the last call (for the engine child to report upward)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def observe_step_failures(self, n: int = 1) -> None:
        with self._lock:
            self.step_failures += n
            self._pending_failures += n

    def take_pending_step_failures(self) -> int:
        """Step failures counted since the last call (for the engine child to report upward)."""
        with self._lock:
            out, self._pending_failures = self._pending_failures, 0
        return out

    @property
    def hop_count(self) -> int:
        return sum(self.hop_counts)


def serving_families(stats: ServingStats) -> Iterator[Metric]:
    """The serving metric families from ``stats``, for a custom collector's ``collect()``."""
    running = GaugeMetricFamily(
        "butterfly_pipeline_requests_running", "Sequences in the batch at the entry stage"
    )
    running.add_metric([], stats.running)
    yield running
    waiting = GaugeMetricFamily(
        "butterfly_pipeline_requests_waiting", "Requests queued at the entry stage for KV cache"
    )
    waiting.add_metric([], stats.waiting)
    yield waiting
    usage = GaugeMetricFamily("butterfly_kv_cache_usage_ratio", "Share of this node's KV cache budget in use")
    usage.add_metric([], stats.kv_bytes_in_use / stats.kv_bytes_total if stats.kv_bytes_total else 0.0)
    yield usage
    hop = HistogramMetricFamily(
        "butterfly_pipeline_hop_seconds",
        "Time from a stage sending activations or tokens to the next receiving them",
    )
    with stats._lock:
        counts, total = list(stats.hop_counts), stats.hop_sum
    buckets: list[tuple[str, float]] = []
    acc = 0
    for bound, n in zip(HOP_BUCKETS, counts, strict=False):
        acc += n
        buckets.append((repr(bound), acc))
    acc += counts[-1]
    buckets.append(("+Inf", acc))
    hop.add_metric([], buckets, total)
    yield hop
    failures = CounterMetricFamily(
        "butterfly_pipeline_step_failures",
        "Unexpected errors in this node's stage (a step's forward pass or sampling, the scheduler)",
    )
    failures.add_metric([], stats.step_failures)
    yield failures


class ServingCollector:
    """A custom collector over ``stats`` (the supervisor's, fed by its engine child's reports)."""

    def __init__(self, stats: ServingStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return serving_families(self.stats)
