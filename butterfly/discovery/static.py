"""Static discovery: the ``[cluster] seed_nodes`` list, host names resolved on every round.

Host names are looked up each round (the system resolver: /etc/hosts, DNS), so a seed whose address
changes is followed; an IP address is used as written. A name that does not resolve is logged and left
out while the others are returned; only when no seed resolves at all is the round a failure.

This module must not dial peers or cache answers across rounds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from butterfly.config import HostPort
from butterfly.discovery import DiscoveryError, DiscoveryProvider, PeerAddress, sort_peers

log = logging.getLogger("butterfly.discovery")

Lookup = Callable[[str, int], Awaitable[list[str]]]
"""``lookup(host, port) -> addresses``; raises OSError when the name does not resolve."""


async def system_lookup(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, without blocking the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class StaticProvider(DiscoveryProvider):
    name = "static"

    def __init__(self, seeds: Sequence[HostPort], *, lookup: Lookup = system_lookup) -> None:
        self.seeds = tuple(seeds)
        self._lookup = lookup

    async def resolve(self) -> list[PeerAddress]:
        results = await asyncio.gather(
            *(self._resolve_one(seed) for seed in self.seeds), return_exceptions=True
        )
        peers: list[PeerAddress] = []
        failures: list[str] = []
        for seed, result in zip(self.seeds, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, OSError):
                    raise result
                failures.append(f"{seed} ({result})")
            else:
                peers.extend(result)
        if failures:
            if not peers:
                raise DiscoveryError(f"no seed node resolves: {', '.join(failures)}")
            log.warning("seed nodes left out this round, their names do not resolve: %s", ", ".join(failures))
        return sort_peers(peers)

    async def _resolve_one(self, seed: HostPort) -> list[PeerAddress]:
        try:
            ipaddress.ip_address(seed.host)
        except ValueError:
            pass
        else:
            return [PeerAddress(seed.host, seed.port)]
        addresses = await self._lookup(seed.host, seed.port)
        return [PeerAddress(address, seed.port) for address in addresses]
