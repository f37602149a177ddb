"""Peer discovery: one interface, one module per provider, and the loop that watches for changes.

``DiscoveryProvider`` is the contract every provider keeps (Patroni's ``AbstractDCS`` shape):

* **lookup** -- ``resolve()`` returns every peer address the provider knows now, this node possibly
  among them (the transport recognises and skips itself). It may take a network round trip, so it is
  awaited beside the control loop, never in a tight loop: ``watch`` calls it every
  ``discovery_interval_s``. It raises ``DiscoveryError`` when it cannot answer at all (server down,
  timeout); "no peers right now" is an empty list, not an error.
* **membership** -- ``register(node)`` / ``deregister()`` publish or withdraw this node where the
  provider holds a registry (Consul). Static lists and DNS are maintained by the operator, so there
  they do nothing. A provider that keeps its entry alive (a Consul TTL check) does so in a task of its
  own, started by ``register``.
* **lifecycle** -- ``close()`` withdraws the registration and releases sockets; idempotent.

Providers: ``static`` (``[cluster] seed_nodes``), ``dns`` (an SRV record), ``consul`` (the health
API). ``MemoryProvider`` is the in-memory fake for unit tests of code that consumes discovery.
``make_provider(config)`` picks one by ``discovery_method``.

This package must not dial peers, authenticate anything or decide membership: it only says where
nodes claim to be; the transport proves who is there.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import msgspec

from butterfly.config import HostPort

if TYPE_CHECKING:
    from butterfly.config import Config

log = logging.getLogger("butterfly.discovery")


class DiscoveryError(Exception):
    """The provider could not answer (unreachable server, timeout, malformed reply)."""


class PeerAddress(msgspec.Struct, frozen=True):
    """Where a peer listens; ``node_id`` when the provider knows it (Consul), else None."""

    host: str
    port: int
    node_id: str | None = None

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)

    def __str__(self) -> str:
        where = str(self.address)
        return f"{self.node_id}@{where}" if self.node_id else where


def sort_peers(peers: Iterable[PeerAddress]) -> list[PeerAddress]:
    """Deduplicated, in a stable order, so two rounds with the same answer compare equal."""
    return sorted(set(peers), key=lambda p: (p.host, p.port, p.node_id or ""))


@dataclass(frozen=True)
class LocalNode:
    """This node as a registry should list it: its id, the transport's advertised address, extra text."""

    node_id: str
    address: HostPort
    role: str = "worker"
    meta: Mapping[str, str] = field(default_factory=dict)


class DiscoveryProvider(abc.ABC):
    """See the package docstring for the contract of each method."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def resolve(self) -> list[PeerAddress]:
        """Every peer known now, sorted by ``sort_peers``; DiscoveryError when there is no answer."""

    async def register(self, node: LocalNode) -> None:  # noqa: B027 - optional, a no-op by design
        """Publish this node; providers without a registry do nothing."""

    async def deregister(self) -> None:  # noqa: B027 - optional, a no-op by design
        """Withdraw this node; providers without a registry do nothing."""

    async def close(self) -> None:
        await self.deregister()


class MemoryProvider(DiscoveryProvider):
    """The in-memory fake: tests set what ``resolve`` returns, or make it fail."""

    name = "memory"

    def __init__(self, peers: Iterable[PeerAddress] = ()) -> None:
        self.peers = sort_peers(peers)
        self.error: DiscoveryError | None = None
        self.registered: LocalNode | None = None
        self.resolves = 0
        self.closed = False

    def set_peers(self, peers: Iterable[PeerAddress]) -> None:
        self.peers = sort_peers(peers)

    async def resolve(self) -> list[PeerAddress]:
        self.resolves += 1
        if self.error is not None:
            raise self.error
        return list(self.peers)

    async def register(self, node: LocalNode) -> None:
        self.registered = node

    async def deregister(self) -> None:
        self.registered = None

    async def close(self) -> None:
        await self.deregister()
        self.closed = True


@dataclass(frozen=True)
class DiscoveryChange:
    """The peer set after a round that changed it (the first round always counts as a change)."""

    peers: tuple[PeerAddress, ...]
    added: tuple[PeerAddress, ...]
    removed: tuple[PeerAddress, ...]


async def watch(provider: DiscoveryProvider, interval_s: float) -> AsyncGenerator[DiscoveryChange, None]:
    """Resolve every ``interval_s`` seconds and yield each time the answer differs from the last one.

    A failed round keeps the last answer (a flapping DNS server must not empty the peer set): it is
    logged once when failures start and once when they stop, never once per round."""
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    known: tuple[PeerAddress, ...] | None = None
    failing = False
    while True:
        try:
            peers = tuple(sort_peers(await provider.resolve()))
        except DiscoveryError as exc:
            if not failing:
                log.warning("%s discovery failed, keeping the last answer: %s", provider.name, exc)
            failing = True
        else:
            if failing:
                log.info("%s discovery answers again (%d peers)", provider.name, len(peers))
            failing = False
            if peers != known:
                before = set(known or ())
                change = DiscoveryChange(
                    peers=peers,
                    added=tuple(p for p in peers if p not in before),
                    removed=tuple(p for p in (known or ()) if p not in set(peers)),
                )
                known = peers
                yield change
        await asyncio.sleep(interval_s)


def make_provider(config: Config) -> DiscoveryProvider:
    """The provider ``[cluster] discovery_method`` names, set up from the config."""
    cluster = config.cluster
    if cluster.discovery_method == "static":
        from butterfly.discovery.static import StaticProvider

        return StaticProvider(cluster.seed_nodes)
    if cluster.discovery_method == "dns":
        from butterfly.discovery.dns import DnsSrvProvider

        if cluster.dns_srv_name is None:  # the config's own checks make this unreachable
            raise ValueError("discovery_method is dns but dns_srv_name is not set")
        return DnsSrvProvider(cluster.dns_srv_name, cluster.dns_servers)
    from butterfly.discovery.consul import ConsulProvider

    # The TTL outlives a few missed refreshes (refreshed every TTL/3) and never drops below 10 s, so a
    # busy event loop does not flap the node's health in Consul.
    ttl = max(10.0, 3 * cluster.discovery_interval_s)
    return ConsulProvider(cluster.consul_address, cluster.consul_service, check_ttl_s=ttl)


__all__ = [
    "DiscoveryChange",
    "DiscoveryError",
    "DiscoveryProvider",
    "LocalNode",
    "MemoryProvider",
    "PeerAddress",
    "make_provider",
    "sort_peers",
    "watch",
]
