"""Deterministic simulation of butterfly.raft clusters, for tests only.

Two harnesses share one in-memory disk model:

* :class:`Lockstep` — a synchronous network for scenario tests (the paper and core tests): every Ready
  is persisted, its messages queued, :meth:`Lockstep.stabilize` delivers until the cluster is quiet.
  Links can be cut, nodes isolated, crashed and restarted.
* :class:`Simulation` — one seeded chaos run: N nodes, a network with loss, duplication, reordering,
  delay, random partitions and one-way link failures, crashes (also in the middle of handling a Ready,
  between its write and its fsync: the disk then loses what was never synced) and restarts from
  exactly what was fsync'd, on a fake clock of ticks. The cluster is founded inside the run as the
  driver does it (one founder writes entry 1 and sends it; members resend it), the leader changes
  voters one at a time, and the log carries real plan and operational entries
  (``butterfly.cluster.messages``) made by the real planner, with a model of the serving gate. Raft's
  safety invariants and the plan/epoch invariants are checked after every step; then a liveness phase
  heals everything and requires one leader and converged, identically applied logs within a bound.
  Every failure is an :class:`InvariantViolation` whose message starts with the seed, so
  ``run_simulation(seed, params)`` replays it exactly.

Nothing here reads a clock or global randomness; Python's per-process hash seed only salts the chain
hashes, which are compared within one process, so runs replay across processes too.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from butterfly.cluster.messages import Assignment, OperationalEntry, PlanEntry, decode_command, encode
from butterfly.planner import Assignment as PlanAssignment
from butterfly.planner import ModelSizes, NodeCapacity, Plan, plan_partition
from butterfly.raft import (
    AddVoter,
    AppendResponse,
    Bootstrap,
    Entry,
    EntryKind,
    HardState,
    Message,
    NodeId,
    PersistedState,
    RaftConfig,
    RaftInvariantError,
    RaftNode,
    Ready,
    RemoveVoter,
    Role,
    VoteResponse,
    bootstrap_state,
    decode_conf_change,
)
from butterfly.weights.layout import LayerRange

NodeFactory = Callable[[NodeId, RaftConfig, PersistedState | None, int], RaftNode]


class InvariantViolation(AssertionError):
    """A Raft safety or liveness property failed in a simulation; the message names the seed."""


class MemDisk:
    """The model of :class:`butterfly.raft.RaftStorage`: ``write`` puts a record in the page cache
    (``hard``/``entries`` show it), ``fsync`` makes everything written durable (``durable_hard`` /
    ``durable_entries``), and ``crash`` loses whatever was written but never synced. One record is
    atomic (RaftStorage cuts a torn last record on open). ``save`` is write + fsync."""

    def __init__(self, initial: PersistedState | None = None) -> None:
        self.hard = initial.hard_state if initial is not None else HardState()
        self.entries: list[Entry] = list(initial.entries) if initial is not None else []
        self.durable_hard = self.hard
        self.durable_entries = list(self.entries)

    def write(self, hard: HardState | None, entries: Sequence[Entry]) -> None:
        if entries:
            del self.entries[entries[0].index - 1 :]
            self.entries.extend(entries)
        if hard is not None:
            self.hard = hard

    def fsync(self) -> None:
        self.durable_hard = self.hard
        self.durable_entries = list(self.entries)

    def crash(self) -> None:
        self.hard = self.durable_hard
        self.entries = list(self.durable_entries)

    def save(self, hard: HardState | None, entries: Sequence[Entry]) -> None:
        self.write(hard, entries)
        self.fsync()

    def load(self) -> PersistedState | None:
        if self.durable_hard == HardState() and not self.durable_entries:
            return None
        return PersistedState(hard_state=self.durable_hard, entries=tuple(self.durable_entries))


def take(node: RaftNode) -> Ready:
    """The node's Ready, acknowledged at once (as if persisted, sent and applied)."""
    rd = node.ready()
    node.advance(rd)
    return rd


def state_with_terms(
    voters: Sequence[NodeId], terms: Sequence[int], *, term: int | None = None, commit: int = 1
) -> PersistedState:
    """A persisted state whose log is the bootstrap entry followed by entries of ``terms`` (index 2 on).
    An entry's data is derived from its index and term, so equal (index, term) means equal entries on
    every node, as Raft's log matching property requires of real logs."""
    boot = bootstrap_state(voters, cluster_id="lockstep")
    entries = list(boot.entries)
    for index, entry_term in enumerate(terms, start=2):
        entries.append(Entry(index, entry_term, EntryKind.NORMAL, b"%d@%d" % (index, entry_term)))
    last_term = entries[-1].term
    return PersistedState(HardState(term=term or last_term, vote=None, commit=commit), tuple(entries))


# -- lockstep network for scenario tests -------------------------------------------------------------


class Lockstep:
    """A synchronous in-memory cluster: bootstrapped ``voters`` plus fresh ``learners`` (not yet added)."""

    def __init__(
        self,
        voters: Sequence[NodeId],
        *,
        learners: Sequence[NodeId] = (),
        config: RaftConfig | None = None,
        configs: dict[NodeId, RaftConfig] | None = None,
        persisted: dict[NodeId, PersistedState] | None = None,
        node_factory: NodeFactory = RaftNode,
        seed: int = 0,
    ) -> None:
        base = config or RaftConfig(election_ticks=10, heartbeat_ticks=1)
        self.configs = {n: (configs or {}).get(n, base) for n in (*voters, *learners)}
        self.factory = node_factory
        self.seed = seed
        boot = bootstrap_state(voters, cluster_id="lockstep")
        initial = {n: boot for n in voters} | (persisted or {})
        self.disks = {n: MemDisk(initial.get(n)) for n in self.configs}
        self.nodes: dict[NodeId, RaftNode] = {}
        self.applied: dict[NodeId, list[Entry]] = {}
        self.queue: deque[Message] = deque()
        self.cut: set[tuple[NodeId, NodeId]] = set()
        self.crashed: set[NodeId] = set()
        for n in self.configs:
            self.restart(n)

    def restart(self, node_id: NodeId) -> RaftNode:
        """(Re)start ``node_id`` from its disk: only what was persisted survives."""
        self.crashed.discard(node_id)
        self.seed += 1
        node = self.factory(node_id, self.configs[node_id], self.disks[node_id].load(), self.seed)
        self.nodes[node_id] = node
        self.applied[node_id] = []
        self.flush(node_id)
        return node

    def crash(self, node_id: NodeId) -> None:
        self.crashed.add(node_id)

    def flush(self, node_id: NodeId) -> tuple[Message, ...]:
        """Handle the node's Ready per its contract; the messages it sent (before link cuts)."""
        node = self.nodes[node_id]
        if node_id in self.crashed or not node.has_ready():
            return ()
        rd = node.ready()
        self.disks[node_id].save(rd.hard_state, rd.entries)
        for m in rd.messages:
            if (m.src, m.dst) not in self.cut and m.dst not in self.crashed:
                self.queue.append(m)
        self.applied[node_id].extend(rd.committed_entries)
        node.advance(rd)
        return rd.messages

    def send(self, *messages: Message) -> None:
        self.queue.extend(messages)

    def stabilize(self, max_messages: int = 100_000) -> int:
        """Deliver queued messages (and everything they cause) until none is left; how many."""
        delivered = 0
        while self.queue:
            m = self.queue.popleft()
            if m.dst in self.crashed or m.dst not in self.nodes or (m.src, m.dst) in self.cut:
                continue
            self.nodes[m.dst].step(m)
            self.flush(m.dst)
            delivered += 1
            if delivered > max_messages:
                raise AssertionError("lockstep network did not quiesce")
        return delivered

    def tick(self, node_id: NodeId, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.nodes[node_id].tick()
            self.flush(node_id)

    def tick_all(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for n in self.nodes:
                if n not in self.crashed:
                    self.tick(n)
            self.stabilize()

    def elect(self, node_id: NodeId) -> RaftNode:
        node = self.nodes[node_id]
        node.campaign()
        self.flush(node_id)
        self.stabilize()
        if node.role is not Role.LEADER:
            raise AssertionError(f"{node_id} did not win: {node.role} at term {node.term}")
        return node

    def propose(self, node_id: NodeId, data: bytes) -> int | None:
        index = self.nodes[node_id].propose(data)
        self.flush(node_id)
        return index

    def isolate(self, node_id: NodeId) -> None:
        for other in self.nodes:
            if other != node_id:
                self.cut |= {(node_id, other), (other, node_id)}

    def heal(self) -> None:
        self.cut.clear()


# -- seeded chaos simulation -------------------------------------------------------------------------


@dataclass(frozen=True)
class SimParams:
    """The cluster's shape and the run's length; the network's weather is drawn from the seed."""

    voters: int = 3
    workers: int = 0
    """How many of the voters run with ``can_campaign=False`` (role worker)."""
    learners: int = 0
    """Fresh nodes the leader adds with ``propose_add_learner`` during the run."""
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    layers: int = 6
    """Blocks of the model the plan entries split (0: no plan or operational entries)."""
    membership: bool = True
    """The leader demotes and promotes voters during the chaos (one at a time, through the log)."""
    chaos_ticks: int = 150
    liveness_bound: int = 250
    """Ticks after healing within which one leader and converged logs are required."""


@dataclass
class SimStats:
    seed: int
    leaders_elected: int = 0
    committed: int = 0
    crashes: int = 0
    delivered: int = 0
    ticks_to_converge: int = 0
    plans: int = 0
    operational: int = 0
    voter_changes: int = 0
    lost_unsynced: int = 0
    chaos: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FoundingMsg:
    """Entry 1 as the driver's ``Founding`` message: sent by a member to the founding voters."""

    src: NodeId
    dst: NodeId
    voters: tuple[NodeId, ...]
    cluster_id: str


@dataclass(frozen=True)
class ValidationMsg:
    """A node tells whom it follows that it loaded and validated its range of plan ``epoch``."""

    src: NodeId
    dst: NodeId
    epoch: int


SimMessage = Message | FoundingMsg | ValidationMsg


@dataclass
class NodeGate:
    """One node's applied cluster state (the driver's plan / operational epoch) and its local load."""

    plan: PlanEntry | None = None
    operational_epoch: int = 0
    validated: int = 0
    loading: tuple[int, int] = (0, 0)  # (epoch, tick when its load and validation finish)


_LEADER = Role.LEADER
_LEADING = (Role.LEADER, Role.CARETAKER)  # Raft leaders both; only the first coordinates


class Simulation:
    """One seeded run; :meth:`run` raises :class:`InvariantViolation` or returns statistics."""

    def __init__(self, seed: int, params: SimParams, node_factory: NodeFactory = RaftNode) -> None:
        self.seed = seed
        self.p = params
        self.rng = random.Random(seed)
        self.factory = node_factory
        rng = self.rng
        # Each run draws its own weather, so a few thousand seeds cover calm and stormy networks alike.
        self.loss = rng.choice((0.0, rng.uniform(0.0, 0.25)))
        self.dup = rng.choice((0.0, rng.uniform(0.0, 0.1)))
        self.max_delay = rng.randint(1, 4)
        self.crash_rate = rng.choice((0.0, rng.uniform(0.0, 0.03)))
        self.ready_crash_rate = rng.choice((0.0, 0.002))
        self.partition_rate = rng.choice((0.0, rng.uniform(0.0, 0.03)))
        self.propose_rate = rng.uniform(0.05, 0.5)
        self.stall_rate = rng.choice((0.0, 0.1))  # a node misses a tick: GC pause, slow clock
        pre_vote, check_quorum = rng.random() < 0.75, rng.random() < 0.75
        voters = [f"n{i}" for i in range(params.voters)]
        self.learner_ids = [f"l{i}" for i in range(params.learners)]
        self.ids = voters + self.learner_ids
        workers = set(rng.sample(voters, params.workers))
        self.configs = {
            n: RaftConfig(
                election_ticks=params.election_ticks,
                heartbeat_ticks=params.heartbeat_ticks,
                pre_vote=pre_vote,
                check_quorum=check_quorum,
                # Learners here are coordinator-eligible: they may stand once promoted; workers never.
                can_campaign=n not in workers,
                max_append_entries=rng.choice((1, 4, 64)),
            )
            for n in self.ids
        }
        self.stats = SimStats(
            seed=seed,
            chaos={
                "loss": round(self.loss, 3),
                "dup": round(self.dup, 3),
                "max_delay": self.max_delay,
                "pre_vote": pre_vote,
                "check_quorum": check_quorum,
            },
        )
        # Founding as the driver does it: only the founder (n0) writes entry 1; the other founding
        # voters start empty and get it by a Founding message or from the leader's log.
        boot = bootstrap_state(voters, cluster_id=f"sim-{seed}")
        self.disks = {n: MemDisk(boot if n == "n0" else None) for n in self.ids}
        self.nodes: dict[NodeId, RaftNode | None] = {}
        self.now = 0
        self.inflight: dict[int, list[SimMessage]] = {}
        # the serving gate
        self.gates: dict[NodeId, NodeGate] = {n: NodeGate() for n in self.ids}
        self.accepted: dict[NodeId, set[tuple[NodeId, int]]] = {n: set() for n in self.ids}
        self.validated_ever: set[tuple[NodeId, int]] = set()
        self.plan_by_epoch: dict[int, bytes] = {}
        self.pending_cmd: dict[NodeId, int] = {}
        self.sizes = (
            ModelSizes(
                block_bytes=tuple(1 << 20 for _ in range(params.layers)),
                embed_bytes=1 << 19,
                head_bytes=1 << 19,
            )
            if params.layers
            else None
        )
        self.group: dict[NodeId, int] = dict.fromkeys(self.ids, 0)
        self.oneway: set[tuple[NodeId, NodeId]] = set()
        self.next_value = 0
        # invariant bookkeeping
        self.leaders: dict[int, NodeId] = {}
        self.chain: dict[NodeId, list[int]] = {}
        self.entry_at: dict[tuple[int, int], int] = {}
        self.committed: list[int] = [0]
        self.committed_in: list[int] = [0]
        self.applied_log: list[Entry] = [Entry(0, 0, EntryKind.NOOP)]  # index 0: a placeholder
        self.applied: dict[NodeId, int] = {}
        self.mem_commit: dict[NodeId, int] = {}
        self.votes: dict[tuple[NodeId, int], NodeId] = {}
        for n in self.ids:
            self.chain[n] = [0]
            self._extend_chain(n, self.disks[n].entries)
            self._start(n)

    # -- driving -------------------------------------------------------------------------------------

    def run(self) -> SimStats:
        try:
            for _ in range(self.p.chaos_ticks):
                self._chaos()
                self._step_time()
            self._heal_everything()
            for waited in range(self.p.liveness_bound):
                self._liveness_nudge(waited)
                self._step_time()
                if self._converged():
                    self.stats.ticks_to_converge = waited + 1
                    return self.stats
            raise self._violation(
                f"no convergence {self.p.liveness_bound} ticks after healing: {self._describe()}"
            )
        except RaftInvariantError as exc:
            raise self._violation(f"core raised {exc}") from exc

    def _step_time(self) -> None:
        self.now += 1
        order = [n for n in self.ids if self.nodes[n] is not None]
        self.rng.shuffle(order)
        for n in order:
            node = self.nodes[n]
            if node is not None and not (self.stall_rate and self.rng.random() < self.stall_rate):
                node.tick()
                self._process(n)
                self._node_cycle(n)
        due = self.inflight.pop(self.now, [])
        self.rng.shuffle(due)
        for m in due:
            node = self.nodes[m.dst]
            if node is None or self._blocked(m.src, m.dst):
                continue
            self.stats.delivered += 1
            if isinstance(m, FoundingMsg):
                self._on_founding(m)
            elif isinstance(m, ValidationMsg):
                if node.role is _LEADER:
                    self.accepted[m.dst].add((m.src, m.epoch))
            else:
                node.step(m)
                self._process(m.dst)

    # -- what the driver does around the core: founding, voters, the coordinator, the gate -------------

    def _node_cycle(self, n: NodeId) -> None:
        node = self.nodes[n]
        if node is None:
            return  # crashed while handling its Ready
        if self.now % 5 == 0 and node.last_index > 0:
            first = decode_conf_change(node.entries(1, 2)[0].data)
            if isinstance(first, Bootstrap):
                for v in first.voters:
                    if v != n:
                        self._send(FoundingMsg(n, v, first.voters, first.cluster_id))
        gate = self.gates[n]
        epoch, due = gate.loading
        if epoch and self.now >= due:
            gate.loading = (0, 0)
            if gate.plan is not None and gate.plan.epoch == epoch:
                gate.validated = epoch
                self.validated_ever.add((n, epoch))
                self._check_serving(n)
        if gate.validated and self.now % 3 == 0 and node.leader is not None:
            if gate.operational_epoch != gate.validated:
                self._send(ValidationMsg(n, node.leader, gate.validated))

    def _on_founding(self, m: FoundingMsg) -> None:
        n = m.dst
        node, disk = self.nodes[n], self.disks[n]
        if node is None or node.last_index > 0 or disk.entries or n not in m.voters:
            return
        state = bootstrap_state(list(m.voters), m.cluster_id)
        disk.write(state.hard_state, state.entries)
        if self.ready_crash_rate and self.rng.random() < self.ready_crash_rate:
            self._crash(n)  # crashed before the fsync: the founding entry is lost again
            return
        disk.fsync()
        del self.chain[n][1:]
        self._extend_chain(n, state.entries)
        self._start(n)

    def _coordinate(self) -> None:
        """The leader's coordinator: plan when there is none or a planned node is down, and commit
        "operational" once every assigned node's validation reached it. Like the real one it acts only
        on what it applied, and only once an entry of its own term is committed."""
        leader = self._leader()
        if leader is None or self.sizes is None or leader.log_term(leader.commit) != leader.term:
            return
        if self.pending_cmd.get(leader.id, 0) > leader.commit:
            return
        gate = self.gates[leader.id]
        plan = gate.plan
        up = [n for n in self.ids if self.nodes[n] is not None]
        if plan is None or any(a.node_id not in up for a in plan.assignments):
            chosen = self.rng.sample(up, self.rng.randint(1, len(up)))
            epoch = (plan.epoch if plan else 0) + 1
            previous = None
            if plan is not None:
                previous = Plan(
                    plan.epoch,
                    tuple(PlanAssignment(a.node_id, LayerRange(a.start, a.stop)) for a in plan.assignments),
                )
            new = plan_partition(
                [NodeCapacity(c, 1 << 30, 1.0) for c in chosen], self.sizes, epoch=epoch, previous=previous
            )
            cmd: PlanEntry | OperationalEntry = PlanEntry(
                epoch=epoch,
                term=leader.term,
                manifest_root="sim",
                num_units=len(self.sizes.block_bytes) + 2,
                num_blocks=len(self.sizes.block_bytes),
                assignments=tuple(
                    Assignment(a.node_id, a.layers.start, a.layers.stop) for a in new.assignments
                ),
            )
        elif gate.operational_epoch != plan.epoch and all(
            (a.node_id, plan.epoch) in self.accepted[leader.id] for a in plan.assignments
        ):
            cmd = OperationalEntry(plan.epoch, leader.term)
        else:
            return
        index = leader.propose(encode(cmd))
        if index is not None:
            self.pending_cmd[leader.id] = index
            self._process(leader.id)

    def _change_voters(self) -> None:
        leader = self._leader()
        if leader is None:
            return
        # As the driver: only nodes that may campaign become voters. A voter that never campaigns can
        # hold the only up-to-date log and leave the others unable to win an election.
        others = [n for n in self.ids if n not in leader.voters and self.configs[n].can_campaign]
        demotable = [v for v in leader.voters if v != leader.id]
        change: AddVoter | RemoveVoter
        if others and (len(leader.voters) <= 2 or self.rng.random() < 0.5):
            change = AddVoter(self.rng.choice(others))
            if not self._caught_up(leader, change.node_id):
                # As the driver, which promotes only a learner holding the committed log: a voter
                # with no log ignores vote requests (it is in no cluster yet), and once the voters
                # came down to it and one other, no one could be elected (seed 2600004330). Drawn
                # again only here, so the runs that never drew such a node stay what they were.
                ready = [n for n in others if self._caught_up(leader, n)]
                if not ready:
                    return
                change = AddVoter(self.rng.choice(ready))
        elif demotable and len(leader.voters) > 2:
            change = RemoveVoter(self.rng.choice(demotable))
        else:
            return
        if leader.propose_conf_change(change) is not None:
            self.stats.voter_changes += 1
            self._process(leader.id)

    @staticmethod
    def _caught_up(leader: RaftNode, n: NodeId) -> bool:
        return n in leader.learners and leader.match_index(n) >= leader.commit

    def _apply_command(self, n: NodeId, e: Entry) -> None:
        """The driver's apply rule, with the plan and epoch invariants."""
        try:
            cmd = decode_command(e.data)
        except Exception:
            return  # a plain test value
        gate = self.gates[n]
        if isinstance(cmd, PlanEntry):
            tiles = sorted((a.start, a.stop) for a in cmd.assignments)
            cover = 0
            for start, stop in tiles:
                if start != cover or stop <= start:
                    raise self._violation(f"plan epoch {cmd.epoch} does not cover every layer once: {tiles}")
                cover = stop
            if cover != cmd.num_blocks:
                raise self._violation(f"plan epoch {cmd.epoch} covers {cover} of {cmd.num_blocks} layers")
            if self.plan_by_epoch.setdefault(cmd.epoch, e.data) != e.data:
                raise self._violation(f"two different plans committed for epoch {cmd.epoch}")
            if gate.plan is None or cmd.epoch > gate.plan.epoch:
                gate.plan = cmd
                self.stats.plans = max(self.stats.plans, cmd.epoch)
                if cmd.range_of(n) is not None:
                    gate.loading = (cmd.epoch, self.now + self.rng.randint(1, 6))
        elif isinstance(cmd, OperationalEntry):
            if gate.plan is not None and cmd.epoch == gate.plan.epoch:
                missing = [
                    a.node_id
                    for a in gate.plan.assignments
                    if (a.node_id, cmd.epoch) not in self.validated_ever
                ]
                if missing:
                    raise self._violation(
                        f"operational at epoch {cmd.epoch} committed before {missing} validated"
                    )
                gate.operational_epoch = cmd.epoch
                self.stats.operational = max(self.stats.operational, cmd.epoch)
        self._check_serving(n)

    def _check_serving(self, n: NodeId) -> None:
        """No node operational outside the committed epoch it validated (in this incarnation)."""
        gate = self.gates[n]
        plan = gate.plan
        if plan is None or gate.operational_epoch != plan.epoch or plan.range_of(n) is None:
            return
        if gate.validated == plan.epoch:
            if plan.epoch not in self.plan_by_epoch or (n, plan.epoch) not in self.validated_ever:
                raise self._violation(
                    f"{n} serves epoch {plan.epoch} it never validated or that never committed"
                )

    def _chaos(self) -> None:
        rng = self.rng
        alive = [n for n in self.ids if self.nodes[n] is not None]
        dead = [n for n in self.ids if self.nodes[n] is None]
        if alive and rng.random() < self.crash_rate:
            self._crash(rng.choice(alive))
        if dead and rng.random() < 0.05:
            self._start(rng.choice(dead))
        if rng.random() < self.partition_rate:
            self._partition()
        if rng.random() < 0.02:
            self.group = dict.fromkeys(self.ids, 0)
            self.oneway.clear()
        if rng.random() < self.propose_rate:
            self._propose()
        if self.learner_ids and rng.random() < 0.02:
            self._add_learner(rng.choice(self.learner_ids))
        if self.p.membership and rng.random() < 0.02:
            self._change_voters()
        if rng.random() < 0.3:
            self._coordinate()

    def _partition(self) -> None:
        rng = self.rng
        shape = rng.random()
        if shape < 0.4:
            self.group = {n: rng.randrange(2) for n in self.ids}
        elif shape < 0.7:
            lone = rng.choice(self.ids)
            self.group = {n: int(n == lone) for n in self.ids}
        else:
            a, b = rng.sample(self.ids, 2)
            self.oneway.add((a, b))

    def _heal_everything(self) -> None:
        self.group = dict.fromkeys(self.ids, 0)
        self.oneway.clear()
        self.loss = 0.0
        self.crash_rate = self.ready_crash_rate = self.stall_rate = 0.0
        for n in self.ids:
            if self.nodes[n] is None:
                self._start(n)

    def _liveness_nudge(self, waited: int) -> None:
        leader = self._leader()
        if leader is None:
            return
        if waited % 10 == 0:
            for learner in self.learner_ids:
                if learner not in leader.learners and learner not in leader.voters:
                    self._add_learner(learner)
        if waited == 0:
            self._propose()

    def _leader(self) -> RaftNode | None:
        best: RaftNode | None = None
        for node in self.nodes.values():
            if node is not None and node.role is _LEADER and (best is None or node.term > best.term):
                best = node
        return best

    def _propose(self) -> None:
        leader = self._leader()
        if leader is not None:
            self.next_value += 1
            leader.propose(b"v%d" % self.next_value)
            self._process(leader.id)

    def _add_learner(self, learner: NodeId) -> None:
        leader = self._leader()
        if leader is not None:
            leader.propose_add_learner(learner)
            self._process(leader.id)

    def _start(self, n: NodeId) -> None:
        node = self.factory(n, self.configs[n], self.disks[n].load(), self.rng.getrandbits(32))
        self.nodes[n] = node
        self.applied[n] = 0
        self.gates[n] = NodeGate()  # volatile: the log is applied again from index 1
        self.mem_commit[n] = node.commit
        if node.commit != self.disks[n].durable_hard.commit:
            raise self._violation(
                f"{n} restarted with commit {node.commit}, persisted {self.disks[n].hard.commit}"
            )
        self._process(n)

    def _crash(self, n: NodeId) -> None:
        self.nodes[n] = None
        self.stats.crashes += 1
        disk = self.disks[n]
        if disk.entries != disk.durable_entries or disk.hard != disk.durable_hard:
            self.stats.lost_unsynced += 1
        disk.crash()  # what was written but never fsync'd is gone
        self.chain[n] = [0]
        self._extend_chain(n, disk.entries)
        self.accepted[n] = set()
        self.pending_cmd.pop(n, None)

    def _blocked(self, src: NodeId, dst: NodeId) -> bool:
        return self.group[src] != self.group[dst] or (src, dst) in self.oneway

    def _send(self, m: SimMessage) -> None:
        rng = self.rng
        if self._blocked(m.src, m.dst) or (self.loss and rng.random() < self.loss):
            return
        copies = 2 if self.dup and rng.random() < self.dup else 1
        for _ in range(copies):
            due = self.now + 1 + int(rng.random() * self.max_delay)  # 1..max_delay ticks; randint is slow
            self.inflight.setdefault(due, []).append(m)

    # -- the Ready contract, with invariants -----------------------------------------------------------

    def _process(self, n: NodeId) -> None:
        node = self.nodes[n]
        if node is None:
            return
        self._check_node(n, node)
        if not node.has_ready():
            return
        rd = node.ready()
        if self.ready_crash_rate and self.rng.random() < self.ready_crash_rate:
            self._crash(n)  # crashed before writing: nothing of this Ready happened
            return
        self._persist(n, rd)
        if self.ready_crash_rate and self.rng.random() < self.ready_crash_rate:
            self._crash(n)  # written, never synced: the disk loses it
            return
        self._sync(n, node)
        if self.ready_crash_rate and self.rng.random() < self.ready_crash_rate:
            self._crash(n)  # crashed after the fsync, before sending
            return
        for m in rd.messages:
            self._check_outgoing(n, m)
            self._send(m)
        self._apply(n, rd.committed_entries)
        node.advance(rd)
        if rd.role_changes and node.role in _LEADING:
            self._check_leader_completeness(n, node)

    def _check_node(self, n: NodeId, node: RaftNode) -> None:
        if node.role in _LEADING:
            holder = self.leaders.setdefault(node.term, n)
            if holder != n:
                raise self._violation(f"election safety: {holder} and {n} both leaders in term {node.term}")
            self.stats.leaders_elected = len(self.leaders)
        if node.commit < self.mem_commit[n]:
            raise self._violation(f"{n} commit went back from {self.mem_commit[n]} to {node.commit}")
        self.mem_commit[n] = node.commit

    def _persist(self, n: NodeId, rd: Ready) -> None:
        disk = self.disks[n]
        old = disk.hard
        if rd.hard_state is not None:
            new = rd.hard_state
            if new.term < old.term:
                raise self._violation(f"{n} persisted term {new.term} after {old.term}")
            if new.term == old.term and old.vote is not None and new.vote != old.vote:
                raise self._violation(f"{n} changed its vote in term {new.term}: {old.vote} -> {new.vote}")
            if new.commit < old.commit:
                raise self._violation(f"{n} persisted commit {new.commit} after {old.commit}")
        if rd.entries:
            first = rd.entries[0].index
            chain = self.chain[n]
            if first < len(chain):
                if first < len(self.committed) and chain[first] == self.committed[first]:
                    raise self._violation(f"{n} overwrote committed entry {first}")
                del chain[first:]
            if first != len(chain):
                raise self._violation(f"{n} persisted entry {first} after last index {len(chain) - 1}")
            self._extend_chain(n, rd.entries)
        disk.write(rd.hard_state, rd.entries)
        node = self.nodes[n]
        assert node is not None
        if node.last_index < len(disk.entries) or node.log_term(len(disk.entries)) != (
            disk.entries[-1].term if disk.entries else 0
        ):
            raise self._violation(f"{n}: Ready entries disagree with the in-memory log")

    def _sync(self, n: NodeId, node: RaftNode) -> None:
        disk = self.disks[n]
        disk.fsync()
        # A vote counts once durable: one written but lost in a crash before its fsync never left.
        if disk.durable_hard.vote is not None:
            self._record_vote(n, disk.durable_hard.term, disk.durable_hard.vote)
        self._check_commit(n, disk.durable_hard.commit, node.term)

    def _extend_chain(self, n: NodeId, entries: Sequence[Entry]) -> None:
        chain = self.chain[n]
        for e in entries:
            h = hash((chain[-1], e.term, e.kind, e.data))
            if self.entry_at.setdefault((e.index, e.term), h) != h:
                raise self._violation(
                    f"log matching: {n} holds a different entry or prefix at index {e.index} term {e.term}"
                )
            chain.append(h)

    def _check_commit(self, n: NodeId, commit: int, term: int) -> None:
        chain = self.chain[n]
        known = len(self.committed) - 1
        if commit <= known:
            if chain[commit] != self.committed[commit]:
                raise self._violation(f"{n} committed a different log at index {commit}")
            return
        if chain[known] != self.committed[known]:
            raise self._violation(f"{n} committed a log that changes committed index {known}")
        self.committed.extend(chain[known + 1 : commit + 1])
        self.committed_in.extend([term] * (commit - known))
        self.stats.committed = commit

    def _check_leader_completeness(self, n: NodeId, node: RaftNode) -> None:
        """Entries committed in a term before this leader's must be in its log (§5.4). We record the
        term of the first node seen committing each index, an upper bound of its real commit term."""
        index = len(self.committed) - 1
        while index > 0 and self.committed_in[index] >= node.term:
            index -= 1
        chain = self.chain[n]
        if index >= len(chain) or chain[index] != self.committed[index]:
            raise self._violation(
                f"leader completeness: {n} leads term {node.term} without committed {index}"
            )

    def _check_outgoing(self, n: NodeId, m: Message) -> None:
        """Messages leave only after what they promise is durable (the Ready contract)."""
        disk = self.disks[n]
        if isinstance(m, VoteResponse) and m.granted:
            if disk.durable_hard.term != m.term or disk.durable_hard.vote != m.dst:
                raise self._violation(f"{n} granted a vote for {m.dst} in term {m.term} before persisting it")
            self._record_vote(n, m.term, m.dst)
        elif isinstance(m, AppendResponse):
            # An acknowledgement (or a refusal's hint) tells the leader which prefix this node holds:
            # it must already be on disk, with the term the hint claims.
            held = m.index if m.success else m.reject_hint
            durable = disk.durable_entries
            if held > len(durable) or (not m.success and held and durable[held - 1].term != m.hint_term):
                raise self._violation(f"{n} told {m.dst} it holds index {held}, persisted {len(durable)}")

    def _record_vote(self, n: NodeId, term: int, candidate: NodeId) -> None:
        if self.votes.setdefault((n, term), candidate) != candidate:
            raise self._violation(
                f"{n} voted for both {self.votes[(n, term)]} and {candidate} in term {term}"
            )

    def _apply(self, n: NodeId, entries: Sequence[Entry]) -> None:
        log = self.applied_log
        for e in entries:
            if e.index != self.applied[n] + 1 or e.index > self.disks[n].durable_hard.commit:
                raise self._violation(f"{n} applied {e.index} out of order or uncommitted")
            if e.index < len(log):
                if log[e.index] != e:
                    raise self._violation(f"state machine safety: {n} applied a different entry {e.index}")
            else:
                log.append(e)
            self.applied[n] = e.index
            if e.kind is EntryKind.NORMAL and e.data:
                self._apply_command(n, e)

    # -- liveness ------------------------------------------------------------------------------------

    def _converged(self) -> bool:
        leader = self._leader()
        if leader is None or leader.log_term(leader.last_index) != leader.term:
            return False
        if any(n not in leader.learners and n not in leader.voters for n in self.ids):
            return False
        last, term = leader.last_index, leader.term
        for n in self.ids:
            node = self.nodes[n]
            if node is None or node.term != term or node.leader != leader.id:
                return False
            if node.last_index != last or node.commit != last or self.applied[n] != last:
                return False
            if self.chain[n][last] != self.chain[leader.id][last]:
                return False
        return True

    def _describe(self) -> str:
        parts = []
        for n in self.ids:
            node = self.nodes[n]
            if node is None:
                parts.append(f"{n}=down")
            else:
                parts.append(
                    f"{n}={node.role.value}@{node.term} lead={node.leader} last={node.last_index} "
                    f"commit={node.commit} applied={self.applied[n]}"
                )
        return "; ".join(parts)

    def _violation(self, what: str) -> InvariantViolation:
        return InvariantViolation(
            f"seed={self.seed} tick={self.now} params={self.p} chaos={self.stats.chaos}: {what}"
        )


def run_simulation(seed: int, params: SimParams, node_factory: NodeFactory = RaftNode) -> SimStats:
    """Replay one run; raises :class:`InvariantViolation` naming ``seed`` on any failure."""
    return Simulation(seed, params, node_factory).run()
