"""An unexpected exception inside a step (a torch error, a bug in sampling, an assertion) ends the
requests it touched with a 5xx naming it, frees their cache on every stage, and the pipeline serves on.

Real stages over loopback (tests.servinghelpers); the fault is a stage model's forward pass raising
once, armed while a request streams. Before the fix the entry's scheduler task died with the exception:
the request in flight, and every later one, waited forever while the stage still looked healthy; a
later stage's step handler died the same way on anything but ValueError, KeyError and RuntimeError.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from butterfly.engine.kvcache import kv_bytes_per_token
from butterfly.engine.sampler import SamplingParams
from butterfly.engine.weights import ModelDir, open_model_dir
from butterfly.serving.backend import GenerationRequest, ServingError, TokenEvent
from butterfly.serving.client import EntryTarget, RemoteBackend
from butterfly.serving.link import Abort
from butterfly.serving.metrics import ServingCollector, ServingStats
from butterfly.serving.stage import StageServer
from tests.hfmodels import save_hf_model
from tests.servinghelpers import SECRET, collect, start_pipeline, stop_pipeline, wait_freed, wait_ready

torch.set_num_threads(1)
# Only a real hang trips it: a failed step ends its requests at once. Not a timing assertion.
HANG_GUARD_S = 30.0
GREEDY = SamplingParams(temperature=0.0)
PROMPT = (5, 17, 3, 42, 8, 11)
OTHER = (7, 7, 2, 90)


@pytest.fixture(scope="module")
def md(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelDir]:
    model = open_model_dir(save_hf_model("llama", tmp_path_factory.mktemp("llama") / "model"))
    yield model
    gc.collect()  # stage servers of the tests hold views of the weights in reference cycles
    model.close()


@pytest.fixture(autouse=True)
def _drop_logged_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """pytest keeps each test's log records until the test is torn down; a logged exception's frames
    hold the stages and through them views of the weights, which ``md`` must close."""
    yield
    for when in ("setup", "call"):
        for record in caplog.get_records(when):
            if record.exc_info:
                traceback.clear_frames(record.exc_info[2])
                record.exc_info = None


class Fault:
    """Replaces ``stage.model.forward``: raises ``exc`` on the first call after ``arm()``, once."""

    def __init__(self, stage: StageServer, exc: BaseException) -> None:
        self.real = stage.model.forward
        self.exc = exc
        self.armed = False
        self.fired = 0
        stage.model.forward = self  # type: ignore[method-assign]

    def arm(self) -> None:
        self.armed = True

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.fired += 1
            raise self.exc
        return self.real(*args, **kwargs)


async def stream_until_error(gen: Any, fault: Fault) -> tuple[int, ServingError]:
    """Iterate ``gen``, arming ``fault`` after the first token; the tokens seen and the error."""
    got = 0
    with pytest.raises(ServingError) as err:
        async for ev in gen:
            assert isinstance(ev, TokenEvent)
            got += 1
            if got == 1:
                fault.arm()
    return got, err.value


def assert_nothing_held(servers: list[StageServer]) -> None:
    entry = servers[0]
    assert not entry.running and not entry.waiting
    assert not entry._reserved and not entry._pending
    assert [s.cache.stats().bytes_in_use for s in servers] == [0] * len(servers)
    assert [len(s.samplers) for s in servers] == [0] * len(servers)


def step_failures_metric(stats: ServingStats) -> str:
    registry = CollectorRegistry()
    registry.register(ServingCollector(stats))
    text = generate_latest(registry).decode()
    return next(
        line for line in text.splitlines() if line.startswith("butterfly_pipeline_step_failures_total")
    )


@pytest.mark.parametrize("cuts", [(0, 4), (0, 2, 4)], ids=lambda c: f"{len(c) - 1}stages")
def test_a_failed_step_at_the_entry_ends_its_requests_and_the_pipeline_serves_on(
    md: ModelDir, cuts: tuple[int, ...], caplog: pytest.LogCaptureFixture
) -> None:
    # Every stage has room for one request at a time: the second waits for the first's cache, so it
    # is not part of the failed step and must be served once the first's cache is freed.
    room = kv_bytes_per_token(md.config, cuts[1] - cuts[0], torch.float32) * 210
    failing = GenerationRequest(PROMPT, 200, GREEDY)
    queued = GenerationRequest(OTHER, 6, GREEDY)
    stats = ServingStats()

    async def run() -> None:
        servers = await start_pipeline(md, cuts, kv_cache_bytes=room, stats=stats)
        entry = servers[0]
        try:
            want_queued, _ = await asyncio.wait_for(collect(entry, queued), HANG_GUARD_S)
            want_failing, _ = await asyncio.wait_for(collect(entry, failing), HANG_GUARD_S)
            fault = Fault(entry, RuntimeError("injected fault: CUDA error: an illegal memory access"))
            gen = entry.generate(failing)
            first = await asyncio.wait_for(gen.__anext__(), HANG_GUARD_S)
            assert isinstance(first, TokenEvent) and first.token_id == want_failing[0]
            waiter = asyncio.ensure_future(collect(entry, queued))
            for _ in range(500):
                if entry.stats.waiting == 1:
                    break
                await asyncio.sleep(0.01)
            assert entry.stats.waiting == 1
            fault.arm()
            got = 1
            with pytest.raises(ServingError) as err:
                async for ev in _bounded(gen):
                    assert isinstance(ev, TokenEvent)
                    got += 1
            assert fault.fired == 1 and 1 <= got < 200
            e = err.value
            assert e.status == 500 and e.code == "server_error", (e.status, e.code)
            assert "stage 0" in e.message and "RuntimeError: injected fault" in e.message, e.message
            # The queued request was not in the failed step: it runs once the cache is free.
            toks, fin = await asyncio.wait_for(waiter, HANG_GUARD_S)
            assert toks == want_queued and fin.reason == "length"
            assert await wait_freed(servers) == [0] * len(servers)
            assert_nothing_held(servers)
            # The same request again: served, the same tokens.
            again, fin = await asyncio.wait_for(collect(entry, failing), HANG_GUARD_S)
            assert again == want_failing and fin.completion_tokens == 200
            assert await wait_freed(servers) == [0] * len(servers)
            assert entry.ready
        finally:
            await stop_pipeline(servers)

    with caplog.at_level(logging.ERROR, logger="butterfly.serving"):
        asyncio.run(run())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None, [r.getMessage() for r in errors]
    assert "RuntimeError: injected fault" in errors[0].getMessage()
    assert stats.step_failures == 1
    assert step_failures_metric(stats) == "butterfly_pipeline_step_failures_total 1.0"
    # What the engine child reports to the supervisor, once.
    assert stats.take_pending_step_failures() == 1 and stats.take_pending_step_failures() == 0


async def _bounded(gen: Any) -> Any:
    """``gen``'s events, each within the hang guard."""
    while True:
        try:
            ev = await asyncio.wait_for(gen.__anext__(), HANG_GUARD_S)
        except StopAsyncIteration:
            return
        yield ev


@pytest.mark.parametrize(
    ("cuts", "stage"),
    [((0, 2, 4), 1), ((0, 1, 3, 4), 1), ((0, 1, 3, 4), 2)],
    ids=["last-of-2", "middle-of-3", "last-of-3"],
)
@pytest.mark.parametrize("exc_type", [AssertionError, RuntimeError])
def test_a_failed_step_at_a_later_stage_aborts_the_ring_with_the_reason_and_it_forms_again(
    md: ModelDir, cuts: tuple[int, ...], stage: int, exc_type: type[Exception]
) -> None:
    req = GenerationRequest(PROMPT, 30, GREEDY)
    stats = ServingStats()

    async def run() -> None:
        servers = await start_pipeline(md, cuts, stats=stats)
        entry = servers[0]
        try:
            want, _ = await asyncio.wait_for(collect(entry, req), HANG_GUARD_S)
            fault = Fault(servers[stage], exc_type("injected fault"))
            got, e = await asyncio.wait_for(stream_until_error(entry.generate(req), fault), HANG_GUARD_S)
            assert fault.fired == 1 and 1 <= got < 30
            assert 500 <= e.status < 600, e.status
            assert f"stage {stage}" in e.message and f"{exc_type.__name__}: injected fault" in e.message, (
                e.message
            )
            # Every stage dropped the aborted sequences; the ring forms again and serves.
            assert await wait_freed(servers) == [0] * len(servers)
            await wait_ready(entry, HANG_GUARD_S)
            again, fin = await asyncio.wait_for(collect(entry, req), HANG_GUARD_S)
            assert again == want and fin.reason == "length"
            assert await wait_freed(servers) == [0] * len(servers)
            assert_nothing_held(servers)
        finally:
            await stop_pipeline(servers)

    asyncio.run(run())
    assert stats.step_failures == 1


@pytest.mark.parametrize("cuts", [(0, 4), (0, 2, 4)], ids=lambda c: f"{len(c) - 1}stages")
def test_a_failure_in_the_scheduler_outside_a_step_ends_what_is_in_flight_and_serving_goes_on(
    md: ModelDir, cuts: tuple[int, ...]
) -> None:
    """Admission raising (a bug in the KV cache's bookkeeping, say): the entry's state is suspect, so
    every request in flight ends with the reason and every stage drops its sequences."""

    async def run() -> None:
        servers = await start_pipeline(md, cuts)
        entry = servers[0]
        try:
            want, _ = await asyncio.wait_for(
                collect(entry, GenerationRequest(OTHER, 5, GREEDY)), HANG_GUARD_S
            )
            first = entry.generate(GenerationRequest(PROMPT, 200, GREEDY))
            assert isinstance(await asyncio.wait_for(first.__anext__(), HANG_GUARD_S), TokenEvent)
            cache = entry.cache
            real = cache.reserve

            def broken(seq_id: int, max_tokens: int) -> None:
                cache.reserve = real  # type: ignore[method-assign]
                raise TypeError("injected bookkeeping bug")

            cache.reserve = broken  # type: ignore[method-assign]
            second = asyncio.ensure_future(collect(entry, GenerationRequest(OTHER, 5, GREEDY)))
            with pytest.raises(ServingError) as err1:
                async for _ in _bounded(first):
                    pass
            with pytest.raises(ServingError) as err2:
                await asyncio.wait_for(second, HANG_GUARD_S)
            for e in (err1.value, err2.value):
                assert e.status >= 500 and "TypeError: injected bookkeeping bug" in e.message, e.message
            assert await wait_freed(servers) == [0] * len(servers)
            await wait_ready(entry, HANG_GUARD_S)
            toks, _ = await asyncio.wait_for(
                collect(entry, GenerationRequest(OTHER, 5, GREEDY)), HANG_GUARD_S
            )
            assert toks == want
            assert await wait_freed(servers) == [0] * len(servers)
            assert_nothing_held(servers)
        finally:
            await stop_pipeline(servers)

    asyncio.run(run())


def test_a_remote_client_gets_the_failed_step_as_an_error(md: ModelDir) -> None:
    """Through the client link (another node's RemoteBackend): the 500 and its reason arrive."""
    req = GenerationRequest(PROMPT, 30, GREEDY)

    async def run() -> None:
        servers = await start_pipeline(md, (0, 2, 4))
        backend = RemoteBackend(SECRET, lambda: EntryTarget("127.0.0.1", servers[0].listen_port, 1))
        try:
            want, _ = await asyncio.wait_for(collect(backend, req), HANG_GUARD_S)
            fault = Fault(servers[0], ValueError("injected fault"))
            got, e = await asyncio.wait_for(stream_until_error(backend.generate(req), fault), HANG_GUARD_S)
            assert got >= 1 and e.status == 500 and e.code == "server_error"
            assert "ValueError: injected fault" in e.message, e.message
            assert await wait_freed(servers) == [0, 0]
            again, _ = await asyncio.wait_for(collect(backend, req), HANG_GUARD_S)
            assert again == want
        finally:
            await backend.close()
            await stop_pipeline(servers)

    asyncio.run(run())


def test_a_late_abort_of_an_earlier_ring_does_not_drop_the_sequences_of_the_current_one(md: ModelDir) -> None:
    """An Abort travels on other links than the probe that forms the next ring, so a later stage may
    get the old ring's abort after the new ring formed. Before, it dropped the new ring's sequences
    (their next step failed with a 503); an abort of the current ring still ends them."""
    req = GenerationRequest(PROMPT, 30, GREEDY)

    async def run() -> None:
        servers = await start_pipeline(md, (0, 1, 3, 4))
        entry, middle = servers[0], servers[1]
        try:
            want, _ = await asyncio.wait_for(collect(entry, req), HANG_GUARD_S)
            assert middle.ring == entry.ring != 0
            got: list[int] = []
            async for ev in _bounded(entry.generate(req)):
                if isinstance(ev, TokenEvent):
                    got.append(ev.token_id)
                    if len(got) == 2:
                        stale = Abort("an earlier ring broke", middle.ring ^ 1)
                        middle._on_abort(stale, forward_up=True)
                        middle._on_abort(stale, forward_up=False)
            assert got == want
            # The current ring's abort is acted on: the request in flight ends with it.
            with pytest.raises(ServingError) as err:
                async for ev in _bounded(entry.generate(req)):
                    if isinstance(ev, TokenEvent):
                        middle._on_abort(Abort("stage 2 broke", middle.ring), forward_up=True)
            assert err.value.status == 503 and "stage 2 broke" in err.value.message
            await wait_ready(entry)
            again, _ = await asyncio.wait_for(collect(entry, req), HANG_GUARD_S)
            assert again == want
        finally:
            await stop_pipeline(servers)

    asyncio.run(run())
