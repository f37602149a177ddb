"""Turns one consistent board snapshot (plus the supervisor's child handles and the whole texts it
keeps, ``Notes``) into a NodeStatus.

Pure function of its inputs (and the clock), so /status, /metrics and systemd's STATUS= line always agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from butterfly import __version__
from butterfly.board import BoardSnapshot
from butterfly.gate import ServeVerdict, may_serve
from butterfly.states import LoadStep, NodeState, Phase
from butterfly.status import ChildStatus, IntegrityStatus, NodeStatus, Notes, PeerFaultStatus


def _progress(snap: BoardSnapshot, phase: Phase) -> tuple[float, int | None]:
    ld, va = snap.loader, snap.validator
    if phase is Phase.LOADING_WEIGHTS and ld.bytes_total:
        pct = 100.0 * ld.bytes_done / ld.bytes_total
        eta = None
        if ld.rate_bps > 0 and ld.bytes_done < ld.bytes_total:
            eta = int((ld.bytes_total - ld.bytes_done) / ld.rate_bps + 0.999)
        elif ld.bytes_done >= ld.bytes_total:
            eta = 0
        return round(pct, 1), eta
    if phase is Phase.VALIDATION and va.bytes_total:
        return round(100.0 * va.bytes_hashed / va.bytes_total, 1), None
    if phase is Phase.READY:
        return 100.0, 0
    return 0.0, None


def _gate_reason(state: NodeState, verdict: ServeVerdict) -> str | None:
    """Once validated, what keeps the node from serving is the gate's reason."""
    return verdict.reason if state is NodeState.READY else None


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
    pct, eta = _progress(snap, phase)
    now = time.monotonic_ns() if now is None else now
    durations = {Phase(i).label: d for i, d in enumerate(node.phase_durations) if d >= 0 and i < len(Phase)}
    if state in (NodeState.READY, NodeState.OPERATIONAL) and durations:
        durations["total"] = sum(durations.values())
    verdict = may_serve(snap, now)
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
        cluster_operational_nodes=cl.operational_nodes,
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
        waiting_reason=None if verdict.ok else (notes.waiting_reason or _gate_reason(state, verdict)),
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
