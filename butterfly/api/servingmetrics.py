"""Serving metrics in the style vLLM users already scrape, and the serving figures /status shows.

Owns ``ServingMetrics``: the request gauges (running, waiting), the time-to-first-token,
inter-token and end-to-end latency histograms and the token and request counters, named like vLLM's
(``vllm:time_to_first_token_seconds`` becomes ``butterfly_time_to_first_token_seconds``), registered
in the API's private registry; and ``ServingStats`` for /status (requests served, running, waiting,
recent tokens/s). Unlike the node's status metrics these are events the API itself sees, so they
live here as state, updated by the /v1 handlers.

"waiting" is what the API can see: admitted to the backend, no first token yet (queued or in
prefill). Must not: read the board or block.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from butterfly.status import ServingStats

__all__ = ["RequestTimer", "ServingMetrics"]

# vLLM's buckets (seconds), which dashboards built for it expect.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
# /status's tokens/s is over this many recent seconds.
RATE_WINDOW_S = 10.0


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.running = Gauge(
            "butterfly_num_requests_running",
            "Requests generating tokens (first token received, not finished).",
            registry=registry,
        )
        self.waiting = Gauge(
            "butterfly_num_requests_waiting",
            "Requests admitted to the pipeline that have not received their first token.",
            registry=registry,
        )
        self.ttft = Histogram(
            "butterfly_time_to_first_token_seconds",
            "Seconds from admitting a request to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "butterfly_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of a request.",
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "butterfly_e2e_request_latency_seconds",
            "Seconds from admitting a request to its end.",
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "butterfly_prompt_tokens", "Prompt tokens of admitted requests.", registry=registry
        )
        self.generation_tokens = Counter(
            "butterfly_generation_tokens", "Tokens generated.", registry=registry
        )
        self.success = Counter(
            "butterfly_request_success",
            "Requests finished, by why they finished (length, stop).",
            labelnames=["finished_reason"],
            registry=registry,
        )
        self.failure = Counter(
            "butterfly_request_failure",
            "Requests ended by an error after admission, by HTTP status.",
            labelnames=["status"],
            registry=registry,
        )
        for reason in ("length", "stop", "abort"):
            self.success.labels(reason)
        self._served = 0
        self._failed = 0
        self._running = 0
        self._waiting = 0
        self._prompt = 0
        self._generated = 0
        # (second, tokens generated in it), for the recent rate.
        self._recent: deque[list[float]] = deque()

    def request(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)

    def _tokens(self, n: int, now: float) -> None:
        with self._lock:
            self._generated += n
            second = float(int(now))
            if self._recent and self._recent[-1][0] == second:
                self._recent[-1][1] += n
            else:
                self._recent.append([second, float(n)])
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - RATE_WINDOW_S:
            self._recent.popleft()

    def stats(self) -> ServingStats:
        now = self._clock()
        with self._lock:
            self._trim(now)
            recent = sum(n for _, n in self._recent)
            return ServingStats(
                requests_served=self._served,
                requests_failed=self._failed,
                requests_running=self._running,
                requests_waiting=self._waiting,
                prompt_tokens_total=self._prompt,
                generation_tokens_total=self._generated,
                generation_tokens_per_second=round(recent / RATE_WINDOW_S, 3),
            )


class RequestTimer:
    """One request's life in the metrics: waiting until its first token, running until it ends.

    ``end`` must be called exactly once (handlers call it in ``finally``); later calls do nothing.
    """

    def __init__(self, m: ServingMetrics, prompt_tokens: int) -> None:
        self._m = m
        self._start = self._last = m._clock()
        self._first = False
        self._ended = False
        self.tokens = 0
        m.waiting.inc()
        m.prompt_tokens.inc(prompt_tokens)
        with m._lock:
            m._waiting += 1
            m._prompt += prompt_tokens

    def token(self) -> None:
        m = self._m
        now = m._clock()
        if not self._first:
            self._first = True
            m.ttft.observe(now - self._start)
            m.waiting.dec()
            m.running.inc()
            with m._lock:
                m._waiting -= 1
                m._running += 1
        else:
            m.itl.observe(now - self._last)
        self._last = now
        self.tokens += 1
        m.generation_tokens.inc()
        m._tokens(1, now)

    def end(self, reason: str | None, failed_status: int | None = None) -> None:
        """``reason``: "length"/"stop" for a finished request, None for one cut short (client gone:
        counted as "abort"); ``failed_status`` for an error after admission."""
        if self._ended:
            return
        self._ended = True
        m = self._m
        m.e2e.observe(m._clock() - self._start)
        if self._first:
            m.running.dec()
        else:
            m.waiting.dec()
        with m._lock:
            if self._first:
                m._running -= 1
            else:
                m._waiting -= 1
            if failed_status is not None:
                m._failed += 1
            elif reason is not None:
                m._served += 1
        if failed_status is not None:
            m.failure.labels(str(failed_status)).inc()
        else:
            m.success.labels(reason or "abort").inc()
