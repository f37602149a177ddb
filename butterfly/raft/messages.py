"""The Raft vocabulary: log entries, hard state, membership changes and the messages peers exchange.

This module owns the typed shapes (msgspec Structs, tagged so one decoder reads any message) and their
msgpack encoding. It must not decide anything: no Raft rule lives here, and it does no I/O. Frame size
limits, authentication and sockets belong to the transport; this module only turns bytes that already
passed those checks into typed values (a malformed body raises ``msgspec.ValidationError``/``DecodeError``,
never returns a half-built message).
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import msgspec

NodeId: TypeAlias = str


class EntryKind(enum.IntEnum):
    """What an entry's ``data`` means. The core interprets CONF entries; NORMAL data is opaque to it."""

    NORMAL = 0
    NOOP = 1
    CONF = 2


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One log entry. ``(index, term)`` names it: Raft's log matching property says two logs holding an
    entry with the same index and term are identical up to it."""

    index: int
    term: int
    kind: EntryKind
    data: bytes = b""


class HardState(msgspec.Struct, frozen=True):
    """What a node must have on stable storage before it speaks: its term, whom it voted for in that
    term, and the highest index it knows to be committed (persisted so the commit index never goes
    backwards across a restart)."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


# -- membership changes, carried as the data of CONF entries ---------------------------------------


class Bootstrap(msgspec.Struct, frozen=True, tag=True, tag_field="op"):
    """Entry 1 of every bootstrapped log: the fixed voter set (see the package docstring for who may
    write it). ``cluster_id`` names this bootstrap so the transport can refuse peers of another one."""

    voters: tuple[NodeId, ...]
    cluster_id: str


class AddLearner(msgspec.Struct, frozen=True, tag=True, tag_field="op"):
    """Adds a non-voter that receives the log but never votes, campaigns or counts towards commit."""

    node_id: NodeId


class AddVoter(msgspec.Struct, frozen=True, tag=True, tag_field="op"):
    """Makes ``node_id`` a voter (a learner is promoted; a node not yet a member joins as a voter).
    One single-server change at a time (Raft thesis §4.1): the core refuses a second while one is
    uncommitted, and refuses any before the leader has committed an entry of its own term."""

    node_id: NodeId


class RemoveVoter(msgspec.Struct, frozen=True, tag=True, tag_field="op"):
    """Demotes the voter ``node_id`` to a learner (it keeps receiving the log, and may be promoted
    again). Same one-at-a-time rules as :class:`AddVoter`."""

    node_id: NodeId


class ForceVoters(msgspec.Struct, frozen=True, tag=True, tag_field="op"):
    """Written only by ``butterfly-admin force-new-cluster`` on a stopped node after the cluster lost
    its quorum for good: the voter set becomes ``voters`` (every other member a learner). It is not
    proposed through a quorum, so it is not safe while any other part of the old cluster still runs."""

    voters: tuple[NodeId, ...]


ConfChange: TypeAlias = Bootstrap | AddLearner | AddVoter | RemoveVoter | ForceVoters

_conf_encoder = msgspec.msgpack.Encoder()
_conf_decoder: msgspec.msgpack.Decoder[ConfChange] = msgspec.msgpack.Decoder(ConfChange)


def encode_conf_change(change: ConfChange) -> bytes:
    return _conf_encoder.encode(change)


def decode_conf_change(data: bytes) -> ConfChange:
    return _conf_decoder.decode(data)


# -- peer messages ---------------------------------------------------------------------------------
# Every message carries the sender's view of the term, its source and its destination. The transport
# must check ``src`` against the authenticated peer id before handing a message to the core.


class PreVoteRequest(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """Asks "would you vote for me at ``term``?"; ``term`` is the candidate's term + 1, and nobody's
    term changes."""

    term: int
    src: NodeId
    dst: NodeId
    last_log_index: int
    last_log_term: int


class PreVoteResponse(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """A grant echoes the request's term; a refusal carries the responder's own term. ``commit`` and
    ``commit_term`` (as in :class:`VoteResponse`) name the responder's commit index."""

    term: int
    src: NodeId
    dst: NodeId
    granted: bool
    commit: int = 0
    commit_term: int = 0


class VoteRequest(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    term: int
    src: NodeId
    dst: NodeId
    last_log_index: int
    last_log_term: int


class VoteResponse(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """``commit`` is the responder's commit index and ``commit_term`` the term of its entry there: a
    candidate whose log holds that entry holds the same prefix (log matching), all of it committed, so
    it may commit up to there. That is how a candidate that missed a committed voter change learns
    the voter set it must win. (Defaults: a peer that sends neither tells nothing.)"""

    term: int
    src: NodeId
    dst: NodeId
    granted: bool
    commit: int = 0
    commit_term: int = 0


class AppendEntries(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """Entries following ``(prev_log_index, prev_log_term)``, and the leader's commit index.
    ``caretaker`` (as in :class:`Heartbeat`): the sender leads only as a caretaker."""

    term: int
    src: NodeId
    dst: NodeId
    prev_log_index: int
    prev_log_term: int
    entries: tuple[Entry, ...]
    commit: int
    caretaker: bool = False


class AppendResponse(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """On success ``index`` is the follower's last index known to match the leader. On refusal
    ``index`` is the refused ``prev_log_index`` and ``(reject_hint, hint_term)`` name the follower's
    last entry that may still match, so the leader skips a whole term per round trip (fast back-off)."""

    term: int
    src: NodeId
    dst: NodeId
    success: bool
    index: int
    reject_hint: int = 0
    hint_term: int = 0


class Heartbeat(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """``commit`` is capped at what the leader knows this follower holds, so it never points past a
    follower's matching prefix. ``caretaker``: the sender is a worker leading only until a candidate
    has its log (``Role.CARETAKER``); its followers name no coordinator meanwhile."""

    term: int
    src: NodeId
    dst: NodeId
    commit: int
    caretaker: bool = False


class HeartbeatResponse(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    term: int
    src: NodeId
    dst: NodeId


Message: TypeAlias = (
    PreVoteRequest
    | PreVoteResponse
    | VoteRequest
    | VoteResponse
    | AppendEntries
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
)

_message_encoder = msgspec.msgpack.Encoder()
_message_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode_message(message: Message) -> bytes:
    """The body of one wire frame; the transport adds length prefix and authentication."""
    return _message_encoder.encode(message)


def decode_message(body: bytes) -> Message:
    """Inverse of :func:`encode_message`; raises ``msgspec.DecodeError`` (or its ``ValidationError``
    subclass) on anything that is not exactly one well-typed message."""
    return _message_decoder.decode(body)
