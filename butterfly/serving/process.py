"""The engine child: this node's stage of the serving pipeline, in a process of its own.

Started with the other children and idle (beating its heartbeat) until the supervisor sends
``StartEngine`` -- the node's range is loaded and validated (READY). It then maps the arena
read-only, builds the engine's ``StageModel`` over views of it (no copy), owns the stage's KV cache
(``[engine] kv_cache_bytes``) and joins the ring of the plan's stages as a ``StageServer`` on
``[engine] port``, authenticated and encrypted with the cluster secret. Every step it serves asks
the node's gate (``butterfly.gate.may_serve``) first. ``StopEngine`` (the loader is about to replace
the arena, or the plan changed) ends what is in flight with 503 and unmaps the arena.

It reports ``EngineState`` to the supervisor when its state changes and every second while serving:
running and waiting sequences, KV cache use, the per-hop times it observed and the steps it failed,
which the supervisor turns into metrics. Its heartbeat is on the board like every child's, so a dead or
frozen engine stops the node serving within the gate's bound; the other stages notice through the
links' own.

Must not: write the arena, tokenize, or talk HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time

from butterfly.board import EngineSection
from butterfly.board.shm import Segment, attach_segment
from butterfly.config import engine_port
from butterfly.engine.config import ConfigUnsupported, ModelConfig
from butterfly.engine.model import StageModel, WeightError
from butterfly.engine.weights import tensor_view
from butterfly.gate import may_serve
from butterfly.ipc import AsyncChannel, ChannelClosed, EngineState, Failed, Shutdown, StartEngine, StopEngine
from butterfly.net.auth import SecretError, load_secret
from butterfly.serving.link import split_address
from butterfly.serving.metrics import ServingStats
from butterfly.serving.stage import StageAddress, StageServer
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    bootstrap,
    child_socket,
    hold_if_requested,
)

log = logging.getLogger("butterfly.engine")

REPORT_S = 1.0


class EngineError(Exception):
    """The stage cannot be built: unsupported config, weights that do not fit, a missing arena.
    ``fatal``: trying again cannot help (the model itself is what the engine cannot run)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def stage_addresses(cmd: StartEngine) -> tuple[int, list[StageAddress]]:
    """This node's stage index and every stage's address, from the plan's stages."""
    index = -1
    out = []
    for i, st in enumerate(cmd.stages):
        if (st.start, st.stop) == (cmd.loaded.start, cmd.loaded.stop):
            index = i
        if not st.engine_address:
            raise EngineError(
                f"node {st.node_id} (blocks {st.start}-{st.stop - 1}) has not said where its engine listens"
            )
        host, port = split_address(st.engine_address)
        out.append(StageAddress(i, st.start, st.stop, host, port, st.node_id))
    if index < 0:
        raise EngineError(
            f"blocks {cmd.loaded.start}-{cmd.loaded.stop - 1} are not a stage of plan epoch {cmd.epoch}"
        )
    return index, out


def build_stage(seg: Segment, cmd: StartEngine) -> StageModel:
    """The engine's stage over views of the arena ``seg`` (mapped read-only)."""
    loaded = cmd.loaded
    where = loaded.model_config_where or "config.json"
    if not loaded.model_config or not loaded.specs:
        raise EngineError("the loader did not say the model's config and tensor shapes")
    try:
        cfg = ModelConfig.from_json(json.loads(loaded.model_config), where)
    except (ConfigUnsupported, ValueError) as e:
        raise EngineError(f"the engine cannot run this model: {e}", fatal=True) from None
    specs = {s.name: s for s in loaded.specs}
    weights = {}
    for p in loaded.tensors:
        spec = specs.get(p.name)
        if spec is None:
            raise EngineError(f"tensor {p.name} is placed in the arena but has no dtype and shape")
        if p.arena_offset + p.length > seg.size:
            raise EngineError(f"tensor {p.name} lies past the end of the arena ({seg.size} bytes)")
        weights[p.name] = tensor_view(seg.buf, p.arena_offset, spec.dtype, spec.shape)
    try:
        return StageModel(cfg, weights, loaded.start, loaded.stop, cfg.num_layers)
    except (WeightError, ValueError) as e:
        raise EngineError(f"weights do not fit the model: {e}", fatal=True) from None


class Engine:
    def __init__(self, ctx: ChildContext, chan: AsyncChannel) -> None:
        self.ctx = ctx
        self.chan = chan
        self.stats = ServingStats()
        self.server: StageServer | None = None
        self.seg: Segment | None = None
        self.epoch = 0
        self._last: tuple[object, ...] = ()

    def gate(self) -> str:
        verdict = may_serve(self.ctx.board.snapshot(), time.monotonic_ns())
        return "" if verdict.ok else verdict.reason

    async def start(self, cmd: StartEngine) -> None:
        await self.stop()
        server: StageServer | None = None
        failed: Failed | None = None
        try:
            secret = load_secret(self.ctx.config.security.secret_file)
            index, stages = stage_addresses(cmd)
            try:
                seg = attach_segment(cmd.loaded.arena_name, writable=False)
            except FileNotFoundError:
                raise EngineError(f"the arena {cmd.loaded.arena_name} is gone (its loader exited)") from None
            self.seg = seg
            model = build_stage(seg, cmd)
            cfg = self.ctx.config
            server = StageServer(
                model,
                index=index,
                epoch=cmd.epoch,
                secret=secret,
                kv_cache_bytes=cfg.engine.kv_cache_bytes,
                listen_host=cfg.node.bind_address.host,
                listen_port=engine_port(cfg),
                node=cfg.node.id,
                gate=self.gate,
                stats=self.stats,
            )
            del model
            await server.listen()
        except (EngineError, SecretError, ValueError, OSError) as e:
            log.error("engine cannot serve blocks %d-%d: %s", cmd.loaded.start, cmd.loaded.stop - 1, e)
            fatal = isinstance(e, EngineError) and e.fatal
            failed = Failed("engine", f"the engine cannot serve this node's blocks: {e}", fatal=fatal)
        if failed is not None:
            # Out of the except block: its traceback holds the frames that hold the stage's views of
            # the arena, which must all be gone before it is unmapped.
            if server is not None:
                await server.close()
            server = None
            self._unmap()
            await self.chan.send(failed)
            return
        assert server is not None
        server.start(stages)
        self.server = server
        self.epoch = cmd.epoch
        self.ctx.board.update(EngineSection, epoch=cmd.epoch, serving=1)
        log.info(
            "engine serving blocks %d-%d as stage %d of %d (epoch %d) on port %d",
            cmd.loaded.start,
            cmd.loaded.stop - 1,
            index,
            len(stages),
            cmd.epoch,
            server.listen_port,
        )
        await self.report(force=True)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self.ctx.board.update(EngineSection, serving=0, running=0, waiting=0)
            await server.close()
            del server
            log.info("engine stopped serving epoch %d", self.epoch)
        self._unmap()
        self.stats.running = self.stats.waiting = self.stats.kv_bytes_in_use = 0
        await self.report(force=True)

    def _unmap(self) -> None:
        seg, self.seg = self.seg, None
        if seg is None:
            return
        gc.collect()  # the stage's views of the arena, in reference cycles of the server's tasks
        try:
            seg.close()
        except BufferError:
            log.error("engine: arena %s still has views after the stage stopped; left mapped", seg.name)

    async def report(self, force: bool = False) -> None:
        srv = self.server
        s = self.stats
        reason = "" if srv is None or not srv.entry else ("" if srv.ready else srv.not_ready)
        state = (self.epoch, srv is not None, reason, s.running, s.waiting, s.kv_bytes_in_use)
        hops = self.stats.take_pending_hops()
        failures = self.stats.take_pending_step_failures()
        if not force and state == self._last and not hops and not failures:
            return
        self._last = state
        self.ctx.board.update(
            EngineSection,
            running=s.running,
            waiting=s.waiting,
            kv_bytes_in_use=s.kv_bytes_in_use,
            kv_bytes_total=s.kv_bytes_total,
        )
        with contextlib.suppress(ChannelClosed):
            await self.chan.send(
                EngineState(
                    self.epoch,
                    srv is not None,
                    reason,
                    s.running,
                    s.waiting,
                    s.kv_bytes_in_use,
                    s.kv_bytes_total,
                    hops,
                    failures,
                )
            )


async def _heartbeat(ctx: ChildContext) -> None:
    while True:
        ctx.board.update(EngineSection, heartbeat_mono_ns=time.monotonic_ns())
        await asyncio.sleep(HEARTBEAT_S)


async def _reports(engine: Engine) -> None:
    while True:
        await asyncio.sleep(REPORT_S)
        await engine.report()


async def run(ctx: ChildContext, chan: AsyncChannel) -> None:
    engine = Engine(ctx, chan)
    tasks = [asyncio.create_task(_heartbeat(ctx)), asyncio.create_task(_reports(engine))]
    try:
        while True:
            cmd = await chan.recv_command()
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, StartEngine):
                await engine.start(cmd)
            elif isinstance(cmd, StopEngine):
                await engine.stop()
            else:
                log.warning("engine ignores %s", type(cmd).__name__)
    except ChannelClosed:
        return
    finally:
        for t in tasks:
            t.cancel()
        await engine.stop()


def main() -> None:
    ctx, sync_chan = bootstrap("engine", child_socket())
    hold_if_requested("engine-boot", lambda: None)  # test hook: an engine slow to start (a loaded host)
    # No heartbeat yet: the supervisor gives a child until its serve loop's first beat to start.
    ctx.board.update(EngineSection, pid=os.getpid(), serving=0, epoch=0)
    # One thread per stage's forward pass keeps the event loop (links, pings) free; torch may use the
    # node's cores inside it.

    async def amain() -> None:
        chan = await AsyncChannel.open(sync_chan.sock)
        await run(ctx, chan)

    try:
        import uvloop  # links' frames cost ~11 us less each way than on asyncio's own loop (bench_serving)

        uvloop.run(amain())
    finally:
        ctx.board.close()
        ctx.logs.close()


if __name__ == "__main__":
    main()
