"""The cluster child: membership, coordinator election, the plan and the serving gate.

This build forms single-node clusters (quorum_size = 1): the node discovers itself, becomes the
coordinator at term 1, plans all blocks onto itself with the planner, and commits "operational"
once its own validated Merkle root arrives. Multi-node formation (authenticated transport,
discovery providers, Raft) replaces `SoloCluster` behind the same reports to the supervisor; until
then a quorum above 1 waits visibly in discovery with the reason on the board, never pretends.

It runs on asyncio with uvloop, like the networked version will. It must not touch the arena.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from butterfly.board import ClusterSection
from butterfly.hardware import detect
from butterfly.ipc import (
    AsyncChannel,
    ChannelClosed,
    ClusterOperational,
    ClusterProgress,
    Failed,
    LocalValidated,
    PlanAssigned,
    Shutdown,
    StartCluster,
)
from butterfly.model.layout import ModelFormatError, load_layout
from butterfly.planner import ModelSizes, NodeCapacity, PlanError, plan_partition
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    bootstrap,
    child_socket,
    hold_if_requested_async,
)

log = logging.getLogger("butterfly.cluster")


class SoloCluster:
    def __init__(self, ctx: ChildContext, chan: AsyncChannel) -> None:
        self.ctx = ctx
        self.chan = chan
        self.term = 0
        self.epoch = 0
        self.plan: PlanAssigned | None = None

    async def start(self) -> None:
        cfg = self.ctx.config
        node_id = cfg.node.id
        await self.chan.send(ClusterProgress("discovery"))
        await hold_if_requested_async("discovery", self.beat)
        if cfg.cluster.quorum_size > 1:
            reason = (
                f"waiting for {cfg.cluster.quorum_size - 1} more node(s): this build forms single-node "
                "clusters only (quorum_size = 1)"
            )
            self.ctx.board.update(
                ClusterSection, cluster_size=1, quorum_size=cfg.cluster.quorum_size, waiting_reason=reason
            )
            await self.chan.send(ClusterProgress("discovery", reason))
            return
        self.ctx.board.update(ClusterSection, cluster_size=1, quorum_size=1, waiting_reason="")

        await self.chan.send(ClusterProgress("election"))
        await hold_if_requested_async("election", self.beat)
        if cfg.node.role != "coordinator":
            reason = "no coordinator: this node's role is worker, which never stands for election"
            self.ctx.board.update(ClusterSection, waiting_reason=reason)
            await self.chan.send(ClusterProgress("election", reason))
            return
        self.term += 1
        self.ctx.board.update(ClusterSection, term=self.term, coordinator=node_id, is_coordinator=1)
        log.info(
            "%s became coordinator at term %d",
            node_id,
            self.term,
            extra={"fields": {"TERM": self.term, "ROLE": "coordinator"}},
        )

        await self.chan.send(ClusterProgress("assignment"))
        await hold_if_requested_async("assignment", self.beat)
        try:
            layout = await asyncio.to_thread(load_layout, Path(cfg.model.source_path))
            hw = detect()
            memory = sum(g.memory_bytes for g in hw.gpus) or hw.memory_bytes
            caps = [NodeCapacity(node_id=node_id, memory_bytes=memory, throughput=1.0)]
            sizes = ModelSizes(
                block_bytes=tuple(layout.block_sizes()),
                embed_bytes=layout.embed_bytes,
                head_bytes=layout.head_bytes,
                tied_embeddings=layout.tied_embeddings,
            )
            plan = plan_partition(
                caps, sizes, epoch=self.epoch + 1, reserve_bytes=cfg.node.memory_reserve_bytes
            )
        except (ModelFormatError, OSError) as e:
            await self.chan.send(Failed("assignment", f"cannot read the model: {e}", fatal=True))
            return
        except PlanError as e:
            self.ctx.board.update(ClusterSection, waiting_reason=str(e))
            await self.chan.send(ClusterProgress("assignment", str(e)))
            return
        mine = plan.range_of(node_id)
        if mine is None:
            # One node and a feasible plan always include it; anything else is a planner bug.
            await self.chan.send(
                Failed("assignment", f"the plan leaves {node_id} without blocks", fatal=True)
            )
            return
        self.epoch = plan.epoch
        self.ctx.board.update(ClusterSection, epoch=self.epoch)
        log.info(
            "plan epoch %d: %s blocks %s",
            self.epoch,
            node_id,
            mine,
            extra={"fields": {"TERM": self.term, "EPOCH": self.epoch}},
        )
        self.plan = PlanAssigned(self.epoch, self.term, mine.start, mine.stop, layout.num_blocks)
        await self.chan.send(self.plan)

    def beat(self) -> None:
        self.ctx.board.update(ClusterSection, heartbeat_mono_ns=time.monotonic_ns())

    async def validated(self, msg: LocalValidated) -> None:
        if self.plan is None or msg.epoch != self.epoch or msg.term != self.term:
            log.warning(
                "ignoring validation for epoch %d term %d (current epoch %d term %d)",
                msg.epoch,
                msg.term,
                self.epoch,
                self.term,
            )
            return
        if (msg.start, msg.stop) != (0, self.plan.num_blocks):
            await self.chan.send(
                Failed("validation", f"validated range {msg.start}-{msg.stop - 1} does not cover the model")
            )
            return
        self.ctx.board.update(ClusterSection, model_root=msg.root.hex(), operational_nodes=1)
        log.info(
            "operational at epoch %d", self.epoch, extra={"fields": {"TERM": self.term, "EPOCH": self.epoch}}
        )
        await self.chan.send(ClusterOperational(self.epoch, self.term))


async def heartbeat(ctx: ChildContext) -> None:
    while True:
        ctx.board.update(ClusterSection, heartbeat_mono_ns=time.monotonic_ns())
        await asyncio.sleep(HEARTBEAT_S)


async def run(ctx: ChildContext, chan: AsyncChannel) -> None:
    cluster = SoloCluster(ctx, chan)
    beat = asyncio.create_task(heartbeat(ctx))
    try:
        while True:
            cmd = await chan.recv_command()
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, StartCluster):
                await cluster.start()
            elif isinstance(cmd, LocalValidated):
                await cluster.validated(cmd)
            else:
                log.warning("cluster ignores %s", type(cmd).__name__)
    except ChannelClosed:
        return
    finally:
        beat.cancel()


def main() -> None:
    sock = child_socket()
    ctx, sync_chan = bootstrap("cluster", sock)
    ctx.board.update(ClusterSection, pid=os.getpid(), heartbeat_mono_ns=time.monotonic_ns())

    async def amain() -> None:
        chan = await AsyncChannel.open(sync_chan.sock)
        await run(ctx, chan)

    try:
        import uvloop

        uvloop.run(amain())
    finally:
        ctx.board.close()
        ctx.logs.close()


if __name__ == "__main__":
    main()
