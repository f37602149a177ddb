"""One authenticated peer connection and its life, and the values the transport reports about peers.

A ``Connection`` seals and writes frames in sequence order, reads and opens the peer's, drains its
peer's send queue (``Link``), pings when idle and closes when nothing arrives; ``retire`` gives it up
without losing what the peer already wrote to it. ``PeerInfo``, ``PeerEvent`` and ``Incoming`` are what
the transport tells its callers.

This module must not decide which connection a peer keeps (``transport`` applies the one-connection
rule), count connection slots (``slots``) or interpret channel payloads: a Data frame goes to the
``deliver`` callback as it came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from butterfly.net.auth import REFUSED_DUPLICATE_ID, Session
from butterfly.net.frames import (
    ConnectionLost,
    Data,
    FrameStream,
    Goodbye,
    Ping,
    SessionMessage,
    decode_session,
    encode,
)
from butterfly.net.limits import LogLimiter, TransportLimits, TransportStats

log = logging.getLogger("butterfly.net")

_DRAIN_ABOVE: Final = 1 << 20
"""Bytes buffered for one peer before the writer waits for the kernel to take them."""
REFUSED_DUPLICATE_CONNECTION: Final = "duplicate-connection"
"""The Goodbye code of the connection that loses the one-connection rule (not a refusal of the peer)."""


@dataclass(frozen=True)
class PeerInfo:
    """An authenticated peer as its connection knows it."""

    node_id: str
    advertise: str
    incarnation: bytes
    version: tuple[int, int]
    dialed_by: str
    remote: str
    cluster_id: str = ""


@dataclass(frozen=True)
class PeerEvent:
    """A peer came up (a connection was kept) or went down (its last connection closed)."""

    up: bool
    peer: PeerInfo


@dataclass(frozen=True)
class Incoming:
    """One received message on a channel without a subscribed handler."""

    peer_id: str
    channel: str
    payload: bytes


MessageHandler = Callable[[str, bytes], None]
"""``handler(peer_id, payload)``, called on the event loop for each message; it must not block."""
PeerListener = Callable[[PeerEvent], None]


class Connection:
    """One authenticated connection. ``write`` seals and queues a frame synchronously, so the sequence
    numbers follow write order whichever task writes."""

    def __init__(self, stream: FrameStream, session: Session, dialed_by: str) -> None:
        self.stream = stream
        self.session = session
        peer = session.peer
        self.info = PeerInfo(
            peer.node_id,
            peer.advertise,
            peer.incarnation,
            session.peer_version,
            dialed_by,
            stream.peer_host(),
            peer.cluster_id,
        )
        self.wake = asyncio.Event()
        self.closed = asyncio.Event()
        self.closing = False
        self.retired_at: float | None = None
        self.last_rx = self.last_tx = time.monotonic()

    def write(self, body: bytes) -> None:
        sealer = self.session.sealer
        self.stream.write(body, sealer.seal(body) if sealer is not None else b"")
        self.last_tx = time.monotonic()

    def close(self, code: str = "", reason: str = "") -> None:
        """Stop using the connection; with a ``code`` the peer is told why first (a sealed Goodbye)."""
        if self.closing:
            return
        self.closing = True
        if code:
            try:
                self.write(encode(Goodbye(code, reason[:512])))
            except (OSError, RuntimeError):
                pass  # the socket is already gone; there is nobody left to tell
        self.stream.close()  # flushes what was written, then closes
        self.wake.set()

    def retire(self, code: str, reason: str) -> None:
        """Stop writing and say Goodbye, but keep reading until the peer's Goodbye: frames it wrote before
        it too saw the other connection are still delivered (the one-connection rule loses nothing)."""
        if self.closing or self.retired_at is not None:
            return
        self.retired_at = time.monotonic()
        try:
            self.write(encode(Goodbye(code, reason[:512])))
        except (OSError, RuntimeError):
            self.close()

    async def read_loop(
        self,
        max_frame_bytes: int,
        stats: TransportStats,
        limiter: LogLimiter,
        deliver: Callable[[str, Data], None],
    ) -> None:
        """Read, open and hand on frames until the peer's Goodbye (returns) or an error (raises)."""
        opener = self.session.opener
        while True:
            frame = await self.stream.read(max_frame_bytes)
            body = opener.open(frame) if opener is not None else frame
            message: SessionMessage = decode_session(body)
            self.last_rx = time.monotonic()
            stats.bytes_received += len(frame)
            if isinstance(message, Data):
                deliver(self.info.node_id, message)
            elif isinstance(message, Goodbye):
                if message.code != REFUSED_DUPLICATE_CONNECTION:
                    level = logging.ERROR if message.code == REFUSED_DUPLICATE_ID else logging.INFO
                    text = (
                        f"node {self.info.node_id} closed the connection ({message.code}): {message.reason}"
                    )
                    limiter.log(level, ("goodbye", message.code, self.info.node_id), text)
                return

    async def write_loop(self, link: Link, stats: TransportStats) -> None:
        """Drain the peer's queue onto this connection while it is the peer's live one."""
        stream = self.stream
        try:
            while not self.closing:
                await self.wake.wait()
                self.wake.clear()
                while link.queue and link.conn is self and not self.closing and self.retired_at is None:
                    body = link.queue.popleft()
                    link.queued_bytes -= len(body)
                    self.write(body)
                    stats.messages_sent += 1
                    stats.bytes_sent += len(body)
                    if stream.buffered() > _DRAIN_ABOVE:
                        await stream.drain()
                await stream.drain()
        except (ConnectionLost, OSError, RuntimeError):
            self.close()

    async def keepalive_loop(self, limits: TransportLimits, stats: TransportStats) -> None:
        """Ping when idle; close when nothing was received for ``idle_timeout_s`` (or, retired, when the
        peer's Goodbye never came)."""
        ping = encode(Ping())
        while not self.closing:
            await asyncio.sleep(limits.keepalive_interval_s / 2)
            now = time.monotonic()
            if now - self.last_rx > limits.idle_timeout_s:
                stats.idle_timeouts += 1
                log.warning(
                    "closing the connection to node %s: nothing received for %.1f s",
                    self.info.node_id,
                    now - self.last_rx,
                )
                self.close("idle", f"nothing received for {limits.idle_timeout_s:g} s")
                return
            if self.retired_at is not None:
                if now - self.retired_at > limits.idle_timeout_s:
                    self.close()  # the peer never said its Goodbye on the connection we gave up
                    return
                continue
            if now - self.last_tx >= limits.keepalive_interval_s and self.stream.buffered() == 0:
                try:
                    self.write(ping)
                except (OSError, RuntimeError):
                    self.close()
                    return


@dataclass
class Link:
    """Everything about one peer id that outlives its connections: the send queue and the live one."""

    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    conn: Connection | None = None
