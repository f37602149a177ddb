"""Connection limits for the HTTP API: a deadline for each request head, caps per client address and
in total, and log lines that cannot flood the journal.

aiohttp bounds a request's size but not how long a client may take to send it, nor how many
connections it may hold: a slowloris client trickling header bytes, or many idle keep-alive
connections, would otherwise hold sockets for good. ``GuardedSite`` listens like ``web.TCPSite`` but
wraps each connection:

* a connection must deliver a complete request head within ``head_timeout_s`` of opening, and the
  next one within the same time of its previous request's end (the keep-alive idle limit); a request
  being handled (a long streamed answer included) is never cut by it;
* at most ``max_per_host`` connections per client address and ``max_connections`` in total; a
  newcomer past either cap evicts the oldest connection of that address (or, for the total, of the
  busiest address) that is *waiting* for a request head, and is refused only when every connection
  there is busy with a request. Slow and idle clients lose their sockets before working ones do.

``track_requests`` is the middleware that tells the guard when a connection has a request in hand.
``RateLimitedLog`` is the filter for aiohttp's own error lines: one line per kind per interval,
without the traceback (a malformed request is the client's fault, not a server bug), then a count.

This module must not know any route or read any request body; it only decides which sockets stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

__all__ = ["ConnectionGuard", "ConnectionLimits", "GuardedSite", "RateLimitedLog", "track_requests"]

log = logging.getLogger("butterfly.api")


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout_s: float = 10.0
    """A request head must arrive within this of the connection opening or of the previous request."""
    max_per_host: int = 32
    """Connections from one client address."""
    max_connections: int = 256
    """Connections in total."""
    log_interval_s: float = 10.0
    """At most one line per kind of event in this many seconds; the rest are counted."""

    def __post_init__(self) -> None:
        if self.head_timeout_s <= 0 or self.max_per_host < 1 or self.max_connections < self.max_per_host:
            raise ValueError("connection limits: head_timeout_s > 0, 1 <= max_per_host <= max_connections")


class _Limiter:
    """One line per key per interval; the next says how many were held back. Keys are capped."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> int | None:
        """None: hold this one back; else log it, with the count held back since the last."""
        now = time.monotonic()
        last, held = self._seen.get(key, (-1e18, 0))
        if now - last < self.interval_s:
            self._seen[key] = (last, held + 1)
            return None
        if len(self._seen) >= 256:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return held


class RateLimitedLog(logging.Filter):
    """For aiohttp's server logger: drops tracebacks and rate-limits per message template."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._limiter = _Limiter(interval_s)

    def allow_with_traceback(self, record: logging.LogRecord) -> bool:
        """Rate-limit ``record`` but keep its traceback (for our own handlers' failures: bugs)."""
        exc = record.exc_info[1] if record.exc_info else None
        held = self._limiter.allow(f"{record.msg}|{record.args}|{type(exc).__name__}")
        if held is None:
            return False
        if held:
            record.msg = f"{record.msg} (%d more like this suppressed)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), held)
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = f"{record.msg}|{type(exc).__name__}"
        held = self._limiter.allow(key)
        if held is None:
            return False
        if exc is not None:
            record.msg = f"{record.msg}: %s"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), _one_line(exc))
            record.exc_info = None
            record.exc_text = None
        if held:
            record.msg = f"{record.msg} (%d more like this suppressed)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), held)
        return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass(eq=False)
class _Conn:
    host: str
    transport: asyncio.Transport
    opened: float = field(default_factory=time.monotonic)
    busy: int = 0
    timer: asyncio.TimerHandle | None = None


class ConnectionGuard:
    """Which connections the API keeps; counters ``evicted``, ``refused`` and ``timed_out``."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.conns: dict[_Conn, None] = {}  # oldest first
        self.per_host: dict[str, int] = {}
        self.limiter = _Limiter(limits.log_interval_s)
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def admit(self, conn: _Conn) -> bool:
        limits = self.limits
        if self.per_host.get(conn.host, 0) >= limits.max_per_host:
            if not self._evict(conn.host, f"{conn.host} holds {limits.max_per_host} connections"):
                return self._refuse(conn, f"{limits.max_per_host} busy connections from it already")
        if len(self.conns) >= limits.max_connections:
            busiest = max(self.per_host, key=lambda h: self.per_host[h])
            reason = f"the API holds {limits.max_connections} connections"
            if not self._evict(busiest, reason) and not self._evict(None, reason):
                return self._refuse(conn, f"all {limits.max_connections} connections busy")
        self.conns[conn] = None
        self.per_host[conn.host] = self.per_host.get(conn.host, 0) + 1
        self.arm(conn)
        return True

    def _refuse(self, conn: _Conn, why: str) -> bool:
        self.refused += 1
        self._log(f"refused:{conn.host}", f"refused an HTTP connection from {conn.host}: {why}")
        return False

    def _evict(self, host: str | None, why: str) -> bool:
        """Close the oldest connection waiting for a request head, of ``host`` (None: of anyone)."""
        victim = next((c for c in self.conns if c.busy == 0 and host in (None, c.host)), None)
        if victim is None:
            return False
        self.evicted += 1
        self._log(
            f"evicted:{victim.host}",
            f"closed an idle HTTP connection from {victim.host} to make room ({why})",
        )
        self.forget(victim)
        victim.transport.abort()
        return True

    def forget(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if self.conns.pop(conn, 0) is None:
            left = self.per_host.get(conn.host, 0) - 1
            if left > 0:
                self.per_host[conn.host] = left
            else:
                self.per_host.pop(conn.host, None)

    def arm(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(self.limits.head_timeout_s, self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.busy or conn not in self.conns:
            return
        self.timed_out += 1
        self._log(
            f"timeout:{conn.host}",
            f"closed an HTTP connection from {conn.host}: no complete request within "
            f"{self.limits.head_timeout_s:g} s",
        )
        self.forget(conn)
        conn.transport.abort()

    def _log(self, key: str, message: str) -> None:
        held = self.limiter.allow(key)
        if held is not None:
            log.warning("%s%s", message, f" ({held} more like this suppressed)" if held else "")


_LIVE: dict[asyncio.BaseTransport, tuple[ConnectionGuard, _Conn]] = {}
"""Every guarded connection by its transport, so the middleware finds its own."""


class ConnectionGuardedProtocol(asyncio.Protocol):
    """Passes everything to aiohttp's protocol once the guard has admitted the connection."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._conn: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but quacks alike
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        conn = _Conn(host, transport)
        if not self._guard.admit(conn):
            transport.abort()
            return
        self._conn = conn
        _LIVE[transport] = (self._guard, conn)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._conn is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._conn is not None else None

    def pause_writing(self) -> None:
        if self._conn is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._conn is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        _LIVE.pop(conn.transport, None)
        self._guard.forget(conn)
        self._inner.connection_lost(exc)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Marks the connection busy while a request is handled, then restarts its head deadline."""
    entry = _LIVE.get(request.transport) if request.transport is not None else None
    if entry is None:
        return await handler(request)
    guard, conn = entry
    conn.busy += 1
    if conn.timer is not None:
        conn.timer.cancel()
        conn.timer = None
    try:
        return await handler(request)
    finally:
        conn.busy -= 1
        if conn.busy == 0 and conn in guard.conns:
            guard.arm(conn)


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a guard with ``limits``. ``handler_class``, a
    subclass of aiohttp's ``RequestHandler`` that adds no slots, serves each connection in its place."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: ConnectionLimits,
        handler_class: type[RequestHandler] = RequestHandler,
    ) -> None:
        super().__init__(runner, host, port)
        self.guard = ConnectionGuard(limits)
        self._handler_class = handler_class

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        guard = self.guard
        handler_class = self._handler_class

        def protocol() -> ConnectionGuardedProtocol:
            handler = server()
            # aiohttp's Server builds its RequestHandler with the runner's settings and takes no class
            # to build instead; a subclass that adds no slots (``handler_class``) takes it over as is.
            handler.__class__ = handler_class
            return ConnectionGuardedProtocol(guard, handler)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
