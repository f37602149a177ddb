"""Discovery providers against real servers on loopback: a real dnsmasq for DNS SRV
(tests/dnsmasq.py), a fake Consul agent that follows Consul's documented HTTP API
(tests/fakeconsul.py), and the static seed list. Also ``watch`` and ``make_provider``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest

from butterfly.config import HostPort, parse_config
from butterfly.discovery import (
    DiscoveryChange,
    DiscoveryError,
    LocalNode,
    MemoryProvider,
    PeerAddress,
    make_provider,
    watch,
)
from butterfly.discovery.consul import ConsulProvider
from butterfly.discovery.dns import DnsSrvProvider
from butterfly.discovery.static import StaticProvider, system_lookup
from butterfly.net import Transport, TransportLimits
from tests.asynchelpers import run, wait_until
from tests.dnsmasq import Dnsmasq, SrvRecord
from tests.fakeconsul import FakeConsul, parse_duration

SRV = "_butterfly._tcp.butterfly.test"


async def next_change(
    changes: AsyncGenerator[DiscoveryChange, None], timeout: float = 5.0
) -> DiscoveryChange:
    return await asyncio.wait_for(changes.__anext__(), timeout)


def peers(*specs: str) -> list[PeerAddress]:
    out = []
    for spec in specs:
        host, port = spec.rsplit(":", 1)
        out.append(PeerAddress(host, int(port)))
    return out


# ---- watch and the in-memory fake ----------------------------------------------------------------


def test_watch_yields_the_first_answer_then_only_changes_and_survives_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="butterfly.discovery")

    async def main() -> None:
        provider = MemoryProvider(peers("127.0.0.2:7000", "127.0.0.1:7000"))
        changes = watch(provider, 0.01)
        first = await next_change(changes)
        assert first.peers == tuple(peers("127.0.0.1:7000", "127.0.0.2:7000"))  # sorted
        assert first.added == first.peers and first.removed == ()
        rounds = provider.resolves
        provider.error = DiscoveryError("server down")
        pending = asyncio.ensure_future(next_change(changes))
        await wait_until(lambda: provider.resolves >= rounds + 5)
        assert not pending.done()  # the failed rounds changed nothing and yielded nothing
        provider.error = None
        provider.set_peers(peers("127.0.0.1:7000", "127.0.0.3:7000"))
        change = await pending
        assert change.added == tuple(peers("127.0.0.3:7000")) and change.removed == tuple(
            peers("127.0.0.2:7000")
        )
        await changes.aclose()

    run(main())
    failures = [r for r in caplog.records if "discovery failed" in r.getMessage()]
    assert len(failures) == 1 and "keeping the last answer: server down" in failures[0].getMessage()
    assert any("memory discovery answers again" in r.getMessage() for r in caplog.records)


def test_memory_provider_records_registration() -> None:
    async def main() -> None:
        provider = MemoryProvider()
        node = LocalNode("n1", HostPort("127.0.0.1", 7000), "coordinator")
        await provider.register(node)
        assert provider.registered == node
        await provider.close()
        assert provider.registered is None and provider.closed

    run(main())


# ---- static --------------------------------------------------------------------------------------


def test_static_seeds_resolve_names_each_round_and_skip_the_ones_that_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table: dict[str, list[str]] = {"node-b": ["127.0.0.2"], "node-c": ["127.0.0.3", "127.0.0.4"]}
    asked: list[str] = []

    async def lookup(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError(f"{host}: Name or service not known")
        return table[host]

    async def main() -> None:
        seeds = [HostPort("127.0.0.1", 7000), HostPort("node-b", 7001), HostPort("node-c", 7002)]
        provider = StaticProvider(seeds, lookup=lookup)
        assert await provider.resolve() == peers(
            "127.0.0.1:7000", "127.0.0.2:7001", "127.0.0.3:7002", "127.0.0.4:7002"
        )
        assert "127.0.0.1" not in asked  # an IP address is used as written
        table["node-b"] = ["127.0.0.5"]
        del table["node-c"]
        assert await provider.resolve() == peers("127.0.0.1:7000", "127.0.0.5:7001")
        with pytest.raises(DiscoveryError, match="no seed node resolves"):
            await StaticProvider([HostPort("node-x", 1)], lookup=lookup).resolve()
        assert await StaticProvider([]).resolve() == []
        assert await system_lookup("127.0.0.3", 7000) == ["127.0.0.3"]

    run(main())
    assert "node-c:7002" in caplog.text


# ---- DNS SRV through a real dnsmasq --------------------------------------------------------------


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path)
    yield server
    server.stop()


def test_dns_srv_targets_resolve_and_changes_are_picked_up(dnsmasq: Dnsmasq) -> None:
    dnsmasq.start(
        {SRV: [SrvRecord("a.butterfly.test", 7001), SrvRecord("b.butterfly.test", 7002, priority=1)]},
        host_records={"a.butterfly.test": "127.0.0.1", "b.butterfly.test": "127.0.0.2"},
        hosts_file={"c.butterfly.test": "127.0.0.3"},
    )
    provider = DnsSrvProvider(SRV, [HostPort("127.0.0.1", dnsmasq.port)], timeout_s=1.0)

    async def main() -> None:
        changes = watch(provider, 0.05)
        first = await next_change(changes)
        assert list(first.peers) == peers("127.0.0.1:7001", "127.0.0.2:7002")
        # A new SRV record: dnsmasq restarts with it, the next round sees the third peer.
        dnsmasq.set_srv(
            {SRV: [SrvRecord("a.butterfly.test", 7001), SrvRecord("b.butterfly.test", 7002),
                   SrvRecord("c.butterfly.test", 7003)]}
        )  # fmt: skip
        change = await next_change(changes)
        assert change.added == tuple(peers("127.0.0.3:7003")) and change.removed == ()
        # A target's address changes in the hosts file: SIGHUP, no restart, and the round follows it.
        dnsmasq.set_hosts({"c.butterfly.test": "127.0.0.4"})
        change = await next_change(changes)
        assert change.added == tuple(peers("127.0.0.4:7003")) and change.removed == tuple(
            peers("127.0.0.3:7003")
        )
        # A target with no address is left out, the others stay.
        dnsmasq.set_hosts({})
        change = await next_change(changes)
        assert list(change.peers) == peers("127.0.0.1:7001", "127.0.0.2:7002")
        await changes.aclose()
        # A name with no SRV record is "no peers", not an error.
        missing = DnsSrvProvider("_other._tcp.butterfly.test", [HostPort("127.0.0.1", dnsmasq.port)])
        assert await missing.resolve() == []

    run(main())


def test_dns_server_down_is_a_discovery_error(dnsmasq: Dnsmasq) -> None:
    dnsmasq.start(
        {SRV: [SrvRecord("a.butterfly.test", 7001)]}, host_records={"a.butterfly.test": "127.0.0.1"}
    )
    port = dnsmasq.port
    dnsmasq.stop()
    provider = DnsSrvProvider(SRV, [HostPort("127.0.0.1", port)], timeout_s=0.3)

    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(DiscoveryError, match="SRV lookup"):
            await provider.resolve()
        assert time.monotonic() - start < 2.0

    run(main())


def test_a_cluster_forms_from_dns_srv(dnsmasq: Dnsmasq) -> None:
    """Discovery feeds the transport: three nodes that know only the SRV name find each other."""
    limits = TransportLimits(
        backoff_initial_s=0.02, backoff_max_s=0.2, keepalive_interval_s=0.2, idle_timeout_s=2
    )

    async def main() -> None:
        secret = b"s" * 32
        nodes = [Transport(f"n{i}", secret, HostPort(f"127.0.0.{i}", 0), limits=limits) for i in (1, 2, 3)]
        for t in nodes:
            await t.start()
        dnsmasq.start(
            {SRV: [SrvRecord(f"n{i}.butterfly.test", t.address.port) for i, t in enumerate(nodes, 1)]},
            host_records={f"n{i}.butterfly.test": f"127.0.0.{i}" for i in (1, 2, 3)},
        )

        async def follow(t: Transport) -> None:
            provider = DnsSrvProvider(SRV, [HostPort("127.0.0.1", dnsmasq.port)], timeout_s=1.0)
            async for change in watch(provider, 0.1):
                t.set_peers({p.address: p.node_id for p in change.peers})

        followers = [asyncio.ensure_future(follow(t)) for t in nodes]
        try:
            await wait_until(lambda: all(len(t.peers()) == 2 for t in nodes), what="the mesh")
            assert {p for p in nodes[0].peers()} == {"n2", "n3"}
        finally:
            for f in followers:
                f.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
            await asyncio.gather(*(t.close() for t in nodes))

    run(main())


# ---- Consul (fake agent) -------------------------------------------------------------------------


def test_consul_registers_this_node_and_lists_passing_instances() -> None:
    async def main() -> None:
        consul = FakeConsul()
        url = await consul.start()
        consul.add_remote("butterfly", "butterfly-b", "127.0.0.2", 7002, meta={"butterfly_node_id": "b"})
        consul.add_remote("butterfly", "butterfly-sick", "127.0.0.5", 7005, status="critical")
        consul.add_remote(
            "butterfly", "butterfly-noaddr", "", 7006, node_address="127.0.0.6"
        )  # node's address
        consul.add_remote("other-service", "x", "127.0.0.7", 7007)
        provider = ConsulProvider(url, "butterfly", check_ttl_s=0.3)
        try:
            before = await provider.resolve()
            assert before == [PeerAddress("127.0.0.2", 7002, "b"), PeerAddress("127.0.0.6", 7006)]
            await provider.register(LocalNode("a", HostPort("127.0.0.1", 7001), "coordinator"))
            instance = consul.instances["butterfly-a"]
            assert instance.meta == {"butterfly_node_id": "a", "butterfly_role": "coordinator"}
            assert instance.checks[0].ttl_s == 0.3 and instance.checks[0].deregister_after_s == 120
            assert PeerAddress("127.0.0.1", 7001, "a") in await provider.resolve()
            # The refresher keeps the TTL check passing well past one TTL.
            await asyncio.sleep(0.8)
            assert PeerAddress("127.0.0.1", 7001, "a") in await provider.resolve()
            # An unknown TTL check is Consul's 500 (the agent's updateTTLCheck error), not a 404.
            status, body = await provider._call("PUT", "/v1/agent/check/pass/service:nobody")
            assert (status, body) == (500, b'CheckID "service:nobody" does not have associated TTL')
            # The agent restarts and forgets us: the next refresh registers again.
            del consul.instances["butterfly-a"]
            await wait_until(lambda: "butterfly-a" in consul.instances, what="re-registration")
            # The node hangs (its refresher stops): after the TTL Consul no longer lists it as passing.
            assert provider._refresher is not None
            provider._refresher.cancel()
            await asyncio.sleep(0.5)
            assert PeerAddress("127.0.0.1", 7001, "a") not in await provider.resolve()
            await provider.close()
            assert "butterfly-a" not in consul.instances  # deregistered on close
            assert ("PUT", "/v1/agent/service/deregister/butterfly-a") in consul.requests
            assert any(
                path.startswith("/v1/health/service/butterfly?passing=true") for _, path in consul.requests
            )
        finally:
            await provider.close()
            await consul.close()

    run(main())


def test_consul_token_errors_and_garbage_replies_are_discovery_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        consul = FakeConsul(token="s3cret")
        url = await consul.start()
        consul.add_remote("butterfly", "butterfly-b", "127.0.0.2", 7002)
        try:
            denied = ConsulProvider(url, "butterfly", token="wrong")
            with pytest.raises(DiscoveryError, match="HTTP 403: ACL not found"):
                await denied.resolve()
            await denied.close()
            monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")  # the variable Consul's own tools read
            allowed = ConsulProvider(url, "butterfly")
            assert await allowed.resolve() == [PeerAddress("127.0.0.2", 7002)]
            consul.broken = True
            with pytest.raises(DiscoveryError, match="not a health entry list"):
                await allowed.resolve()
            await allowed.close()
        finally:
            await consul.close()
        gone = ConsulProvider(url, "butterfly", timeout_s=0.5)  # the agent is not running any more
        with pytest.raises(DiscoveryError, match="did not answer"):
            await gone.resolve()
        await gone.close()

    run(main())


def test_fake_consul_durations_follow_go_syntax() -> None:
    assert parse_duration("10s") == 10 and parse_duration("1m30s") == 90 and parse_duration("1500ms") == 1.5
    with pytest.raises(ValueError):
        parse_duration("10 seconds")


# ---- the factory ---------------------------------------------------------------------------------


def _config(tmp_path: Path, cluster: str) -> Any:
    return parse_config(
        f"""
        [cluster]
        {cluster}
        [model]
        source_type = "filesystem"
        source_path = "{tmp_path}"
        """
    )


def test_make_provider_follows_discovery_method(tmp_path: Path) -> None:
    static = make_provider(_config(tmp_path, 'seed_nodes = ["127.0.0.2:7000", "node-b:7000"]'))
    assert isinstance(static, StaticProvider) and static.seeds == (
        HostPort("127.0.0.2", 7000),
        HostPort("node-b", 7000),
    )
    dns_provider = make_provider(
        _config(
            tmp_path, f'discovery_method = "dns"\ndns_srv_name = "{SRV}"\ndns_servers = ["127.0.0.1:5353"]'
        )
    )
    assert isinstance(dns_provider, DnsSrvProvider) and dns_provider.srv_name == SRV
    consul = make_provider(
        _config(
            tmp_path,
            'discovery_method = "consul"\nconsul_address = "http://127.0.0.1:8500/"\nconsul_service = "llm"\n'
            "discovery_interval_s = 5.0",
        )
    )
    assert isinstance(consul, ConsulProvider)
    assert (consul.base, consul.service, consul.check_ttl_s) == ("http://127.0.0.1:8500", "llm", 15.0)


def test_only_a_forgotten_check_re_registers() -> None:
    from butterfly.discovery.consul import _check_unknown

    assert _check_unknown(500, b'CheckID "service:butterfly-a" does not have associated TTL')
    assert _check_unknown(404, b'Unknown check ID "service:butterfly-a"')
    assert not _check_unknown(500, b"rpc error making call: No cluster leader")  # the agent failing
    assert not _check_unknown(403, b"ACL not found")
