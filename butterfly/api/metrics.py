"""Prometheus metrics of one node, rendered from a ``NodeStatus`` at scrape time.

This module owns the metric names, types, labels and help texts (the seed's names exactly:
``init_duration_seconds``, ``node_state``, ``cluster_size``, ``cluster_operational_nodes``,
``model_bytes_downloaded_total``; the rest are what an operator needs to watch a node load) and the
private ``CollectorRegistry`` they live in.

It must not keep metric state of its own, write exposition text by hand, or touch the global
``prometheus_client.REGISTRY``: every scrape calls the status source exactly once and renders that
one snapshot, so /metrics can never disagree with /status or lag behind the board. It must not do
I/O or block; the status source is the supervisor's cheap board read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from butterfly.states import NodeState, Phase
from butterfly.status import IntegrityStatus, NodeStatus

__all__ = ["ALL_PHASES", "ALL_STATES", "NodeStatusCollector", "make_registry"]

ALL_STATES: tuple[str, ...] = tuple(s.name for s in NodeState)
ALL_PHASES: tuple[str, ...] = tuple(p.label for p in Phase)

# States in which initialization has finished, so a "total" init duration is meaningful.
_INITIALIZED_STATES = frozenset({NodeState.READY.name, NodeState.OPERATIONAL.name})


def _flag(value: bool) -> float:
    return 1.0 if value else 0.0


def init_total_seconds(status: NodeStatus) -> float | None:
    """Time to ready, or None while the node is not (or no longer) ready.

    The supervisor may record ``phase_durations["total"]`` itself (wall-clock start to first READY,
    which also counts any fallbacks); when it does not, the sum of the completed phases is the same
    number for a node that went straight through.
    """
    if status.state not in _INITIALIZED_STATES:
        return None
    if "total" in status.phase_durations:
        return status.phase_durations["total"]
    return sum(status.phase_durations.values())


class NodeStatusCollector:
    """A custom collector: each ``collect()`` reads one ``NodeStatus`` and yields every family.

    Registered in a private registry only (see ``make_registry``). It has a ``describe()`` that
    returns nothing so that registering it never calls the status source.
    """

    def __init__(self, status_source: Callable[[], NodeStatus]) -> None:
        self._status_source = status_source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        # Read once, up front: a source that raises fails the scrape before any text is produced,
        # and every family below describes the same instant.
        status = self._status_source()
        return iter(render_families(status))


def render_families(status: NodeStatus) -> list[Metric]:
    """All metric families for one snapshot, in a stable order (seed's names first)."""
    families: list[Metric] = []

    # --- The seed's metrics -------------------------------------------------------------------
    init = GaugeMetricFamily(
        "init_duration_seconds",
        'Seconds each completed initialization phase took; phase="total" is the time to ready, '
        "present once the node is READY or OPERATIONAL.",
        labels=["phase"],
    )
    for phase, seconds in status.phase_durations.items():
        if phase != "total":
            init.add_metric([phase], seconds)
    total = init_total_seconds(status)
    if total is not None:
        init.add_metric(["total"], total)
    families.append(init)

    state_family = GaugeMetricFamily(
        "node_state",
        "1 for the node's current state, 0 for every other state.",
        labels=["state"],
    )
    for name in ALL_STATES:
        state_family.add_metric([name], _flag(status.state == name))
    families.append(state_family)

    families.append(
        GaugeMetricFamily(
            "cluster_size", "Nodes this node counts as cluster members.", value=status.cluster_size
        )
    )
    families.append(
        GaugeMetricFamily(
            "cluster_operational_nodes",
            "Cluster members known to be OPERATIONAL.",
            value=status.cluster_operational_nodes,
        )
    )
    # CounterMetricFamily appends the _total suffix itself, exposing model_bytes_downloaded_total.
    families.append(
        CounterMetricFamily(
            "model_bytes_downloaded",
            "Bytes of model weights fetched from the source (S3 or filesystem) since the node started.",
            value=status.model_bytes_downloaded_total,
        )
    )

    # --- Where the node is --------------------------------------------------------------------
    phase_family = GaugeMetricFamily(
        "node_phase",
        "1 for the node's current initialization phase, 0 for every other phase.",
        labels=["phase"],
    )
    for name in ALL_PHASES:
        phase_family.add_metric([name], _flag(status.phase == name))
    families.append(phase_family)

    # Info renders as node_info{...} 1 in the text format and as an info family in OpenMetrics.
    families.append(
        InfoMetricFamily(
            "node",
            "Identity of this node: id, configured role and software version.",
            value={"node_id": status.node_id, "role": status.role, "version": status.version},
        )
    )
    families.append(
        GaugeMetricFamily(
            "init_progress_ratio",
            "Overall initialization progress, 0 to 1 (progress_percent / 100 on /status).",
            value=status.progress_percent / 100.0,
        )
    )
    families.append(GaugeMetricFamily("raft_term", "Current Raft term seen by this node.", value=status.term))
    families.append(
        GaugeMetricFamily("plan_epoch", "Epoch of the committed layer-assignment plan.", value=status.epoch)
    )
    families.append(
        GaugeMetricFamily("quorum_size", "Nodes needed for quorum, as configured.", value=status.quorum_size)
    )

    # --- Loading ------------------------------------------------------------------------------
    families.append(
        GaugeMetricFamily(
            "load_bytes_done",
            "Bytes of this node's assigned layers loaded so far.",
            value=status.bytes_done,
        )
    )
    families.append(
        GaugeMetricFamily(
            "load_bytes_total",
            "Bytes of this node's assigned layers (0 until a plan assigns layers).",
            value=status.bytes_total,
        )
    )
    ratio = status.bytes_done / status.bytes_total if status.bytes_total > 0 else 0.0
    families.append(
        GaugeMetricFamily(
            "load_progress_ratio",
            "load_bytes_done / load_bytes_total, 0 to 1 (0 until a plan assigns layers).",
            value=min(ratio, 1.0),
        )
    )
    families.append(
        GaugeMetricFamily(
            "load_rate_bytes_per_second",
            "Recent weight loading rate in bytes per second.",
            value=status.rate_bytes_per_second,
        )
    )
    eta = GaugeMetricFamily(
        "load_eta_seconds",
        "Estimated seconds until initialization completes; absent when unknown.",
    )
    # An unknown ETA is left out rather than exported as 0 or NaN, which dashboards would misread.
    if status.eta_seconds is not None:
        eta.add_metric([], status.eta_seconds)
    families.append(eta)

    # --- Health -------------------------------------------------------------------------------
    families.append(
        GaugeMetricFamily(
            "node_may_serve",
            "1 when the node is validated and the cluster's gate allows it to serve inference.",
            value=_flag(status.may_serve),
        )
    )
    families.append(
        GaugeMetricFamily(
            "node_healthy",
            "1 when the supervisor judges the node alive and its children healthy.",
            value=_flag(status.healthy),
        )
    )
    child_up = GaugeMetricFamily("child_up", "1 when the child process is alive.", labels=["child"])
    restarts = CounterMetricFamily(
        "child_restarts", "Times the supervisor restarted the child process.", labels=["child"]
    )
    heartbeat = GaugeMetricFamily(
        "child_heartbeat_age_seconds",
        "Seconds since the child's last heartbeat on the status board; absent before the first.",
        labels=["child"],
    )
    for child in status.children:
        child_up.add_metric([child.name], _flag(child.alive))
        restarts.add_metric([child.name], child.restarts)
        if child.heartbeat_age_seconds is not None:
            heartbeat.add_metric([child.name], child.heartbeat_age_seconds)
    families.extend([child_up, restarts, heartbeat])
    families.append(
        GaugeMetricFamily(
            "node_uptime_seconds",
            "Seconds since the supervisor started.",
            value=status.uptime_seconds,
        )
    )
    if status.integrity is not None:
        families.extend(_integrity_families(status.integrity))
    return families


def _integrity_families(i: IntegrityStatus) -> list[Metric]:
    """The weights in memory: scrubbing's work and what it found (``integrity`` on /status)."""
    return [
        CounterMetricFamily(
            "scrub_bytes", "Bytes of weights re-hashed in memory by scrubbing.", value=i.scrub_bytes
        ),
        CounterMetricFamily(
            "scrub_passes", "Full scrubbing passes over this node's weights.", value=i.scrub_passes
        ),
        CounterMetricFamily(
            "scrub_cpu_seconds",
            "CPU seconds scrubbing spent hashing (its thread's time).",
            value=i.scrub_cpu_seconds,
        ),
        GaugeMetricFamily(
            "scrub_last_pass_seconds",
            "Wall-clock seconds the last full scrubbing pass took (0 before the first).",
            value=i.scrub_last_pass_seconds,
        ),
        CounterMetricFamily(
            "weight_mismatches",
            "Tensors found changed in memory (by validation or scrubbing) since the node started.",
            value=i.mismatches,
        ),
        CounterMetricFamily(
            "weight_repairs",
            "Repairs of weights found changed in memory (re-read, verified).",
            value=i.repairs,
        ),
        GaugeMetricFamily(
            "weight_fault",
            "1 from a mismatch found in memory until a validation passes again (the node does not serve).",
            value=_flag(i.fault),
        ),
    ]


def make_registry(status_source: Callable[[], NodeStatus]) -> CollectorRegistry:
    """A private registry holding only the node's collector; never the global REGISTRY."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeStatusCollector(status_source))
    return registry
