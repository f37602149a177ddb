"""The cluster driver: runs Raft on asyncio, bootstraps, applies the log, and reports to the supervisor.

One task owns the RaftNode. Each Ready is saved with fsync BEFORE its messages go out (the core's
contract), then committed entries are applied: plans and the serving gate. Time becomes ticks here
(TICK_S). The coordinator's decisions (butterfly.cluster.coordinator) run every cycle while this node
leads; followers only report, validate and obey committed entries.

Founding (the rule in butterfly.raft's docstring): exactly one node, the founder (``cluster.founder``,
by default the lowest address of the seed list), may write a first voter set. Once it sees quorum_size
nodes, at least one of them coordinator-eligible, with a view stable for SETTLE_S (WORKERS_SETTLE_S when
workers must make up the number) and no bootstrapped peer, it picks quorum_size of them
(``first_voters``: coordinator-eligible ones first, workers, which vote but never coordinate, only to make up
the number), saves entry 1 durably, and sends it (``Founding``) to them; every member that holds entry 1
resends it to founding voters that have no state yet. Every other node waits for entry 1 or to be added
as a learner by the leader.

Membership while leading: caught-up learners (coordinator-eligible ones first) are promoted while
there are fewer than quorum_size voters; a voter silent for ``voter_grace_s`` is demoted and a live
learner promoted in its place; a coordinator-eligible learner takes a worker voter's place (promoted,
then the worker demoted), so the voters that may lead are as many as there are; one change at a time
through the log.

This module must not touch the arena or decide plans itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from butterfly.cluster.coordinator import DEAD_AFTER_S, SETTLE_S, Coordinator, ModelInfo
from butterfly.cluster.lease import RENEW_S, LeaderLease, MemberLease, promise_span
from butterfly.cluster.messages import (
    Founding,
    LeasePing,
    LeasePong,
    NodeReport,
    OperationalEntry,
    PeerMessage,
    PlanEntry,
    ValidationReport,
    ValidationVerdict,
    decode_command,
    decode_peer,
    encode,
)
from butterfly.config import HostPort
from butterfly.ipc import PeerFault
from butterfly.raft import (
    AddVoter,
    AppendEntries,
    Bootstrap,
    EntryKind,
    Heartbeat,
    PreVoteRequest,
    RaftConfig,
    RaftNode,
    RaftStorage,
    RemoveVoter,
    Role,
    VoteRequest,
    bootstrap_state,
    decode_conf_change,
    decode_message,
    encode_message,
)
from butterfly.supervisor.childproc import held
from butterfly.weights.layout import LayerRange
from butterfly.weights.manifest import unit_range_for_blocks

log = logging.getLogger("butterfly.cluster")

TICK_S = 0.05
ELECTION_TICKS = 10
# Followers time out after 10-14 ticks (0.50-0.70 s) without a leader: enough spread for 7 voters not
# to split votes, and a failover bounded well under a second.
ELECTION_JITTER_TICKS = 5
HEARTBEAT_TICKS = 2
REPORT_INTERVAL_S = 0.15
CYCLE_S = 0.1
# A node that had a coordinator and lost it for this long stops serving and says so.
LEADERLESS_S = 2.0
# How long a voter that heard its coordinator is sure not to vote for another (butterfly.cluster.lease):
# the longest serving lease there can be.
PROMISE_S = promise_span(TICK_S, ELECTION_TICKS)
# A planned node that has not answered the coordinator's lease pings (in its term) for this long
# stops the whole cluster serving: the pipeline lost a stage. Much shorter than DEAD_AFTER_S, the
# silence that re-plans: not serving is cheap to undo, a re-plan is not. A new coordinator grants
# nothing until every planned node answered it.
SILENT_STOPS_SERVING_S = 1.0

RAFT = "raft"
CLUSTER = "cluster"


def choose_founder(
    discovery_method: str,
    seeds: tuple[HostPort, ...],
    founder: HostPort | None,
    advertise: HostPort,
    role: str = "coordinator",
) -> tuple[bool, str]:
    """(whether this node founds a new cluster, the founder for status). Safe only because every node
    computes the same answer: ``cluster.founder`` when set, else the lowest of the seed list plus the
    coordinator's own address (so every coordinator must list the same set; a worker, often started
    with just one seed, never founds unless ``cluster.founder`` names it). DNS and Consul views are not
    shared facts, so with them nobody founds unless ``cluster.founder`` names the node."""
    if founder is None:
        if discovery_method != "static":
            return False, f"unset: set cluster.founder, {discovery_method} discovery names no founder"
        candidates = {*seeds, advertise} if role == "coordinator" else set(seeds)
        if not candidates:
            return False, "unset: a worker without seed_nodes founds nothing"
        founder = min(candidates, key=lambda a: (a.host, a.port))
    return founder == advertise, str(founder)


WORKERS_SETTLE_S = 2.0
"""How long a founder's view must stay unchanged before workers make up quorum_size's voters."""


def first_voters(roles: dict[str, str], quorum_size: int) -> tuple[str, ...]:
    """The founding voter set from the nodes seen (node id -> role): quorum_size of them, the
    coordinator-eligible ones first (lowest ids first), workers only to make up the number. A worker
    voter votes and stores the log but never coordinates (RaftConfig.can_campaign), so the
    seed's cluster of one coordinator and workers with quorum_size 3 forms, and rides out a lost
    worker, while only the coordinator may lead."""
    ordered = sorted(roles, key=lambda n: (roles[n] != "coordinator", n))
    return tuple(sorted(ordered[:quorum_size]))


class PeerNet(Protocol):
    """The authenticated transport as the driver needs it (butterfly.net implements it)."""

    def send(self, peer: str, channel: str, payload: bytes) -> None: ...

    def peers(self) -> set[str]: ...

    async def recv(self) -> tuple[str, str, bytes]: ...


@dataclass(frozen=True)
class Progress:
    """What the driver tells the supervisor (the cluster process maps it to ipc messages)."""

    phase: str  # discovery | election | assignment
    waiting_reason: str = ""


class Events(Protocol):
    async def progress(self, p: Progress) -> None: ...

    async def plan(self, plan: PlanEntry, term: int) -> bool:
        """Hand this node's part of ``plan`` on; False: not yet (asked again next cycle)."""

    async def operational(self, epoch: int, term: int) -> None: ...

    async def validation_rejected(self, epoch: int, reason: str) -> None: ...

    async def range_accepted(self, epoch: int) -> None: ...

    async def waiting(self, reason: str) -> None:
        """Why the cluster is not moving on, whole ('' when it is); called on every cycle."""

    async def peer_faults(self, faults: list[PeerFault]) -> None:
        """Live peers that report a fault (failed, or retrying, or repairing); called on every cycle."""

    async def plan_applied(self, plan: PlanEntry) -> None:
        """A newer plan was applied (every node's range, for status), whether or not it assigns us."""

    def board(self, **fields: object) -> None: ...


class ClusterDriver:
    def __init__(
        self,
        node_id: str,
        cluster_name: str,
        role: str,
        quorum_size: int,
        state_dir: Path,
        net: PeerNet,
        events: Events,
        local_report: Callable[[], NodeReport],
        load_model: Callable[[], Awaitable[ModelInfo]],
        reserve_bytes: int,
        *,
        is_founder: bool = False,
        founder: str = "",
        voter_grace_s: float = 30.0,
    ) -> None:
        self.node_id = node_id
        self.cluster_name = cluster_name
        self.role = role
        self.quorum_size = quorum_size
        self.dir = state_dir / "raft"
        self.net = net
        self.events = events
        self.local_report = local_report
        self.load_model = load_model
        self.coordinator = Coordinator(node_id, quorum_size, reserve_bytes)
        self.is_founder = is_founder
        self.founder = founder
        self.voter_grace_s = voter_grace_s
        self.reports: dict[str, tuple[NodeReport, float]] = {}
        self.leading_since = 0.0
        self.last_membership = ""
        self.storage: RaftStorage | None = None
        self.raft: RaftNode | None = None
        self.plan: PlanEntry | None = None
        self.operational_epoch = 0
        self.model: ModelInfo | None = None
        self.model_error = ""
        self.validated: ValidationReport | None = None
        self.verdict: ValidationVerdict | None = None
        self.reported_plan_epoch = 0
        self.reported_operational = 0
        self.last_leader_seen = time.monotonic()
        self.last_progress: Progress | None = None
        self.last_description = ""
        # Until then (set at bootstrap for the lowest voter) campaign every cycle while no leader is
        # known: voters that bootstrap a moment later ignore an early pre-vote, and waiting for the
        # randomized timeout would cost 0.5-1 s. Pre-vote does not change the term, so this is safe.
        self.campaign_until = 0.0
        self.judge_after = 0.0
        self._ready_lock = asyncio.Lock()
        self._view: frozenset[str] = frozenset()
        self._view_since = time.monotonic()
        # Serving lease (butterfly.cluster.lease). heard: when a Raft message of the current leader
        # at the current term last arrived; no_vote_until: every promise this node made (as a voter,
        # or as the coordinator it was) ends before then, and it drops vote requests until then.
        self.leader_lease: LeaderLease | None = None
        self.leader_end = 0.0
        self.member_lease = MemberLease()
        self.heard: tuple[str, int, float] = ("", 0, 0.0)
        self.no_vote_until = 0.0
        self.serve_epoch = 0
        # Why nobody may serve ('' when they may): the coordinator's own, and the one its pings carry.
        self.serve_reason = ""
        self.lead_waiting = ""
        self.coordinator_reason = ""
        self._lease_on_board = (0, 0)

    # ---- raft plumbing -------------------------------------------------------------------------

    def _raft_config(self) -> RaftConfig:
        return RaftConfig(
            election_ticks=ELECTION_TICKS,
            election_jitter_ticks=ELECTION_JITTER_TICKS,
            heartbeat_ticks=HEARTBEAT_TICKS,
            can_campaign=self.role == "coordinator",
        )

    def open_storage(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = RaftStorage.open(self.dir / "raft.log")
        persisted = self.storage.load()
        if self.storage.recovered_torn_bytes:
            log.warning(
                "dropped a torn last Raft record (%d bytes) left by a crash",
                self.storage.recovered_torn_bytes,
            )
        self.raft = RaftNode(self.node_id, self._raft_config(), persisted, secrets.randbits(63))
        if persisted is not None:
            log.info(
                "restarted from Raft state: term %d, %d entries, voters %s",
                self.raft.term,
                self.raft.last_index,
                ",".join(self.raft.voters),
            )

    async def _process_ready(self) -> None:
        # Saving awaits a thread; the tick, receive and cycle tasks all land here, and only one
        # Ready may be outstanding at a time.
        async with self._ready_lock:
            await self._drain_ready()

    async def _drain_ready(self) -> None:
        raft, storage = self.raft, self.storage
        assert raft is not None and storage is not None
        while raft.has_ready():
            rd = raft.ready()
            # fsync before any message of this Ready leaves: the core's safety contract.
            await asyncio.to_thread(storage.save_ready, rd)
            for m in rd.messages:
                self.net.send(m.dst, RAFT, encode_message(m))
            for entry in rd.committed_entries:
                if entry.kind is EntryKind.NORMAL and entry.data:
                    await self._apply(entry.data)
            for change in rd.role_changes:
                self.events.board(is_coordinator=int(change.role is Role.LEADER))
                self._role_changed(change.role, change.term)
            raft.advance(rd)
        membership = 1 if self.node_id in raft.voters else 2 if self.node_id in raft.learners else 0
        self.events.board(term=raft.term, coordinator=raft.leader or "", membership=membership)

    async def _apply(self, data: bytes) -> None:
        try:
            cmd = decode_command(data)
        except Exception as e:  # a committed entry we cannot read is a bug or a newer version
            log.error("cannot decode committed entry: %s", e)
            return
        if isinstance(cmd, PlanEntry):
            if self.plan is None or cmd.epoch > self.plan.epoch:
                self.plan = cmd
                log.info(
                    "applied plan epoch %d (term %d): %s",
                    cmd.epoch,
                    cmd.term,
                    ", ".join(f"{a.node_id} {a.start}-{a.stop - 1}" for a in cmd.assignments),
                    extra={"fields": {"EPOCH": cmd.epoch, "TERM": cmd.term}},
                )
                self.events.board(epoch=cmd.epoch, model_root=cmd.manifest_root)
                await self.events.plan_applied(cmd)
        elif isinstance(cmd, OperationalEntry):
            # Fenced: only the current plan's epoch can open the gate.
            if self.plan is not None and cmd.epoch == self.plan.epoch:
                self.operational_epoch = cmd.epoch
                log.info(
                    "applied operational at epoch %d (term %d)",
                    cmd.epoch,
                    cmd.term,
                    extra={"fields": {"EPOCH": cmd.epoch, "TERM": cmd.term}},
                )

    # ---- bootstrap -----------------------------------------------------------------------------

    def _cluster_id(self) -> str:
        # Random: only the founder ever makes one, and a second founding (a misconfiguration) must
        # not produce a cluster the transport cannot tell apart from the first.
        return f"{self.cluster_name}/{secrets.token_hex(8)}"

    async def _adopt(self, voters: tuple[str, ...], cluster_id: str) -> bool:
        """Save entry 1 naming ``voters`` and start Raft from it; False if state arrived meanwhile."""
        state = bootstrap_state(list(voters), cluster_id)
        assert self.storage is not None
        async with self._ready_lock:
            if self.raft is not None and self.raft.last_index > 0:
                return False  # entries from an existing cluster arrived while we waited
            await asyncio.to_thread(self.storage.save, state.hard_state, list(state.entries))
            self.raft = RaftNode(self.node_id, self._raft_config(), state, secrets.randbits(63))
        log.info("bootstrapped cluster %s with voters %s", cluster_id, ",".join(voters))
        # The lowest voter campaigns at once: election costs one round trip, not a timeout.
        if voters[0] == self.node_id:
            self.campaign_until = time.monotonic() + ELECTION_TICKS * TICK_S
        return True

    def founding(self) -> Founding | None:
        """Entry 1 of our log as a Founding message (None before we have one)."""
        raft = self.raft
        if raft is None or raft.last_index == 0:
            return None
        first = raft.entries(1, 2)[0]
        change = decode_conf_change(first.data)
        if not isinstance(change, Bootstrap):
            return None
        return Founding(voters=change.voters, cluster_id=change.cluster_id)

    def _resend_founding(self, now: float) -> None:
        """Founding voters that report no state yet get entry 1 again (from any member: it is the same
        entry everywhere), so the founder dying right after founding does not strand them."""
        found = self.founding()
        if found is None:
            return
        alive = self.coordinator.alive(self.reports, now)
        for v in found.voters:
            if v != self.node_id and v in alive and not alive[v].cluster_id:
                self.net.send(v, CLUSTER, encode(found))

    async def _on_founding(self, peer: str, found: Founding) -> None:
        raft = self.raft
        if raft is None or raft.last_index > 0 or self.node_id not in found.voters:
            return
        if len(set(found.voters)) != len(found.voters) or not found.cluster_id:
            log.warning("ignoring a malformed founding message from %s", peer)
            return
        log.info("founding entry from %s: voters %s", peer, ",".join(found.voters))
        await self._adopt(tuple(sorted(found.voters)), found.cluster_id)

    async def _try_bootstrap(self, now: float) -> str:
        """One founding step; returns what it waits for ('' once Raft has state)."""
        raft = self.raft
        assert raft is not None
        if raft.last_index > 0:
            return ""
        if self.role != "coordinator" and not self.is_founder:
            return "waiting to be added to the cluster by its coordinator (role worker never bootstraps)"
        alive = self.coordinator.alive(self.reports, now)
        if any(r.cluster_id for r in alive.values()):
            return "a bootstrapped cluster exists: waiting to be added as a learner"
        # The founder need not be a voter itself (a worker may be the lowest address).
        roles = {n: r.role for n, r in alive.items()}
        roles[self.node_id] = self.role
        seen = frozenset(roles)
        if seen != self._view:
            self._view, self._view_since = seen, now
        coordinators = sum(1 for r in roles.values() if r == "coordinator")
        if len(seen) < self.quorum_size:
            return f"found {len(seen)} of quorum_size {self.quorum_size} nodes"
        if not coordinators:
            return f"found {len(seen)} nodes, none with role coordinator: none of them could lead"
        if not self.is_founder:
            who = f" ({self.founder})" if self.founder else ""
            return f"waiting for the founder{who} to found the cluster"
        if now - self._view_since < SETTLE_S and self.quorum_size > 1:
            return "discovery view settling"
        if coordinators < self.quorum_size and now - self._view_since < WORKERS_SETTLE_S:
            # Coordinators started together show up within this: workers are voters only when there
            # are not enough of them, and a first plan without a late one would be re-planned at once.
            return (
                f"found {coordinators} coordinator-eligible node(s) of the {self.quorum_size} voters; "
                f"workers make up the number if no other shows up within {WORKERS_SETTLE_S:g} s"
            )
        voters = first_voters(roles, self.quorum_size)
        if not await self._adopt(voters, self._cluster_id()):
            return ""
        self._resend_founding(now)
        return ""

    # ---- membership while leading ----------------------------------------------------------------

    def _membership_step(self, now: float) -> None:
        """At most one voter change per cycle (the core refuses a second while one is uncommitted)."""
        raft = self.raft
        assert raft is not None and raft.role is Role.LEADER
        alive = self.coordinator.alive(self.reports, now)
        voters = raft.voters

        def last_seen(n: str) -> float:
            seen = self.reports.get(n)
            # A voter never heard from since we lead counts from when we started leading.
            return max(seen[1] if seen else 0.0, self.leading_since)

        dead = sorted(v for v in voters if v != self.node_id and now - last_seen(v) > self.voter_grace_s)
        # Coordinator-eligible learners first: the more voters may lead, the fewer losses stop the log.
        spares = sorted(
            (
                n
                for n in raft.learners
                if n in alive and not alive[n].failed and raft.match_index(n) >= raft.commit
            ),
            key=lambda n: (alive[n].role != "coordinator", n),
        )
        # Workers vote only to make up quorum_size (founding takes them when too few coordinators are
        # up): a coordinator-eligible learner takes a worker's vote, added first, the worker then let go.
        worker_voters = sorted(v for v in voters if v in alive and alive[v].role != "coordinator")
        standing = [n for n in spares if alive[n].role == "coordinator"]
        change: AddVoter | RemoveVoter | None = None
        why = ""
        if len(voters) < self.quorum_size and spares:
            change, why = AddVoter(spares[0]), f"{len(voters)} voter(s), quorum_size {self.quorum_size}"
        elif dead and spares:
            change = RemoveVoter(dead[0])
            why = f"silent for more than voter_grace_s ({self.voter_grace_s:g} s); {spares[0]} replaces it"
        elif worker_voters and standing and len(voters) <= self.quorum_size:
            change = AddVoter(standing[0])
            why = f"coordinator-eligible, to take the vote of worker {worker_voters[0]}"
        elif worker_voters and len(voters) > self.quorum_size:
            change = RemoveVoter(worker_voters[0])
            why = f"a worker, and {len(voters)} voters where quorum_size is {self.quorum_size}"
        if change is None:
            return
        refusal = raft.conf_change_refusal(change)
        what = f"{'promoting' if isinstance(change, AddVoter) else 'demoting'} {change.node_id} ({why})"
        if refusal:
            if what != self.last_membership:
                log.info("membership: %s waits: %s", what, refusal)
                self.last_membership = what
            return
        raft.propose_conf_change(change)
        log.warning("membership: %s", what)
        self.last_membership = ""

    # ---- peer messages -------------------------------------------------------------------------

    async def _on_peer(self, peer: str, channel: str, payload: bytes) -> None:
        raft = self.raft
        assert raft is not None
        if channel == RAFT:
            try:
                msg = decode_message(payload)
            except Exception as e:
                log.warning("dropping malformed Raft message from %s: %s", peer, e)
                return
            if msg.src != peer or msg.dst != self.node_id:
                log.warning("dropping Raft message from %s claiming src=%s dst=%s", peer, msg.src, msg.dst)
                return
            report = self.reports.get(peer)
            if (
                report
                and report[0].cluster_id
                and raft.cluster_id
                and report[0].cluster_id != raft.cluster_id
            ):
                log.warning("dropping Raft message from %s of another cluster %s", peer, report[0].cluster_id)
                return
            now = time.monotonic()
            if isinstance(msg, PreVoteRequest | VoteRequest) and now < self._no_vote_until(now):
                return  # a promise not to elect anyone else is still running (butterfly.cluster.lease)
            raft.step(msg)
            if isinstance(msg, AppendEntries | Heartbeat) and raft.leader == peer and msg.term == raft.term:
                self.heard = (peer, msg.term, now)
            await self._process_ready()
            return
        if channel != CLUSTER:
            return
        try:
            pm: PeerMessage = decode_peer(payload)
        except Exception as e:
            log.warning("dropping malformed cluster message from %s: %s", peer, e)
            return
        if isinstance(pm, NodeReport):
            if pm.node_id != peer:
                log.warning("dropping report from %s claiming to be %s", peer, pm.node_id)
            elif pm.cluster_name != self.cluster_name:
                log.warning("ignoring %s of cluster %r (we are %r)", peer, pm.cluster_name, self.cluster_name)
            else:
                self.reports[peer] = (pm, time.monotonic())
        elif isinstance(pm, Founding):
            await self._on_founding(peer, pm)
        elif isinstance(pm, ValidationReport):
            if pm.node_id == peer and raft.role is Role.LEADER:
                verdict = self.coordinator.on_validation(pm, self.plan)
                if verdict is None:
                    self._log_no_verdict(pm)
                else:
                    self._log_verdict(verdict)
                    self.net.send(peer, CLUSTER, encode(verdict))
        elif isinstance(pm, ValidationVerdict):
            if raft.leader == peer and pm.node_id == self.node_id:
                await self._on_verdict(pm)
        elif isinstance(pm, LeasePing):
            self._on_lease_ping(peer, pm)
        elif isinstance(pm, LeasePong):
            if raft.role is Role.LEADER and self.leader_lease is not None:
                self.leader_lease.on_pong(time.monotonic(), peer, pm)

    # ---- serving lease (butterfly.cluster.lease) -----------------------------------------------

    def _no_vote_until(self, now: float) -> float:
        raft = self.raft
        if raft is not None and raft.role is Role.LEADER and self.leader_lease is not None:
            return max(self.no_vote_until, self.leader_end)
        return self.no_vote_until

    def _role_changed(self, role: Role, term: int) -> None:
        if role is Role.LEADER:
            self.leader_lease = LeaderLease(self.node_id, term, PROMISE_S)
            self.leader_end = 0.0
            self.member_lease.drop()
        elif self.leader_lease is not None:
            # Stepping down: no vote for anyone until every lease this node granted has ended.
            self.no_vote_until = max(self.no_vote_until, self.leader_end)
            self.leader_lease = None
            self.leader_end = 0.0
        self._lease_to_board()

    def _on_lease_ping(self, peer: str, ping: LeasePing) -> None:
        raft = self.raft
        assert raft is not None
        if raft.leader != peer or ping.term != raft.term or raft.role is not Role.FOLLOWER:
            return
        now = time.monotonic()
        promise = 0.0
        lead, term, heard = self.heard
        # Learners promise too: one may be a voter that has not yet applied its promotion, and a
        # candidate counts the voters of its own configuration (one-at-a-time changes overlap).
        if (lead, term) == (peer, raft.term):
            promise = max(0.0, heard + PROMISE_S - now)
            self.no_vote_until = max(self.no_vote_until, now + promise)
        self.coordinator_reason = ping.reason
        pong = self.member_lease.on_ping(now, ping, promise)
        self.net.send(peer, CLUSTER, encode(pong))
        self._lease_to_board()

    def _lease_round(self, now: float) -> None:
        """The coordinator's ping to every member (and its own lease); a member's lease check."""
        raft = self.raft
        if raft is None:
            return
        ll = self.leader_lease
        if raft.role is Role.LEADER and ll is not None:
            ll.new_round(now)
            self.leader_end = max(self.leader_end, ll.end(now, raft.voters))
            for member in (set(raft.voters) | set(raft.learners)) - {self.node_id}:
                ping = ll.ping(now, member, self.serve_epoch, self.leader_end, self.serve_reason)
                self.net.send(member, CLUSTER, encode(ping))
        elif self.member_lease.until and (raft.leader != self.heard[0] or raft.term != self.heard[1]):
            self.member_lease.drop()  # granted by a coordinator that is no longer ours
        self._lease_to_board(now)

    def _lease_to_board(self, now: float | None = None) -> None:
        raft = self.raft
        if raft is not None and raft.role is Role.LEADER and self.leader_lease is not None:
            until, epoch = (self.leader_end, self.serve_epoch) if self.serve_epoch else (0.0, 0)
        else:
            until, epoch = self.member_lease.until, self.member_lease.epoch
        value = (int(until * 1e9), epoch)
        if value != self._lease_on_board:
            self._lease_on_board = value
            self.events.board(lease_until_mono_ns=value[0], lease_epoch=value[1])

    def _leader_serve_epoch(self, now: float) -> tuple[int, str]:
        """The epoch the coordinator lets members serve: the operational plan, while every planned
        node is alive, not failed and answering this coordinator's pings, and no newer plan is on its
        way; otherwise 0 (everybody stops) and why, naming the node and its blocks."""
        plan = self.plan
        if plan is None:
            return 0, "no plan is committed yet"
        if self.coordinator.proposed_epoch > plan.epoch:
            return 0, f"plan epoch {self.coordinator.proposed_epoch} proposed, waiting for it to commit"
        if self.operational_epoch != plan.epoch:
            return 0, self.lead_waiting or f"epoch {plan.epoch} is not operational yet"
        alive = self.coordinator.alive(self.reports, now)
        ll = self.leader_lease
        for a in plan.assignments:
            who = f"{a.node_id} (blocks {a.start}-{a.stop - 1})"
            if a.node_id not in alive:
                return 0, f"{who} is not reporting"
            if alive[a.node_id].failed:
                return 0, f"{who} failed: {alive[a.node_id].fault}"
            if ll is None or not ll.following(now, a.node_id, SILENT_STOPS_SERVING_S):
                return 0, f"{who} has not answered the coordinator for over {SILENT_STOPS_SERVING_S:.1f}s"
        return plan.epoch, ""

    def _log_verdict(self, v: ValidationVerdict) -> None:
        if v.ok:
            log.info("validation of %s at epoch %d accepted", v.node_id, v.epoch)
        else:
            log.warning("validation of %s at epoch %d rejected: %s", v.node_id, v.epoch, v.reason)

    def _log_no_verdict(self, r: ValidationReport) -> None:
        log.info(
            "validation of %s is for epoch %d, the applied plan is epoch %s: no verdict",
            r.node_id,
            r.epoch,
            self.plan.epoch if self.plan else None,
        )

    async def _on_verdict(self, v: ValidationVerdict) -> None:
        # A verdict on a superseded plan says nothing about this node's weights for the current one.
        if (
            self.validated is None
            or v.epoch != self.validated.epoch
            or self.plan is None
            or v.epoch != self.plan.epoch
        ):
            return
        self.verdict = v
        if v.ok:
            await self.events.range_accepted(v.epoch)
        else:
            self.validated = None
            await self.events.validation_rejected(v.epoch, v.reason)

    # ---- local validation ----------------------------------------------------------------------

    async def local_validated(
        self,
        epoch: int,
        start: int,
        stop: int,
        unit_digests: list[bytes],
        proof: list[bytes],
        manifest_root: str,
    ) -> None:
        if self.plan is None or epoch != self.plan.epoch:
            log.info(
                "ignoring local validation for epoch %d (plan epoch %s)",
                epoch,
                self.plan.epoch if self.plan else None,
            )
            return
        first, _ = unit_range_for_blocks(self.plan.num_blocks, LayerRange(start, stop))
        # A fresh local validation (a reload, a restarted child) must be accepted again before this
        # node reports operational again.
        self.reported_operational = 0
        self.validated = ValidationReport(
            epoch, self.node_id, start, stop, manifest_root, first, unit_digests, proof
        )
        self.verdict = None
        await self._send_validation()

    async def _send_validation(self) -> None:
        raft = self.raft
        if self.validated is None or raft is None or raft.leader is None:
            return
        if raft.leader == self.node_id:
            verdict = self.coordinator.on_validation(self.validated, self.plan)
            if verdict is None:
                self._log_no_verdict(self.validated)
            else:
                self._log_verdict(verdict)
                await self._on_verdict(verdict)
        else:
            self.net.send(raft.leader, CLUSTER, encode(self.validated))

    # ---- loops ---------------------------------------------------------------------------------

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            assert self.raft is not None
            if held("election") and self.raft.leader is None:
                continue
            self.raft.tick()
            await self._process_ready()

    async def lease_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            self._lease_round(time.monotonic())

    async def recv_loop(self) -> None:
        while True:
            peer, channel, payload = await self.net.recv()
            await self._on_peer(peer, channel, payload)

    async def report_loop(self) -> None:
        while True:
            base = self.local_report()
            raft = self.raft
            report = msgspec.structs.replace(
                base,
                cluster_id=(raft.cluster_id or "") if raft else "",
                validated_epoch=self.validated.epoch if self.validated else 0,
            )
            self.reports[self.node_id] = (report, time.monotonic())
            payload = encode(report)
            for peer in self.net.peers():
                self.net.send(peer, CLUSTER, payload)
            # Re-send an unanswered validation: the coordinator may have changed or missed it.
            if self.validated is not None and self.verdict is None:
                await self._send_validation()
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def cycle_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(CYCLE_S)
            now = time.monotonic()
            if now - last - CYCLE_S > DEAD_AFTER_S / 2:
                # This process was not scheduled: peers' reports only look old. Let them refresh
                # before judging anyone dead.
                self.judge_after = now + DEAD_AFTER_S
                log.warning(
                    "cluster loop ran %.1fs late: not judging peers for %.1fs", now - last, DEAD_AFTER_S
                )
            last = now
            await self.cycle(now)

    async def cycle(self, now: float) -> None:
        raft = self.raft
        assert raft is not None
        alive = self.coordinator.alive(self.reports, now)
        self.events.board(cluster_size=len(alive), operational_nodes=self._operational_nodes(now, alive))
        await self.events.peer_faults(
            [
                PeerFault(node_id=n, reason=r.fault, failed=r.failed, start=r.fault_start, stop=r.fault_stop)
                for n, r in sorted(alive.items())
                if r.fault and n != self.node_id
            ]
        )
        if raft.last_index == 0:
            waiting = "held by a test" if held("discovery") else await self._try_bootstrap(now)
            if waiting:
                await self._progress(Progress("discovery", waiting))
                return
            raft = self.raft
            assert raft is not None
        if (
            now < self.campaign_until
            and raft.leader is None
            and raft.role in (Role.FOLLOWER, Role.PRE_CANDIDATE)
            and not held("election")
        ):
            raft.campaign()
            await self._process_ready()
        if raft.leader is not None:
            self.last_leader_seen = now
        self._resend_founding(now)
        if raft.role is Role.LEADER:
            if self.leading_since == 0.0:
                self.leading_since = now
            await self._lead(now)
            if raft.role is Role.LEADER and now >= self.judge_after:
                self._membership_step(now)
                await self._process_ready()
        else:
            self.leading_since = 0.0
        await self._report_to_supervisor(now)

    async def _lead(self, now: float) -> None:
        raft = self.raft
        assert raft is not None
        serve, self.serve_reason = self._leader_serve_epoch(now)
        if serve != self.serve_epoch:
            self.serve_epoch = serve
            log.info(
                "serving leases now name epoch %d%s",
                serve,
                "" if serve else " (nobody serves)",
                extra={"fields": {"TERM": raft.term, "EPOCH": serve}},
            )
            self._lease_round(now)  # revoke (or grant) now, not at the next round
        if held("assignment") or now < self.judge_after:
            return
        if self.model is None:
            try:
                self.model = await self.load_model()
                self.model_error = ""
            except Exception as e:
                self.model_error = f"cannot load the model manifest: {e}"
        members = set(raft.voters) | set(raft.learners)
        res = self.coordinator.run_cycle(
            now,
            raft.term,
            self.reports,
            members,
            self.plan,
            self.operational_epoch,
            self.model,
            self.model_error,
        )
        for learner in res.learners:
            raft.propose_add_learner(learner)
            log.info("adding %s to the cluster as a learner", learner)
        for p in res.proposals:
            raft.propose(encode(p))
        if res.description != self.last_description:
            self.last_description = res.description
            log.info("coordinator: %s", res.description, extra={"fields": {"TERM": raft.term}})
        self.lead_waiting = res.waiting_reason
        if self.plan is None or self.plan.range_of(self.node_id) is None:
            await self.events.waiting(res.waiting_reason)
        await self._process_ready()

    async def _report_to_supervisor(self, now: float) -> None:
        raft = self.raft
        assert raft is not None
        plan = self.plan
        if raft.leader is None:
            if plan is None or now - self.last_leader_seen < LEADERLESS_S:
                if plan is None:
                    await self._progress(Progress("election"))
                return
            await self._progress(
                Progress("election", f"no coordinator for {now - self.last_leader_seen:.1f}s")
            )
            self.reported_plan_epoch = 0
            self.reported_operational = 0
            return
        if plan is None:
            silent = self._leader_silence(now)
            await self._progress(
                Progress("assignment", f"waiting for the coordinator's plan{': ' if silent else ''}{silent}")
            )
            return
        mine = plan.range_of(self.node_id)
        if mine is None:
            await self._progress(
                Progress("assignment", f"no layers assigned to this node in epoch {plan.epoch}")
            )
            return
        if self.reported_plan_epoch != plan.epoch:
            if not await self.events.plan(plan, raft.term):
                return
            self.reported_plan_epoch = plan.epoch
            self.last_progress = None
        if (
            self.operational_epoch == plan.epoch
            and self.reported_operational != plan.epoch
            and self.verdict is not None
            and self.verdict.ok
            and self.verdict.epoch == plan.epoch
        ):
            self.reported_operational = plan.epoch
            await self.events.operational(plan.epoch, raft.term)
        # The waiting reason is current: '' while the cluster serves this plan, else the coordinator's
        # reason, which names the node and blocks that hold it up.
        serving = self._lease_epoch(now) == plan.epoch
        leading = raft.role is Role.LEADER
        await self.events.waiting(
            ""
            if serving
            else (self.lead_waiting or self.serve_reason)
            if leading
            else self.coordinator_reason
        )

    def _leader_silence(self, now: float) -> str:
        """Why the leader this node knows is not worth waiting for, when it has gone silent: a worker
        never stands for election, so where no coordinator-eligible node is left it keeps a dead
        coordinator as its leader, and only this says so."""
        raft = self.raft
        leader = raft.leader if raft is not None else None
        if leader is None or leader == self.node_id:
            return ""
        heard = self.reports.get(leader)
        if heard is not None and now - heard[1] < DEAD_AFTER_S:
            return ""
        since = f" for {now - heard[1]:.1f}s" if heard is not None else ""
        return f"coordinator {leader} has not been heard from{since}"

    def _lease_epoch(self, now: float) -> int:
        """The epoch this node holds a live serving lease for (0: none)."""
        raft = self.raft
        if raft is not None and raft.role is Role.LEADER and self.leader_lease is not None:
            return self.serve_epoch if self.leader_end > now else 0
        return self.member_lease.epoch if self.member_lease.until > now else 0

    def _operational_nodes(self, now: float, alive: dict[str, NodeReport]) -> int:
        """Planned nodes serving the current plan as far as this node knows: all live planned ones
        while it holds a lease for that plan, none otherwise; never more than the nodes it sees."""
        plan = self.plan
        if plan is None or self._lease_epoch(now) != plan.epoch:
            return 0
        return sum(1 for a in plan.assignments if a.node_id in alive and not alive[a.node_id].failed)

    async def _progress(self, p: Progress) -> None:
        if p != self.last_progress:
            self.last_progress = p
            await self.events.waiting(p.waiting_reason)
            await self.events.progress(p)

    async def run(self) -> None:
        self.open_storage()
        await asyncio.gather(
            self.tick_loop(), self.recv_loop(), self.report_loop(), self.cycle_loop(), self.lease_loop()
        )
