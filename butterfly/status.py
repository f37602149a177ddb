"""The node's status as the HTTP API, metrics and butterfly-admin see it.

The supervisor builds one ``NodeStatus`` from a consistent board snapshot; every reader (the
/status body, /metrics, the systemd STATUS= line) is rendered from that one value so they cannot
disagree. This module holds data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from butterfly.ipc import Mismatch, PeerFault, PlanView


@dataclass
class Notes:
    """The texts behind a node's status that must reach every reader whole: why it failed, why it
    waits. The supervisor owns them (the board's fixed-size fields would cut them): children send
    theirs over their channel, and /status, /metrics and STATUS= are all rendered from here."""

    last_error: str = ""
    waiting_reason: str = ""
    peer_faults: list[PeerFault] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    """The tensors of the last mismatch scrubbing found in memory (kept after the repair)."""
    plan: PlanView | None = None
    """The latest plan the cluster child applied: every node's range."""


class IntegrityStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The weights in memory: are they known bad, and what scrubbing has done so far."""

    fault: bool
    """A mismatch was found and no validation has passed since: the node must not serve."""
    scrubbing: bool
    scrub_passes: int
    scrub_bytes: int
    scrub_cpu_seconds: float
    scrub_last_pass_seconds: float
    mismatches: int
    """Tensors found changed in memory since the node started (validation and scrubbing)."""
    repairs: int
    last_mismatch: list[Mismatch]
    """Each tensor of the last mismatch scrubbing found: tensor, layer, offsets, digests."""


class PeerFaultStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A peer that cannot serve its layers: which, since when it failed for good or not, and why."""

    node_id: str
    layers: str | None
    """Its blocks in the seed's inclusive form ("2-3"); None when it held none."""
    failed: bool
    """For good (the peer is FAILED and no longer planned for); false: retrying or repairing."""
    reason: str


class ServingStats(msgspec.Struct, frozen=True, kw_only=True):
    """Inference this node's API has served (the ``serving`` object of /status; the API fills it)."""

    requests_served: int
    """Requests that finished (length, stop or a stop string) since the node started."""
    requests_failed: int
    """Requests ended by an error after they were admitted (backend refused or failed)."""
    requests_running: int
    """Requests generating (first token received, not finished)."""
    requests_waiting: int
    """Requests admitted that have not received their first token."""
    prompt_tokens_total: int
    generation_tokens_total: int
    generation_tokens_per_second: float
    """Tokens generated per second over the last 10 seconds."""


class NodeLayersStatus(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    layers: str
    """Its blocks in the seed's inclusive form ("0-3")."""


class ChildStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    pid: int | None
    alive: bool
    heartbeat_age_seconds: float | None
    restarts: int
    last_exit: str = ""
    # Spawned but not beaten yet (importing, attaching): judged by the start-up bound, not heartbeats.
    starting: bool = False


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    # The seed's fields, in the seed's order.
    state: str
    phase: str
    progress_percent: float
    eta_seconds: int | None
    cluster_size: int
    coordinator: str | None
    # What an operator needs beyond them.
    node_id: str
    role: str
    version: str
    term: int
    epoch: int
    quorum_size: int
    cluster_operational_nodes: int
    load_step: str
    bytes_done: int
    bytes_total: int
    model_bytes_downloaded_total: int
    rate_bytes_per_second: float
    model_root: str | None
    phase_durations: dict[str, float]
    uptime_seconds: float
    may_serve: bool
    healthy: bool
    last_error: str | None
    waiting_reason: str | None
    children: list[ChildStatus]
    peer_faults: list[PeerFaultStatus] = []
    integrity: IntegrityStatus | None = None
    cluster_role: str = "none"
    """What this node is in the cluster now: coordinator (the Raft leader), voter, learner, worker (a
    learner with role = "worker"), or none (not a member yet). ``role`` is the configured one."""
    layers: str | None = None
    """This node's blocks in the plan of ``epoch`` ("0-3"), None when it holds none."""
    plan: list[NodeLayersStatus] = []
    """Every node's blocks in the plan of ``epoch``, in pipeline order."""
    serving: ServingStats | None = None
    """Present when the node runs an inference backend."""
