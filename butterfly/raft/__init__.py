"""Raft for Butterfly: the pure consensus core, its message vocabulary and durable storage.

This package owns the consensus rules (``core``), the typed messages and entries (``messages``) and the
crash-safe file that holds hard state and log (``storage``). It must not own sockets, timers, discovery
or the state machine the log feeds: the asyncio driver in ``butterfly.cluster`` steps the core, saves
each :class:`Ready` with :class:`RaftStorage` before sending its messages, applies committed entries,
and turns wall-clock time into ticks.

Design note: founding, and changing voters later
------------------------------------------------
*What the core does.* The core never chooses voters. Entry 1 of every log is a CONF entry
(:class:`Bootstrap`) naming the first voter set and a cluster id; :func:`bootstrap_state` builds it,
term 1, already committed, byte-identical wherever it is written. Later CONF entries add learners
(:class:`AddLearner`: they replicate and apply the log but never vote, campaign or count towards
commit) and change voters one at a time (:class:`AddVoter`, :class:`RemoveVoter`: the Raft thesis'
single-server changes; see ``core``). The transport refuses a peer whose cluster id differs from
ours: two logs from different foundings both start with an (index 1, term 1) entry, and Raft's log
matching check could not tell them apart.

*The danger.* Two groups that cannot see each other each write an entry 1: two clusters, two
coordinators, split brain. No rule based only on what a group can discover prevents this (the groups
see symmetric worlds), and voter sets that merely overlap are not enough: {a,b,c} and {c,d,e} share c,
yet {a,b} and {d,e} are majorities of their own sets. The earlier rule (each of the quorum_size lowest
ids pledges durably to that set) was safe only while at most 2 x quorum_size - 1 coordinators started,
and deadlocked when views differed while pledging.

*The rule (one founder).* Exactly one node may ever write entry 1: the founder, which every node
computes from the same configuration (``cluster.founder``, or the lowest address of ``seed_nodes`` plus
a coordinator's own, which must then list the same set on every coordinator; workers never found unless
named). Once it sees quorum_size nodes (one at least coordinator-eligible) with no bootstrapped peer, it
picks quorum_size of them (coordinator-eligible ones first; a worker voter never coordinates: see
``Role.CARETAKER`` for the one case where it leads Raft for a moment),
saves entry 1 (fsync'd) and sends it; a chosen voter with no state saves the entry it receives, and any
member resends it to chosen voters still without state. Since only one node writes an entry 1, any
number of nodes may start at once: one cluster forms as soon as the founder and quorum_size nodes are
up. Assumptions: the configuration names one founder, and a node whose state directory is lost comes
back under a new node id (a voter that forgets its vote or log breaks Raft, whatever the founding rule).
Liveness of founding needs the founder; after entry 1 exists it does not.

*After founding.* The coordinator promotes caught-up learners (coordinator-eligible ones first) while
there are fewer than quorum_size voters, and replaces a voter silent for ``voter_grace_s`` (demote it,
then promote a live learner), one change at a time through the log. A cluster that lost a majority of
its voters for good cannot commit anything, including such a change: ``butterfly-admin
force-new-cluster`` (:func:`force_new_cluster_state`), run on one stopped survivor, makes it the only
voter; it then promotes the others back as they return. That step gives up Raft's guarantee for entries
the lost majority may have committed, like etcd's ``--force-new-cluster``.
"""

from butterfly.raft.core import (
    PersistedState,
    RaftConfig,
    RaftConfigError,
    RaftInvariantError,
    RaftNode,
    RaftUsageError,
    Ready,
    Role,
    RoleChange,
    SoftState,
    bootstrap_state,
    force_new_cluster_state,
)
from butterfly.raft.messages import (
    AddLearner,
    AddVoter,
    AppendEntries,
    AppendResponse,
    Bootstrap,
    ConfChange,
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
    decode_message,
    encode_conf_change,
    encode_message,
)
from butterfly.raft.storage import RaftStorage, StorageCorrupt, StorageError

__all__ = [
    "AddLearner",
    "AddVoter",
    "AppendEntries",
    "AppendResponse",
    "Bootstrap",
    "ConfChange",
    "Entry",
    "EntryKind",
    "ForceVoters",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "Message",
    "NodeId",
    "PersistedState",
    "PreVoteRequest",
    "PreVoteResponse",
    "RaftConfig",
    "RaftConfigError",
    "RaftInvariantError",
    "RaftNode",
    "RaftStorage",
    "RaftUsageError",
    "Ready",
    "RemoveVoter",
    "Role",
    "RoleChange",
    "SoftState",
    "StorageCorrupt",
    "StorageError",
    "VoteRequest",
    "VoteResponse",
    "bootstrap_state",
    "force_new_cluster_state",
    "decode_conf_change",
    "decode_message",
    "encode_conf_change",
    "encode_message",
]
