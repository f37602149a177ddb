"""An HTTP/1.1 reverse proxy on loopback that injects faults into an S3 server's responses, as a test scripts.

Owns: relaying requests from one client (keep-alive connections, as boto3 makes them) to the upstream
server, one upstream connection per request; applying the scripted faults to matching requests in
order (error statuses with an S3 XML body, delays before or part-way through a response, bodies cut
short or trickled at a set rate, flipped bytes, connection resets, a Range header dropped or stretched
so the server answers with the wrong range); and a log of every request (method, path, Range,
headers, status sent, fault, client connection) written as each request arrives, so a test that has
its answer sees the entry.

Must not: listen anywhere but 127.0.0.1, buffer more than one response at a time per connection, or
change a response that no fault matched (beyond its Connection header, so the client may keep the
connection open while the upstream one is closed per request).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["Fault", "FaultProxy", "Logged"]

FaultKind = Literal["status", "delay", "truncate", "flip", "reset", "whole", "extend", "overlong", "throttle"]
_MAX_HEAD = 64 << 10
_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    412: "Precondition Failed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Fault:
    """One scripted fault for the next ``times`` requests matching ``method`` and ``path`` (a substring).

    ``range_start``, when set, narrows the match to GETs whose Range begins at that byte.
    Kinds: ``status`` answers ``status``/``code`` itself without asking upstream; ``delay`` waits
    ``delay_s`` before the response (``after`` None) or after ``after`` body bytes; ``truncate`` sends
    the real headers but only ``after`` body bytes, then closes; ``flip`` inverts body byte ``after``
    (default: the middle one); ``reset`` sends a TCP RST before the response or after ``after`` body
    bytes; ``whole`` drops the Range header (the server answers 200 with the whole object);
    ``extend`` asks upstream for one byte more than the client did (206 with a longer range);
    ``overlong`` sends ``after`` (default 100) junk bytes after the body, past its Content-Length;
    ``throttle`` sends the body at ``rate_bps`` bytes per second (a slow link or a slow store).
    ``times=None``: every matching request, until the script is cleared.
    """

    kind: FaultKind
    times: int | None = 1
    status: int = 503
    code: str = "ServiceUnavailable"
    delay_s: float = 0.0
    after: int | None = None
    method: str = "GET"
    path: str = ""
    range_start: int | None = None
    rate_bps: float = 64 << 10

    def matches(self, method: str, path: str, range_header: str | None) -> bool:
        if method != self.method or self.path not in path:
            return False
        if self.range_start is None:
            return True
        return range_header is not None and range_header.startswith(f"bytes={self.range_start}-")


@dataclass
class Logged:
    """One request as the proxy saw it (logged as it arrives), and what it did with it."""

    method: str
    path: str
    range: str | None
    headers: dict[str, str]
    connection: int
    fault: FaultKind | None
    status: int | None = None  # sent to the client; None until then, or when reset before a response


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass
class _Response:
    status_line: bytes
    headers: list[tuple[str, str]]
    body: bytes = field(repr=False)

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])


class FaultProxy:
    """Start with ``start()``; point clients at ``endpoint``; script with ``inject``; read ``log()``."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        resign: Callable[[str, str, list[tuple[str, str]]], list[tuple[str, str]]] | None = None,
    ) -> None:
        """``resign(method, target, headers)``: new headers for a request the proxy rewrote (a Range
        dropped or stretched), so an upstream that checks signatures sees a correctly signed request,
        as it would from a server that itself answers the wrong range."""
        self.upstream = (upstream_host, upstream_port)
        self.resign = resign
        self.port = 0
        self._lock = threading.Lock()
        self._script: list[Fault] = []
        self._log: list[Logged] = []
        self._conn_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- scripting (test thread) ----------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Append faults to the script; each request takes the first matching fault with uses left."""
        with self._lock:
            self._script.extend(replace(f) for f in faults)

    def clear(self) -> None:
        """Forget the script and the log."""
        with self._lock:
            self._script.clear()
            self._log.clear()

    def log(self, method: str | None = None, path: str = "") -> list[Logged]:
        with self._lock:
            return [e for e in self._log if (method is None or e.method == method) and path in e.path]

    def _take(self, method: str, path: str, range_header: str | None) -> Fault | None:
        with self._lock:
            for f in self._script:
                if (f.times is None or f.times > 0) and f.matches(method, path, range_header):
                    if f.times is not None:
                        f.times -= 1
                    return replace(f)
        return None

    def _record(self, req: _Request, conn: int, fault: Fault | None) -> Logged:
        entry = Logged(
            method=req.method,
            path=req.target,
            range=req.header("range"),
            headers={k.lower(): v for k, v in req.headers},
            connection=conn,
            fault=fault.kind if fault else None,
        )
        with self._lock:
            self._log.append(entry)
        return entry

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def boot() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_MAX_HEAD)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        loop.run_until_complete(boot())
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(10)

    # -- relaying (proxy thread) ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._conn_ids)
        try:
            while True:
                req = await _read_request(reader, writer)
                if req is None or not await self._handle(req, conn, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def _handle(self, req: _Request, conn: int, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the client connection must close."""
        path = req.target.split("?", 1)[0]
        fault = self._take(req.method, path, req.header("range"))
        kind = fault.kind if fault else None
        # Logged on arrival, before any delay: a test that got its answer (or gave up waiting) sees it,
        # and a stalled request cannot land in the log of the test after it.
        entry = self._record(req, conn, fault)
        if fault is not None and kind == "reset" and fault.after is None:
            _reset(writer)
            return False
        if fault is not None and kind == "status":
            entry.status = fault.status
            writer.write(_error_response(fault.status, fault.code, req))
            await writer.drain()
            return True
        if fault is not None and kind == "delay" and fault.after is None:
            await asyncio.sleep(fault.delay_s)
        upstream_req = _rewrite_request(req, kind)
        if upstream_req is not req and self.resign is not None:
            upstream_req = replace(
                upstream_req, headers=self.resign(req.method, req.target, upstream_req.headers)
            )
        resp = await self._forward(upstream_req)
        body = resp.body
        if fault is not None and kind == "flip" and body:
            at = fault.after if fault.after is not None else len(body) // 2
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        entry.status = resp.status
        writer.write(_head(resp))
        if kind == "overlong":
            assert fault is not None
            body += b"J" * (fault.after if fault.after is not None else 100)
        if kind == "throttle":
            assert fault is not None
            await _trickle(writer, body, fault.rate_bps)
            return True
        if fault is None or kind in ("flip", "whole", "extend", "overlong") or fault.after is None:
            writer.write(body)
            await writer.drain()
            return True
        cut = min(fault.after, len(body))
        writer.write(body[:cut])
        await writer.drain()
        if kind == "truncate":
            writer.close()
            return False
        if kind == "reset":
            _reset(writer)
            return False
        await asyncio.sleep(fault.delay_s)  # delay part-way through the body
        writer.write(body[cut:])
        await writer.drain()
        return True

    async def _forward(self, req: _Request) -> _Response:
        reader, writer = await asyncio.open_connection(*self.upstream, limit=_MAX_HEAD)
        try:
            lines = [f"{req.method} {req.target} {req.version}"]
            lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in ("connection", "expect")]
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            # The upstream connection is ours alone and closes after the response: read to EOF.
            body = b"" if req.method == "HEAD" else await reader.read()
        finally:
            writer.close()
        status_line, headers = _parse_head(head)
        return _Response(status_line, headers, body)


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed its keep-alive connection
    first, headers = _parse_head(head)
    method, target, version = first.decode("latin-1").split(" ", 2)
    req = _Request(method, target, version, headers, b"")
    if (req.header("expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    length = int(req.header("content-length") or 0)
    if length:
        req.body = await reader.readexactly(length)
    return req


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _rewrite_request(req: _Request, kind: FaultKind | None) -> _Request:
    rng = req.header("range")
    if rng is None or kind not in ("whole", "extend"):
        return req
    headers = [(k, v) for k, v in req.headers if k.lower() != "range"]
    if kind == "extend":
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
        assert m is not None, rng
        headers.append(("Range", f"bytes={m.group(1)}-{int(m.group(2)) + 1}"))
    return replace(req, headers=headers)


def _head(resp: _Response) -> bytes:
    lines = [resp.status_line.decode("latin-1")]
    lines += [f"{k}: {v}" for k, v in resp.headers if k.lower() not in ("connection", "keep-alive")]
    lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_response(status: int, code: str, req: _Request) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the fault proxy</Message>"
        f"<Resource>{req.target}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    if req.method == "HEAD":
        body = b""
    head = (
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


async def _trickle(writer: asyncio.StreamWriter, body: bytes, rate_bps: float) -> None:
    """Write ``body`` in small pieces, each after the time the rate allots it."""
    piece = max(1, int(rate_bps / 20))
    for at in range(0, len(body), piece):
        await asyncio.sleep(min(piece, len(body) - at) / rate_bps)
        writer.write(body[at : at + piece])
        await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN: the client sees ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
