"""The transport's connection slots: ``max_connections`` in all, inbound and outbound, and the
handshake slots of inbound connections still proving the secret.

Unauthenticated connections can never lock an authenticated peer out: handshakes in progress may hold
at most ``max_pending_total`` of the ``max_connections`` slots (the rest are reserved for connections
that proved the secret), and when a new connection finds the handshake slots or all slots taken, the
oldest handshake of the host holding the most is evicted for it. A peer completes its handshake in a
few round trips while a slow or half-open one sits in its slot, so the slow ones go first; only a
transport full of *authenticated* connections refuses a newcomer.

This module owns that counting and the eviction. It must not read or write frames nor judge a peer: it
sees a connection only as its remote host, its writer and its task.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from butterfly.net.limits import LogLimiter, TransportLimits, TransportStats


@dataclass(eq=False)
class Slot:
    """One accepted connection's claim on ``max_connections``, and on the handshake slots until it
    authenticates. Released exactly once, by its own task's end or by an eviction."""

    host: str
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    handshaking: bool = True
    released: bool = False
    evicted: bool = False


class ConnectionSlots:
    """Every connection's claim on ``max_connections``, and the inbound handshakes' on
    ``max_pending_per_host`` and ``max_pending_total``; refusals and evictions are counted in ``stats``."""

    def __init__(self, limits: TransportLimits, stats: TransportStats, limiter: LogLimiter) -> None:
        self.limits = limits
        self.stats = stats
        self._limiter = limiter
        self.open = 0
        """Connections holding a slot, handshaking or established, inbound and outbound."""
        self.pending: dict[str, int] = {}
        """Inbound handshakes in progress per remote host."""
        self.handshaking: dict[Slot, None] = {}
        """Inbound connections still in their handshake, oldest first (an ordered set)."""

    def claim_inbound(self, host: str, writer: asyncio.StreamWriter) -> Slot | None:
        """A slot for a new inbound connection, evicting a handshake for it if need be; None: refused."""
        limits = self.limits
        if self.pending.get(host, 0) >= limits.max_pending_per_host:
            self._refuse(host, f"{limits.max_pending_per_host} handshakes from it already in progress")
            return None
        if len(self.handshaking) >= limits.max_pending_total or self.open >= limits.max_connections:
            if not self.evict_handshake():
                self._refuse(host, f"all {limits.max_connections} connections are authenticated peers")
                return None
        slot = Slot(host, writer)
        self.open += 1
        self.pending[host] = self.pending.get(host, 0) + 1
        self.handshaking[slot] = None
        return slot

    def claim_outbound(self) -> bool:
        """A slot for a connection we dial, evicting a handshake for it if need be; False: refused.
        The caller gives it back with ``release_outbound`` when the connection ends."""
        if self.open >= self.limits.max_connections and not self.evict_handshake():
            self.stats.refused_limit += 1
            return False
        self.open += 1
        return True

    def release_outbound(self) -> None:
        self.open -= 1

    def _refuse(self, host: str, why: str) -> None:
        self.stats.refused_limit += 1
        self._limiter.log(
            logging.WARNING, ("limit", host), f"refused a connection from {host}: connection limit ({why})"
        )

    def evict_handshake(self) -> bool:
        """Make room by dropping the oldest handshake of the host with the most in progress: a flood
        loses its own slots first, and a real peer, through its handshake in a few round trips, is
        rarely the oldest. False when no handshake is in progress."""
        if not self.handshaking:
            return False
        busiest = max(self.pending.values())
        victim = next(slot for slot in self.handshaking if self.pending.get(slot.host, 0) == busiest)
        self._limiter.log(
            logging.WARNING,
            ("evicted", victim.host),
            f"dropped an unfinished handshake from {victim.host} to make room for a new connection "
            f"({len(self.handshaking)} handshakes in progress, {busiest} from that host; "
            f"{self.open} connections)",
        )
        victim.evicted = True
        self.free(victim)
        victim.writer.transport.abort()
        if victim.task is not None:
            victim.task.cancel()
        self.stats.evicted_handshakes += 1
        return True

    def end_handshake(self, slot: Slot) -> None:
        if not slot.handshaking:
            return
        slot.handshaking = False
        self.handshaking.pop(slot, None)
        left = self.pending.get(slot.host, 0) - 1
        if left > 0:
            self.pending[slot.host] = left
        else:
            self.pending.pop(slot.host, None)

    def free(self, slot: Slot) -> None:
        self.end_handshake(slot)
        if not slot.released:
            slot.released = True
            self.open -= 1
