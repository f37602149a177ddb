"""Turns one consistent board snapshot (plus the supervisor's child handles and the whole texts it
keeps, ``Notes``) into a NodeStatus.

Pure function of its inputs (and the clock), so /status, /metrics and systemd's STATUS= line always agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from butterfly import __version__
from butterfly.board import BoardSnapshot
from butterfly.board.layout import MEMBERSHIP
from butterfly.gate import ServeVerdict, may_serve
from butterfly.states import LoadStep, NodeState, Phase
from butterfly.status import (
    ChildStatus,
    IntegrityStatus,
    NodeLayersStatus,
    NodeStatus,
    Notes,
    PeerFaultStatus,
)

# What /status's progress_percent covers in the LOADING state: the weights' bytes (download, verify
# and upload stream together, chunk by chunk), then compile, warmup and validation (re-hashing the
# bytes in memory), each sub-step weighted by its usual share of a load's time on a real model
# (bytes dominate; warmup runs a few tokens; validation hashes at memory speed). Only READY is 100%:
# a node that has every byte but still compiles, warms up or validates is not done.
PROGRESS_WEIGHTS: dict[str, float] = {"bytes": 80.0, "compile": 5.0, "warmup": 5.0, "validation": 10.0}
VALIDATION_BPS_ESTIMATE = 1 << 30
"""Hashing speed assumed for the ETA until validation has measured its own (BLAKE3, one core)."""
_BEFORE_DONE = 99.9


def _progress(snap: BoardSnapshot, phase: Phase, now: int) -> tuple[float, int | None]:
    """(percent, ETA in seconds or None when unknown). The ETA counts what can be estimated from
    measured rates (the bytes still to stream, then validation); it is None during compile and
    warmup, whose length is not known, and 0 only once the node is READY."""
    ld, va, node = snap.loader, snap.validator, snap.node
    w = PROGRESS_WEIGHTS
    validation_s = (ld.bytes_total or va.bytes_total) / VALIDATION_BPS_ESTIMATE
    eta: int | None = None
    if phase is Phase.LOADING_WEIGHTS:
        try:
            step = LoadStep(ld.step)
        except ValueError:
            step = LoadStep.NONE
        if step is LoadStep.COMPILE:
            return w["bytes"], None
        if step is LoadStep.WARMUP:
            return w["bytes"] + w["compile"], None
        if not ld.bytes_total:
            return 0.0, None
        done = min(ld.bytes_done, ld.bytes_total) / ld.bytes_total
        if ld.rate_bps > 0 and ld.bytes_done < ld.bytes_total:
            eta = int((ld.bytes_total - ld.bytes_done) / ld.rate_bps + validation_s + 0.999)
        return round(w["bytes"] * done, 1), eta
    if phase is Phase.VALIDATION:
        base = w["bytes"] + w["compile"] + w["warmup"]
        if not va.bytes_total:
            return base, None
        done = min(va.bytes_hashed, va.bytes_total) / va.bytes_total
        elapsed_s = (now - node.phase_started_mono_ns) / 1e9 if node.phase_started_mono_ns else 0.0
        if va.bytes_hashed >= va.bytes_total:
            eta = None  # hashed; the coordinator's acceptance of the range takes what the network takes
        elif va.bytes_hashed > 0 and elapsed_s > 0:
            eta = int((va.bytes_total - va.bytes_hashed) / (va.bytes_hashed / elapsed_s) + 0.999)
        else:
            eta = int(validation_s + 0.999)
        return min(_BEFORE_DONE, round(base + w["validation"] * done, 1)), eta
    if phase is Phase.READY:
        return 100.0, 0
    return 0.0, None


def _waiting(snap: BoardSnapshot, state: NodeState, verdict: ServeVerdict, notes: Notes) -> str | None:
    """Why the node does not serve now, whole: None while it serves. Once the cluster committed its
    epoch, the gate's own reason comes first (a silent child, an expired lease); the cluster's reason
    (which names the node or blocks holding it up) follows, or stands alone before that."""
    if verdict.ok:
        return None
    parts = []
    if state is NodeState.READY and (snap.node.serving_epoch or not notes.waiting_reason):
        parts.append(verdict.reason)
    if notes.waiting_reason and notes.waiting_reason not in parts:
        parts.append(notes.waiting_reason)
    return "; ".join(parts) or None


def cluster_role(snap: BoardSnapshot, role: str) -> str:
    """The role this node plays now (the board's Raft view), not the one configured."""
    cl = snap.cluster
    if cl.is_coordinator:
        return "coordinator"
    member = MEMBERSHIP[cl.membership] if cl.membership < len(MEMBERSHIP) else "none"
    if member == "learner" and role == "worker":
        return "worker"
    return member


def _plan_rows(snap: BoardSnapshot, notes: Notes) -> list[NodeLayersStatus]:
    view = notes.plan
    if view is None or view.epoch != snap.cluster.epoch:
        return []
    return [NodeLayersStatus(node_id=a.node_id, layers=f"{a.start}-{a.stop - 1}") for a in view.assignments]


def build_status(
    snap: BoardSnapshot,
    role: str,
    children: Sequence[ChildStatus],
    heartbeat_timeout_s: float,
    now: int | None = None,
    notes: Notes | None = None,
) -> NodeStatus:
    """``now``: the time.monotonic_ns() the caller judged the children by (read here if None);
    ``notes``: the supervisor's whole texts (none when None)."""
    notes = notes if notes is not None else Notes()
    node, cl, ld, va = snap.node, snap.cluster, snap.loader, snap.validator
    phase = Phase(node.phase)
    state = NodeState(node.state)
    now = time.monotonic_ns() if now is None else now
    pct, eta = _progress(snap, phase, now)
    durations = {Phase(i).label: d for i, d in enumerate(node.phase_durations) if d >= 0 and i < len(Phase)}
    if state in (NodeState.READY, NodeState.OPERATIONAL) and durations:
        durations["total"] = sum(durations.values())
    verdict = may_serve(snap, now)
    plan = _plan_rows(snap, notes)
    if state is NodeState.OPERATIONAL and not verdict.ok:
        # The node's state follows the gate: validated and committed, but not serving this moment.
        state = NodeState.READY
    healthy = state is not NodeState.FAILED and all(
        c.alive
        and c.heartbeat_age_seconds is not None
        and (c.starting or c.heartbeat_age_seconds < heartbeat_timeout_s)
        for c in children
    )
    return NodeStatus(
        state=state.name,
        phase=phase.label,
        progress_percent=pct,
        eta_seconds=eta,
        cluster_size=cl.cluster_size,
        coordinator=cl.coordinator or None,
        node_id=snap.header.node_id,
        role=role,
        version=__version__,
        term=cl.term,
        epoch=cl.epoch,
        quorum_size=cl.quorum_size,
        cluster_operational_nodes=min(cl.operational_nodes, cl.cluster_size),
        load_step=LoadStep(ld.step).label,
        bytes_done=ld.bytes_done,
        bytes_total=ld.bytes_total,
        model_bytes_downloaded_total=ld.bytes_downloaded_total,
        rate_bytes_per_second=round(ld.rate_bps, 1),
        model_root=cl.model_root or None,
        phase_durations=durations,
        uptime_seconds=round((now - node.started_mono_ns) / 1e9, 3),
        may_serve=verdict.ok,
        healthy=healthy,
        last_error=notes.last_error or None,
        waiting_reason=_waiting(snap, state, verdict, notes),
        children=list(children),
        peer_faults=[
            PeerFaultStatus(
                node_id=f.node_id,
                layers=f"{f.start}-{f.stop - 1}" if f.stop > f.start else None,
                failed=f.failed,
                reason=f.reason,
            )
            for f in notes.peer_faults
        ],
        integrity=IntegrityStatus(
            fault=bool(va.fault),
            scrubbing=bool(va.scrubbing),
            scrub_passes=va.scrub_passes,
            scrub_bytes=va.scrub_bytes,
            scrub_cpu_seconds=round(va.scrub_cpu_s, 6),
            scrub_last_pass_seconds=round(va.scrub_last_pass_s, 3),
            mismatches=va.mismatches,
            repairs=node.repairs,
            last_mismatch=list(notes.mismatches),
        ),
        cluster_role=cluster_role(snap, role),
        layers=next((r.layers for r in plan if r.node_id == snap.header.node_id), None),
        plan=plan,
    )


def status_line(s: NodeStatus) -> str:
    """The one-line STATUS= text systemd shows in `systemctl status`."""
    text = f"{s.state} {s.phase}"
    if s.phase == "loading_weights":
        text += f"/{s.load_step} {s.progress_percent:.1f}%"
        if s.eta_seconds is not None:
            text += f" ETA {s.eta_seconds}s"
    elif s.phase == "validation":
        text += f" {s.progress_percent:.1f}%"
    if s.waiting_reason:
        text += f" ({s.waiting_reason})"
    if s.last_error:
        text += f": {s.last_error}"
    for f in s.peer_faults:
        layers = f" (layers {f.layers})" if f.layers else ""
        text += f"; peer {f.node_id}{layers} {'failed' if f.failed else 'cannot serve'}: {f.reason}"
    return text


def progress_line(s: NodeStatus) -> str:
    """The periodic "progress" log line while the node loads and validates (the seed watches the log
    with ``grep -E "phase|progress"``): the phase (and load step), percent, bytes, rate and ETA."""
    where = f"{s.phase}/{s.load_step}" if s.phase == "loading_weights" and s.load_step != "none" else s.phase
    text = f"progress {s.progress_percent:.1f}% {where}"
    if s.bytes_total:
        text += f": {s.bytes_done / 2**20:.1f} of {s.bytes_total / 2**20:.1f} MiB"
        if s.rate_bytes_per_second > 0:
            text += f" at {s.rate_bytes_per_second / 2**20:.1f} MiB/s"
    text += f", ETA {s.eta_seconds}s" if s.eta_seconds is not None else ", ETA unknown"
    return text
