"""The bounds the peer transport enforces, the counters it keeps, and the rate limit on its log lines.

``TransportLimits`` holds every bound that keeps a hostile or broken peer from holding resources (frame
sizes, connection and handshake slots, timeouts, queue lengths); ``TransportStats`` the counters
/metrics reads; ``LogLimiter`` keeps a peer that is refused over and over from flooding the log.

This module holds values and counts only. It must not open sockets, read frames or judge a peer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

from butterfly.net.frames import DEFAULT_MAX_FRAME

log = logging.getLogger("butterfly.net")


@dataclass(frozen=True)
class TransportLimits:
    """Every bound the transport enforces; the defaults suit a LAN cluster of up to a few hundred nodes."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME
    """Largest session frame (body and MAC) sent or accepted; a larger one received drops the connection."""
    max_connections: int = 512
    """Connections in total, handshaking or established, inbound and outbound."""
    max_pending_per_host: int = 8
    """Handshakes in progress from one remote IP address (a peer has one connection once established)."""
    max_pending_total: int = 128
    """Handshakes in progress in total, inbound; the other ``max_connections`` slots are kept for
    authenticated connections. A newcomer past it evicts the oldest handshake of the busiest host."""
    handshake_timeout_s: float = 5.0
    """The whole handshake (and TLS) must finish within this, however the peer trickles its bytes."""
    connect_timeout_s: float = 3.0
    keepalive_interval_s: float = 1.0
    """A connection with nothing to send for this long sends a Ping."""
    idle_timeout_s: float = 5.0
    """A connection that received nothing (not even a Ping) for this long is closed."""
    queue_max_messages: int = 1024
    """Messages waiting for one peer before the oldest is dropped."""
    queue_max_bytes: int = 64 << 20
    """Bytes waiting for one peer before the oldest message is dropped."""
    inbox_max_messages: int = 4096
    """Messages waiting in ``inbox`` (channels without a handler) before new ones are dropped."""
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    log_interval_s: float = 10.0
    """At most one refusal line per (reason, remote host) in this many seconds; the rest are counted."""

    def __post_init__(self) -> None:
        positive = [f.name for f in fields(self) if getattr(self, f.name) <= 0 and f.name != "log_interval_s"]
        if positive:
            raise ValueError(f"transport limits must be > 0: {', '.join(positive)}")
        if self.log_interval_s < 0:
            raise ValueError("log_interval_s must be >= 0 (0: log every refusal)")
        if self.idle_timeout_s <= self.keepalive_interval_s:
            raise ValueError("idle_timeout_s must be longer than keepalive_interval_s")
        if self.queue_max_bytes < self.max_frame_bytes:
            raise ValueError("queue_max_bytes must hold at least one max_frame_bytes frame")
        if self.max_pending_total >= self.max_connections:
            raise ValueError("max_pending_total must be below max_connections (the rest are reserved)")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")


@dataclass
class TransportStats:
    """Counters for /metrics; each names what happened, never a gauge."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped_queue_full: int = 0
    dropped_no_route: int = 0
    dropped_inbox_full: int = 0
    connections_accepted: int = 0
    connections_dialed: int = 0
    connect_failures: int = 0
    refused_limit: int = 0
    evicted_handshakes: int = 0
    refused_auth: int = 0
    refused_version: int = 0
    refused_cluster: int = 0
    refused_duplicate_id: int = 0
    refused_other: int = 0
    handshake_timeouts: int = 0
    protocol_errors: int = 0
    integrity_failures: int = 0
    oversized_frames: int = 0
    idle_timeouts: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LogLimiter:
    """One line per key per interval; the next line says how many were held back. Keys are capped so
    a peer cycling source addresses cannot grow this without bound."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}

    def log(self, level: int, key: tuple[str, ...], message: str) -> None:
        now = time.monotonic()
        last, held = self._seen.get(key, (-1e18, 0))
        if now - last < self.interval_s:
            self._seen[key] = (last, held + 1)
            return
        if len(self._seen) >= 1024:
            self._seen.clear()
        self._seen[key] = (now, 0)
        log.log(level, "%s%s", message, f" ({held} more like this suppressed)" if held else "")
