"""Seeded chaos simulations of 3-, 5- and 7-node clusters (see ``tests/raftsim.py`` for the model and
the invariants), and proof that the checker catches a broken core.

Sizing: by default 3,500 seeds (2,000 of 3 nodes, 1,000 of 5, 500 of 7) in about a minute on one core.
``RAFT_SIM_SEEDS=N`` runs N seeds in the same 4:2:1 proportion; ``RAFT_SIM_SEED_BASE=B`` starts at seed B
so a nightly job can explore new seeds. A failure names its seed; replay it with
``run_simulation(seed, PARAMS[nodes])``.
"""

from __future__ import annotations

import os

import pytest
from raftsim import InvariantViolation, NodeFactory, SimParams, Simulation, run_simulation

from butterfly.raft import Message, RaftNode
from butterfly.raft.messages import PreVoteRequest, VoteRequest

TOTAL_SEEDS = int(os.environ.get("RAFT_SIM_SEEDS", "3500"))
SEED_BASE = int(os.environ.get("RAFT_SIM_SEED_BASE", "0"))
CHUNKS = 4  # per cluster size, so a failure report is local and xdist can spread the work

PARAMS = {
    3: SimParams(voters=3),
    5: SimParams(voters=5, workers=1, learners=1),
    7: SimParams(voters=7, workers=1, learners=2),
}
SHARE = {3: 4, 5: 2, 7: 1}


def seeds_for(nodes: int, chunk: int) -> range:
    count = TOTAL_SEEDS * SHARE[nodes] // sum(SHARE.values())
    per_chunk = -(-count // CHUNKS)
    start = SEED_BASE + nodes * 1_000_000 + chunk * per_chunk  # disjoint seeds per cluster size
    return range(start, start + max(0, min(per_chunk, count - chunk * per_chunk)))


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("nodes", sorted(PARAMS))
def test_raft_stays_safe_under_chaos_and_converges_once_healed(nodes: int, chunk: int) -> None:
    """Safety after every step, liveness after healing: every seed must pass (each one's weather is
    drawn from the seed: loss, duplication, delay/reordering, partitions, crashes, pre-vote and
    check-quorum on or off, batch sizes)."""
    failures: list[str] = []
    slowest = 0
    for seed in seeds_for(nodes, chunk):
        try:
            stats = run_simulation(seed, PARAMS[nodes])
        except InvariantViolation as exc:
            failures.append(str(exc))
            continue
        slowest = max(slowest, stats.ticks_to_converge)
    assert not failures, f"{len(failures)} seed(s) failed; first: {failures[0]}"
    assert slowest <= PARAMS[nodes].liveness_bound


def test_simulations_replay_exactly_from_their_seed() -> None:
    first = run_simulation(42, PARAMS[5])
    again = run_simulation(42, PARAMS[5])
    assert first == again
    assert first.leaders_elected > 0 and first.committed > 0 and first.delivered > 0


def test_a_run_does_real_work() -> None:
    """Guard against a harness that checks nothing: over a few seeds, leaders change, entries commit,
    nodes crash and restart, and every seed converges."""
    runs = [run_simulation(seed, PARAMS[5]) for seed in range(20)]
    assert sum(r.crashes for r in runs) > 0
    assert sum(r.leaders_elected for r in runs) > 20
    assert min(r.committed for r in runs) > 1
    assert all(0 < r.ticks_to_converge <= PARAMS[5].liveness_bound for r in runs)


# -- the checker catches broken cores ------------------------------------------------------------------


class VotesTwicePerTerm(RaftNode):
    """Broken on purpose: grants any candidate with an up-to-date log, even after voting for another
    in the same term, and does not record the second vote (so only the cluster's behaviour betrays it)."""

    def _may_grant_vote(self, m: PreVoteRequest | VoteRequest) -> bool:
        return self._log_up_to_date(m.last_log_index, m.last_log_term)

    def _handle_vote_request(self, m: PreVoteRequest | VoteRequest) -> None:
        first_vote = self._vote
        super()._handle_vote_request(m)
        if first_vote is not None:
            self._vote = first_vote


class IgnoresLogUpToDateness(RaftNode):
    """Broken on purpose: votes for a candidate whose log is behind its own (violates §5.4.1)."""

    def _may_grant_vote(self, m: PreVoteRequest | VoteRequest) -> bool:
        return self._vote == m.src or (self._vote is None and self._lead is None) or m.term > self._term


class WithoutVoteBookkeeping(Simulation):
    """The harness minus its direct checks on votes, so only Raft's own invariants can object."""

    def _record_vote(self, n: str, term: int, candidate: str) -> None:
        return None

    def _check_outgoing(self, n: str, m: Message) -> None:
        return None


def first_violation(factory: NodeFactory, seeds: int, simulation: type[Simulation] = Simulation) -> str:
    for seed in range(seeds):
        try:
            simulation(seed, PARAMS[5], factory).run()
        except InvariantViolation as exc:
            return str(exc)
    name = getattr(factory, "__name__", repr(factory))
    raise AssertionError(f"{name} survived {seeds} seeds: the checker is blind to it")


def test_the_checker_catches_a_core_that_votes_twice_in_a_term() -> None:
    message = first_violation(VotesTwicePerTerm, seeds=50)
    assert message.startswith("seed=")
    assert any(what in message for what in ("voted for both", "before persisting", "election safety"))


def test_election_safety_alone_catches_double_voting() -> None:
    message = first_violation(VotesTwicePerTerm, seeds=300, simulation=WithoutVoteBookkeeping)
    assert message.startswith("seed=")
    assert any(what in message for what in ("election safety", "log matching", "leader completeness"))


def test_the_checker_catches_a_core_that_votes_for_stale_logs() -> None:
    message = first_violation(IgnoresLogUpToDateness, seeds=50)
    assert message.startswith("seed=")
    assert any(what in message for what in ("leader completeness", "committed", "state machine safety"))
