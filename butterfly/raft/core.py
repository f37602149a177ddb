"""The Raft consensus core: a pure, deterministic state machine in the shape of etcd-io/raft.

Inputs are :meth:`RaftNode.step` (a message from a peer), :meth:`RaftNode.tick` (one unit of abstract
time), :meth:`RaftNode.propose` / :meth:`RaftNode.propose_add_learner` and :meth:`RaftNode.campaign`.
The only output is a :class:`Ready`: what to persist, what to send, what to apply. The driver calls
:meth:`RaftNode.ready`, honours the contract written on :class:`Ready`, then calls
:meth:`RaftNode.advance`.

This module owns the Raft rules: elections with randomized timeouts (from a seeded ``random.Random``,
never the global one; pre-candidates re-ask silent voters every heartbeat interval, and of two
pre-candidates for one term the better log, then the lower id, runs first, so two nodes timing out
together do not split the vote), pre-vote, check-quorum with the follower-side leader lease, heartbeats, log
replication with the consistency check and fast back-off, commitment by counting only entries of the
current term (Raft §5.4.2), a no-op entry when a leader takes office, learners and ``can_campaign``
(with its caretaker exception, see :attr:`Role.CARETAKER`).
It must not touch a socket, the disk, a clock or global randomness, and must not block: that is what
lets the same code run inside thousands of seeded simulations (``tests/raftsim.py``).

Membership: the bootstrap entry (index 1, see :func:`bootstrap_state` and the package docstring)
names the first voters; after it, CONF entries add learners and add or demote one voter at a time
(the Raft thesis' single-server changes, §4.1). A change takes effect on every node when it commits
(as in etcd), and the leader refuses a voter change while another is uncommitted, and before it has
committed an entry of its own term (the fix for the single-server-change bug in the thesis' errata:
a leader elected in a configuration that a lost, uncommitted change had already left must not build
on that change). :func:`force_new_cluster_state` is the offline recovery of a cluster that lost its
quorum for good. Leader transfer, log compaction/snapshots and read leases are out of scope.

Role changes are logged through the stdlib logger ("<id> became <role> at term <n>") and also
returned in :attr:`Ready.role_changes` so the driver can update status without parsing logs.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from butterfly.raft.messages import (
    AddLearner,
    AddVoter,
    AppendEntries,
    AppendResponse,
    Bootstrap,
    Entry,
    EntryKind,
    ForceVoters,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    NodeId,
    PreVoteRequest,
    PreVoteResponse,
    RemoveVoter,
    VoteRequest,
    VoteResponse,
    decode_conf_change,
    encode_conf_change,
)

logger = logging.getLogger(__name__)


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    CARETAKER = "caretaker"
    """A Raft leader that is no coordinator: a voter with ``can_campaign=False`` (a worker) stands when
    it has refused a candidate whose log is behind its own and no leader has been heard since. Without
    it, a committed voter set such as {coordinator, worker} deadlocks once the leader that committed an
    entry with only the worker's acknowledgement dies: the coordinator lacks the entry, the worker may
    not stand, and refuses it (simulator seed 2500007721). The caretaker proposes nothing and grants no
    lease; it replicates its log, and stands down once a candidate it refused holds all of it, or after
    one election period, whichever comes first. Its followers, and it, name no leader (``leader`` is
    None), so no one mistakes it for the coordinator. Every Raft rule holds for it as for a leader."""


_LEADING = (Role.LEADER, Role.CARETAKER)


class RaftConfigError(ValueError):
    """A :class:`RaftConfig` field is out of range or inconsistent with another field."""


class RaftUsageError(RuntimeError):
    """The driver broke the calling contract (e.g. asked for a second Ready before advancing the first)."""


class RaftInvariantError(RuntimeError):
    """State that Raft's rules cannot produce (a persisted log with gaps, a commit index past the log,
    a second bootstrap entry). It means a bug or damaged storage, never ordinary network trouble, so
    the node stops rather than guess."""


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Per-node consensus settings; call :meth:`validate` once at start-up."""

    election_ticks: int = 10
    """Minimum election timeout T in ticks; each node draws its timeout from [T, 2T). Also the
    check-quorum period and the follower's leader lease."""
    heartbeat_ticks: int = 1
    """A leader sends heartbeats every this many ticks; must be well below ``election_ticks``."""
    pre_vote: bool = True
    """Ask for votes at term + 1 before incrementing the term (Raft thesis §9.6), so a node rejoining
    from a partition cannot force a healthy leader to step down."""
    check_quorum: bool = True
    """A leader that has not heard from a majority within ``election_ticks`` steps down, and followers
    ignore vote requests while they have a live leader (the lease that makes pre-vote effective)."""
    can_campaign: bool = True
    """False for ``role = "worker"`` nodes: they may vote (if voters) but never lead, except as a
    caretaker (:attr:`Role.CARETAKER`) that hands its log to a candidate it had to refuse."""
    max_append_entries: int = 64
    """Most entries carried by one AppendEntries message."""
    max_inflight_appends: int = 8
    """Most unacknowledged appends a leader pipelines to one peer (a window of entries, really)."""
    election_jitter_ticks: int = 0
    """Election timeouts are drawn from [T, T + jitter); 0 means jitter = T (the paper's [T, 2T)).
    Less jitter bounds failover sooner; too little and candidates split their votes."""

    def validate(self) -> None:
        if self.election_ticks < 2:
            raise RaftConfigError(f"election_ticks must be >= 2, got {self.election_ticks}")
        if self.heartbeat_ticks < 1:
            raise RaftConfigError(f"heartbeat_ticks must be >= 1, got {self.heartbeat_ticks}")
        if self.election_ticks <= self.heartbeat_ticks:
            raise RaftConfigError(
                f"election_ticks ({self.election_ticks}) must be greater than heartbeat_ticks "
                f"({self.heartbeat_ticks})"
            )
        if self.max_append_entries < 1:
            raise RaftConfigError(f"max_append_entries must be >= 1, got {self.max_append_entries}")
        if self.max_inflight_appends < 1:
            raise RaftConfigError(f"max_inflight_appends must be >= 1, got {self.max_inflight_appends}")
        if self.election_jitter_ticks < 0:
            raise RaftConfigError(f"election_jitter_ticks must be >= 0, got {self.election_jitter_ticks}")


@dataclass(frozen=True, slots=True)
class PersistedState:
    """Everything a node had on stable storage: its hard state and its whole log (index 1 first)."""

    hard_state: HardState
    entries: tuple[Entry, ...]


def bootstrap_state(voters: Sequence[NodeId], cluster_id: str) -> PersistedState:
    """The initial state of every bootstrap voter: entry 1 (term 1, committed) names the voter set.

    Every voter must be given the same ``voters`` and ``cluster_id``, persist this state, and only then
    construct its :class:`RaftNode` from it; nodes that join later start with ``persisted=None`` and
    receive entry 1 from the leader. How ``voters`` is chosen safely is in the package docstring.
    """
    if not voters:
        raise ValueError("a cluster needs at least one voter")
    if len(set(voters)) != len(voters):
        raise ValueError(f"duplicate voter ids in {list(voters)}")
    change = Bootstrap(voters=tuple(sorted(voters)), cluster_id=cluster_id)
    entry = Entry(index=1, term=1, kind=EntryKind.CONF, data=encode_conf_change(change))
    return PersistedState(hard_state=HardState(term=1, vote=None, commit=1), entries=(entry,))


def force_new_cluster_state(persisted: PersistedState | None, node_id: NodeId) -> PersistedState:
    """The state that makes ``node_id`` the only voter of its cluster, for a cluster that lost its
    quorum for good (etcd's ``--force-new-cluster``); ``butterfly-admin force-new-cluster`` writes it
    while the node is stopped.

    One CONF entry (:class:`ForceVoters`) is appended at a term above every term this node knows, and
    everything in the log is marked committed, including entries the old cluster may never have
    committed. Every other member becomes a learner; the leader promotes live ones back to voters
    one at a time. Not proposed through any quorum: run it on one survivor only (the one with the
    longest log), and only while no other member of the old cluster runs.
    """
    if persisted is None or not persisted.entries:
        raise ValueError(f"{node_id} holds no Raft log: it was never a member of a cluster")
    last = persisted.entries[-1]
    term = max(persisted.hard_state.term, last.term) + 1
    entry = Entry(
        index=last.index + 1,
        term=term,
        kind=EntryKind.CONF,
        data=encode_conf_change(ForceVoters(voters=(node_id,))),
    )
    return PersistedState(
        hard_state=HardState(term=term, vote=None, commit=entry.index), entries=(*persisted.entries, entry)
    )


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth showing (status page, coordinator name); never persisted."""

    leader: NodeId | None
    role: Role


@dataclass(frozen=True, slots=True)
class RoleChange:
    node_id: NodeId
    role: Role
    term: int

    def __str__(self) -> str:
        return f"{self.node_id} became {self.role.value} at term {self.term}"


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver. The order is the contract:

    1. Save ``hard_state`` (when not None) and ``entries`` to stable storage and fsync. Stored entries
       at index >= ``entries[0].index`` are replaced (a follower's conflicting suffix is dropped).
       This MUST complete BEFORE any of ``messages`` is sent: a vote or an acknowledgement that leaves
       before it is durable can be forgotten by a crash, and Raft's safety is gone.
    2. Send ``messages`` (each carries its ``dst``); losing, reordering or duplicating them is fine.
    3. Apply ``committed_entries`` to the state machine, in order (never before step 1).
    4. Call :meth:`RaftNode.advance` with this object. Only one Ready may be outstanding; the node may
       be stepped and ticked while it is.

    ``soft_state`` is None when unchanged; ``role_changes`` lists every role change since the last
    Ready (already logged by the core; use them for status, not to log again).
    """

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    soft_state: SoftState | None
    role_changes: tuple[RoleChange, ...]


class _Progress:
    """The leader's view of one peer. In probe mode one append is in flight at a time (we do not know
    where the logs match); in replicate mode appends are pipelined and ``next`` advances optimistically."""

    __slots__ = ("match", "next", "probe", "probe_sent", "recent_active")

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.probe = True
        self.probe_sent = False
        self.recent_active = False

    def update(self, index: int) -> bool:
        """A peer acknowledged holding our log up to ``index``; True if that is news."""
        self.next = max(self.next, index + 1)
        if index > self.match:
            self.match = index
            self.probe_sent = False
            return True
        return False

    def replicate_from_match(self) -> None:
        self.probe, self.probe_sent, self.next = False, False, self.match + 1

    def probe_from(self, rejected: int, next_index: int) -> bool:
        """Probe at ``next_index`` after a refusal of the append following ``rejected``; False if the
        refusal answers an older probe than the one in flight."""
        if self.probe and self.next - 1 != rejected:
            return False
        self.probe, self.probe_sent = True, False
        self.next = max(next_index, self.match + 1)
        return True


_NO_TERM = -1  # term of an index past the end of the log: never equal to a real term


class RaftNode:
    """One Raft peer. Not thread-safe: one driver task owns it.

    ``persisted`` is exactly what the node's storage holds (``RaftStorage.load()``): None for a node
    that joins later as a learner, :func:`bootstrap_state` (saved first) for a bootstrap voter. A
    restarted node keeps term, vote, log and commit index, and hands its committed entries out again
    from index 1 so the driver rebuilds its state machine. ``rng_seed`` drives the election timeouts
    and nothing else: tests fix it, a daemon must draw it at random per start (e.g. ``secrets``);
    nodes sharing a seed time out in lockstep and split their votes.

    Driver loop, all on one task::

        on timer (tick interval):   node.tick()
        on message from peer:       node.step(decode_message(body))   # after auth and size checks
        after either, if node.has_ready():
            rd = node.ready(); storage.save_ready(rd); send(rd.messages)
            apply(rd.committed_entries); node.advance(rd)
    """

    def __init__(
        self, node_id: NodeId, config: RaftConfig, persisted: PersistedState | None, rng_seed: int
    ) -> None:
        config.validate()
        self._id = node_id
        self._cfg = config
        self._rng = random.Random(rng_seed)
        hard = persisted.hard_state if persisted is not None else HardState()
        self._log: list[Entry] = list(persisted.entries) if persisted is not None else []
        for position, entry in enumerate(self._log):
            if entry.index != position + 1:
                raise RaftInvariantError(
                    f"{node_id}: persisted log has index {entry.index} at {position + 1}"
                )
        last_term = self._log[-1].term if self._log else 0
        # A storage that is not atomic across hard state and entries could keep entries of a term whose
        # hard state it lost; no message of that Ready left, so adopting that term with no vote is safe.
        self._term = max(hard.term, last_term)
        self._vote: NodeId | None = hard.vote if hard.term == self._term else None
        if hard.commit > len(self._log):
            raise RaftInvariantError(f"{node_id}: commit {hard.commit} beyond last index {len(self._log)}")
        self._commit = 0
        self._applied = 0  # no snapshots: a restarted node re-applies its committed log from index 1
        self._unstable_from = len(self._log) + 1
        self._persisted_hard = hard
        self._voters: tuple[NodeId, ...] = ()
        self._learners: list[NodeId] = []
        self._cluster_id: str | None = None
        self._role = Role.FOLLOWER
        self._lead: NodeId | None = None
        self._lead_caretaker = False  # the leader we follow said it is a caretaker
        # Voters whose (pre-)vote requests we refused for a log behind ours since we last heard a leader
        # or granted a vote: only kept with can_campaign off, where it makes us a caretaker candidate.
        self._behind: set[NodeId] = set()
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._draw_timeout()
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, _Progress] = {}
        self._msgs: list[Message] = []
        self._role_changes: list[RoleChange] = []
        self._reported_soft = SoftState(leader=None, role=Role.FOLLOWER)
        self._outstanding: Ready | None = None
        # Membership is not stored apart from the log: replaying the committed CONF entries rebuilds it.
        self._commit_to(hard.commit)

    # -- read-only views -----------------------------------------------------------------------------

    @property
    def id(self) -> NodeId:
        return self._id

    @property
    def role(self) -> Role:
        return self._role

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> NodeId | None:
        return self._vote

    @property
    def leader(self) -> NodeId | None:
        """The leader this node follows or is, unless that is a caretaker (:attr:`Role.CARETAKER`): a
        caretaker is no coordinator, so the driver sees an election still going on."""
        return None if self._role is Role.CARETAKER or self._lead_caretaker else self._lead

    @property
    def commit(self) -> int:
        return self._commit

    @property
    def applied(self) -> int:
        return self._applied

    @property
    def last_index(self) -> int:
        return len(self._log)

    @property
    def voters(self) -> tuple[NodeId, ...]:
        return self._voters

    @property
    def learners(self) -> tuple[NodeId, ...]:
        return tuple(self._learners)

    @property
    def cluster_id(self) -> str | None:
        return self._cluster_id

    @property
    def is_voter(self) -> bool:
        return self._id in self._voters

    def log_term(self, index: int) -> int | None:
        """Term of the entry at ``index`` (0 for index 0), None past the end of the log."""
        term = self._term_at(index)
        return None if term == _NO_TERM else term

    def entries(self, low: int, high: int) -> tuple[Entry, ...]:
        """Entries with ``low <= index < high`` that this node holds."""
        return tuple(self._log[max(low, 1) - 1 : max(high, 1) - 1])

    # -- inputs --------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance abstract time by one tick."""
        self._election_elapsed += 1
        if self._role in _LEADING:
            self._tick_leader()
        elif self._promotable() and self._election_elapsed >= self._timeout + self._caretaker_delay():
            self._election_elapsed = 0
            self._start_campaign()
        elif self._role is Role.PRE_CANDIDATE:
            if self._election_elapsed % self._cfg.heartbeat_ticks == 0:
                self._resend_vote_requests()

    def _resend_vote_requests(self) -> None:
        """Pre-vote again at the voters that have not answered. A follower still inside its leader lease
        drops a pre-vote request without a word; it may be out of it a tick later, and waiting a whole
        election timeout for that made one failover in nine of a 3-node cluster take ~1.1 s instead of
        ~0.5 s. Pre-votes change nothing, so asking again is free. (Real vote requests are not
        repeated: without pre-vote, repeated requests from a candidate that cannot win kept a 2-voter
        cluster electing for 250 ticks in the simulator, seed 820848566.)"""
        last_index, last_term = len(self._log), self._term_at(len(self._log))
        for voter in self._voters:
            if voter != self._id and voter not in self._votes:
                self._send(PreVoteRequest(self._term + 1, self._id, voter, last_index, last_term))

    def campaign(self) -> bool:
        """Start an election now (with pre-vote if configured); False if this node may not campaign
        or already leads."""
        if self._role in _LEADING or not self._promotable():
            return False
        self._start_campaign()
        return True

    def propose(self, data: bytes) -> int | None:
        """Append ``data`` as a normal entry; its index, or None when this node is not the leader (the
        driver forwards to :attr:`leader` or retries). An index is no promise: watch committed entries."""
        if self._role is not Role.LEADER:
            return None
        return self._append_as_leader(EntryKind.NORMAL, data)

    def conf_change_refusal(self, change: AddVoter | RemoveVoter) -> str:
        """Why :meth:`propose_conf_change` would refuse ``change`` now ('' if it would not)."""
        if self._role is not Role.LEADER:
            return "not the leader"
        if isinstance(change, AddVoter):
            if change.node_id in self._voters:
                return f"{change.node_id} is already a voter"
        else:
            if change.node_id not in self._voters:
                return f"{change.node_id} is not a voter"
            if change.node_id == self._id:
                return "the leader does not demote itself"
            if len(self._voters) == 1:
                return "the last voter cannot be removed"
        if self._term_at(self._commit) != self._term:
            return "the leader has not yet committed an entry of its term"
        pending = self._pending_conf_index()
        if pending:
            return f"membership change at index {pending} is not committed yet"
        return ""

    def propose_conf_change(self, change: AddVoter | RemoveVoter) -> int | None:
        """Propose one single-server voter change; its index, or None when refused (see
        :meth:`conf_change_refusal`). It takes effect on each node when committed."""
        if self.conf_change_refusal(change):
            return None
        return self._append_as_leader(EntryKind.CONF, encode_conf_change(change))

    def match_index(self, node_id: NodeId) -> int:
        """On the leader: the highest index ``node_id`` is known to hold (0 when unknown or not leader).
        A learner is worth promoting once this reaches the commit index."""
        pr = self._progress.get(node_id) if self._role in _LEADING else None
        return pr.match if pr is not None else 0

    def _pending_conf_index(self) -> int:
        """Index of an uncommitted voter change in the log (0 if none). Learner additions do not count:
        they never change a quorum."""
        for entry in self._log[self._commit :]:
            if entry.kind is EntryKind.CONF and not isinstance(decode_conf_change(entry.data), AddLearner):
                return entry.index
        return 0

    def propose_add_learner(self, node_id: NodeId) -> int | None:
        """Propose adding ``node_id`` as a learner; it takes effect on every node when committed, and
        adding a current member is a committed no-op. None when not the leader."""
        if self._role is not Role.LEADER:
            return None
        return self._append_as_leader(EntryKind.CONF, encode_conf_change(AddLearner(node_id=node_id)))

    def step(self, m: Message) -> None:
        """Handle one message from a peer. Stale, duplicated and reordered messages are expected."""
        if m.dst != self._id:
            logger.warning("%s dropped %s addressed to %s", self._id, type(m).__name__, m.dst)
            return
        if isinstance(m, PreVoteRequest | VoteRequest) and not self._log:
            return  # not in any cluster yet
        # A learner does answer: it may be a voter that has not yet learned of its promotion (the change
        # commits on the leader first), and without its vote the new voter set may have no majority.
        # Candidates count only the voters of their own configuration, so a real learner's vote is inert.
        if m.term > self._term:
            # Leader lease: while we hear from a leader, a higher-term vote request comes from a node
            # that cannot see that leader; letting it bump our term would depose a healthy one.
            if (
                isinstance(m, PreVoteRequest | VoteRequest)
                and self._cfg.check_quorum
                and self._lead is not None
                and self._in_lease()
            ):
                return
            if isinstance(m, PreVoteRequest) or (isinstance(m, PreVoteResponse) and m.granted):
                pass  # pre-vote never changes terms; a grant echoes the term we would campaign at
            elif isinstance(m, AppendEntries | Heartbeat):
                self._become_follower(m.term, m.src)
            elif isinstance(m, VoteRequest):
                # A newer term, but no timer restarts: only a vote granted or a leader heard does that
                # (Figure 2). Otherwise a candidate whose log can never win (without pre-vote) pushes
                # back the timeout of every node whose log could, each time it stands.
                elapsed = self._election_elapsed
                self._become_follower(m.term, None)
                self._election_elapsed = elapsed
            else:
                self._become_follower(m.term, None)
        elif m.term < self._term:
            if isinstance(m, AppendEntries | Heartbeat):
                # "Reply false if term < currentTerm" (Figure 2). It matters beyond the paper: if we
                # raised our term while cut off, pre-vote and the lease keep our vote requests from
                # spreading it, so this reply is how that leader learns it and steps down.
                self._send(AppendResponse(self._term, self._id, m.src, success=False, index=0))
            elif isinstance(m, PreVoteRequest | VoteRequest):
                # "Reply false if term < currentTerm" (Figure 2): the stale candidate learns our term.
                self._answer_vote(m, self._term, granted=False)
            return

        if isinstance(m, PreVoteRequest | VoteRequest):
            self._handle_vote_request(m)
            return
        if isinstance(m, PreVoteResponse | VoteResponse):
            self._learn_commit(m.commit, m.commit_term)
        if self._role in _LEADING:
            self._step_leader(m)
        elif self._role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # -- output --------------------------------------------------------------------------------------

    def has_ready(self) -> bool:
        # Field by field rather than building the structs: the driver asks after every step.
        hard, soft = self._persisted_hard, self._reported_soft
        return bool(
            self._msgs
            or self._role_changes
            or self._unstable_from <= len(self._log)
            or self._commit > self._applied
            or self._term != hard.term
            or self._vote != hard.vote
            or self._commit != hard.commit
            or self.leader != soft.leader
            or self._role is not soft.role
        )

    def ready(self) -> Ready:
        """Collect the work accumulated since the last Ready; see :class:`Ready` for what to do with it."""
        if self._outstanding is not None:
            raise RaftUsageError(f"{self._id}: ready() called again before advance()")
        hard = self._hard_state()
        soft = self._soft_state()
        rd = Ready(
            hard_state=hard if hard != self._persisted_hard else None,
            entries=tuple(self._log[self._unstable_from - 1 :]),
            messages=tuple(self._msgs),
            committed_entries=tuple(self._log[self._applied : self._commit]),
            soft_state=soft if soft != self._reported_soft else None,
            role_changes=tuple(self._role_changes),
        )
        self._msgs = []
        self._role_changes = []
        self._reported_soft = soft
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """Acknowledge that ``rd`` was persisted, sent and applied."""
        if rd is not self._outstanding:
            raise RaftUsageError(f"{self._id}: advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        if rd.hard_state is not None:
            self._persisted_hard = rd.hard_state
        if rd.entries:
            last = rd.entries[-1]
            # Steps between ready() and advance() may have replaced that suffix; same term at the last
            # index means (log matching) the persisted prefix is still ours.
            if self._term_at(last.index) == last.term:
                self._unstable_from = max(self._unstable_from, last.index + 1)
        if rd.committed_entries:
            self._applied = rd.committed_entries[-1].index

    # -- elections -----------------------------------------------------------------------------------

    def _promotable(self) -> bool:
        return self._id in self._voters and (self._cfg.can_campaign or bool(self._behind))

    def _caretaker_delay(self) -> int:
        """A would-be caretaker waits one election period more than a coordinator-eligible node, so a
        candidate that can win without it goes first."""
        return 0 if self._cfg.can_campaign else self._cfg.election_ticks

    def _in_lease(self) -> bool:
        return self._election_elapsed < self._cfg.election_ticks

    def _quorum(self) -> int:
        return len(self._voters) // 2 + 1

    def _draw_timeout(self) -> int:
        return self._cfg.election_ticks + self._rng.randrange(
            self._cfg.election_jitter_ticks or self._cfg.election_ticks
        )

    def _start_campaign(self) -> None:
        self._campaign(pre=self._cfg.pre_vote)

    def _campaign(self, *, pre: bool) -> None:
        if pre:
            self._become(Role.PRE_CANDIDATE, self._term, None)
            term = self._term + 1
        else:
            self._become(Role.CANDIDATE, self._term + 1, None)
            self._vote = self._id
            term = self._term
        if self._poll(self._id, True):
            return
        last_index, last_term = len(self._log), self._term_at(len(self._log))
        request = PreVoteRequest if pre else VoteRequest
        for voter in self._voters:
            if voter != self._id:
                self._send(request(term, self._id, voter, last_index, last_term))

    def _poll(self, voter: NodeId, granted: bool) -> bool:
        """Record a (pre-)vote; act on a decided election. True once decided."""
        if voter not in self._voters:
            return False
        self._votes.setdefault(voter, granted)
        return self._tally()

    def _tally(self) -> bool:
        """Act on a decided election; True once decided. Only current voters count: the voter set can
        change under a campaign (see :meth:`_learn_commit`)."""
        yes = sum(1 for v, granted in self._votes.items() if granted and v in self._voters)
        no = sum(1 for v, granted in self._votes.items() if not granted and v in self._voters)
        if yes >= self._quorum():
            if self._role is Role.PRE_CANDIDATE:
                self._campaign(pre=False)
            else:
                self._become_leader()
            return True
        if len(self._voters) - no < self._quorum():
            self._become_follower(self._term, None)
            return True
        return False

    def _handle_vote_request(self, m: PreVoteRequest | VoteRequest) -> None:
        pre = isinstance(m, PreVoteRequest)
        if pre and self._role is Role.PRE_CANDIDATE and m.term == self._term + 1:
            # Two pre-candidates for the same term would both pass pre-vote, both stand, vote for
            # themselves and split the vote (another election timeout, 0.5 s or more). The one with
            # the more up-to-date log, then the lower id, goes on; the other grants and stands down.
            # Pre-votes promise nothing, so this only decides who runs first, never who may win. A
            # pre-candidate whose own round has not succeeded within two heartbeat intervals (its
            # requests may not get through: a one-way link) no longer stands in the other's way.
            ours = (self._term_at(len(self._log)), len(self._log))
            theirs = (m.last_log_term, m.last_log_index)
            fresh = self._election_elapsed <= 2 * self._cfg.heartbeat_ticks
            if fresh and (ours > theirs or (ours == theirs and self._id < m.src)):
                self._answer_vote(m, self._term, granted=False)
                return
            if self._may_grant_vote(m):
                self._become_follower(self._term, None)
                self._answer_vote(m, m.term, granted=True)
                return
        if self._may_grant_vote(m):
            if not pre:
                self._election_elapsed = 0
                self._vote = m.src
                self._behind.clear()
            self._answer_vote(m, m.term, granted=True)
        else:
            if (
                not self._cfg.can_campaign
                and self._id in self._voters
                and m.src in self._voters
                and not self._log_up_to_date(m.last_log_index, m.last_log_term)
            ):
                self._behind.add(m.src)
            self._answer_vote(m, self._term, granted=False)

    def _answer_vote(self, m: PreVoteRequest | VoteRequest, term: int, *, granted: bool) -> None:
        answer = PreVoteResponse if isinstance(m, PreVoteRequest) else VoteResponse
        commit_term = self._term_at(self._commit)
        self._send(answer(term, self._id, m.src, granted, commit=self._commit, commit_term=commit_term))

    def _learn_commit(self, commit: int, commit_term: int) -> None:
        """A peer knows ``commit`` is committed, its entry there of ``commit_term``. If ours there has
        that term, our log up to there is the same (log matching), so it is committed too, voter
        changes included: a candidate that missed a leader's last commit (a leader that committed its
        own demotion steps down) learns the voter set it must win. A leader learns its commit index
        from its followers only."""
        if self._role in _LEADING or commit <= self._commit or self._term_at(commit) != commit_term:
            return
        self._commit_to(commit)
        if self._role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
            self._tally()  # undecided still, unless the voter set changed

    def _may_grant_vote(self, m: PreVoteRequest | VoteRequest) -> bool:
        """At most one candidate per term (§5.2), and only one whose log is at least as up-to-date as
        ours (§5.4.1); a pre-vote for a future term promises nothing. (Non-voters never get here.)"""
        can_vote = (
            self._vote == m.src
            or (self._vote is None and self._lead is None)
            or (isinstance(m, PreVoteRequest) and m.term > self._term)
        )
        return can_vote and self._log_up_to_date(m.last_log_index, m.last_log_term)

    def _log_up_to_date(self, last_index: int, last_term: int) -> bool:
        my_term = self._term_at(len(self._log))
        return last_term > my_term or (last_term == my_term and last_index >= len(self._log))

    def _step_candidate(self, m: Message) -> None:
        if isinstance(m, AppendEntries | Heartbeat):
            self._become_follower(self._term, m.src)
            self._step_follower(m)
        elif isinstance(m, PreVoteResponse) and self._role is Role.PRE_CANDIDATE:
            # Grants echo term + 1; a grant for any other term belongs to an earlier pre-campaign.
            if not m.granted or m.term == self._term + 1:
                self._poll(m.src, m.granted)
        elif isinstance(m, VoteResponse) and self._role is Role.CANDIDATE:
            self._poll(m.src, m.granted)

    # -- role changes --------------------------------------------------------------------------------

    def _become(self, role: Role, term: int, lead: NodeId | None) -> None:
        if term != self._term:
            self._term = term
            self._vote = None
        self._role = role
        self._lead = lead
        self._lead_caretaker = False
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._draw_timeout()
        self._votes = {}
        self._progress = {}
        change = RoleChange(self._id, role, term)
        self._role_changes.append(change)
        logger.info("%s", change)

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        self._become(Role.FOLLOWER, term, lead)

    def _become_leader(self) -> None:
        self._become(Role.LEADER if self._cfg.can_campaign else Role.CARETAKER, self._term, self._id)
        next_index = len(self._log) + 1
        for peer in (*self._voters, *self._learners):
            self._progress[peer] = _Progress(next_index)
        own = self._progress.setdefault(self._id, _Progress(next_index))
        own.match, own.probe, own.recent_active = len(self._log), False, True
        # A new leader cannot know which older entries are committed until an entry of its own term
        # commits (§5.4.2, §8); the no-op makes that happen without waiting for a client.
        self._append_as_leader(EntryKind.NOOP, b"")

    # -- leader --------------------------------------------------------------------------------------

    def _tick_leader(self) -> None:
        if self._role is Role.CARETAKER and (
            self._election_elapsed >= self._cfg.election_ticks
            or any(p in self._progress and self._progress[p].match >= len(self._log) for p in self._behind)
        ):
            # A candidate it refused now holds its whole log, no-op included (the newest term there
            # is), so that candidate can win; or one period is over: stand down either way.
            self._behind.clear()
            self._become_follower(self._term, None)
            return
        self._heartbeat_elapsed += 1
        if self._election_elapsed >= self._cfg.election_ticks:
            self._election_elapsed = 0
            if self._cfg.check_quorum:
                active = sum(
                    1
                    for v in self._voters
                    if v == self._id or (v in self._progress and self._progress[v].recent_active)
                )
                for peer, pr in self._progress.items():
                    if peer != self._id:
                        pr.recent_active = False
                if active < self._quorum():
                    self._become_follower(self._term, None)
                    return
        if self._heartbeat_elapsed >= self._cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            for peer, pr in self._progress.items():
                if peer != self._id:
                    commit = min(pr.match, self._commit)
                    self._send(Heartbeat(self._term, self._id, peer, commit, self._role is Role.CARETAKER))

    def _append_as_leader(self, kind: EntryKind, data: bytes) -> int:
        index = len(self._log) + 1
        self._log.append(Entry(index=index, term=self._term, kind=kind, data=data))
        own = self._progress[self._id]
        own.match, own.next = index, index + 1
        self._maybe_commit()
        self._broadcast_append()
        return index

    def _broadcast_append(self) -> None:
        for peer in self._progress:
            if peer != self._id:
                self._send_append(peer)

    def _send_append(self, peer: NodeId) -> None:
        pr = self._progress.get(peer)
        if pr is None or self._role not in _LEADING:
            return  # stepped down while committing (its own demotion)
        if pr.probe and pr.probe_sent:
            return  # a probe is in flight; a heartbeat response or refusal resumes us
        prev = pr.next - 1
        entries = tuple(self._log[prev : prev + self._cfg.max_append_entries])
        caretaker = self._role is Role.CARETAKER
        self._send(
            AppendEntries(
                self._term, self._id, peer, prev, self._term_at(prev), entries, self._commit, caretaker
            )
        )
        if pr.probe:
            pr.probe_sent = True
        elif entries:
            pr.next = entries[-1].index + 1

    def _step_leader(self, m: Message) -> None:
        pr = self._progress.get(m.src)
        if isinstance(m, AppendResponse) and pr is not None:
            pr.recent_active = True
            if m.success:
                self._handle_append_success(m, pr)
            else:
                self._handle_append_refusal(m, pr)
        elif isinstance(m, HeartbeatResponse) and pr is not None:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.match < len(self._log):
                self._send_append(m.src)
        elif isinstance(m, AppendEntries | Heartbeat):
            logger.error("%s is leader at term %d but %s claims to be too", self._id, self._term, m.src)

    def _handle_append_success(self, m: AppendResponse, pr: _Progress) -> None:
        was_probe, was_paused = pr.probe, pr.probe and pr.probe_sent
        if pr.update(m.index) or (was_probe and pr.match == m.index):
            if was_probe:
                pr.replicate_from_match()
            if self._maybe_commit():
                self._broadcast_append()
                return
        if was_paused and pr.next > len(self._log):
            # A paused peer was skipped by the broadcasts that carried our latest commit index.
            self._send_append(m.src)
        self._fill_pipeline(m.src, pr)

    def _fill_pipeline(self, peer: NodeId, pr: _Progress) -> None:
        """Keep up to ``max_inflight_appends`` appends in flight to a replicating peer (one to a
        probed one), so catching up takes round trips per window, not per message."""
        window = self._cfg.max_inflight_appends * self._cfg.max_append_entries
        while pr.next <= len(self._log) and pr.next - 1 - pr.match < window:
            self._send_append(peer)
            if pr.probe:
                return

    def _handle_append_refusal(self, m: AppendResponse, pr: _Progress) -> None:
        if m.index <= pr.match:
            return  # refused an append whose prefix the peer has acknowledged since: stale
        if self._term_at(m.reject_hint) == m.hint_term:
            # Log matching: the peer holds our entries up to the hint, and what follows is missing
            # (lost, or overtaken by a later append) or conflicting. Resending from there costs no
            # probe round trip, and pipelined appends that arrive out of order cannot make us thrash.
            committed = pr.update(m.reject_hint) and self._maybe_commit()
            pr.replicate_from_match()
            if committed:
                self._broadcast_append()
            else:
                self._send_append(m.src)
            return
        back_to = self._find_conflict_by_term(m.reject_hint, m.hint_term)
        if pr.probe_from(m.index, min(m.index, back_to + 1)):
            self._send_append(m.src)

    def _maybe_commit(self) -> bool:
        """Commit the highest index held by a majority of voters, but only if it is of this leader's
        term: an older entry on a majority can still be overwritten (Raft §5.4.2, Figure 8). A voter
        change that commits changes the majority, so look again until nothing moves."""
        committed = False
        while self._role in _LEADING:
            matches = sorted(
                (self._progress[v].match for v in self._voters if v in self._progress), reverse=True
            )
            if len(matches) < self._quorum():
                break
            index = matches[self._quorum() - 1]
            if index > self._commit and self._term_at(index) == self._term:
                self._commit_to(index)
                committed = True
                if self._id not in self._voters:
                    # It committed its own demotion (it won an election before learning of it): tell
                    # everyone the new commit index, so they apply the new voter set, then step down.
                    # A leader that is not a voter would count a majority it is not part of.
                    for peer, pr in self._progress.items():
                        if peer != self._id:
                            pr.probe_sent = False  # even a peer with a probe in flight must hear it
                            self._send_append(peer)
                    self._become_follower(self._term, None)
                    break
                continue
            break
        return committed

    # -- follower ------------------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, AppendEntries | Heartbeat):
            self._election_elapsed = 0
            self._lead, self._lead_caretaker = m.src, m.caretaker
            self._behind.clear()
        if isinstance(m, AppendEntries):
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            # The leader caps ``commit`` at what it knows we hold; the clamp only matters if this
            # node lost acknowledged entries, which the fsync contract rules out.
            self._commit_to(min(m.commit, len(self._log)))
            self._send(HeartbeatResponse(self._term, self._id, m.src))

    def _handle_append(self, m: AppendEntries) -> None:
        for offset, entry in enumerate(m.entries):
            if entry.index != m.prev_log_index + 1 + offset or entry.term > m.term:
                logger.warning("%s dropped a malformed append from %s", self._id, m.src)
                return
        if m.prev_log_index < self._commit:
            # Everything up to our commit index already matches any legitimate leader.
            self._send(AppendResponse(self._term, self._id, m.src, success=True, index=self._commit))
            return
        if self._term_at(m.prev_log_index) != m.prev_log_term:
            hint = min(m.prev_log_index, len(self._log))
            hint = self._find_conflict_by_term(hint, m.prev_log_term)
            self._send(
                AppendResponse(
                    self._term,
                    self._id,
                    m.src,
                    success=False,
                    index=m.prev_log_index,
                    reject_hint=hint,
                    hint_term=self._term_at(hint),
                )
            )
            return
        last_new = m.prev_log_index + len(m.entries)
        for offset, entry in enumerate(m.entries):
            if self._term_at(entry.index) != entry.term:
                # Only a conflicting or missing entry changes the log: a delayed, shorter append must
                # not cut off entries we already acknowledged to this leader. (entry.index > prev >=
                # commit here, so a committed entry is never cut.)
                del self._log[entry.index - 1 :]
                self._log.extend(m.entries[offset:])
                self._unstable_from = min(self._unstable_from, entry.index)
                break
        self._commit_to(min(m.commit, last_new))
        self._send(AppendResponse(self._term, self._id, m.src, success=True, index=last_new))

    # -- log -----------------------------------------------------------------------------------------

    def _term_at(self, index: int) -> int:
        if index == 0:
            return 0
        if 0 < index <= len(self._log):
            return self._log[index - 1].term
        return _NO_TERM

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= ``index`` whose term is <= ``term``: every entry after it is known not to
        match a log whose entry at ``index`` has ``term``, so back-off skips whole terms."""
        index = min(index, len(self._log))
        while index > 0 and self._log[index - 1].term > term:
            index -= 1
        return index

    def _commit_to(self, index: int) -> None:
        if index <= self._commit:
            return  # the commit index never moves backwards
        for entry in self._log[self._commit : index]:
            if entry.kind is EntryKind.CONF:
                self._apply_conf(entry)
        self._commit = index

    def _apply_conf(self, entry: Entry) -> None:
        """Membership takes effect when committed; learners do not change quorums, so any later point
        would be as safe, and committing keeps every node's view identical at each index."""
        change = decode_conf_change(entry.data)
        if isinstance(change, Bootstrap):
            if self._voters:
                raise RaftInvariantError(f"{self._id}: second bootstrap entry at index {entry.index}")
            self._voters = tuple(sorted(change.voters))
            self._cluster_id = change.cluster_id
            return
        if isinstance(change, ForceVoters):
            members = [*self._voters, *self._learners]
            self._voters = tuple(sorted(change.voters))
            self._learners = [m for m in members if m not in self._voters]
            self._after_membership_change()
            return
        if isinstance(change, AddVoter):
            if change.node_id in self._voters:
                return
            if change.node_id in self._learners:
                self._learners.remove(change.node_id)
            self._voters = tuple(sorted((*self._voters, change.node_id)))
            self._after_membership_change(added=change.node_id)
            return
        if isinstance(change, RemoveVoter):
            if change.node_id not in self._voters or len(self._voters) == 1:
                return
            self._voters = tuple(v for v in self._voters if v != change.node_id)
            self._learners.append(change.node_id)
            self._after_membership_change()
            return
        if change.node_id in self._voters or change.node_id in self._learners:
            return
        self._learners.append(change.node_id)
        self._after_membership_change(added=change.node_id)

    def _after_membership_change(self, added: NodeId | None = None) -> None:
        if self._role not in _LEADING:
            if self._role is not Role.FOLLOWER and not self._promotable():
                self._become_follower(self._term, None)  # a candidate that stopped being a voter
            return
        if self._id not in self._voters:
            return  # its own demotion committed: _maybe_commit tells the others, then steps down
        if added is not None and added != self._id and added not in self._progress:
            self._progress[added] = _Progress(len(self._log) + 1)
            self._send_append(added)

    # -- plumbing ------------------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _hard_state(self) -> HardState:
        return HardState(term=self._term, vote=self._vote, commit=self._commit)

    def _soft_state(self) -> SoftState:
        return SoftState(leader=self.leader, role=self._role)
