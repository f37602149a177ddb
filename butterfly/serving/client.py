"""``RemoteBackend``: the ``Backend`` of a node, forwarding each request to the pipeline's entry.

Any node accepts a request: its backend dials the entry stage (stage 0, which may be this node's own
engine) over an encrypted stage link (role "client") and multiplexes its requests over that one
connection. Closing a request's iterator sends ``Cancel``, which frees the sequence's cache on every
stage. A link that breaks or falls silent ends every request on it with a 503 naming the entry; the
next request dials again.

Must not: tokenize or know HTTP (the API does), or decide whether this node may serve (``target``
does: it answers the entry's address, or raises ServingError with the reason it has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from butterfly.serving.backend import Finished, GenerationRequest, ServingError, TokenEvent
from butterfly.serving.link import (
    PING_S,
    ROLE_CLIENT,
    SILENT_S,
    Cancel,
    Done,
    Error,
    Link,
    LinkError,
    Ping,
    Submit,
    Token,
    dial_link,
)

__all__ = ["EntryTarget", "RemoteBackend"]

log = logging.getLogger("butterfly.serving")

Event = TokenEvent | Finished | ServingError


@dataclass(frozen=True)
class EntryTarget:
    """Where the entry of the pipeline of ``epoch`` listens."""

    host: str
    port: int
    epoch: int
    name: str = ""

    def describe(self) -> str:
        return self.name or f"the pipeline's entry at {self.host}:{self.port}"


class _Conn:
    def __init__(self, link: Link, target: EntryTarget) -> None:
        self.link = link
        self.target = target
        self.queues: dict[int, asyncio.Queue[Event]] = {}
        self.broken = ""
        self.tasks: list[asyncio.Task[None]] = []


class RemoteBackend:
    """A ``Backend`` that forwards to the entry ``target()`` names (re-read for every request);
    ``secret`` is the cluster secret or a function reading it (when first needed)."""

    def __init__(
        self,
        secret: bytes | Callable[[], bytes],
        target: Callable[[], EntryTarget],
        *,
        silent_s: float = SILENT_S,
        ping_s: float = PING_S,
    ) -> None:
        self.secret = secret
        self.target = target
        self.silent_s = silent_s
        self.ping_s = ping_s
        self._conn: _Conn | None = None
        self._dialing: asyncio.Lock | None = None
        self._ids = itertools.count(1)

    async def _connect(self) -> _Conn:
        target = self.target()
        if self._dialing is None:
            self._dialing = asyncio.Lock()
        async with self._dialing:
            conn = self._conn
            if conn is not None and not conn.broken and conn.target == target:
                return conn
            if conn is not None:
                self._break(conn, "the pipeline changed")
            try:
                secret = self.secret() if callable(self.secret) else self.secret
                link = await dial_link(
                    target.host,
                    target.port,
                    secret,
                    role=ROLE_CLIENT,
                    epoch=target.epoch,
                    index=-1,
                    peer=target.describe(),
                    timeout_s=max(self.silent_s, 1.0),
                )
            except LinkError as exc:
                raise ServingError(
                    503, "service_unavailable", f"cannot reach {target.describe()}: {exc}"
                ) from None
            conn = _Conn(link, target)
            loop = asyncio.get_running_loop()
            conn.tasks = [loop.create_task(self._reader(conn)), loop.create_task(self._keepalive(conn))]
            self._conn = conn
            return conn

    def _break(self, conn: _Conn, reason: str) -> None:
        if conn.broken:
            return
        conn.broken = reason
        conn.link.abort()
        err = ServingError(503, "service_unavailable", f"lost {conn.target.describe()}: {reason}")
        for q in conn.queues.values():
            q.put_nowait(err)
        conn.queues.clear()
        if self._conn is conn:
            self._conn = None
        for t in conn.tasks:
            if t is not asyncio.current_task():
                t.cancel()

    async def _reader(self, conn: _Conn) -> None:
        try:
            while True:
                try:
                    msg, _ = await asyncio.wait_for(conn.link.recv(), self.silent_s)
                except asyncio.TimeoutError:
                    raise LinkError(f"silent for {self.silent_s:.1f}s") from None
                if isinstance(msg, Ping):
                    continue
                if isinstance(msg, Token):
                    q = conn.queues.get(msg.req_id)
                    if q is not None:
                        q.put_nowait(TokenEvent(msg.token_id))
                elif isinstance(msg, Done):
                    q = conn.queues.pop(msg.req_id, None)
                    if q is not None:
                        q.put_nowait(
                            Finished(
                                "stop" if msg.reason == "stop" else "length",
                                msg.prompt_tokens,
                                msg.completion_tokens,
                            )
                        )
                elif isinstance(msg, Error):
                    q = conn.queues.pop(msg.req_id, None)
                    if q is not None:
                        q.put_nowait(ServingError(msg.status, msg.code, msg.message))
                else:
                    raise LinkError(f"unexpected {type(msg).__name__} from the entry")
        except LinkError as exc:
            self._break(conn, str(exc))

    async def _keepalive(self, conn: _Conn) -> None:
        while not conn.broken:
            await asyncio.sleep(self.ping_s)
            try:
                conn.link.send_nowait(Ping())
            except LinkError as exc:
                self._break(conn, str(exc))
                return

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        conn = await self._connect()
        rid = next(self._ids)
        q: asyncio.Queue[Event] = asyncio.Queue()
        conn.queues[rid] = q
        p = request.params
        finished = False
        try:
            try:
                await conn.link.send(
                    Submit(
                        rid,
                        list(request.prompt_ids),
                        request.max_tokens,
                        float(p.temperature),
                        float(p.top_p),
                        p.seed,
                        sorted(request.stop_token_ids),
                    )
                )
            except LinkError as exc:
                self._break(conn, str(exc))
            while True:
                ev = await q.get()
                if isinstance(ev, ServingError):
                    finished = True
                    raise ev
                if isinstance(ev, Finished):
                    finished = True
                    yield ev
                    return
                yield ev
        finally:
            conn.queues.pop(rid, None)
            if not finished and not conn.broken:
                with contextlib.suppress(LinkError):
                    conn.link.send_nowait(Cancel(rid))

    async def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._break(conn, "the backend is closing")
            for t in conn.tasks:
                with contextlib.suppress(BaseException):
                    await t
