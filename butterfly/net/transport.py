"""The peer transport: authenticated connections between nodes, carrying opaque bytes per channel.

``Transport`` listens on the node's bind address, dials the peers it is told about (``add_peer`` /
``set_peers``, fed by discovery), authenticates every connection (``butterfly.net.auth``) and keeps
at most one connection per peer pair. ``send`` never blocks: it puts the message on the peer's bounded
queue, dropping the oldest message (and counting it) when the queue is full -- Raft tolerates loss, a
stuck peer must not stall the node. Received messages go to the handler subscribed for their channel,
or to the bounded ``inbox``.

Who keeps which connection, in order:

* a peer of another ``cluster_name``, or bootstrapped into another Raft cluster id
  (``set_cluster_id``): refused on both sides;
* a peer claiming *this* node's id: our own listener (same incarnation) is quietly dropped and never
  dialed again; another process is a duplicate node id, refused on both sides with an error line;
* a peer id already connected from another advertised address, through a live connection, by another
  incarnation: a duplicate node id, the newcomer is refused (the one that came first stays);
* the same id with a new incarnation at the same address: the peer restarted, the new connection
  replaces the old one;
* two live connections between the same two processes (both dialed at once): both sides keep the one
  dialed by the lower node id, so they always agree; with the same dialer, the older one stays. The
  other is retired, not cut: each side says Goodbye on it and reads it until the peer's Goodbye, so no
  message already written to it is lost (messages around the switch may arrive out of order, which
  Raft tolerates).

Limits that keep a hostile or broken peer from holding resources: handshake frames are capped at
``HANDSHAKE_MAX_FRAME`` and the whole handshake at ``handshake_timeout_s``, and TLS's own before it
(a silent or trickling peer loses its slot), handshakes in progress are capped per remote host and
in total, and connections in total; session frames are capped at ``max_frame_bytes`` (a larger one drops the
connection, never the node), and a connection that receives nothing for ``idle_timeout_s`` is closed
(each side pings when idle).

Unauthenticated connections can never lock an authenticated peer out (``butterfly.net.slots`` says how
handshakes share the connection slots and which one is evicted for a newcomer).

This module owns sockets, reconnects, the one-connection rule, the send queues and the refusal log
lines (rate limited); a connection's own reading, writing and keepalive are ``butterfly.net.connection``,
the bounds and counters ``butterfly.net.limits``. It must not interpret channel payloads, import their
message types, discover peers or decide cluster membership: it reports peers up and down and leaves the
rest to its callers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import socket
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from butterfly.config import Config, HostPort
from butterfly.net.auth import (
    REFUSED_AUTH,
    REFUSED_CLUSTER,
    REFUSED_DUPLICATE_ID,
    REFUSED_PROTOCOL,
    REFUSED_SELF,
    REFUSED_VERSION,
    HandshakeError,
    IntegrityError,
    Session,
    TlsContexts,
    Verdict,
    client_handshake,
    load_secret,
    make_tls_contexts,
    server_handshake,
    tls_binding,
)
from butterfly.net.connection import (
    REFUSED_DUPLICATE_CONNECTION,
    Connection,
    Incoming,
    Link,
    MessageHandler,
    PeerEvent,
    PeerInfo,
    PeerListener,
)
from butterfly.net.frames import (
    MAC_BYTES,
    PROTOCOL_VERSION,
    ConnectionLost,
    Data,
    FrameError,
    FrameStream,
    FrameTooLarge,
    PeerIdentity,
    encode,
)
from butterfly.net.limits import LogLimiter, TransportLimits, TransportStats
from butterfly.net.slots import ConnectionSlots

log = logging.getLogger("butterfly.net")

_CHANNEL = re.compile(r"[a-z0-9_.-]{1,32}")
_WILDCARDS: Final = frozenset({"0.0.0.0", "::", ""})


@dataclass
class _Dialer:
    address: HostPort
    expected_id: str | None
    peer_id: str | None = None
    is_self: bool = False
    stopped: bool = False
    in_session: bool = False
    pending: deque[bytes] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


def default_advertise(bind: HostPort) -> HostPort:
    """The address to tell peers when none is configured: the bind address unless it is a wildcard,
    else this host's first non-loopback address (the host name when it resolves to nothing better)."""
    if bind.host not in _WILDCARDS:
        return bind
    hostname = socket.gethostname()
    try:
        infos = socket.getaddrinfo(hostname, bind.port, type=socket.SOCK_STREAM)
    except OSError:
        return HostPort(hostname, bind.port)
    for info in infos:
        host = str(info[4][0])
        if not host.startswith("127.") and host != "::1":
            return HostPort(host, bind.port)
    return HostPort(hostname, bind.port)


class Transport:
    """Authenticated, bounded, reconnecting peer connections for one node. Use on one event loop:
    ``await start()``, then ``add_peer``/``set_peers``, ``send``, ``subscribe``; ``await close()``."""

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        bind: HostPort,
        *,
        cluster_name: str = "butterfly",
        advertise: HostPort | None = None,
        tls: TlsContexts | None = None,
        limits: TransportLimits | None = None,
        protocol_version: tuple[int, int] = PROTOCOL_VERSION,
    ) -> None:
        if len(secret) < 32:
            raise ValueError(
                "the cluster secret must be at least 32 bytes (see butterfly.net.auth.load_secret)"
            )
        self.node_id = node_id
        self.cluster_name = cluster_name
        self.limits = limits or TransportLimits()
        self.stats = TransportStats()
        self.inbox: asyncio.Queue[Incoming] = asyncio.Queue(self.limits.inbox_max_messages)
        self._secret = secret
        self._bind = bind
        self._advertise = advertise
        self._tls = tls
        self._version = protocol_version
        self._incarnation = secrets.token_bytes(16)
        self._cluster_id = ""
        self._identity: PeerIdentity | None = None
        self._server: asyncio.AbstractServer | None = None
        self._links: dict[str, Link] = {}
        self._dialers: dict[HostPort, _Dialer] = {}
        self._handlers: dict[str, MessageHandler] = {}
        self._listeners: list[PeerListener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._limiter = LogLimiter(self.limits.log_interval_s)
        self._slots = ConnectionSlots(self.limits, self.stats, self._limiter)
        self.address: HostPort = bind
        """The address actually listened on (the real port when ``bind`` asked for port 0)."""

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the bind address; raises OSError if it cannot."""
        host = None if self._bind.host in _WILDCARDS else self._bind.host
        # TLS (when configured) runs in asyncio's server before a connection reaches ``_accept``, bounded
        # by the handshake timeout; it takes no slot, so a TLS flood cannot crowd out peers either.
        self._server = await asyncio.start_server(
            self._accept,
            host,
            self._bind.port,
            ssl=self._tls.server if self._tls else None,
            ssl_handshake_timeout=self.limits.handshake_timeout_s if self._tls else None,
            reuse_address=True,
            backlog=256,
        )
        port = int(self._server.sockets[0].getsockname()[1])
        self.address = HostPort(self._bind.host, port)
        advertise = self._advertise or default_advertise(self.address)
        if advertise.port == 0:
            advertise = HostPort(advertise.host, port)
        self._advertise = advertise
        self._identity = PeerIdentity(
            self.node_id, self.cluster_name, self._incarnation, str(advertise), self._cluster_id
        )
        log.info(
            "transport of node %s listening on %s (advertised as %s, protocol %d.%d, %s)",
            self.node_id,
            self.address,
            advertise,
            *self._version,
            "TLS + cluster secret" if self._tls else "cluster secret, HMAC-sealed frames",
        )

    async def close(self) -> None:
        """Stop listening and dialing, say goodbye on every connection and wait for every task."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for link in self._links.values():
            if link.conn is not None:
                link.conn.close("shutdown", f"node {self.node_id} is shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def advertise(self) -> HostPort:
        return self._advertise or self._bind

    def set_cluster_id(self, cluster_id: str) -> None:
        """Name the Raft bootstrap this node belongs to (before or after ``start``). From now on a peer
        announcing another cluster id is refused, and connected peers that announced one are dropped.
        Peers that had none when they connected are kept: the Raft layer checks what they send."""
        self._cluster_id = cluster_id
        if self._identity is not None:
            self._identity = msgspec.structs.replace(self._identity, cluster_id=cluster_id)
        for link in self._links.values():
            conn = link.conn
            if conn is not None and conn.info.cluster_id not in ("", cluster_id):
                reason = (
                    f"node {conn.info.node_id} belongs to cluster id {conn.info.cluster_id!r}, "
                    f"node {self.node_id} to {cluster_id!r}"
                )
                log.warning("dropping the connection to node %s: %s", conn.info.node_id, reason)
                conn.close(REFUSED_CLUSTER, reason)

    # ---- peers -----------------------------------------------------------------------------------

    def add_peer(self, address: HostPort, node_id: str | None = None) -> None:
        """Keep a connection to ``address`` (redialing with backoff); ``node_id`` is what discovery
        believes is there (a mismatch is logged, the authenticated id wins)."""
        if self._closing or address in self._dialers or address in (self.advertise, self.address):
            return
        dialer = _Dialer(address, node_id)
        self._dialers[address] = dialer
        dialer.task = self._spawn(self._dial_loop(dialer))

    def remove_peer(self, address: HostPort) -> None:
        """Stop dialing ``address``; a connection that is up stays until it closes."""
        dialer = self._dialers.pop(address, None)
        if dialer is None:
            return
        dialer.stopped = True
        # A discovery round that misses a peer must not cut a working connection: a dialer inside a
        # session ends when that session does; one that is waiting or connecting ends now.
        if not dialer.in_session and dialer.task is not None:
            dialer.task.cancel()

    def set_peers(self, peers: Mapping[HostPort, str | None]) -> None:
        """Dial exactly these addresses (address -> expected node id or None), e.g. each discovery round."""
        for address in list(self._dialers):
            if address not in peers:
                self.remove_peer(address)
        for address, node_id in peers.items():
            self.add_peer(address, node_id)

    def peers(self) -> dict[str, PeerInfo]:
        """Peers with a connection up now."""
        return {
            pid: link.conn.info for pid, link in self._links.items() if link.conn and not link.conn.closing
        }

    def subscribe(self, channel: str, handler: MessageHandler) -> None:
        """Deliver ``channel``'s messages to ``handler`` instead of ``inbox``."""
        self._check_channel(channel)
        self._handlers[channel] = handler

    def add_peer_listener(self, listener: PeerListener) -> None:
        self._listeners.append(listener)

    # ---- sending and receiving -------------------------------------------------------------------

    def send(self, peer: str | HostPort, channel: str, payload: bytes) -> bool:
        """Queue ``payload`` for ``peer`` (a node id, or an address being dialed); never blocks.

        Returns False when there is no route (an unknown node id) or the transport is closed. A full
        queue drops its oldest message to make room (``stats.dropped_queue_full``). Raises
        FrameTooLarge for a payload no peer would accept and ValueError for a bad channel name."""
        self._check_channel(channel)
        body = encode(Data(channel, payload))
        size = len(body) + (0 if self._tls else MAC_BYTES)
        if size > self.limits.max_frame_bytes:
            raise FrameTooLarge(
                f"a {size}-byte frame exceeds max_frame_bytes ({self.limits.max_frame_bytes})"
            )
        if self._closing:
            return False
        if isinstance(peer, HostPort):
            dialer = self._dialers.get(peer)
            if dialer is None or dialer.is_self:
                self.stats.dropped_no_route += 1
                return False
            if dialer.peer_id is None:
                # Not yet identified: hold it with the dialer; it moves to the peer's queue on connect.
                if len(dialer.pending) >= self.limits.queue_max_messages:
                    dialer.pending.popleft()
                    self.stats.dropped_queue_full += 1
                dialer.pending.append(body)
                return True
            peer = dialer.peer_id
        link = self._links.get(peer)
        if link is None:
            self.stats.dropped_no_route += 1
            return False
        self._enqueue(link, body)
        return True

    async def recv(self) -> Incoming:
        """The next message of a channel that has no handler."""
        return await self.inbox.get()

    def _enqueue(self, link: Link, body: bytes) -> None:
        limits = self.limits
        while link.queue and (
            len(link.queue) >= limits.queue_max_messages
            or link.queued_bytes + len(body) > limits.queue_max_bytes
        ):
            link.queued_bytes -= len(link.queue.popleft())
            self.stats.dropped_queue_full += 1
        link.queue.append(body)
        link.queued_bytes += len(body)
        if link.conn is not None:
            link.conn.wake.set()

    def _deliver(self, peer_id: str, message: Data) -> None:
        self.stats.messages_received += 1
        handler = self._handlers.get(message.channel)
        if handler is None:
            try:
                self.inbox.put_nowait(Incoming(peer_id, message.channel, message.payload))
            except asyncio.QueueFull:
                self.stats.dropped_inbox_full += 1
            return
        try:
            handler(peer_id, message.payload)
        except Exception:
            # A handler bug must not cut the peer off; it is logged with its traceback.
            log.exception("handler for channel %r failed on a message from %s", message.channel, peer_id)

    @staticmethod
    def _check_channel(channel: str) -> None:
        if not _CHANNEL.fullmatch(channel):
            raise ValueError(f"channel {channel!r} is not 1-32 of a-z 0-9 _ . -")

    # ---- admission and the one-connection rule ---------------------------------------------------

    def _admit(self, peer: PeerIdentity) -> Verdict:
        """Whether an authenticated peer may have a connection (see the module docstring's list)."""
        if peer.cluster_name != self.cluster_name:
            return (
                REFUSED_CLUSTER,
                f"node {peer.node_id} belongs to cluster {peer.cluster_name!r}, "
                f"node {self.node_id} to {self.cluster_name!r}",
            )
        if peer.cluster_id and self._cluster_id and peer.cluster_id != self._cluster_id:
            return (
                REFUSED_CLUSTER,
                f"node {peer.node_id} was bootstrapped into cluster id {peer.cluster_id!r}, "
                f"node {self.node_id} into {self._cluster_id!r}",
            )
        if peer.node_id == self.node_id:
            if peer.incarnation == self._incarnation:
                return REFUSED_SELF, "this is the node itself"
            return (
                REFUSED_DUPLICATE_ID,
                f"duplicate node id {peer.node_id!r}: used by the node at {self.advertise} and by the node "
                f"at {peer.advertise}; give each node its own [node] id",
            )
        link = self._links.get(peer.node_id)
        old = link.conn if link is not None else None
        if (
            old is not None
            and not old.closing
            and old.info.incarnation != peer.incarnation
            and old.info.advertise != peer.advertise
        ):
            return (
                REFUSED_DUPLICATE_ID,
                f"duplicate node id {peer.node_id!r}: already connected to it at {old.info.advertise}, "
                f"refusing a second node with that id at {peer.advertise}; give each node its own [node] id",
            )
        return None

    def _register(self, conn: Connection) -> bool:
        """Make ``conn`` its peer's live connection, or retire it if the one already there wins."""
        peer_id = conn.info.node_id
        link = self._links.setdefault(peer_id, Link())
        old = link.conn
        if old is None or old.closing:
            link.conn = conn
            self._notify(PeerEvent(True, conn.info))
        elif old.info.incarnation != conn.info.incarnation:
            link.conn = conn
            old.close("replaced", "a newer incarnation of this node connected")
            self._notify(PeerEvent(False, old.info))
            self._notify(PeerEvent(True, conn.info))
            log.info("peer %s restarted; its new connection replaces the old one", peer_id)
        elif self._prefer(conn.info, old.info):
            link.conn = conn
            old.retire(
                REFUSED_DUPLICATE_CONNECTION, f"keeping the connection dialed by {conn.info.dialed_by}"
            )
        else:
            conn.retire(
                REFUSED_DUPLICATE_CONNECTION, f"keeping the connection dialed by {old.info.dialed_by}"
            )
            return False
        if link.queue:
            conn.wake.set()
        return True

    def _prefer(self, new: PeerInfo, old: PeerInfo) -> bool:
        """Both ends see the same two connections and must pick the same one: the lower id's dial."""
        lower = min(self.node_id, new.node_id)
        if (new.dialed_by == lower) != (old.dialed_by == lower):
            return new.dialed_by == lower
        return False

    def _notify(self, event: PeerEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("peer listener failed on %s", event)

    # ---- refusals and their log lines ------------------------------------------------------------

    def _refused(self, exc: HandshakeError, where: str) -> None:
        counter = {
            REFUSED_AUTH: "refused_auth",
            REFUSED_VERSION: "refused_version",
            REFUSED_CLUSTER: "refused_cluster",
            REFUSED_DUPLICATE_ID: "refused_duplicate_id",
            REFUSED_PROTOCOL: "protocol_errors",
        }.get(exc.code, "refused_other")
        if exc.code == REFUSED_SELF:
            log.debug("%s is this node itself; not dialing it again", where)
            return
        if exc.code == REFUSED_DUPLICATE_CONNECTION:
            return
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        mine = f"{self._version[0]}.{self._version[1]}"
        theirs = f"{exc.peer_version[0]}.{exc.peer_version[1]}" if exc.peer_version else "?"
        if exc.code == REFUSED_VERSION:
            message = (
                f"incompatible protocol version with {where}: it runs {theirs}, node {self.node_id} runs "
                f"{mine}; {'the peer refused us' if exc.by_peer else 'refused'} (major versions must match)"
            )
        elif exc.by_peer:
            message = f"{where} refused node {self.node_id} ({exc.code}): {exc.reason}"
            if exc.code == REFUSED_AUTH:
                message += " -- the two nodes do not hold the same cluster secret file"
        else:
            who = f"node {exc.peer.node_id} at " if exc.peer is not None else ""
            message = f"refused {who}{where} ({exc.code}): {exc.reason}"
        level = logging.ERROR if exc.code == REFUSED_DUPLICATE_ID else logging.WARNING
        self._limiter.log(level, (exc.code, where.rsplit(":", 1)[0]), message)

    # ---- accepting -------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FrameStream(reader, writer)
        host = stream.peer_host()
        limits = self.limits
        slot = None if self._closing else self._slots.claim_inbound(host, writer)
        if slot is None:
            stream.close()
            return
        task = slot.task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # so close() can cancel a handshake in progress
        try:
            try:
                session = await asyncio.wait_for(self._server_side(stream), limits.handshake_timeout_s)
            finally:
                self._slots.end_handshake(slot)
            self.stats.connections_accepted += 1
            await self._run(Connection(stream, session, dialed_by=session.peer.node_id))
        except HandshakeError as exc:
            self._refused(exc, f"connection from {host}")
        except asyncio.TimeoutError:
            self.stats.handshake_timeouts += 1
            self._limiter.log(
                logging.WARNING,
                ("timeout", host),
                f"dropped a connection from {host}: "
                f"no complete handshake within {limits.handshake_timeout_s:g} s",
            )
        except (FrameError, ConnectionLost, OSError) as exc:
            self.stats.protocol_errors += 1
            self._limiter.log(logging.WARNING, ("protocol", host), f"dropped a connection from {host}: {exc}")
        except asyncio.CancelledError:
            # close() cancelled us, or an eviction did. This task belongs to asyncio's server, whose
            # done-callback calls task.exception() and logs a spurious error for a cancelled task
            # (CPython < 3.12): end normally instead; nothing waits on this task's result.
            pass
        finally:
            self._slots.free(slot)
            await stream.aclose()
            if task is not None:
                self._tasks.discard(task)

    async def _server_side(self, stream: FrameStream) -> Session:
        return await server_handshake(
            stream,
            self._secret,
            self._own_identity(),
            self._admit,
            tls_binding=self._binding(stream, is_client=False),
            version=self._version,
        )

    def _binding(self, stream: FrameStream, *, is_client: bool) -> bytes | None:
        return tls_binding(stream, self._tls.certificate, is_client=is_client) if self._tls else None

    def _own_identity(self) -> PeerIdentity:
        if self._identity is None:
            raise RuntimeError("Transport.start() has not run")
        return self._identity

    # ---- dialing ---------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _dial_loop(self, dialer: _Dialer) -> None:
        limits = self.limits
        attempt = 0
        while not self._closing and not dialer.stopped:
            link = self._links.get(dialer.peer_id) if dialer.peer_id else None
            if link is not None and link.conn is not None and not link.conn.closing:
                # The peer is reachable through a connection it dialed; redial only once that ends, after a
                # random pause so both ends do not dial each other in lockstep.
                await link.conn.closed.wait()
                await asyncio.sleep(random.uniform(0, limits.backoff_initial_s))
                continue
            if await self._dial_once(dialer):
                attempt = 0
                await asyncio.sleep(random.uniform(0, limits.backoff_initial_s))
                continue
            if dialer.is_self:
                return
            delay = min(limits.backoff_max_s, limits.backoff_initial_s * 2**attempt)
            attempt = min(attempt + 1, 32)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _dial_once(self, dialer: _Dialer) -> bool:
        """One connection attempt, run until the connection ends; True if a session was established."""
        limits = self.limits
        address = dialer.address
        if not self._slots.claim_outbound():
            return False
        local = None if self._bind.host in _WILDCARDS else (self._bind.host, 0)
        stream: FrameStream | None = None
        where = f"peer {address}"
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        address.host,
                        address.port,
                        ssl=self._tls.client if self._tls else None,
                        ssl_handshake_timeout=limits.handshake_timeout_s if self._tls else None,
                        local_addr=local,
                    ),
                    limits.connect_timeout_s,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                self.stats.connect_failures += 1
                log.debug("cannot connect to %s: %s", where, exc)
                return False
            stream = FrameStream(reader, writer)
            self.stats.connections_dialed += 1
            session = await asyncio.wait_for(
                client_handshake(
                    stream,
                    self._secret,
                    self._own_identity(),
                    tls_binding=self._binding(stream, is_client=True),
                    version=self._version,
                ),
                limits.handshake_timeout_s,
            )
            conn = Connection(stream, session, dialed_by=self.node_id)
            verdict = self._admit(session.peer)
            if verdict is not None:
                conn.close(*verdict)
                raise HandshakeError(verdict[0], verdict[1], by_peer=False, peer=session.peer)
            if dialer.expected_id is not None and dialer.expected_id != session.peer.node_id:
                log.warning(
                    "discovery said %s is node %s, but node %s answered there",
                    address,
                    dialer.expected_id,
                    session.peer.node_id,
                )
            dialer.peer_id = session.peer.node_id
            link = self._links.setdefault(dialer.peer_id, Link())
            while dialer.pending:
                self._enqueue(link, dialer.pending.popleft())
            dialer.in_session = True
            try:
                await self._run(conn)
            finally:
                dialer.in_session = False
            return True
        except HandshakeError as exc:
            if exc.code == REFUSED_SELF:
                dialer.is_self = True
            self._refused(exc, where)
            return False
        except asyncio.TimeoutError:
            self.stats.handshake_timeouts += 1
            self._limiter.log(
                logging.WARNING,
                ("timeout", address.host),
                f"{where}: no complete handshake within the timeout",
            )
            return False
        except (FrameError, ConnectionLost, OSError) as exc:
            self.stats.protocol_errors += 1
            self._limiter.log(
                logging.WARNING, ("protocol", address.host), f"{where}: handshake failed: {exc}"
            )
            return False
        finally:
            self._slots.release_outbound()
            if stream is not None:
                await stream.aclose()

    # ---- a connection's life ---------------------------------------------------------------------

    async def _run(self, conn: Connection) -> None:
        """Serve one authenticated connection until it ends; its writer and keepalive run beside. A
        connection that loses the one-connection rule is read until the peer's Goodbye, then closed."""
        peer_id = conn.info.node_id
        if self._closing:
            # close() cancelled this task as its handshake finished, and the cancellation was lost:
            # Python 3.11's wait_for returns a result that lands with a cancellation and drops the
            # cancellation. Served, the connection's keepalive would hold close() for ever.
            conn.close("shutdown", f"node {self.node_id} is shutting down")
            conn.closed.set()
            return
        if self._register(conn):
            log.info(
                "connected to node %s at %s (%s, protocol %d.%d)",
                peer_id,
                conn.info.advertise,
                "we dialed" if conn.info.dialed_by == self.node_id else "it dialed",
                *conn.session.version,
            )
        helpers = [
            self._spawn(conn.write_loop(self._links[peer_id], self.stats)),
            self._spawn(conn.keepalive_loop(self.limits, self.stats)),
        ]
        try:
            await conn.read_loop(self.limits.max_frame_bytes, self.stats, self._limiter, self._deliver)
        except IntegrityError as exc:
            self.stats.integrity_failures += 1
            log.warning("dropping the connection to node %s: %s", peer_id, exc)
        except FrameTooLarge as exc:
            self.stats.oversized_frames += 1
            log.warning("dropping the connection to node %s: %s", peer_id, exc)
        except FrameError as exc:
            self.stats.protocol_errors += 1
            log.warning("dropping the connection to node %s: %s", peer_id, exc)
        except (ConnectionLost, OSError) as exc:
            if not conn.closing:
                log.info("connection to node %s lost: %s", peer_id, exc)
        finally:
            conn.close()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            link = self._links.get(peer_id)
            if link is not None and link.conn is conn:
                link.conn = None
                self._notify(PeerEvent(False, conn.info))
            conn.closed.set()


def transport_from_config(config: Config, *, limits: TransportLimits | None = None) -> Transport:
    """The node's transport as its configuration describes it; reads the secret and TLS files now, so
    a bad one stops the node at start with ``SecretError``/``TlsConfigError`` naming the file."""
    security = config.security
    secret = load_secret(security.secret_file)
    tls = None
    if security.tls_cert is not None and security.tls_key is not None and security.tls_ca is not None:
        tls = make_tls_contexts(security.tls_cert, security.tls_key, security.tls_ca)
    return Transport(
        config.node.id,
        secret,
        config.node.bind_address,
        cluster_name=config.cluster.cluster_name,
        advertise=config.node.advertise_address,
        tls=tls,
        limits=limits,
    )
