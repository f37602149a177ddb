"""One stage of the serving pipeline: a ``StageModel`` with its KV cache, its links, and at the entry
the scheduler.

The stages of plan epoch E form a ring over stage links (``butterfly.serving.link``): stage i dials
stage i+1, the last stage dials the entry (stage 0, which holds block 0). Clients (the ``Backend`` of
any node) dial the entry too. Down the ring flow ``Probe`` (the entry checks the ring covers every
block and learns each stage's KV budget), ``Step`` (chunks of several sequences with their activations;
sequences join with an ``Admit`` carrying their sampling parameters) and ``Free``; the last stage samples
and sends ``Tokens`` back to the entry. One step is in flight at a time.

Entry scheduling (continuous batching): every step takes each running sequence's next chunk: one token
for a sequence that is decoding, up to the step's token budget of a prompt being prefilled, so new
sequences join at the next token boundary and finished or cancelled ones leave (their cache is freed on
every stage). A request joins when the KV cache of every stage has room for its prompt plus
max_tokens; otherwise it waits in a bounded queue (full: 429). A request that could never fit is 400.

Failure: every link carries pings; a link silent for ``silent_s`` (a SIGSTOPped or hung stage) or
closed (a dead one) or a frame that fails authentication makes the stage that sees it free every
sequence and send ``Abort(reason)`` the other way; the entry ends every request in flight with a 503
that names the stage, and forms the ring again once every stage is back. A stage whose gate says no
(``gate``: the node's ``may_serve``) aborts instead of computing. So no request ever waits longer than
about ``silent_s`` on a dead or frozen stage.

An unexpected exception (a bug, a torch error) never ends a loop silently: it is logged once with its
traceback and counted (``ServingStats.step_failures``). At the entry, one in a step ends the requests
that step carried with a 500 naming it and frees their cache on every stage (``Free``); one elsewhere in
the scheduler ends every request in flight and aborts the ring. A non-entry stage that fails a step
aborts the ring with the reason (the entry ends what is in flight with a 503 naming it and forms the
ring again). The scheduler serves on either way.

Must not: tokenize, know HTTP, or read weights (the caller builds the ``StageModel``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from butterfly.engine.kvcache import KVCache, KVCacheFull
from butterfly.engine.model import SeqChunk, StageModel
from butterfly.engine.sampler import SamplingParams, SeqSampler, sample_batch
from butterfly.serving.backend import Finished, GenerationRequest, ServingError, TokenEvent
from butterfly.serving.link import (
    PING_S,
    ROLE_CLIENT,
    ROLE_STAGE,
    SILENT_S,
    Abort,
    Admit,
    Cancel,
    Done,
    Error,
    Free,
    Hello,
    Link,
    LinkError,
    LinkRefused,
    Message,
    Ping,
    Probe,
    StageInfo,
    Step,
    Submit,
    Token,
    Tokens,
    accept_link,
    dial_link,
)
from butterfly.serving.metrics import ServingStats
from butterfly.serving.tensors import tensor_bytes, tensor_from

__all__ = ["StageAddress", "StageServer"]

log = logging.getLogger("butterfly.serving")

MAX_WAITING = 64
MAX_STEP_TOKENS = 256


@dataclass(frozen=True)
class StageAddress:
    """Where stage ``index`` (blocks [start, stop)) listens for stage links and clients."""

    index: int
    start: int
    stop: int
    host: str
    port: int
    node: str = ""

    def describe(self) -> str:
        who = f"node {self.node} " if self.node else ""
        return f"stage {self.index} ({who}blocks {self.start}-{self.stop - 1} at {self.host}:{self.port})"


class _Broken(Exception):
    """The pipeline broke under a step; the reason is already delivered to the requests."""


@dataclass(eq=False)
class _Seq:
    seq_id: int
    request: GenerationRequest
    capacity: int
    events: asyncio.Queue[TokenEvent | Finished | ServingError] = field(default_factory=asyncio.Queue)
    ids: list[int] = field(default_factory=list)
    pos: int = 0
    generated: int = 0
    announced: bool = False
    cancelled: bool = False
    done: bool = False


@dataclass
class _StepPlan:
    """What one entry step runs: each member sequence's chunk, whether to sample it, its token ids,
    and the admissions of members the other stages do not hold yet."""

    step_id: int
    members: list[_Seq] = field(default_factory=list)
    chunks: list[SeqChunk] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    admits: list[Admit] = field(default_factory=list)


def _forget(tasks: dict[int, asyncio.Task[None]], req_id: int, _task: object) -> None:
    tasks.pop(req_id, None)


def _unavailable(message: str) -> ServingError:
    return ServingError(503, "service_unavailable", message)


class StageServer:
    """Serves blocks [model.start, model.stop) as stage ``index`` of the pipeline of plan ``epoch``."""

    def __init__(
        self,
        model: StageModel,
        *,
        index: int,
        epoch: int,
        secret: bytes,
        kv_cache_bytes: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        node: str = "",
        gate: Callable[[], str] | None = None,
        stats: ServingStats | None = None,
        silent_s: float = SILENT_S,
        ping_s: float = PING_S,
        max_waiting: int = MAX_WAITING,
        max_step_tokens: int = MAX_STEP_TOKENS,
        compute: ThreadPoolExecutor | None = None,
    ) -> None:
        """``compute``: the one thread the stage's forward passes run on (default: a thread of its own,
        shut down with the stage). Stages sharing a process should share it: every thread that runs
        torch's parallel operators gets an OpenMP team of its own, and with more threads than cores
        the teams' workers sleep between operators instead of spinning, ~40% slower per decode step
        here (bench_serving runs all its stages, and transformers, on one such thread)."""
        self.model = model
        self.index = index
        self.epoch = epoch
        self.secret = secret
        self.kv_cache_bytes = kv_cache_bytes
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.node = node
        self.gate = gate
        self.stats = stats or ServingStats()
        self.silent_s = silent_s
        self.ping_s = ping_s
        self.max_waiting = max_waiting
        self.max_step_tokens = max_step_tokens
        self.cache: KVCache = model.new_cache(kv_cache_bytes)
        self.samplers: dict[int, SeqSampler] = {}
        self.stages: list[StageAddress] = []
        self.prev: Link | None = None
        self.next: Link | None = None
        self.ring = 0
        self._own_pool = compute is None
        self._pool = compute or ThreadPoolExecutor(1, thread_name_prefix=f"stage{index}")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._links: set[Link] = set()
        self._closed = False
        # Entry only.
        self.ready = False
        self.not_ready = "the pipeline is forming"
        self.infos: list[StageInfo] = []
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []
        self._reserved: dict[int, int] = {}
        self._seq_ids = itertools.count(1)
        self._step_ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Tokens]] = {}
        self._probe: tuple[int, asyncio.Future[Probe]] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def entry(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.model.last

    @property
    def info(self) -> StageInfo:
        return StageInfo(
            self.index,
            self.model.start,
            self.model.stop,
            self.kv_cache_bytes,
            self.cache.bytes_per_token,
            self.node,
        )

    async def listen(self) -> int:
        """Open the listener; the port it got (``listen_port`` 0 picks one)."""
        self._server = await asyncio.start_server(self._on_connection, self.listen_host, self.listen_port)
        port: int = self._server.sockets[0].getsockname()[1]
        self.listen_port = port
        return port

    def start(self, stages: Sequence[StageAddress]) -> None:
        """Begin serving as part of ``stages`` (this one included, in pipeline order)."""
        if [s.index for s in stages] != list(range(len(stages))) or not 0 <= self.index < len(stages):
            raise ValueError(f"stage {self.index} is not among stages {[s.index for s in stages]}")
        me = stages[self.index]
        if (me.start, me.stop) != (self.model.start, self.model.stop):
            raise ValueError(
                f"stage {self.index} holds blocks [{self.model.start}, {self.model.stop}), the plan says "
                f"[{me.start}, {me.stop})"
            )
        self.stages = list(stages)
        if len(stages) > 1:
            self._spawn(self._dial_loop())
        if self.entry:
            if len(stages) == 1:
                self.infos = [self.info]
                self.ready = True
            else:
                self._spawn(self._probe_loop())
            self._spawn(self._schedule_loop())

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._fail_all("the node is shutting down")
        for link in (self.prev, self.next, *self._links):
            if link is not None:
                link.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5.0)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        if self._own_pool:
            self._pool.shutdown(wait=True)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stage_name(self, index: int) -> str:
        if 0 <= index < len(self.stages):
            return self.stages[index].describe()
        return f"stage {index}"

    # ---- links ----------------------------------------------------------------------------------

    def _admit_hello(self, hello: Hello) -> tuple[str, str] | None:
        if hello.epoch != self.epoch:
            return (
                "epoch",
                f"this stage serves plan epoch {self.epoch}, the link is for epoch {hello.epoch}",
            )
        n = len(self.stages)
        if hello.role == ROLE_STAGE:
            if n < 2 or hello.index != (self.index - 1) % n:
                return (
                    "role",
                    f"stage {self.index} takes a stage link only from stage {(self.index - 1) % n}",
                )
            return None
        if hello.role == ROLE_CLIENT and not self.entry:
            return ("role", f"stage {self.index} is not the pipeline's entry; clients dial stage 0")
        return None

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Not cancelled by close() (asyncio logs a cancelled handler with its frames, which would keep
        # this stage's weight views alive): close() aborts the links, and the handler returns.
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        if self._closed:
            writer.close()
            return
        try:
            link = await accept_link(reader, writer, self.secret, self._admit_hello)
        except LinkError as exc:
            log.warning("stage %d refused a link: %s", self.index, exc)
            writer.close()
            return
        if self._closed:  # close() ran during the handshake and has aborted every link it knew
            link.abort()
            return
        if link.role == ROLE_STAGE:
            old = self.prev
            self.prev = link
            if old is not None:
                old.abort()
                self._local_abort(f"{self._stage_name(link.index)} connected again")
            self._spawn(self._keepalive(link))
            await self._upstream_loop(link)
        else:
            self._links.add(link)
            self._spawn(self._keepalive(link))
            try:
                await self._client_loop(link)
            finally:
                self._links.discard(link)

    async def _dial_loop(self) -> None:
        n = len(self.stages)
        target = self.stages[(self.index + 1) % n]
        backoff = 0.05
        while not self._closed:
            if self.next is not None:
                await asyncio.sleep(0.05)
                continue
            try:
                link = await dial_link(
                    target.host,
                    target.port,
                    self.secret,
                    role=ROLE_STAGE,
                    epoch=self.epoch,
                    index=self.index,
                    peer=target.describe(),
                    timeout_s=max(self.silent_s, 1.0),
                )
            except LinkRefused as exc:
                log.warning("stage %d: %s", self.index, exc)
                self.not_ready = f"{target.describe()} refused the link: {exc.reason}"
                await asyncio.sleep(1.0)
                continue
            except LinkError as exc:
                self.not_ready = f"{target.describe()} is not reachable: {exc}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            backoff = 0.05
            if self._closed:
                # close() cancelled us as the handshake finished and the cancellation was lost
                # (Python 3.11's wait_for): this link would outlive the stage.
                link.abort()
                return
            self.next = link
            self._spawn(self._keepalive(link))
            self._spawn(self._downstream_loop(link))

    async def _keepalive(self, link: Link) -> None:
        while not link.closed:
            await asyncio.sleep(self.ping_s)
            if time.monotonic() - link.last_sent >= self.ping_s and not link.closed:
                try:
                    link.send_nowait(Ping())
                except LinkError:
                    return

    async def _recv(self, link: Link, who: str) -> tuple[Message, memoryview]:
        try:
            return await asyncio.wait_for(link.recv(), self.silent_s)
        except asyncio.TimeoutError:
            raise LinkError(f"{who} silent for {self.silent_s:.1f}s") from None

    async def _downstream_loop(self, link: Link) -> None:
        """Reads what the next stage sends back up the link we dialed: pings and aborts."""
        who = self._stage_name((self.index + 1) % len(self.stages))
        try:
            while True:
                msg, _ = await self._recv(link, who)
                if isinstance(msg, Abort):
                    self._on_abort(msg, forward_up=True)
                elif not isinstance(msg, Ping):
                    raise LinkError(f"{who} sent an unexpected {type(msg).__name__} up the ring")
        except LinkError as exc:
            if self.next is link:
                self.next = None
                link.abort()
                self._failure(f"lost the link to {who}: {exc}")

    async def _upstream_loop(self, link: Link) -> None:
        n = len(self.stages)
        who = self._stage_name((self.index - 1) % n)
        try:
            while self.prev is link:
                msg, raw = await self._recv(link, who)
                if self.prev is not link:
                    return
                if isinstance(msg, Ping):
                    continue
                if isinstance(msg, Abort):
                    self._on_abort(msg, forward_up=False)
                elif isinstance(msg, Probe):
                    await self._on_probe(msg)
                elif isinstance(msg, Free):
                    self._free_local(msg.seq)
                    if not self.last and self.next is not None:
                        self.next.send_nowait(msg)
                elif isinstance(msg, Step) and not self.entry:
                    await self._on_step(msg, raw)
                elif isinstance(msg, Tokens) and self.entry:
                    self.stats.observe_hop(time.time() - msg.sent_unix)
                    fut = self._pending.pop(msg.step_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    raise LinkError(f"{who} sent an unexpected {type(msg).__name__}")
        except LinkError as exc:
            if self.prev is link:
                self.prev = None
                link.abort()
                self._failure(f"lost the link from {who}: {exc}")
        except Exception as exc:
            # A bug handling a message: drop the link (the stage before dials again) rather than
            # leave it unread, which would hang the step the entry waits on.
            reason = self._crash(f"{self._stage_name(self.index)} failed handling a message from {who}", exc)
            if self.prev is link:
                self.prev = None
                link.abort()
                self._failure(reason)

    # ---- failure --------------------------------------------------------------------------------

    def _local_abort(self, reason: str) -> None:
        """Drop every sequence this stage holds (and at the entry, end its requests)."""
        self.cache = self.model.new_cache(self.kv_cache_bytes)
        self.samplers.clear()
        if self.entry:
            self._fail_all(reason)

    def _crash(self, what: str, exc: Exception) -> str:
        """An unexpected exception: logged once with its traceback and counted; the reason to give
        the requests it ends (what failed, the exception's type and text)."""
        reason = f"{what}: {type(exc).__name__}: {exc}"
        log.error("stage %d: %s", self.index, reason, exc_info=exc)
        self.stats.observe_step_failures()
        return reason

    def _failure(self, reason: str) -> None:
        """This stage saw the pipeline break: drop everything and tell the others."""
        if self._closed:
            return
        log.warning("stage %d: pipeline broken: %s", self.index, reason)
        self._local_abort(reason)
        abort = Abort(reason[:1000], self.ring)
        for link in (self.prev, self.next):
            if link is not None:
                with contextlib.suppress(LinkError):
                    link.send_nowait(abort)

    def _on_abort(self, msg: Abort, *, forward_up: bool) -> None:
        if self.entry:
            if self.ready and msg.ring == self.ring:
                log.warning("stage 0: pipeline broken: %s", msg.reason)
                self._local_abort(msg.reason)
            return
        if msg.ring != self.ring:
            # Another ring's abort, come late over a link other than the one the new ring's probe
            # took: the sequences held now belong to the ring formed since. Neither acted on nor
            # passed on (the stages of that ring have it already, or are not in this one).
            log.info("stage %d: ignoring an abort of an earlier ring: %s", self.index, msg.reason)
            return
        self._local_abort(msg.reason)
        link = self.prev if forward_up else self.next
        if link is not None:
            with contextlib.suppress(LinkError):
                link.send_nowait(msg)

    def _fail_all(self, reason: str) -> None:
        """Entry: end every request in flight or waiting with 503, free its cache everywhere."""
        if not self.entry:
            return
        if self.ready:
            self.ready = False
            self.not_ready = reason
        err = _unavailable(f"the inference pipeline broke: {reason}")
        for seq in [*self.running, *self.waiting]:
            if not seq.done:
                seq.done = True
                seq.events.put_nowait(err)
        self.running.clear()
        self.waiting.clear()
        self._reserved.clear()
        self.cache = self.model.new_cache(self.kv_cache_bytes)
        self.samplers.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_Broken(reason))
        self._pending.clear()
        self._update_stats()

    # ---- non-entry stages -----------------------------------------------------------------------

    async def _on_probe(self, msg: Probe) -> None:
        if self.entry:
            if self._probe is not None and self._probe[0] == msg.nonce and not self._probe[1].done():
                self._probe[1].set_result(msg)
            return
        self.ring = msg.nonce
        self._local_abort("the pipeline formed again")
        if self.next is not None:
            self.next.send_nowait(Probe(msg.nonce, [*msg.stages, self.info]))

    async def _on_step(self, msg: Step, raw: memoryview) -> None:
        self.stats.observe_hop(time.time() - msg.sent_unix)
        if self.gate is not None and (why := self.gate()):
            self._failure(f"{self._stage_name(self.index)} may not serve: {why}")
            return
        try:
            x = tensor_from(msg.dtype, msg.shape, raw)
            for a in msg.admit:
                self.cache.reserve(a.seq_id, a.capacity)
                if self.last:
                    self.samplers[a.seq_id] = SeqSampler(SamplingParams(a.temperature, a.top_p, a.seed))
            chunks = [SeqChunk(s, p, k) for s, p, k in zip(msg.seq, msg.pos, msg.n, strict=True)]
        except (ValueError, KVCacheFull, LinkError) as exc:
            self._failure(f"{self._stage_name(self.index)} cannot run step {msg.step_id}: {exc}")
            return
        except Exception as exc:
            self._failure(self._crash(f"{self._stage_name(self.index)} cannot run step {msg.step_id}", exc))
            return
        cache = self.cache
        loop = asyncio.get_running_loop()
        data: memoryview | bytes = b""
        try:
            if self.last:
                rows = [i for i, s in enumerate(msg.sample) if s]
                samplers = [self.samplers[msg.seq[i]] for i in rows]
                tokens = await loop.run_in_executor(
                    self._pool, self._last_step, x, chunks, cache, rows, samplers
                )
                out: Message = Tokens(msg.step_id, [msg.seq[i] for i in rows], tokens, time.time())
            else:
                hidden = await loop.run_in_executor(self._pool, self.model.forward, x, chunks, cache)
                dtype, shape, data = tensor_bytes(hidden)
                out = Step(
                    msg.step_id, msg.seq, msg.pos, msg.n, msg.sample, msg.admit, time.time(), dtype, shape
                )
        except Exception as exc:
            # The entry waits for this step's tokens: never leave it waiting. The ring has no message
            # for one failed step, so abort it: the entry ends what is in flight with the reason,
            # every stage drops its sequences, and the ring forms again.
            reason = self._crash(f"{self._stage_name(self.index)} failed step {msg.step_id}", exc)
            if cache is self.cache:
                self._failure(reason)
            return
        if cache is not self.cache or self.next is None:
            return  # the pipeline broke meanwhile
        await self.next.send(out, data)

    def _last_step(
        self,
        x: torch.Tensor,
        chunks: list[SeqChunk],
        cache: KVCache,
        rows: list[int],
        samplers: list[SeqSampler],
    ) -> list[int]:
        logits = self.model.forward(x, chunks, cache)
        if not rows:
            return []
        return sample_batch(logits[rows], samplers)

    def _free_local(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            self.cache.free(s)
            self.samplers.pop(s, None)

    # ---- entry: forming the ring ----------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(0.05)
            if self.ready or self.next is None or self.prev is None:
                continue
            nonce = secrets.randbits(62)
            fut: asyncio.Future[Probe] = asyncio.get_running_loop().create_future()
            self._probe = (nonce, fut)
            try:
                self.next.send_nowait(Probe(nonce, [self.info]))
                reply = await asyncio.wait_for(fut, max(2 * self.silent_s, 1.0))
            except (LinkError, asyncio.TimeoutError):
                self.not_ready = "the stages did not answer the entry's probe: " + self.not_ready
                continue
            finally:
                self._probe = None
            why = self._check_ring(reply.stages)
            if why:
                self.not_ready = why
                log.error("stage 0: %s", why)
                await asyncio.sleep(1.0)
                continue
            self.ring = nonce
            self.infos = list(reply.stages)
            self.cache = self.model.new_cache(self.kv_cache_bytes)
            self.samplers.clear()
            self.ready = True
            self.not_ready = ""
            log.info("stage 0: pipeline of %d stages formed", len(self.infos))
            self._wake.set()

    def _check_ring(self, infos: Sequence[StageInfo]) -> str:
        expected = 0
        for i, info in enumerate(infos):
            if info.index != i or info.start != expected:
                return (
                    f"the ring's stages do not tile the model: stage {info.index} holds "
                    f"[{info.start}, {info.stop})"
                )
            expected = info.stop
        if expected != self.model.num_blocks or len(infos) != len(self.stages):
            return f"the ring covers blocks [0, {expected}) of {self.model.num_blocks}"
        return ""

    # ---- entry: requests ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> _Seq:
        """Queue ``request``; ServingError at once when it can never run or cannot wait."""
        if not self.entry:
            raise _unavailable(f"stage {self.index} is not the pipeline's entry")
        cfg = self.model.cfg
        prompt = request.prompt_ids
        if not prompt:
            raise ServingError(400, "invalid_request_error", "the prompt is empty")
        if request.max_tokens < 1:
            raise ServingError(
                400, "invalid_request_error", f"max_tokens must be >= 1, got {request.max_tokens}"
            )
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ServingError(
                400,
                "invalid_request_error",
                f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})",
            )
        capacity = len(prompt) + request.max_tokens
        if capacity > cfg.max_position_embeddings:
            raise ServingError(
                400,
                "invalid_request_error",
                f"the prompt's {len(prompt)} tokens plus max_tokens {request.max_tokens} exceed the model's "
                f"context of {cfg.max_position_embeddings} tokens",
            )
        if self.gate is not None and (why := self.gate()):
            raise _unavailable(f"the pipeline's entry may not serve: {why}")
        if not self.ready:
            raise _unavailable(f"the inference pipeline is not connected: {self.not_ready}")
        for info in self.infos:
            need = capacity * info.bytes_per_token
            if need > info.budget_bytes:
                raise ServingError(
                    400,
                    "invalid_request_error",
                    f"the prompt's {len(prompt)} tokens plus max_tokens {request.max_tokens} need "
                    f"{need} bytes of KV cache on stage {info.index}, more than its whole budget of "
                    f"{info.budget_bytes} bytes",
                )
        if len(self.waiting) >= self.max_waiting:
            raise ServingError(
                429,
                "rate_limit_error",
                f"the KV cache is full and {len(self.waiting)} requests are already waiting "
                f"({self._kv_text()}); retry later",
            )
        seq = _Seq(next(self._seq_ids), request, capacity, ids=list(prompt))
        self.waiting.append(seq)
        self._update_stats()
        self._wake.set()
        return seq

    def cancel(self, seq: _Seq) -> None:
        if seq.done:
            return
        seq.cancelled = True
        seq.done = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._update_stats()
        self._wake.set()

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        """The ``Backend`` contract, in this process (the entry's own node, tests, the bench)."""
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent | Finished, None]:
        seq = self.submit(request)
        try:
            while True:
                ev = await seq.events.get()
                if isinstance(ev, ServingError):
                    raise ev
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            self.cancel(seq)

    def _kv_text(self) -> str:
        used = sum(self._reserved.values())
        parts = [f"stage {i.index}: {used * i.bytes_per_token} of {i.budget_bytes} bytes" for i in self.infos]
        return "KV cache in use: " + ", ".join(parts)

    def _fits(self, capacity: int) -> bool:
        used = sum(self._reserved.values())
        return all((used + capacity) * i.bytes_per_token <= i.budget_bytes for i in self.infos)

    def _update_stats(self) -> None:
        self.stats.running = len(self.running)
        self.stats.waiting = len(self.waiting)
        st = self.cache.stats()
        self.stats.kv_bytes_in_use = st.bytes_in_use
        self.stats.kv_bytes_total = st.bytes_total

    def _release(self, seq: _Seq) -> None:
        """Free ``seq`` on every stage."""
        self._reserved.pop(seq.seq_id, None)
        self.cache.free(seq.seq_id)
        self.samplers.pop(seq.seq_id, None)
        if seq.announced and self.next is not None:
            with contextlib.suppress(LinkError):
                self.next.send_nowait(Free([seq.seq_id]))

    # ---- entry: the scheduler -------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._schedule()
            except Exception as exc:
                # A bug outside any one step (admission, the gate, bookkeeping): the entry's state
                # is suspect, so end everything in flight, drop every stage's sequences, serve on.
                self._failure(self._crash(f"{self._stage_name(self.index)}'s scheduler failed", exc))
                if len(self.stages) == 1 and not self._closed:
                    self.ready = True  # no probe to form a ring of one again
                    self.not_ready = ""

    async def _schedule(self) -> None:
        """Step the running sequences until none is left (or the pipeline broke)."""
        while self.running or self.waiting:
            if not self.ready:
                self._fail_all(self.not_ready)
                return
            if self.gate is not None and (why := self.gate()):
                self._fail_all(f"the entry may not serve: {why}")
                return
            self._drop_cancelled()
            self._admit()
            if not self.running:
                return
            try:
                await self._step()
            except _Broken:
                return
            self._drop_cancelled()
            self._update_stats()

    def _drop_cancelled(self) -> None:
        keep = []
        for seq in self.running:
            if seq.cancelled:
                self._release(seq)
            else:
                keep.append(seq)
        self.running = keep

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            if not self._fits(seq.capacity):
                return
            try:
                self.cache.reserve(seq.seq_id, seq.capacity)
            except KVCacheFull:
                return
            self.waiting.popleft()
            self._reserved[seq.seq_id] = seq.capacity
            if self.last:
                self.samplers[seq.seq_id] = SeqSampler(seq.request.params)
            self.running.append(seq)
        self._update_stats()

    async def _step(self) -> None:
        """One step of the running sequences. An unexpected exception in it (the forward pass, the
        sampler, a bug) ends the requests the step carried with a 500 naming it and frees their
        cache on every stage; the others and the scheduler go on."""
        step = self._plan_step()
        try:
            await self._run_step(step)
        except _Broken:
            raise
        except Exception as exc:
            self._end_step(step, self._crash(f"{self._stage_name(self.index)} failed a step", exc))

    def _plan_step(self) -> _StepPlan:
        """Decoding sequences first (one token each), then prompts with what is left of the budget.
        A prompt is cut at multiples of ``max_step_tokens`` from its start, whatever else is in
        flight: its chunks, and so its arithmetic, are the same alone as under load, and the
        tokens a request gets do not depend on its neighbours. The first prompt chunk of a step
        goes in even past the budget, so that prompts always progress."""
        step = _StepPlan(next(self._step_ids))
        budget = self.max_step_tokens
        prompts = 0
        for seq in sorted(self.running, key=lambda s: len(s.ids) - s.pos > 1):
            todo = len(seq.ids) - seq.pos
            if todo < 1:
                continue
            if todo == 1:
                k = 1
                if budget < 1:
                    continue
            else:
                k = min(todo, self.max_step_tokens - seq.pos % self.max_step_tokens)
                if k > budget and prompts:
                    continue
                prompts += 1
            budget -= k
            step.chunks.append(SeqChunk(seq.seq_id, seq.pos, k))
            step.members.append(seq)
            step.sample.append(k == todo)
            step.ids.extend(seq.ids[seq.pos : seq.pos + k])
            if not seq.announced:
                p = seq.request.params
                step.admits.append(
                    Admit(seq.seq_id, seq.capacity, float(p.temperature), float(p.top_p), p.seed)
                )
        return step

    async def _run_step(self, step: _StepPlan) -> None:
        members, chunks, sample, step_id = step.members, step.chunks, step.sample, step.step_id
        x = torch.tensor(step.ids, dtype=torch.long)
        loop = asyncio.get_running_loop()
        cache = self.cache
        rows = [i for i, s in enumerate(sample) if s]
        if self.last:
            samplers = [self.samplers[members[i].seq_id] for i in rows]
            tokens = await loop.run_in_executor(self._pool, self._last_step, x, chunks, cache, rows, samplers)
            if cache is not self.cache:
                raise _Broken("the pipeline broke during the step")
        else:
            hidden = await loop.run_in_executor(self._pool, self.model.forward, x, chunks, cache)
            link = self.next
            if cache is not self.cache or link is None:
                raise _Broken("the pipeline broke during the step")
            fut: asyncio.Future[Tokens] = loop.create_future()
            self._pending[step_id] = fut
            try:
                dtype, shape, data = tensor_bytes(hidden)
                try:
                    link.send_nowait(
                        Step(
                            step_id,
                            [c.seq_id for c in chunks],
                            [c.start_pos for c in chunks],
                            [c.n_tokens for c in chunks],
                            sample,
                            step.admits,
                            time.time(),
                            dtype,
                            shape,
                        ),
                        data,
                    )
                except LinkError as exc:
                    self._fail_all(f"lost the link to {self._stage_name(1)}: {exc}")
                    raise _Broken(str(exc)) from None
                # The other stages hold these sequences from here on: a failure frees them there too.
                for seq in members:
                    seq.announced = True
                reply = await fut
            finally:
                self._pending.pop(step_id, None)
            if [members[i].seq_id for i in rows] != reply.seq:
                self._failure(
                    f"{self._stage_name(len(self.stages) - 1)} answered step {step_id} for other sequences"
                )
                raise _Broken("bad reply")
            tokens = reply.tokens
        for seq, chunk in zip(members, chunks, strict=True):
            seq.pos += chunk.n_tokens
        for i, tok in zip(rows, tokens, strict=True):
            self._deliver(members[i], tok)

    def _end_step(self, step: _StepPlan, reason: str) -> None:
        """End the requests ``step`` carried that are still running, free them on every stage."""
        err = ServingError(500, "server_error", f"the inference pipeline failed this request: {reason}")
        for seq in step.members:
            if seq not in self.running:
                continue  # finished (and freed) before the failure
            self.running.remove(seq)
            if not seq.done:
                seq.done = True
                seq.events.put_nowait(err)
            self._release(seq)
        self._update_stats()

    def _deliver(self, seq: _Seq, tok: int) -> None:
        if seq.done:
            return
        seq.ids.append(tok)
        seq.generated += 1
        seq.events.put_nowait(TokenEvent(tok))
        req = seq.request
        reason = "stop" if tok in req.stop_token_ids else "length" if seq.generated >= req.max_tokens else ""
        if reason:
            seq.done = True
            seq.events.put_nowait(Finished(reason, len(req.prompt_ids), seq.generated))  # type: ignore[arg-type]
            self.running.remove(seq)
            self._release(seq)

    # ---- entry: clients -------------------------------------------------------------------------

    async def _client_loop(self, link: Link) -> None:
        tasks: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                msg, _ = await self._recv(link, f"client {link.peer}")
                if isinstance(msg, Ping):
                    continue
                if isinstance(msg, Submit):
                    if msg.req_id in tasks:
                        raise LinkError(f"client {link.peer} reused request id {msg.req_id}")
                    task = asyncio.get_running_loop().create_task(self._serve_request(link, msg))
                    tasks[msg.req_id] = task
                    task.add_done_callback(functools.partial(_forget, tasks, msg.req_id))
                elif isinstance(msg, Cancel):
                    t = tasks.get(msg.req_id)
                    if t is not None:
                        t.cancel()
                else:
                    raise LinkError(f"client {link.peer} sent an unexpected {type(msg).__name__}")
        except LinkError as exc:
            log.info("stage 0: client %s gone (%s); cancelling its %d requests", link.peer, exc, len(tasks))
        finally:
            link.abort()
            for t in list(tasks.values()):
                t.cancel()

    async def _serve_request(self, link: Link, msg: Submit) -> None:
        rid = msg.req_id
        try:
            params = SamplingParams(msg.temperature, msg.top_p, msg.seed)
            req = GenerationRequest(
                tuple(msg.prompt_ids), msg.max_tokens, params, frozenset(msg.stop_token_ids)
            )
        except ValueError as exc:
            await self._client_send(link, Error(rid, 400, "invalid_request_error", str(exc)[:1000]))
            return
        gen = self._stream(req)
        try:
            async for ev in gen:
                if isinstance(ev, TokenEvent):
                    await self._client_send(link, Token(rid, ev.token_id))
                else:
                    await self._client_send(
                        link, Done(rid, ev.reason, ev.prompt_tokens, ev.completion_tokens)
                    )
        except ServingError as exc:
            await self._client_send(link, Error(rid, exc.status, exc.code[:1000], exc.message[:1000]))
        except Exception as exc:
            # Never leave the client waiting for an answer that will not come.
            reason = self._crash(f"{self._stage_name(self.index)} failed request {rid}", exc)
            await self._client_send(link, Error(rid, 500, "server_error", reason[:1000]))
        finally:
            await gen.aclose()

    async def _client_send(self, link: Link, msg: Message) -> None:
        with contextlib.suppress(LinkError):
            await link.send(msg)
