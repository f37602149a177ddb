"""The HTTP API against a real listening server: endpoints, codes and bodies across node states,
HEAD, 404/405, size limits, a failing status source, and /metrics parsed back by prometheus_client.

Each test runs its own server on 127.0.0.1 port 0 inside ``asyncio.run`` (no pytest plugin).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from butterfly.api import MAX_BODY_BYTES, ApiBindError, make_app, make_registry, start_api
from butterfly.status import ChildStatus, NodeStatus

T = TypeVar("T")

SEED_FIELDS = ["state", "phase", "progress_percent", "eta_seconds", "cluster_size", "coordinator"]
ENDPOINTS = ["/status", "/health", "/ready", "/metrics"]


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await asyncio.wait_for(coro, timeout=20)

    return asyncio.run(wrapper())


# --- Status fixtures: one realistic snapshot per state ------------------------------------------


def _children(**down: str) -> list[ChildStatus]:
    out = []
    for i, name in enumerate(("cluster", "loader", "validator")):
        alive = name not in down
        out.append(
            ChildStatus(
                name=name,
                pid=100 + i if alive else None,
                alive=alive,
                heartbeat_age_seconds=0.25 if alive else None,
                restarts=2 if name == "loader" else 0,
                last_exit=down.get(name, ""),
            )
        )
    return out


def make_status(**overrides: Any) -> NodeStatus:
    base: dict[str, Any] = dict(
        state="COLD",
        phase="cold_start",
        progress_percent=0.0,
        eta_seconds=None,
        cluster_size=1,
        coordinator=None,
        node_id="node-a-7f3d",
        role="worker",
        version="0.1.0",
        term=0,
        epoch=0,
        quorum_size=3,
        cluster_operational_nodes=0,
        load_step="none",
        bytes_done=0,
        bytes_total=0,
        model_bytes_downloaded_total=0,
        rate_bytes_per_second=0.0,
        model_root=None,
        phase_durations={},
        uptime_seconds=1.5,
        may_serve=False,
        healthy=True,
        last_error=None,
        waiting_reason="starting",
        children=_children(),
    )
    base.update(overrides)
    return NodeStatus(**base)


DONE_PHASES = {
    "cold_start": 4.0,
    "discovery": 10.0,
    "election": 2.0,
    "assignment": 5.0,
    "loading_weights": 120.0,
    "validation": 10.0,
}


def cold() -> NodeStatus:
    return make_status()


def loading() -> NodeStatus:
    return make_status(
        state="LOADING",
        phase="loading_weights",
        progress_percent=45.2,
        eta_seconds=68,
        cluster_size=3,
        coordinator="node-a-7f3d",
        term=4,
        epoch=2,
        load_step="download",
        bytes_done=25 * 2**30,
        bytes_total=100 * 2**30,
        model_bytes_downloaded_total=25 * 2**30,
        rate_bytes_per_second=1.25e9,
        phase_durations={k: DONE_PHASES[k] for k in ("cold_start", "discovery", "election", "assignment")},
        waiting_reason="loading weights",
        uptime_seconds=40.0,
    )


def ready_not_serving() -> NodeStatus:
    return make_status(
        state="READY",
        phase="ready",
        progress_percent=100.0,
        eta_seconds=0,
        cluster_size=3,
        coordinator="node-a-7f3d",
        cluster_operational_nodes=1,
        term=4,
        epoch=2,
        bytes_done=100 * 2**30,
        bytes_total=100 * 2**30,
        model_bytes_downloaded_total=100 * 2**30,
        model_root="ab" * 32,
        phase_durations=dict(DONE_PHASES),
        waiting_reason="waiting for the cluster's operational gate",
        uptime_seconds=160.0,
    )


def operational() -> NodeStatus:
    return msgspec.structs.replace(
        ready_not_serving(),
        state="OPERATIONAL",
        cluster_operational_nodes=3,
        may_serve=True,
        waiting_reason=None,
    )


def failed() -> NodeStatus:
    return make_status(
        state="FAILED",
        phase="failed",
        progress_percent=30.0,
        cluster_size=3,
        coordinator="node-b-11aa",
        term=5,
        healthy=False,
        last_error="checksum mismatch in layer 12",
        waiting_reason=None,
        children=_children(loader="exit code 3"),
    )


ALL_STATES: dict[str, Callable[[], NodeStatus]] = {
    "COLD": cold,
    "LOADING": loading,
    "READY": ready_not_serving,
    "OPERATIONAL": operational,
    "FAILED": failed,
}


class FakeSource:
    """A mutable status source; ``error`` makes the next calls raise; ``calls`` counts reads."""

    def __init__(self, status: NodeStatus) -> None:
        self.status = status
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self) -> NodeStatus:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.status


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, port: int) -> None:
        self.session = session
        self.base = base
        self.port = port

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any, bytes]:
        async with self.session.request(method, self.base + path, **kw) as resp:
            body = await resp.read()
            return resp.status, resp.headers, body

    async def get_json(self, path: str) -> tuple[int, Any]:
        status, headers, body = await self.request("GET", path)
        assert headers["Content-Type"].startswith("application/json")
        return status, json.loads(body)


@asynccontextmanager
async def serving(source: Callable[[], NodeStatus]) -> AsyncIterator[Client]:
    server = await start_api(make_app(source), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(session, f"http://127.0.0.1:{server.port}", server.port)
    finally:
        await server.close()


def with_server(source: Callable[[], NodeStatus], body: Callable[[Client], Awaitable[T]]) -> T:
    async def main() -> T:
        async with serving(source) as client:
            return await body(client)

    return run(main())


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape(status: NodeStatus) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    return parse_metrics(generate_latest(make_registry(lambda: status)).decode())


def one(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


# --- /status ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(ALL_STATES))
def test_status_returns_snapshot_with_seed_fields_first(state: str) -> None:
    expected = ALL_STATES[state]()

    async def body(c: Client) -> None:
        code, headers, raw = await c.request("GET", "/status")
        assert code == 200
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Cache-Control"] == "no-store"
        doc = json.loads(raw)
        assert list(doc)[:6] == SEED_FIELDS
        assert doc["state"] == state
        assert msgspec.json.decode(raw, type=NodeStatus) == expected

    with_server(FakeSource(expected), body)


def test_status_loading_matches_seed_example() -> None:
    async def body(c: Client) -> None:
        code, doc = await c.get_json("/status")
        assert code == 200
        assert {k: doc[k] for k in SEED_FIELDS} == {
            "state": "LOADING",
            "phase": "loading_weights",
            "progress_percent": 45.2,
            "eta_seconds": 68,
            "cluster_size": 3,
            "coordinator": "node-a-7f3d",
        }
        assert doc["children"][1] == {
            "name": "loader",
            "pid": 101,
            "alive": True,
            "heartbeat_age_seconds": 0.25,
            "restarts": 2,
            "last_exit": "",
            "starting": False,
        }

    with_server(FakeSource(loading()), body)


def test_status_follows_source_between_requests() -> None:
    source = FakeSource(cold())

    async def body(c: Client) -> None:
        states = []
        for make in (cold, loading, ready_not_serving, operational):
            source.status = make()
            _, doc = await c.get_json("/status")
            states.append(doc["state"])
        assert states == ["COLD", "LOADING", "READY", "OPERATIONAL"]

    with_server(source, body)


# --- /health and /ready -------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["COLD", "LOADING", "READY", "OPERATIONAL"])
def test_health_ok_while_healthy(state: str) -> None:
    async def body(c: Client) -> None:
        code, doc = await c.get_json("/health")
        assert code == 200
        assert doc["status"] == "ok"
        assert doc["state"] == state

    with_server(FakeSource(ALL_STATES[state]()), body)


def test_health_failed_is_503_with_reason() -> None:
    async def body(c: Client) -> None:
        code, doc = await c.get_json("/health")
        assert code == 503
        assert doc["status"] == "unhealthy"
        assert doc["state"] == "FAILED"
        assert "state FAILED" in doc["reason"]
        assert "checksum mismatch in layer 12" in doc["reason"]
        assert "child loader down (exit code 3)" in doc["reason"]
        assert doc["children_down"] == ["loader"]

    with_server(FakeSource(failed()), body)


def test_health_unhealthy_child_while_loading() -> None:
    status = msgspec.structs.replace(
        loading(), healthy=False, children=_children(validator="killed by SIGKILL")
    )

    async def body(c: Client) -> None:
        code, doc = await c.get_json("/health")
        assert code == 503
        assert doc["reason"] == "child validator down (killed by SIGKILL)"
        assert doc["last_error"] is None

    with_server(FakeSource(status), body)


@pytest.mark.parametrize("state", ["COLD", "LOADING", "READY", "FAILED"])
def test_ready_is_503_until_may_serve(state: str) -> None:
    status = ALL_STATES[state]()

    async def body(c: Client) -> None:
        code, doc = await c.get_json("/ready")
        assert code == 503
        assert doc == {
            "ready": False,
            "state": state,
            "phase": status.phase,
            "epoch": status.epoch,
            "term": status.term,
            "waiting_reason": status.waiting_reason,
        }

    with_server(FakeSource(status), body)


def test_ready_200_when_operational() -> None:
    async def body(c: Client) -> None:
        code, doc = await c.get_json("/ready")
        assert code == 200
        status = operational()
        assert doc == {
            "ready": True,
            "state": "OPERATIONAL",
            "phase": "ready",
            "epoch": status.epoch,
            "term": status.term,
        }

    with_server(FakeSource(operational()), body)


# --- /metrics over HTTP -------------------------------------------------------------------------


def test_metrics_endpoint_seed_names_and_values() -> None:
    source = FakeSource(loading())

    async def body(c: Client) -> None:
        code, headers, raw = await c.request("GET", "/metrics")
        assert code == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = parse_metrics(raw.decode())
        assert one(samples, "node_state", state="LOADING") == 1.0
        assert sum(samples["node_state"].values()) == 1.0
        assert one(samples, "cluster_size") == 3
        assert one(samples, "cluster_operational_nodes") == 0
        assert one(samples, "model_bytes_downloaded_total") == 25 * 2**30
        assert one(samples, "init_duration_seconds", phase="discovery") == 10.0
        assert ("phase", "total") not in {lbl for key in samples["init_duration_seconds"] for lbl in key}

        # The next scrape renders the new snapshot, reading the source once per scrape.
        source.status = operational()
        before = source.calls
        _, _, raw = await c.request("GET", "/metrics")
        assert source.calls == before + 1
        samples = parse_metrics(raw.decode())
        assert one(samples, "node_state", state="OPERATIONAL") == 1.0
        assert one(samples, "node_state", state="LOADING") == 0.0
        assert one(samples, "init_duration_seconds", phase="total") == sum(DONE_PHASES.values())
        assert one(samples, "cluster_operational_nodes") == 3

    with_server(source, body)


def test_metrics_openmetrics_negotiation() -> None:
    async def body(c: Client) -> None:
        accept = "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
        code, headers, raw = await c.request("GET", "/metrics", headers={"Accept": accept})
        assert code == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        text = raw.decode()
        assert text.endswith("# EOF\n")
        families = {f.name: f for f in om_parse(text)}
        assert families["model_bytes_downloaded"].type == "counter"
        assert families["model_bytes_downloaded"].samples[0].name == "model_bytes_downloaded_total"
        assert families["node"].type == "info"
        assert families["node"].samples[0].labels == {
            "node_id": "node-a-7f3d",
            "role": "worker",
            "version": "0.1.0",
        }

    with_server(FakeSource(loading()), body)


def test_metrics_malformed_accept_falls_back_to_text() -> None:
    async def body(c: Client) -> None:
        for accept in ("application/openmetrics-text; version=abc", "text/plain; version=zz"):
            code, headers, raw = await c.request("GET", "/metrics", headers={"Accept": accept})
            assert code == 200, accept
            assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert one(parse_metrics(raw.decode()), "cluster_size") == 3

    with_server(FakeSource(loading()), body)


# --- /metrics rendering (collector only, no socket) ---------------------------------------------


@pytest.mark.parametrize("state", list(ALL_STATES))
def test_node_state_is_one_hot(state: str) -> None:
    samples = scrape(ALL_STATES[state]())
    assert samples["node_state"] == {
        (("state", s),): 1.0 if s == state else 0.0
        for s in ("COLD", "JOINING", "LOADING", "READY", "OPERATIONAL", "FAILED")
    }
    phases = samples["node_phase"]
    assert len(phases) == 8
    assert [k for k, v in phases.items() if v == 1.0] == [(("phase", ALL_STATES[state]().phase),)]


def test_init_duration_total_only_once_ready() -> None:
    assert ("phase", "total") not in {k[0] for k in scrape(loading())["init_duration_seconds"]}
    ready = scrape(ready_not_serving())["init_duration_seconds"]
    assert ready[(("phase", "total"),)] == 151.0
    assert ready[(("phase", "loading_weights"),)] == 120.0
    assert len(ready) == len(DONE_PHASES) + 1
    # A total the supervisor measured itself (wall clock, fallbacks included) wins over the sum.
    measured = msgspec.structs.replace(operational(), phase_durations={**DONE_PHASES, "total": 170.5})
    assert scrape(measured)["init_duration_seconds"][(("phase", "total"),)] == 170.5
    assert len(scrape(measured)["init_duration_seconds"]) == len(DONE_PHASES) + 1


def test_operator_metrics_loading() -> None:
    s = scrape(loading())
    assert one(s, "node_info", node_id="node-a-7f3d", role="worker", version="0.1.0") == 1.0
    assert one(s, "raft_term") == 4
    assert one(s, "plan_epoch") == 2
    assert one(s, "quorum_size") == 3
    assert one(s, "load_bytes_done") == 25 * 2**30
    assert one(s, "load_bytes_total") == 100 * 2**30
    assert one(s, "load_progress_ratio") == 0.25
    assert one(s, "init_progress_ratio") == pytest.approx(0.452)
    assert one(s, "load_rate_bytes_per_second") == 1.25e9
    assert one(s, "load_eta_seconds") == 68
    assert one(s, "node_may_serve") == 0.0
    assert one(s, "node_healthy") == 1.0
    assert one(s, "node_uptime_seconds") == 40.0
    assert s["child_up"] == {(("child", c),): 1.0 for c in ("cluster", "loader", "validator")}
    assert one(s, "child_restarts_total", child="loader") == 2
    assert one(s, "child_restarts_total", child="cluster") == 0
    assert one(s, "child_heartbeat_age_seconds", child="validator") == 0.25


def test_operator_metrics_cold_and_failed() -> None:
    s = scrape(cold())
    assert "load_eta_seconds" not in s  # unknown ETA is absent, not 0
    assert one(s, "load_progress_ratio") == 0.0  # no plan yet: no division by zero
    assert "init_duration_seconds" not in s  # no phase completed yet
    f = scrape(failed())
    assert one(f, "node_healthy") == 0.0
    assert one(f, "child_up", child="loader") == 0.0
    assert ("child", "loader") not in {k[0] for k in f.get("child_heartbeat_age_seconds", {})}
    o = scrape(operational())
    assert one(o, "node_may_serve") == 1.0
    assert one(o, "load_progress_ratio") == 1.0


def test_every_family_has_help() -> None:
    text = generate_latest(make_registry(loading)).decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 20
    for family in families:
        assert family.documentation, family.name


def test_registry_is_private() -> None:
    from prometheus_client import REGISTRY

    make_registry(loading)
    assert "node_state" not in generate_latest(REGISTRY).decode()


# --- HEAD, 404, 405, limits ---------------------------------------------------------------------


def test_head_everywhere_get_is() -> None:
    async def body(c: Client) -> None:
        for path in ENDPOINTS:
            get_code, get_headers, get_body = await c.request("GET", path)
            code, headers, raw = await c.request("HEAD", path)
            assert code == get_code, path
            assert raw == b"", path
            assert headers["Content-Type"] == get_headers["Content-Type"], path
        # HEAD keeps the GET's code on a node that is not ready.
        code, _, _ = await c.request("HEAD", "/ready")
        assert code == 503

    with_server(FakeSource(ready_not_serving()), body)


def test_unknown_path_is_json_404() -> None:
    async def body(c: Client) -> None:
        for path in ("/", "/nope", "/status/extra"):
            code, doc = await c.get_json(path)
            assert code == 404
            assert doc["error"] == "Not Found"
            assert doc["path"] == path

    with_server(FakeSource(cold()), body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405_with_allow(method: str) -> None:
    async def body(c: Client) -> None:
        for path in ENDPOINTS:
            code, headers, raw = await c.request(method, path)
            assert code == 405
            assert set(headers["Allow"].split(",")) == {"GET", "HEAD"}
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(raw)["error"] == "Method Not Allowed"

    with_server(FakeSource(cold()), body)


def test_request_body_capped() -> None:
    async def body(c: Client) -> None:
        code, _, raw = await c.request("GET", "/status", data=b"x" * (MAX_BODY_BYTES + 1))
        assert code == 413
        assert "error" in json.loads(raw)
        # A small stray body is ignored; the endpoint still answers.
        code, _, _ = await c.request("GET", "/status", data=b"x" * 10)
        assert code == 200

        async def chunks() -> AsyncIterator[bytes]:
            yield b"x"

        code, _, _ = await c.request("GET", "/status", data=chunks())
        assert code == 411
        code, _, _ = await c.request("GET", "/status")
        assert code == 200

    with_server(FakeSource(cold()), body)


def test_absurd_header_rejected_server_survives() -> None:
    async def body(c: Client) -> None:
        code, _, _ = await c.request("GET", "/status", headers={"X-Big": "a" * 20000})
        assert 400 <= code < 500
        code, _, _ = await c.request("GET", "/status")
        assert code == 200

    with_server(FakeSource(cold()), body)


# --- Failures -----------------------------------------------------------------------------------


def test_raising_source_is_500_logged_and_server_keeps_answering(caplog: pytest.LogCaptureFixture) -> None:
    source = FakeSource(operational())
    source.error = RuntimeError("board torn")

    async def body(c: Client) -> None:
        for path in ENDPOINTS:
            code, headers, raw = await c.request("GET", path)
            assert code == 500, path
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(raw) == {"error": "internal error"}
        source.error = None
        for path in ENDPOINTS:
            code, _, _ = await c.request("GET", path)
            assert code == 200, path

    with caplog.at_level(logging.ERROR, logger="butterfly.api.http"):
        with_server(source, body)
    failures = [r for r in caplog.records if r.name == "butterfly.api.http" and r.exc_info]
    assert len(failures) == len(ENDPOINTS)
    assert "board torn" in caplog.text


def test_bind_failure_names_address() -> None:
    async def main() -> None:
        async with serving(FakeSource(cold())) as c:
            with pytest.raises(ApiBindError, match=rf"127\.0\.0\.1:{c.port}"):
                await start_api(make_app(FakeSource(cold())), "127.0.0.1", c.port)
            # The failed attempt leaves the first server untouched.
            code, _, _ = await c.request("GET", "/health")
            assert code == 200

    run(main())


def test_close_stops_listening() -> None:
    async def main() -> int:
        server = await start_api(make_app(FakeSource(cold())), "127.0.0.1", 0)
        port = server.port
        assert port > 0
        await server.close()
        return port

    port = run(main())
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_serves_on_uvloop() -> None:
    """The supervisor runs uvloop; the whole API must work on it, not only on the default loop."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[int]:
        async with serving(FakeSource(operational())) as c:
            return [(await c.request("GET", path))[0] for path in ENDPOINTS]

    assert uvloop.run(main()) == [200, 200, 200, 200]
