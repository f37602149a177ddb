"""Pipelines of ``StageServer``s over loopback in this process, for the serving tests and the bench."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from butterfly.engine.model import StageModel
from butterfly.engine.weights import ModelDir
from butterfly.serving.backend import Backend, Finished, GenerationRequest, TokenEvent
from butterfly.serving.stage import StageAddress, StageServer

SECRET = os.urandom(32)


async def start_pipeline(
    md: ModelDir,
    cuts: Sequence[int],
    *,
    epoch: int = 1,
    kv_cache_bytes: int = 16 << 20,
    secret: bytes = SECRET,
    **kw: object,
) -> list[StageServer]:
    """Stages [cuts[i], cuts[i+1]) listening on loopback, started and formed into a ring."""
    servers = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        model = StageModel(md.config, md.weights, a, b, md.layout.num_blocks)
        srv = StageServer(model, index=i, epoch=epoch, secret=secret, kv_cache_bytes=kv_cache_bytes, **kw)  # type: ignore[arg-type]
        await srv.listen()
        servers.append(srv)
    addrs = [
        StageAddress(i, s.model.start, s.model.stop, "127.0.0.1", s.listen_port, f"n{i}")
        for i, s in enumerate(servers)
    ]
    for s in servers:
        s.start(addrs)
    await wait_ready(servers[0])
    return servers


async def wait_ready(entry: StageServer, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not entry.ready:
        if loop.time() > end:
            raise AssertionError(f"the pipeline did not form: {entry.not_ready}")
        await asyncio.sleep(0.02)


async def stop_pipeline(servers: Sequence[StageServer]) -> None:
    for s in servers:
        await s.close()


async def collect(backend: Backend, req: GenerationRequest) -> tuple[list[int], Finished]:
    out: list[int] = []
    async for ev in backend.generate(req):
        if isinstance(ev, TokenEvent):
            out.append(ev.token_id)
        else:
            return out, ev
    raise AssertionError("the stream ended without Finished")


async def wait_freed(servers: Sequence[StageServer], timeout_s: float = 10.0) -> list[int]:
    """Sequences each stage holds once the frees sent down the ring arrived (or the timeout passed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if all(s.cache.stats().sequences == 0 for s in servers):
            break
        await asyncio.sleep(0.01)
    return [s.cache.stats().sequences for s in servers]
