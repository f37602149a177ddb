"""The HTTP API under attack: slowloris heads, idle connections from many sockets and addresses,
malformed requests in a loop, a handler bug hit in a loop. The API must keep answering real clients
and keep its log to a few lines.

Each test runs its own server on 127.0.0.1 port 0 (no pytest plugin), clients bound to 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from butterfly.api import make_app, start_api
from butterfly.api.guard import ConnectionLimits
from butterfly.api.http import ApiServer
from butterfly.status import NodeStatus
from tests.asynchelpers import run, wait_until
from tests.test_api import make_status

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _ready() -> NodeStatus:
    return make_status(state="OPERATIONAL", phase="serving", may_serve=True)


async def _serve(
    limits: ConnectionLimits, *, source: Callable[[], NodeStatus] = _ready
) -> tuple[ApiServer, asyncio.Event]:
    """An API with one extra route, /slow, that holds its request until the returned event is set."""
    release = asyncio.Event()
    app = make_app(source)

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app.router.add_get("/slow", slow)
    return await start_api(app, "127.0.0.1", 0, limits=limits), release


async def _open(port: int, source: str) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed(reader: asyncio.StreamReader, wait: float = 3.0) -> bool:
    """True if the server closed the connection (EOF or reset) within ``wait`` s, False if it is open."""
    try:
        while True:
            if not await asyncio.wait_for(reader.read(4096), wait):
                return True
    except asyncio.TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True


async def _get(port: int, path: str, source: str = "127.0.0.9") -> int:
    reader, writer = await _open(port, source)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5.0)
        return int(line.split()[1])
    finally:
        writer.close()


def _with_api(
    limits: ConnectionLimits, body: Callable[[ApiServer, asyncio.Event], Awaitable[None]], **kw: Any
) -> None:
    async def main() -> None:
        server, release = await _serve(limits, **kw)
        try:
            await body(server, release)
        finally:
            release.set()
            await server.close()

    run(main(), timeout=30.0)


def test_a_slowloris_head_is_cut_at_the_deadline_while_others_are_served() -> None:
    async def body(server: ApiServer, release: asyncio.Event) -> None:
        reader, writer = await _open(server.port, "127.0.0.2")
        head = b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400

        async def trickle() -> None:
            for byte in head:  # never ends the head; 400+ bytes at 20 ms is longer than the deadline
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)

        dribbler = asyncio.ensure_future(trickle())
        try:
            assert await _get(server.port, "/ready") == 200  # served meanwhile
            assert await _closed(reader, 5.0)
            assert server.guard.timed_out == 1
        finally:
            dribbler.cancel()
            writer.close()

    _with_api(ConnectionLimits(head_timeout_s=0.5, log_interval_s=0), body)


def test_an_idle_keepalive_connection_is_closed_but_a_long_request_is_not() -> None:
    async def body(server: ApiServer, release: asyncio.Event) -> None:
        idle_reader, idle_writer = await _open(server.port, "127.0.0.2")
        idle_writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, then silence
        assert (await idle_reader.readline()).split()[1] == b"200"
        slow_reader, slow_writer = await _open(server.port, "127.0.0.3")
        slow_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert await _closed(idle_reader, 5.0)
        assert not await _closed(slow_reader, 0.8)  # in hand for longer than the deadline: kept
        release.set()
        answer = await asyncio.wait_for(slow_reader.read(), 5.0)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done")
        idle_writer.close()
        slow_writer.close()

    _with_api(ConnectionLimits(head_timeout_s=0.3, log_interval_s=0), body)


def test_idle_connections_from_many_addresses_never_lock_a_client_out() -> None:
    limits = ConnectionLimits(head_timeout_s=30.0, max_per_host=4, max_connections=16, log_interval_s=0)

    async def body(server: ApiServer, release: asyncio.Event) -> None:
        held = [await _open(server.port, f"127.0.0.{10 + i // 4}") for i in range(16)]  # 4 hosts x 4
        await wait_until(lambda: len(server.guard.conns) == 16, what="every slot held")
        # A fifth connection from a full address evicts that address's oldest idle one.
        extra = await _open(server.port, "127.0.0.10")
        assert await _closed(held[0][0])
        assert server.guard.evicted == 1
        # A newcomer finds every slot taken by idle connections: the busiest address's oldest goes.
        for _ in range(3):
            assert await _get(server.port, "/ready") == 200
        # (each request here closes its connection after the answer, freeing its slot for the next)
        assert 2 <= server.guard.evicted <= 4 and server.guard.refused == 0
        assert len(server.guard.conns) <= limits.max_connections
        for _, writer in [*held, extra]:
            writer.close()

    _with_api(limits, body)


def test_a_newcomer_is_refused_only_when_every_connection_is_busy() -> None:
    limits = ConnectionLimits(head_timeout_s=30.0, max_per_host=2, max_connections=2, log_interval_s=0)

    async def body(server: ApiServer, release: asyncio.Event) -> None:
        busy = [await _open(server.port, f"127.0.0.{i}") for i in (2, 3)]
        for _, writer in busy:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await wait_until(lambda: sum(c.busy for c in server.guard.conns) == 2, what="two requests in hand")
        reader, writer = await _open(server.port, "127.0.0.4")
        assert await _closed(reader)
        writer.close()
        assert server.guard.refused == 1 and server.guard.evicted == 0
        release.set()
        for reader, writer in busy:
            assert (await asyncio.wait_for(reader.read(), 5.0)).endswith(b"done")
            writer.close()
        await wait_until(lambda: not server.guard.conns, what="the slots to free")
        assert await _get(server.port, "/ready") == 200

    _with_api(limits, body)


def test_malformed_requests_in_a_loop_log_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body(server: ApiServer, release: asyncio.Event) -> None:
        for i in range(20):
            reader, writer = await _open(server.port, "127.0.0.2")
            writer.write(
                b"GET /ready HTTP/1.1\r\nHost: x\r\nBad Header\x01: " + str(i).encode() + b"\r\n\r\n"
            )
            assert (await asyncio.wait_for(reader.readline(), 5.0)).split()[1] == b"400"
            writer.close()
        assert await _get(server.port, "/ready") == 200

    _with_api(ConnectionLimits(), body)
    protocol = [r for r in caplog.records if r.name == "butterfly.api.protocol"]
    assert len(protocol) == 1, [r.getMessage() for r in protocol]
    assert protocol[0].exc_info is None and "Error handling request" in protocol[0].getMessage()


def test_a_handler_bug_hit_in_a_loop_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    def broken() -> NodeStatus:
        raise RuntimeError("the board is torn")

    async def body(server: ApiServer, release: asyncio.Event) -> None:
        for _ in range(20):
            assert await _get(server.port, "/status") == 500

    _with_api(ConnectionLimits(), body, source=broken)
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and "GET /status" in failures[0].getMessage()
