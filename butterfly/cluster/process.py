"""The cluster child: transport, discovery, Raft and the coordinator, speaking to the supervisor.

It owns this node's part in the cluster: it dials the peers discovery finds over the authenticated
transport, runs the Raft driver (bootstrap, election, the replicated plan and serving gate), and
turns what the log commits into reports for the supervisor (ClusterProgress, PlanAssigned,
ClusterOperational). A locally validated assignment goes to the coordinator as unit digests with a
Merkle range proof computed from this node's own copy of the manifest.

It reads and checks that manifest (pins included) as soon as it starts, and refuses a plan for
another model version: either is a fatal ``Failed("manifest", ...)``, seen at once on /status. What
the supervisor says about this node's faults (``NodeFault``) rides on its NodeReport, so every peer
can name it; the peers' faults come back as ``PeerFaults``.

It runs on asyncio with uvloop. It must not touch the arena.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from butterfly.board import ClusterSection
from butterfly.cluster.coordinator import ModelInfo
from butterfly.cluster.driver import ClusterDriver, Progress, choose_founder
from butterfly.cluster.messages import MAX_PEERS, NodeReport, PlanEntry
from butterfly.config import Config, HostPort, engine_port, parse_host_port
from butterfly.hardware import detect
from butterfly.ipc import (
    AsyncChannel,
    ChannelClosed,
    ClusterOperational,
    ClusterProgress,
    Failed,
    LocalValidated,
    NodeFault,
    NodeLayers,
    PeerFault,
    PeerFaults,
    PlanAssigned,
    PlanView,
    RangeAccepted,
    Shutdown,
    StageEndpoint,
    StartCluster,
    Waiting,
)
from butterfly.net.connection import Incoming
from butterfly.net.transport import Transport, transport_from_config
from butterfly.planner import ModelSizes
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    bootstrap,
    child_socket,
    hold_if_requested_async,
)
from butterfly.weights.cache import WeightCache
from butterfly.weights.layout import LayerRange
from butterfly.weights.manifest import (
    Manifest,
    ManifestError,
    layout_from_manifest,
    range_proof_for_blocks,
    unit_range_for_blocks,
)
from butterfly.weights.modelsource import NoManifest, load_manifest
from butterfly.weights.provenance import ManifestRefused
from butterfly.weights.sources import SourceError

log = logging.getLogger("butterfly.cluster")

# What a manifest that cannot be used raises; their messages name the manifest and the fix.
MANIFEST_PROBLEMS = (NoManifest, ManifestError, ManifestRefused, SourceError)


class NetAdapter:
    """The transport as the driver's PeerNet."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def send(self, peer: str, channel: str, payload: bytes) -> None:
        self.t.send(peer, channel, payload)

    def peers(self) -> set[str]:
        return set(self.t.peers())

    async def recv(self) -> tuple[str, str, bytes]:
        m: Incoming = await self.t.recv()
        return m.peer_id, m.channel, m.payload


PEERS_HEARD_S = 0.5
"""How often the peers that reports name are compared with the ones being dialed."""


def peers_heard_of(
    reports: Iterable[NodeReport], own_id: str
) -> tuple[dict[HostPort, tuple[str, str]], list[str]]:
    """address -> (node id, the peer that named it) of every node the ``reports`` say their senders
    are connected to, this node left out; and what was wrong with each entry whose address does not
    parse (skipped: one bad entry never costs the rest of a report)."""
    out: dict[HostPort, tuple[str, str]] = {}
    bad: list[str] = []
    for r in reports:
        if r.node_id == own_id:
            continue  # our own report names the peers we are connected to already
        for node_id, text in r.peers:
            if node_id == own_id:
                continue
            try:
                address = parse_host_port(text)
            except ValueError as e:
                bad.append(f"{r.node_id} names peer {node_id} at {text!r}, which is not host:port: {e}")
                continue
            out.setdefault(address, (node_id, r.node_id))
    return out, bad


class SupervisorEvents:
    def __init__(self, ctx: ChildContext, chan: AsyncChannel, child: ClusterChild) -> None:
        self.ctx = ctx
        self.chan = chan
        self.child = child
        self.last_waiting = ""
        self.plan_waiting = ""
        self.last_faults: list[PeerFault] = []

    async def progress(self, p: Progress) -> None:
        await self.chan.send(ClusterProgress(p.phase, p.waiting_reason))

    async def plan(self, plan: PlanEntry, term: int) -> bool:
        mine = plan.range_of(self.ctx.config.node.id)
        assert mine is not None
        stages = [
            StageEndpoint(a.node_id, a.start, a.stop, self.child.engine_address_of(a.node_id))
            for a in plan.assignments
        ]
        unknown = [s for s in stages if not s.engine_address]
        if unknown:
            # A restarted cluster child has not yet heard every peer's report (each says where its
            # engine listens); the stages' ring cannot be formed without it. Asked again next cycle.
            s = unknown[0]
            reason = (
                f"waiting for node {s.node_id} (blocks {s.start}-{s.stop - 1}) to say where its engine "
                f"listens (plan epoch {plan.epoch})"
            )
            if reason != self.plan_waiting:
                self.plan_waiting = reason
                await self.progress(Progress("assignment", reason))
            return False
        self.plan_waiting = ""
        own = await self.child.checked_manifest()
        if own is None:
            return True  # reported as a manifest failure
        if own.merkle_root != plan.manifest_root:
            await self.chan.send(
                Failed(
                    "manifest",
                    f"this node's manifest names model version {own.merkle_root}, the cluster's plan "
                    f"(epoch {plan.epoch}) is for {plan.manifest_root}: this node holds another model "
                    "version; point its [model] at the cluster's model",
                    fatal=True,
                )
            )
            return True
        await self.chan.send(PlanAssigned(plan.epoch, term, mine.start, mine.stop, plan.num_blocks, stages))
        return True

    async def operational(self, epoch: int, term: int) -> None:
        await self.chan.send(ClusterOperational(epoch, term))

    async def validation_rejected(self, epoch: int, reason: str) -> None:
        await self.chan.send(Failed("validation", f"coordinator rejected epoch {epoch}: {reason}"))

    async def range_accepted(self, epoch: int) -> None:
        await self.chan.send(RangeAccepted(epoch))

    async def waiting(self, reason: str) -> None:
        # Sent on change only: the driver says it every cycle.
        if reason != self.last_waiting:
            self.last_waiting = reason
            await self.chan.send(Waiting(reason))

    async def plan_applied(self, plan: PlanEntry) -> None:
        rows = [NodeLayers(a.node_id, a.start, a.stop) for a in plan.assignments]
        await self.chan.send(PlanView(plan.epoch, rows))

    async def peer_faults(self, faults: list[PeerFault]) -> None:
        if faults != self.last_faults:
            self.last_faults = faults
            await self.chan.send(PeerFaults(faults))

    def board(self, **fields: Any) -> None:
        self.ctx.board.update(ClusterSection, **fields)


def model_info(m: Manifest) -> ModelInfo:
    layout = layout_from_manifest(m, "<manifest>")
    sizes = ModelSizes(
        block_bytes=tuple(layout.block_sizes()),
        embed_bytes=layout.embed_bytes,
        head_bytes=layout.head_bytes,
        tied_embeddings=layout.tied_embeddings,
    )
    return ModelInfo(m.merkle_root, m.num_units, sizes)


def cached_blocks(config: Config, m: Manifest) -> tuple[int, ...]:
    """Blocks whose every tensor is already in the local cache (the planner prefers keeping them)."""
    cache = WeightCache(config.node.cache_dir)
    layout = layout_from_manifest(m, "<manifest>")
    digests = {t.name: t.blake3 for t in m.tensors}
    out = []
    for unit in layout.units:
        if unit.kind == "block" and all(cache.lookup(digests[t.name], t.length) for t in unit.tensors):
            out.append(unit.block)
    return tuple(out)


class ClusterChild:
    def __init__(self, ctx: ChildContext, chan: AsyncChannel) -> None:
        self.ctx = ctx
        self.chan = chan
        self.config = ctx.config
        self.manifest: Manifest | None = None
        self.manifest_failed = False
        self.fault = NodeFault("")
        self.cached: tuple[int, ...] = ()
        # Peers heard of through reports, and bad entries, already logged (each once).
        self._heard_logged: set[str] = set()
        hw = detect(self.config.node.gpu)
        self.memory = sum(g.memory_bytes for g in hw.gpus) or hw.memory_bytes
        self.throughput = float(max(1, len(hw.gpus)))
        self.transport = transport_from_config(self.config)
        self.driver = ClusterDriver(
            node_id=self.config.node.id,
            cluster_name=self.config.cluster.cluster_name,
            role=self.config.node.role,
            quorum_size=self.config.cluster.quorum_size,
            state_dir=self.config.node.state_dir,
            net=NetAdapter(self.transport),
            events=SupervisorEvents(ctx, chan, self),
            local_report=self.report,
            load_model=self.load_model,
            reserve_bytes=self.config.node.memory_reserve_bytes,
            voter_grace_s=self.config.cluster.voter_grace_s,
        )
        cluster = self.config.cluster
        self.driver.is_founder, self.driver.founder = choose_founder(
            cluster.discovery_method,
            cluster.seed_nodes,
            cluster.founder,
            self.transport.advertise,
            self.config.node.role,
        )

    def report(self) -> NodeReport:
        return NodeReport(
            node_id=self.config.node.id,
            cluster_name=self.config.cluster.cluster_name,
            role=self.config.node.role,
            memory_bytes=self.memory,
            throughput=self.throughput,
            cached_blocks=self.cached,
            fault=self.fault.reason,
            failed=self.fault.failed,
            fault_start=self.fault.start,
            fault_stop=self.fault.stop,
            engine_address=self.engine_address(),
            peers=tuple(sorted((pid, info.advertise) for pid, info in self.transport.peers().items()))[
                :MAX_PEERS
            ],
        )

    def engine_address(self) -> str:
        """Where peers reach this node's engine: the transport's advertised host, the engine's port."""
        host = self.transport.advertise.host
        return f"[{host}]:{engine_port(self.config)}" if ":" in host else f"{host}:{engine_port(self.config)}"

    def engine_address_of(self, node_id: str) -> str:
        if node_id == self.config.node.id:
            return self.engine_address()
        seen = self.driver.reports.get(node_id)
        return seen[0].engine_address if seen is not None else ""

    async def manifest_once(self) -> Manifest:
        if self.manifest is None:
            self.manifest = await asyncio.to_thread(load_manifest, self.config)
            self.cached = await asyncio.to_thread(cached_blocks, self.config, self.manifest)
            log.info(
                "model version %s: %d units, %d blocks cached locally",
                self.manifest.merkle_root,
                self.manifest.num_units,
                len(self.cached),
            )
        return self.manifest

    async def checked_manifest(self) -> Manifest | None:
        """The manifest, or None after reporting (once) why this node cannot use it: missing,
        unreadable, malformed, another root than pinned, not signed as required."""
        try:
            return await self.manifest_once()
        except Exception as e:  # every way of not having a usable manifest ends the same: say why
            if not self.manifest_failed:
                self.manifest_failed = True
                reason = str(e) if isinstance(e, MANIFEST_PROBLEMS) else f"{type(e).__name__}: {e}"
                await self.chan.send(
                    Failed("manifest", f"cannot use the model's manifest: {reason}", fatal=True)
                )
            return None

    async def check_manifest(self) -> None:
        await self.checked_manifest()

    async def load_model(self) -> ModelInfo:
        return model_info(await self.manifest_once())

    async def discovery_loop(self) -> None:
        from butterfly.discovery import LocalNode, make_provider

        provider = make_provider(self.config)
        cluster_id = ""
        try:
            # Registries (Consul) list us; static and DNS providers do nothing here.
            local = LocalNode(self.config.node.id, self.transport.advertise, self.config.node.role)
            try:
                await provider.register(local)
            except Exception as e:  # the registry may come later; resolve() keeps retrying
                log.warning("could not register with discovery: %s", e)
            discovered: dict[HostPort, str | None] = {}
            resolve_at = 0.0
            while True:
                raft = self.driver.raft
                if raft is not None and raft.cluster_id and raft.cluster_id != cluster_id:
                    # From now on the transport refuses peers of another bootstrap outright.
                    cluster_id = raft.cluster_id
                    self.transport.set_cluster_id(cluster_id)
                if time.monotonic() >= resolve_at:
                    resolve_at = time.monotonic() + self.config.cluster.discovery_interval_s
                    try:
                        found = await provider.resolve()
                    except Exception as e:  # the last view stands until a round succeeds
                        await self.driver.events.waiting(f"discovery failed: {e}")
                        log.warning("discovery failed: %s", e)
                    else:
                        discovered = {HostPort(p.host, p.port): p.node_id for p in found}
                # Peers heard of through reports are dialed within PEERS_HEARD_S, not a discovery round.
                self.transport.set_peers(self._dial_list(discovered))
                await asyncio.sleep(min(PEERS_HEARD_S, self.config.cluster.discovery_interval_s))
        finally:
            await provider.deregister()
            await provider.close()

    def _dial_list(self, discovered: dict[HostPort, str | None]) -> dict[HostPort, str | None]:
        """What discovery found, and the peers that live peers say they are connected to: a worker
        seeded with the coordinator alone learns the other nodes from it (the stage ring needs every
        stage to reach the next). Only members send reports (the transport authenticates them with
        the cluster secret), and every address heard of is dialed through the same authentication."""
        me = self.transport.advertise
        alive = self.driver.coordinator.alive(self.driver.reports, time.monotonic())
        heard, bad = peers_heard_of(alive.values(), self.config.node.id)
        if len(self._heard_logged) > 4 * MAX_PEERS:
            self._heard_logged.clear()  # bounded whatever peers say: at worst a line is logged again
        for why in bad:
            if why not in self._heard_logged:
                self._heard_logged.add(why)
                log.warning("ignoring a peer address: %s", why)
        for address, (node_id, via) in heard.items():
            said = f"{node_id}@{address}"
            if address not in discovered and said not in self._heard_logged:
                self._heard_logged.add(said)
                log.info("dialing node %s at %s: %s is connected to it", node_id, address, via)
        dial: dict[HostPort, str | None] = {a: n for a, (n, _) in heard.items()}
        dial.update(discovered)
        return {a: n for a, n in dial.items() if a != me}

    async def validated(self, msg: LocalValidated) -> None:
        # Test hook: the unit digests are computed but not yet proven to anyone.
        await hold_if_requested_async("proof", lambda: None)
        try:
            m = await self.manifest_once()
        except Exception as e:
            await self.chan.send(Failed("validation", f"cannot read the manifest: {e}"))
            return
        blocks = LayerRange(msg.start, msg.stop)
        first, last = unit_range_for_blocks(m.num_blocks, blocks)
        have = dict(zip(msg.units, msg.unit_digests, strict=True))
        # Our own manifest first: a mismatch here needs no coordinator to be declared.
        for u, d in have.items():
            if d.hex() != m.units[u].digest:
                await self.chan.send(
                    Failed("validation", f"unit {m.units[u].name} in the arena does not match the manifest")
                )
                return
        missing = [u for u in range(first, last) if u not in have]
        if missing:
            await self.chan.send(Failed("validation", f"units {missing} of blocks {blocks} were not loaded"))
            return
        proof = range_proof_for_blocks(m, blocks)
        await self.driver.local_validated(
            msg.epoch,
            msg.start,
            msg.stop,
            [have[u] for u in range(first, last)],
            list(proof.hashes),
            m.merkle_root,
        )


async def heartbeat(ctx: ChildContext) -> None:
    while True:
        ctx.board.update(ClusterSection, heartbeat_mono_ns=time.monotonic_ns())
        await asyncio.sleep(HEARTBEAT_S)


async def run(ctx: ChildContext, chan: AsyncChannel) -> None:
    beat = asyncio.create_task(heartbeat(ctx))
    child = ClusterChild(ctx, chan)
    ctx.board.update(ClusterSection, quorum_size=ctx.config.cluster.quorum_size)
    tasks: list[asyncio.Task[None]] = []
    try:
        while True:
            cmd = await chan.recv_command()
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, StartCluster) and not tasks:
                await child.transport.start()
                log.info(
                    "cluster transport on %s (advertising %s)",
                    child.transport.address,
                    child.transport.advertise,
                )
                await chan.send(ClusterProgress("discovery"))
                tasks = [asyncio.create_task(child.discovery_loop()), asyncio.create_task(child.driver.run())]
                for t in tasks:
                    t.add_done_callback(_crash_on_error(ctx))
                # Read the manifest now, not when a plan arrives: a node that cannot use it says so
                # at once (and its peers see it), instead of waiting in JOINING.
                tasks.append(asyncio.create_task(child.check_manifest()))
            elif isinstance(cmd, LocalValidated):
                await child.validated(cmd)
            elif isinstance(cmd, NodeFault):
                child.fault = cmd
            else:
                log.warning("cluster ignores %s", type(cmd).__name__)
    except ChannelClosed:
        return
    finally:
        beat.cancel()
        for t in tasks:
            t.cancel()
        await child.transport.close()


def _crash_on_error(ctx: ChildContext) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster task failed", exc_info=task.exception())
            ctx.logs.flush()
            # The supervisor restarts us; a half-working cluster child is worse than none.
            os._exit(70)

    return done


def main() -> None:
    sock = child_socket()
    ctx, sync_chan = bootstrap("cluster", sock)
    # No heartbeat yet: the supervisor gives a child until its serve loop's first beat to start.
    ctx.board.update(ClusterSection, pid=os.getpid())

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
