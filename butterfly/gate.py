"""The serving gate: the one function that decides whether this node may serve right now.

``may_serve(snap, now_mono_ns)`` reads one board snapshot and the monotonic clock and answers a
``ServeVerdict``. /ready, ``NodeStatus.may_serve`` (and so the state shown as OPERATIONAL), the
metrics and the inference engine all ask this function and nothing else, so they cannot disagree.
It is pure: no I/O, no clock of its own, no state between calls; call it before every step you serve.

A node may serve epoch E only while every one of these holds (the first that fails is the reason):
1. the supervisor put the node in OPERATIONAL for epoch E (``node.serving_epoch``): its range of the
   committed plan E is loaded and validated here, and the coordinator committed "operational at E";
2. the cluster child has not applied a newer plan (``cluster.epoch == E``): a new epoch stops serving
   the moment it is applied, before anything is reloaded;
3. the supervisor and every child beat their heartbeat within ``STALE_AFTER_NS``: a hung (SIGSTOPped,
   deadlocked) or dead process stops serving, long before the supervisor kills it;
4. the validator has not found weights in memory that are not the model's (``validator.fault``, set
   by scrubbing or a validation the moment it finds one, cleared when a validation passes again);
   the engine child (which runs the node's stage of the pipeline) is one of the children; a dead or
   frozen engine elsewhere in the pipeline ends requests through the stage links' own bound
   (butterfly.serving.stage);
5. the engine child has built its stage of epoch E over the validated arena (``engine.serving``);
6. the node holds a serving lease for epoch E (``cluster.lease_epoch == E`` and ``now <
   cluster.lease_until_mono_ns``): its coordinator granted it, and the coordinator held its own lease
   from a quorum of voters that promised not to elect another coordinator meanwhile
   (butterfly.cluster.lease). The coordinator names epoch 0 (no lease) while a planned node is
   silent or failed, or a newer plan is proposed, so the whole cluster stops serving together.

Bounds (from the moment the fact changes to the moment this function says no):
- a new plan applied on this node: immediately (check 2);
- a hung child or supervisor: ``STALE_AFTER_NS`` (1.0 s, four missed heartbeats); a dead child: at
  once (the supervisor clears ``serving_epoch`` on its exit, and while a child cannot be started
  again it stays cleared; check 1);
- weights found changed in memory: immediately (check 4; scrubbing finds them within a pass);
- quorum lost, coordinator dead, frozen (node or cluster child) or cut off: the lease runs out at
  most ``PROMISE_S`` (0.44 s) after the coordinator last heard a quorum, and a member's at most that
  long after its last lease exchange with the coordinator (check 6). A new coordinator needs at
  least an election timeout (0.5 s) after the voters last heard the old one, so leases never overlap
  a new coordinator's term; a non-voting node (learner, worker) times out the same way;
- a planned node dead, frozen, cut off or failed: the coordinator revokes every lease once the node
  has not answered its lease pings for ``SILENT_STOPS_SERVING_S`` (1.0 s; butterfly.cluster.driver),
  or reports itself failed, and a member stops on the revoke (one message) or at its lease's end if
  it misses it. A new coordinator grants nothing until every planned node has answered it. The
  re-plan waits for the longer ``DEAD_AFTER_S`` (1.5 s).

This module must not write the board, read a clock, or know how the values got there.
"""

from __future__ import annotations

from dataclasses import dataclass

from butterfly.board import BoardSnapshot
from butterfly.states import NodeState
from butterfly.supervisor.childproc import HEARTBEAT_S

# A process whose heartbeat is older than this stops the node serving (children beat every
# HEARTBEAT_S; the supervisor's serving loop as often). Killing it waits for the much longer
# supervisor.heartbeat_timeout_s: not serving is cheap to undo, a restart is not.
STALE_AFTER_NS = int(4 * HEARTBEAT_S * 1e9)


@dataclass(frozen=True, slots=True)
class ServeVerdict:
    """``ok``: may serve ``epoch`` now. Otherwise ``reason`` says why not (one line) and epoch is 0."""

    ok: bool
    reason: str
    epoch: int


def _no(reason: str) -> ServeVerdict:
    return ServeVerdict(False, reason, 0)


def _stale(name: str, beat_ns: int, now_ns: int) -> str:
    age = now_ns - beat_ns
    if beat_ns == 0:
        return f"{name} has not started"
    if age > STALE_AFTER_NS:
        return f"{name} silent for {age / 1e9:.1f}s"
    return ""


def may_serve(snap: BoardSnapshot, now_mono_ns: int) -> ServeVerdict:
    """Whether this node may serve at ``now_mono_ns`` (``time.monotonic_ns()``), and which epoch."""
    node, cl = snap.node, snap.cluster
    state = NodeState(node.state) if node.state in NodeState._value2member_map_ else None
    epoch = node.serving_epoch
    if state is not NodeState.OPERATIONAL or epoch == 0:
        name = state.name if state is not None else f"unknown ({node.state})"
        return _no(f"state {name}: no validated operational epoch")
    if cl.epoch != epoch:
        return _no(f"plan epoch {cl.epoch} applied; this node validated epoch {epoch}")
    for name, beat in (
        ("supervisor", node.heartbeat_mono_ns),
        ("cluster child", cl.heartbeat_mono_ns),
        ("loader child", snap.loader.heartbeat_mono_ns),
        ("validator child", snap.validator.heartbeat_mono_ns),
        ("engine child", snap.engine.heartbeat_mono_ns),
    ):
        why = _stale(name, beat, now_mono_ns)
        if why:
            return _no(why)
    if snap.validator.fault:
        return _no("the validator found weights in memory that are not the model's")
    if not snap.engine.serving or snap.engine.epoch != epoch:
        return _no(f"the engine has not built its stage of epoch {epoch}")
    if cl.lease_epoch != epoch or cl.lease_until_mono_ns == 0:
        return _no(f"no serving lease for epoch {epoch} from the coordinator")
    if now_mono_ns >= cl.lease_until_mono_ns:
        ago = (now_mono_ns - cl.lease_until_mono_ns) / 1e9
        return _no(f"serving lease from the coordinator expired {ago:.2f}s ago")
    return ServeVerdict(True, "", epoch)
