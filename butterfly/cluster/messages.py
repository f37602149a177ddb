"""What Butterfly nodes say to each other besides Raft, and what the Raft log carries.

Peer messages (the "cluster" channel of the transport):
- ``NodeReport``: sent by every node to every peer every report interval; liveness and capabilities,
  the node's fault when it has one (so every peer can name it, and a failed node stops being
  planned for), and the peers it is connected to (so every node finds every other).
- ``Founding``: entry 1 of a new cluster (its first voters and cluster id), sent by the founder and
  resent by any member to founding voters that have no Raft state yet (see butterfly.raft's docstring).
- ``ValidationReport`` / ``ValidationVerdict``: a node's Merkle leaves for its assignment, with a range
  proof against the manifest root, and the coordinator's answer.
- ``LeasePing`` / ``LeasePong``: the serving lease (butterfly.cluster.lease).
Log entries (data of NORMAL Raft entries): ``PlanEntry`` and ``OperationalEntry``. Everything a node
acts on about the cluster comes from a committed entry, fenced by the plan epoch and the term that
proposed it.

This module holds data shapes and their encoding only.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_PEERS = 1024
"""The most peers a NodeReport may name: a report naming more is malformed and dropped."""


class NodeReport(msgspec.Struct, tag=True, frozen=True):
    node_id: str
    cluster_name: str
    role: str
    memory_bytes: int
    throughput: float
    cached_blocks: tuple[int, ...] = ()
    cluster_id: str = ""
    # The epoch this node last validated locally, or 0; helps a new coordinator skip waiting.
    validated_epoch: int = 0
    # Why this node cannot serve its range now ('' when it can), and the blocks [fault_start,
    # fault_stop) it held (0, 0: none). ``failed``: for good (the node is FAILED), so it must not be
    # planned for; otherwise it is retrying or repairing and keeps its range.
    fault: str = ""
    failed: bool = False
    fault_start: int = 0
    fault_stop: int = 0
    # "host:port" of this node's inference engine (stage links, forwarded requests).
    engine_address: str = ""
    # (node id, advertised "host:port") of every peer this node holds an authenticated connection
    # to: how nodes seeded with one address (workers given only the coordinator) find the rest.
    peers: Annotated[tuple[tuple[str, str], ...], msgspec.Meta(max_length=MAX_PEERS)] = ()


class Founding(msgspec.Struct, tag=True, frozen=True):
    voters: tuple[str, ...]
    cluster_id: str


class ValidationReport(msgspec.Struct, tag=True, frozen=True):
    epoch: int
    node_id: str
    start: int
    stop: int
    manifest_root: str
    unit_start: int
    unit_digests: list[bytes]
    proof: list[bytes]


class ValidationVerdict(msgspec.Struct, tag=True, frozen=True):
    epoch: int
    node_id: str
    ok: bool
    reason: str = ""


class LeasePing(msgspec.Struct, tag=True, frozen=True):
    """Coordinator -> member, every lease round (butterfly.cluster.lease): ``seq`` numbers the round;
    ``grant_s`` seconds of serving lease counted from when the member sent its pong ``grant_seq``,
    for plan ``epoch`` (0: the member may not serve, and ``reason`` says why, naming the node or
    blocks that hold the cluster up)."""

    term: int
    seq: int
    grant_seq: int
    grant_s: float
    epoch: int
    reason: str = ""


class LeasePong(msgspec.Struct, tag=True, frozen=True):
    """Member -> coordinator, answering ping ``seq``: the member's own ``pong_seq``, and for a voter
    following that coordinator (learners too) how long from now it will not vote for another
    (``promise_s``)."""

    term: int
    seq: int
    pong_seq: int
    promise_s: float


PeerMessage = NodeReport | Founding | ValidationReport | ValidationVerdict | LeasePing | LeasePong


class Assignment(msgspec.Struct, frozen=True, array_like=True):
    node_id: str
    start: int
    stop: int


class PlanEntry(msgspec.Struct, tag=True, frozen=True):
    epoch: int
    term: int
    manifest_root: str
    num_units: int
    num_blocks: int
    assignments: tuple[Assignment, ...]

    def range_of(self, node_id: str) -> Assignment | None:
        return next((a for a in self.assignments if a.node_id == node_id), None)


class OperationalEntry(msgspec.Struct, tag=True, frozen=True):
    epoch: int
    term: int


LogCommand = PlanEntry | OperationalEntry

_enc = msgspec.msgpack.Encoder()
_peer_dec = msgspec.msgpack.Decoder(PeerMessage)
_cmd_dec = msgspec.msgpack.Decoder(LogCommand)


def encode(msg: PeerMessage | LogCommand) -> bytes:
    return _enc.encode(msg)


def decode_peer(data: bytes) -> PeerMessage:
    return _peer_dec.decode(data)


def decode_command(data: bytes) -> LogCommand:
    return _cmd_dec.decode(data)
