"""Node states and initialization phases of the seed, and the only transitions allowed between them.

States are what an operator sees first (COLD, JOINING, LOADING, READY, OPERATIONAL, plus FAILED);
phases say which step of initialization the node is in. Every phase belongs to exactly one state,
except that the ``ready`` phase covers both READY (validated, waiting for the cluster's gate) and
OPERATIONAL (the gate is committed; the node accepts work).

This module owns the rules only; the supervisor owns the single current value and writes it to the
board. It must not import anything that does I/O.
"""

from __future__ import annotations

import enum


class NodeState(enum.IntEnum):
    COLD = 0
    JOINING = 1
    LOADING = 2
    READY = 3
    OPERATIONAL = 4
    FAILED = 5


class Phase(enum.IntEnum):
    COLD_START = 0
    DISCOVERY = 1
    ELECTION = 2
    ASSIGNMENT = 3
    LOADING_WEIGHTS = 4
    VALIDATION = 5
    READY = 6
    FAILED = 7

    @property
    def label(self) -> str:
        """The seed's lower-case name, as shown on /status and in metrics."""
        return self.name.lower()


class LoadStep(enum.IntEnum):
    """Sub-steps of the loading_weights phase."""

    NONE = 0
    DOWNLOAD = 1
    VERIFY = 2
    UPLOAD = 3
    COMPILE = 4
    WARMUP = 5

    @property
    def label(self) -> str:
        return self.name.lower()


PHASE_STATE: dict[Phase, NodeState] = {
    Phase.COLD_START: NodeState.COLD,
    Phase.DISCOVERY: NodeState.JOINING,
    Phase.ELECTION: NodeState.JOINING,
    Phase.ASSIGNMENT: NodeState.JOINING,
    Phase.LOADING_WEIGHTS: NodeState.LOADING,
    Phase.VALIDATION: NodeState.LOADING,
    Phase.READY: NodeState.READY,
    Phase.FAILED: NodeState.FAILED,
}


class IllegalTransition(Exception):
    """A caller asked for a state or phase change the rules forbid; this is a bug, not bad input."""


def phase_transition_allowed(current: Phase, new: Phase) -> bool:
    """Phases advance one step at a time; a node may fall back to any earlier phase after
    cold_start (lost quorum -> discovery, leader lost -> election, re-plan -> assignment, a
    validation failure -> loading_weights); any phase may fail; FAILED is final."""
    if current is Phase.FAILED:
        return False
    if new is Phase.FAILED:
        return True
    if new == current + 1:
        return True
    return Phase.DISCOVERY <= new < current


def state_for(phase: Phase, operational: bool = False) -> NodeState:
    """The state a phase implies; ``operational`` selects OPERATIONAL over READY in phase ready."""
    if phase is Phase.READY and operational:
        return NodeState.OPERATIONAL
    return PHASE_STATE[phase]
