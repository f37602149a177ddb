"""Raft for Butterfly: the pure consensus core, its message vocabulary and durable storage.

This package owns the consensus rules (``core``), the typed messages and entries (``messages``) and the
crash-safe file that holds hard state and log (``storage``). It must not own sockets, timers, discovery
or the state machine the log feeds: the asyncio driver in ``butterfly.cluster`` steps the core, saves
each :class:`Ready` with :class:`RaftStorage` before sending its messages, applies committed entries,
and turns wall-clock time into ticks.

Design note: how the voter set is fixed at bootstrap
----------------------------------------------------
*What the core does.* The core never chooses voters. Entry 1 of every bootstrapped log is a CONF entry
(:class:`Bootstrap`) naming the voter set and a cluster id; :func:`bootstrap_state` builds it, term 1,
already committed, byte-identical on every voter. Nodes that arrive later start with no state, get
entry 1 from the leader and become learners when the leader commits :class:`AddLearner` for them; they
replicate and apply the log but never vote, campaign or count towards commit. Changing the voter set
after bootstrap is out of scope (the Raft thesis' joint consensus / one-at-a-time changes would be the
way); so is leader transfer. The transport must refuse a peer whose cluster id differs from ours,
because two logs from different bootstraps both start with an (index 1, term 1) entry and Raft's log
matching check could not tell them apart.

*The danger.* quorum_size nodes know each other and bootstrap; elsewhere, another quorum_size nodes
that cannot see the first group do the same. Two clusters, two coordinators: split brain. No rule based
only on what a group can discover prevents this: two groups that cannot reach each other see symmetric
worlds. Safety needs one assumption shared by every node, and voter sets that merely *overlap* are not
enough: voters {a,b,c} and {c,d,e} share c, yet {a,b} and {d,e} are majorities of their own sets and
can both elect a leader.

*The rule we choose (pledges).* (1) Only coordinator-eligible nodes (``can_campaign``; workers never)
take part; workers and late nodes join as learners. (2) A node that knows at least quorum_size eligible,
authenticated nodes (itself included), and whose discovery view has been stable for a settle period,
proposes V = the quorum_size lowest node ids it knows; the same view gives the same V everywhere. (3) A
member of V durably records a pledge to V (fsync'd, beside the Raft log) and never pledges to another
set. (4) A member writes :func:`bootstrap_state` (V) and starts Raft only after it has seen pledges to V
from *every* member of V. Two completed bootstraps V1 != V2 would therefore have disjoint members (a
shared node pledges once) — 2 x quorum_size distinct eligible nodes. So the rule is safe exactly when
the operator starts at most 2 x quorum_size - 1 coordinator-eligible nodes for one cluster, i.e. when
quorum_size is a strict majority of them (quorum_size = 3: at most 5 coordinators; any number of
workers), and when pledges are as durable as the Raft log (a node whose disk is wiped must come back
under a new id). That is the guarantee and its assumptions. Once bootstrapped, Raft needs a majority
of V (2 of 3 for quorum_size = 3) to elect a coordinator and commit.

*What it does not guarantee.* Liveness: if views differ while pledging, members can pledge to different
sets and no set completes; the node then waits and says so on /status. A pledge is never withdrawn
automatically: without ballot numbers (that is, Paxos) a delayed old pledge could complete a set its
sender had left. An operator clears it (``butterfly-admin``) on the stuck nodes. If the operator cannot
promise the bound above (for instance, coordinators autoscaled behind DNS or Consul), the only safe rule
is the seed list: voters are exactly the coordinator nodes listed in the configuration, identical on
every node, and quorum_size must be a majority of that list; bootstrap waits until quorum_size of them
are reachable.
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
)
from butterfly.raft.messages import (
    AddLearner,
    AppendEntries,
    AppendResponse,
    Bootstrap,
    ConfChange,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    NodeId,
    PreVoteRequest,
    PreVoteResponse,
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
    "AppendEntries",
    "AppendResponse",
    "Bootstrap",
    "ConfChange",
    "Entry",
    "EntryKind",
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
    "Role",
    "RoleChange",
    "SoftState",
    "StorageCorrupt",
    "StorageError",
    "VoteRequest",
    "VoteResponse",
    "bootstrap_state",
    "decode_conf_change",
    "decode_message",
    "encode_conf_change",
    "encode_message",
]
