"""DNS discovery: the peers are the targets of one SRV record (RFC 2782), resolved to A/AAAA.

``[cluster] dns_srv_name`` names the record (``_butterfly._tcp.example.com``); each answer's target
host is resolved to its IPv4 and IPv6 addresses and paired with the answer's port. ``dns_servers``
(``ip`` or ``ip:port``) replaces the system resolver, which is how the tests point it at a dnsmasq on
a loopback port. Every round asks again (dnspython's resolver keeps no cache unless given one), so
records that change are followed at the caller's ``discovery_interval_s``.

An SRV name that does not exist, or exists with no records, means "no peers yet" (an empty list); a
target of "." means "no service here" (RFC 2782) and is skipped. A server that does not answer makes
the round fail with DiscoveryError. This module must not dial peers or cache answers across rounds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.SRV import SRV

from butterfly.config import HostPort
from butterfly.discovery import DiscoveryError, DiscoveryProvider, PeerAddress, sort_peers

log = logging.getLogger("butterfly.discovery")


class DnsSrvProvider(DiscoveryProvider):
    name = "dns"

    def __init__(
        self, srv_name: str, nameservers: Sequence[HostPort] = (), *, timeout_s: float = 3.0
    ) -> None:
        self.srv_name = srv_name
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        # One deadline for each query including retries across servers: a dead server costs one
        # timeout per round, not one per target.
        self._resolver.lifetime = timeout_s
        self._resolver.timeout = timeout_s

    async def resolve(self) -> list[PeerAddress]:
        try:
            answer = await self._resolver.resolve(self.srv_name, dns.rdatatype.SRV, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"SRV lookup of {self.srv_name} failed: {exc}") from None
        records = [r for r in answer if isinstance(r, SRV) and r.target.to_text() != "."]
        targets = sorted({(r.target.to_text(), int(r.port)) for r in records})
        found = await asyncio.gather(*(self._addresses(target) for target, _ in targets))
        peers: list[PeerAddress] = []
        for (target, port), addresses in zip(targets, found, strict=True):
            if not addresses:
                log.warning("SRV target %s of %s has no A or AAAA record; left out", target, self.srv_name)
            peers.extend(PeerAddress(address, port) for address in addresses)
        return sort_peers(peers)

    async def _addresses(self, target: str) -> list[str]:
        addresses: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolver.resolve(target, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise DiscoveryError(f"address lookup of SRV target {target} failed: {exc}") from None
            addresses.extend(record.to_text() for record in answer)
        return addresses
