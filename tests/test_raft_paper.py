"""Raft paper conformance: each test is named after a sentence of "In Search of an Understandable
Consensus Algorithm (Extended Version)", Ongaro & Ousterhout, and its docstring quotes it.

The node under test is driven by hand (messages in, Ready out) or on the lockstep network of
``tests/raftsim.py``. Pre-vote is off here unless a test says otherwise: the paper's elections are
the plain ones; pre-vote and check-quorum have their own tests in ``test_raft_core.py``.
"""

from __future__ import annotations

from typing import TypeVar

import pytest
from raftsim import Lockstep, state_with_terms, take

from butterfly.raft import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    Heartbeat,
    Message,
    RaftConfig,
    RaftNode,
    Role,
    VoteRequest,
    VoteResponse,
    bootstrap_state,
)

T = 10  # election_ticks: timeouts are drawn from [T, 2T)
PAPER = RaftConfig(election_ticks=T, heartbeat_ticks=1, pre_vote=False, check_quorum=False)
THREE = ("n1", "n2", "n3")
FIVE = ("n1", "n2", "n3", "n4", "n5")
FIVE_S = ("s1", "s2", "s3", "s4", "s5")  # Figure 8's names


def fresh(
    node_id: str = "n1", voters: tuple[str, ...] = THREE, config: RaftConfig = PAPER, seed: int = 1
) -> RaftNode:
    node = RaftNode(node_id, config, bootstrap_state(voters, "paper"), seed)
    take(node)
    return node


def sent(node: RaftNode) -> list[Message]:
    return list(take(node).messages)


M = TypeVar("M", bound=Message)


def of_type(messages: list[Message], kind: type[M]) -> list[M]:
    return [m for m in messages if isinstance(m, kind)]


def leader_of(voters: tuple[str, ...] = THREE, node_id: str = "n1", config: RaftConfig = PAPER) -> RaftNode:
    """``node_id`` elected leader at term 2 by injected votes; its opening appends are drained."""
    node = fresh(node_id, voters, config)
    node.campaign()
    take(node)
    for voter in voters:
        if voter != node_id and node.role is not Role.LEADER:
            node.step(VoteResponse(2, voter, node_id, granted=True))
    assert node.role is Role.LEADER
    take(node)
    return node


def log_terms(node: RaftNode) -> list[int]:
    return [node.log_term(i) or 0 for i in range(1, node.last_index + 1)]


# -- §5.2 Leader election ------------------------------------------------------------------------------


def test_if_a_follower_receives_no_communication_it_becomes_candidate() -> None:
    """ "If a follower receives no communication over a period of time called the election timeout,
    then it assumes there is no viable leader and begins an election to choose a new leader." """
    node = fresh()
    for _ in range(T - 1):
        node.tick()
    assert node.role is Role.FOLLOWER, "no election before the minimum timeout"
    for _ in range(T):
        node.tick()
    assert node.role is Role.CANDIDATE
    assert node.term == 2


def test_a_server_remains_follower_as_long_as_it_receives_valid_rpcs_from_a_leader() -> None:
    """ "A server remains in follower state as long as it receives valid RPCs from a leader or
    candidate. Leaders send periodic heartbeats [...] to all followers in order to maintain their
    authority." """
    node = fresh("n2")
    for tick in range(20 * T):
        node.tick()
        if tick % (T // 2) == 0:
            node.step(Heartbeat(1, "n1", "n2", commit=1))
    assert node.role is Role.FOLLOWER
    assert node.term == 1
    assert node.leader == "n1"


def test_to_begin_an_election_a_follower_increments_its_term_votes_for_itself_and_requests_votes() -> None:
    """ "To begin an election, a follower increments its current term and transitions to candidate
    state. It then votes for itself and issues RequestVote RPCs in parallel to each of the other
    servers in the cluster." """
    node = fresh()
    node.campaign()
    rd = take(node)
    assert node.role is Role.CANDIDATE
    assert rd.hard_state is not None and rd.hard_state.term == 2 and rd.hard_state.vote == "n1"
    requests = of_type(list(rd.messages), VoteRequest)
    assert sorted(m.dst for m in requests) == ["n2", "n3"]
    assert all(m.term == 2 and m.last_log_index == 1 and m.last_log_term == 1 for m in requests)


@pytest.mark.parametrize(
    ("voters", "grants", "wins"),
    [
        (("n1",), (), True),
        (THREE, ("n2",), True),
        (THREE, (), False),
        (FIVE, ("n2",), False),
        (FIVE, ("n2", "n3"), True),
        (FIVE, ("n2", "n3", "n4", "n5"), True),
    ],
)
def test_candidate_wins_election_with_votes_from_majority(
    voters: tuple[str, ...], grants: tuple[str, ...], wins: bool
) -> None:
    """ "A candidate wins an election if it receives votes from a majority of the servers in the full
    cluster for the same term." """
    node = fresh(voters=voters)
    node.campaign()
    for voter in grants:
        node.step(VoteResponse(2, voter, "n1", granted=True))
    assert (node.role is Role.LEADER) is wins


def test_votes_for_another_term_do_not_count() -> None:
    """ "[...] votes from a majority of the servers in the full cluster for the same term." """
    node = fresh()
    node.campaign()  # term 2
    node.step(VoteResponse(1, "n2", "n1", granted=True))  # a stale grant from an earlier term
    assert node.role is Role.CANDIDATE


def test_each_server_will_vote_for_at_most_one_candidate_in_a_given_term() -> None:
    """ "Each server will vote for at most one candidate in a given term, on a first-come-first-served
    basis." """
    node = fresh("n3")
    node.step(VoteRequest(2, "n1", "n3", last_log_index=1, last_log_term=1))
    node.step(VoteRequest(2, "n2", "n3", last_log_index=1, last_log_term=1))
    node.step(VoteRequest(2, "n1", "n3", last_log_index=1, last_log_term=1))  # a retry
    answers = {(m.dst, m.granted) for m in of_type(sent(node), VoteResponse)}
    assert answers == {("n1", True), ("n2", False)}
    assert node.vote == "n1"


def test_once_a_candidate_wins_it_sends_heartbeats_to_establish_authority() -> None:
    """ "Once a candidate wins an election, it becomes leader. It then sends heartbeat messages to all
    of the other servers to establish its authority and prevent new elections." """
    node = fresh()
    node.campaign()
    take(node)
    node.step(VoteResponse(2, "n2", "n1", granted=True))
    opening = sent(node)
    assert sorted(m.dst for m in of_type(opening, AppendEntries)) == ["n2", "n3"]
    node.tick()
    beats = of_type(sent(node), Heartbeat)
    assert sorted(m.dst for m in beats) == ["n2", "n3"] and all(m.term == 2 for m in beats)


def test_candidate_recognizes_leader_with_term_at_least_as_large_and_returns_to_follower() -> None:
    """ "If the leader's term (included in its RPC) is at least as large as the candidate's current
    term, then the candidate recognizes the leader as legitimate and returns to follower state." """
    for leader_term in (2, 3):
        node = fresh()
        node.campaign()  # candidate at term 2
        node.step(AppendEntries(leader_term, "n2", "n1", 1, 1, (), commit=1))
        assert node.role is Role.FOLLOWER
        assert node.term == leader_term and node.leader == "n2"


def test_candidate_rejects_rpc_with_smaller_term_and_continues_in_candidate_state() -> None:
    """ "If the term in the RPC is smaller than the candidate's current term, then the candidate rejects
    the RPC and continues in candidate state." """
    node = fresh()
    node.campaign()
    node.campaign()  # term 3
    take(node)
    node.step(AppendEntries(2, "n2", "n1", 1, 1, (Entry(2, 2, EntryKind.NOOP),), commit=1))
    assert node.role is Role.CANDIDATE and node.term == 3
    assert node.last_index == 1
    [refusal] = sent(node)
    assert isinstance(refusal, AppendResponse) and not refusal.success and refusal.term == 3


def test_candidate_that_neither_wins_nor_loses_times_out_and_starts_a_new_election() -> None:
    """ "[...] each candidate will time out and start a new election by incrementing its term and
    initiating another round of RequestVote RPCs." """
    node = fresh()
    node.campaign()
    take(node)
    for _ in range(2 * T):
        node.tick()
    assert node.role is Role.CANDIDATE and node.term == 3
    assert {m.dst for m in of_type(sent(node), VoteRequest)} == {"n2", "n3"}


def test_election_timeouts_are_chosen_randomly_from_a_fixed_interval() -> None:
    """ "Raft uses randomized election timeouts to ensure that split votes are rare [...] election
    timeouts are chosen randomly from a fixed interval (e.g., 150–300ms)." """
    timeouts = []
    for seed in range(200):
        node = fresh(seed=seed)
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
        timeouts.append(ticks)
    assert min(timeouts) >= T and max(timeouts) < 2 * T
    assert len(set(timeouts)) >= T // 2, "timeouts should spread over the interval"


def test_at_most_one_leader_can_be_elected_in_a_given_term() -> None:
    """ "Election Safety: at most one leader can be elected in a given term." (Figure 3)"""
    for seed in range(30):
        net = Lockstep(FIVE, config=PAPER, seed=seed * 10)
        net.nodes["n1"].campaign()
        net.nodes["n2"].campaign()  # both at term 2: a split vote is possible, two leaders are not
        net.flush("n1")
        net.flush("n2")
        net.stabilize()
        leaders = [n for n in net.nodes.values() if n.role is Role.LEADER and n.term == 2]
        assert len(leaders) <= 1


# -- §5.1 terms ----------------------------------------------------------------------------------------


def test_if_a_server_receives_a_request_with_a_stale_term_number_it_rejects_the_request() -> None:
    """ "If a server receives a request with a stale term number, it rejects the request." """
    node = fresh("n2")
    node.step(Heartbeat(3, "n3", "n2", commit=1))  # now at term 3
    take(node)
    node.step(AppendEntries(2, "n1", "n2", 1, 1, (Entry(2, 2, EntryKind.NORMAL, b"x"),), commit=1))
    node.step(VoteRequest(2, "n1", "n2", last_log_index=9, last_log_term=2))
    replies = sent(node)
    assert node.last_index == 1 and node.vote is None
    assert all(m.term == 3 for m in replies)
    assert [type(m) for m in replies] == [AppendResponse, VoteResponse]
    assert not any(getattr(m, "success", False) or getattr(m, "granted", False) for m in replies)


def test_a_server_with_a_smaller_term_updates_it_and_a_stale_leader_reverts_to_follower() -> None:
    """ "If one server's current term is smaller than the other's, then it updates its current term to
    the larger value. If a candidate or leader discovers that its term is out of date, it immediately
    reverts to follower state." """
    follower = fresh("n2")
    follower.step(Heartbeat(4, "n1", "n2", commit=1))
    assert follower.term == 4 and follower.role is Role.FOLLOWER

    leader = leader_of()
    leader.step(AppendResponse(5, "n3", "n1", success=False, index=0))
    assert leader.role is Role.FOLLOWER and leader.term == 5


# -- §5.3 Log replication ------------------------------------------------------------------------------


def test_leader_appends_command_to_its_log_then_replicates_it() -> None:
    """ "The leader appends the command to its log as a new entry, then issues AppendEntries RPCs in
    parallel to each of the other servers to replicate the entry." """
    leader = leader_of()
    for follower in ("n2", "n3"):  # both acknowledge the no-op, so they replicate
        leader.step(AppendResponse(2, follower, "n1", success=True, index=2))
    take(leader)
    index = leader.propose(b"cmd")
    assert index == 3 and leader.entries(3, 4) == (Entry(3, 2, EntryKind.NORMAL, b"cmd"),)
    appends = of_type(sent(leader), AppendEntries)
    assert sorted(m.dst for m in appends) == ["n2", "n3"]
    assert all(m.entries[-1].data == b"cmd" and m.prev_log_index == 2 for m in appends)


@pytest.mark.parametrize(("acks", "committed"), [(0, False), (1, False), (2, True), (4, True)])
def test_leader_commits_entry_once_replicated_on_majority(acks: int, committed: bool) -> None:
    """ "A log entry is committed once the leader that created the entry has replicated it on a
    majority of the servers." """
    leader = leader_of(FIVE)
    index = leader.propose(b"cmd")
    assert index == 3
    for follower in FIVE[1 : 1 + acks]:
        leader.step(AppendResponse(2, follower, "n1", success=True, index=index))
    assert (leader.commit == index) is committed
    assert leader.commit in (1, index)


def test_committing_an_entry_commits_all_preceding_entries_including_those_of_previous_leaders() -> None:
    """ "This also commits all preceding entries in the leader's log, including entries created by
    previous leaders." """
    net = Lockstep(
        THREE,
        config=PAPER,
        persisted={"n1": state_with_terms(THREE, [2, 2], term=2), "n2": state_with_terms(THREE, [2], term=2)},
    )
    net.elect("n1")  # term 3; its no-op lands at index 4
    assert [net.nodes[n].commit for n in THREE] == [4, 4, 4]
    assert [e.term for e in net.applied["n3"]] == [1, 2, 2, 3]


def test_leader_includes_commit_index_in_heartbeats_and_followers_apply_in_log_order() -> None:
    """ "The leader [...] includes that index in future AppendEntries RPCs (including heartbeats) so
    that the other servers eventually find out. Once a follower learns that a log entry is committed,
    it applies the entry to its local state machine (in log order)." """
    net = Lockstep(THREE, config=PAPER)
    net.elect("n1")
    net.cut.add(("n1", "n3"))
    for value in (b"a", b"b", b"c"):
        net.propose("n1", value)
    net.stabilize()
    net.heal()
    net.tick("n1")  # a heartbeat tells n3 it is behind, and then what is committed
    net.stabilize()
    applied = [e.data for e in net.applied["n3"] if e.kind is EntryKind.NORMAL]
    assert applied == [b"a", b"b", b"c"]
    assert [e.index for e in net.applied["n3"]] == list(range(1, 6))


def test_follower_refuses_new_entries_if_it_does_not_find_the_preceding_entry() -> None:
    """ "When sending an AppendEntries RPC, the leader includes the index and term of the entry in its
    log that immediately precedes the new entries. If the follower does not find an entry in its log
    with the same index and term, then it refuses the new entries." """
    node = RaftNode("n2", PAPER, state_with_terms(THREE, [2]), 1)
    take(node)
    new = (Entry(4, 3, EntryKind.NORMAL, b"x"),)
    node.step(AppendEntries(3, "n1", "n2", 3, 3, new, commit=1))  # no entry at index 3
    node.step(AppendEntries(3, "n1", "n2", 2, 3, (Entry(3, 3, EntryKind.NORMAL, b"x"),), commit=1))
    replies = of_type(sent(node), AppendResponse)
    assert [r.success for r in replies] == [False, False]
    assert log_terms(node) == [1, 2]


FIGURE_7_LEADER = [1, 1, 4, 4, 5, 5, 6, 6, 6]  # terms of indexes 2..10 (index 1 is the bootstrap)
FIGURE_7_FOLLOWERS = {
    "a": [1, 1, 4, 4, 5, 5, 6, 6],
    "b": [1, 1, 4],
    "c": [1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d": [1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e": [1, 1, 4, 4, 4, 4],
    "f": [1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


def figure_7_exchange(case: str) -> tuple[RaftNode, RaftNode, int]:
    """The leader for term 8 and follower ``case`` of Figure 7, after replication; also how many
    appends the follower refused on the way."""
    leader = RaftNode("n1", PAPER, state_with_terms(THREE, FIGURE_7_LEADER, term=7), 1)
    follower = RaftNode("n2", PAPER, state_with_terms(THREE, FIGURE_7_FOLLOWERS[case]), 2)
    leader.campaign()
    leader.step(VoteResponse(8, "n3", "n1", granted=True))  # n3 elects it; n2 may have a longer log
    assert leader.role is Role.LEADER and leader.term == 8
    refused = 0
    inbox = [m for m in take(leader).messages if m.dst == "n2"]
    while inbox:
        m = inbox.pop(0)
        target = follower if m.dst == "n2" else leader
        target.step(m)
        for reply in take(target).messages:
            if reply.dst in ("n1", "n2"):
                refused += isinstance(reply, AppendResponse) and not reply.success
                inbox.append(reply)
    return leader, follower, refused


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_conflicting_entries_in_follower_logs_are_overwritten_with_entries_from_the_leaders_log(
    case: str,
) -> None:
    """ "In Raft, the leader handles inconsistencies by forcing the followers' logs to duplicate its
    own. This means that conflicting entries in follower logs will be overwritten with entries from
    the leader's log." (Figure 7, cases a-f)"""
    leader, follower, _ = figure_7_exchange(case)
    assert follower.entries(1, follower.last_index + 1) == leader.entries(1, leader.last_index + 1)
    assert log_terms(follower) == [1, *FIGURE_7_LEADER, 8]


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_leader_decrements_next_index_and_retries_until_the_logs_match(case: str) -> None:
    """ "After a rejection, the leader decrements nextIndex and retries the AppendEntries RPC.
    Eventually nextIndex will reach a point where the leader and follower logs will match." We back
    off by whole terms (the optimization the paper sketches next), so a follower refuses at most once
    per conflicting term, not once per entry."""
    _, follower, refused = figure_7_exchange(case)
    conflicting_terms = len(set(FIGURE_7_FOLLOWERS[case]) - set(FIGURE_7_LEADER)) + 1
    assert refused <= conflicting_terms
    assert follower.commit == follower.last_index  # once matched, the no-op commits on the next round


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_a_leader_never_overwrites_or_deletes_entries_in_its_own_log(case: str) -> None:
    """ "A leader never overwrites or deletes entries in its own log (the Leader Append-Only Property
    in Figure 3)." Neither a follower's longer, conflicting log nor a stale leader's append changes it."""
    leader, _, _ = figure_7_exchange(case)
    before = leader.entries(1, leader.last_index + 1)
    leader.step(AppendEntries(7, "n2", "n1", 1, 1, (Entry(2, 7, EntryKind.NORMAL, b"z"),), commit=2))
    assert leader.entries(1, leader.last_index + 1) == before
    assert log_terms(leader) == [1, *FIGURE_7_LEADER, 8]


def test_follower_ignores_entries_already_present_in_its_log() -> None:
    """ "Raft RPCs are idempotent [...] if a follower receives an AppendEntries request that includes
    log entries already present in its log, it ignores those entries in the new request." A delayed,
    shorter copy must not truncate what follows."""
    node = RaftNode("n2", PAPER, state_with_terms(THREE, [2, 2, 2], term=2), 1)
    take(node)
    node.step(AppendEntries(2, "n1", "n2", 1, 1, (Entry(2, 2, EntryKind.NORMAL, b"2@2"),), commit=1))
    rd = take(node)
    assert log_terms(node) == [1, 2, 2, 2]
    assert rd.entries == ()
    assert [(m.success, m.index) for m in of_type(list(rd.messages), AppendResponse)] == [(True, 2)]


def test_leader_retries_append_entries_indefinitely_until_all_followers_store_all_entries() -> None:
    """ "If followers crash or run slowly, or if network packets are lost, the leader retries
    AppendEntries RPCs indefinitely [...] until all followers eventually store all log entries." """
    net = Lockstep(THREE, config=PAPER)
    net.elect("n1")
    net.crash("n3")
    for value in (b"a", b"b"):
        net.propose("n1", value)
    net.stabilize()
    net.tick("n1", 5)
    net.stabilize()
    net.restart("n3")
    for _ in range(3):  # heartbeats now reach n3 again
        net.tick("n1")
        net.stabilize()
    assert net.nodes["n3"].entries(1, 10) == net.nodes["n1"].entries(1, 10)
    assert net.nodes["n3"].commit == net.nodes["n1"].last_index


def test_when_a_leader_comes_to_power_it_initializes_next_index_just_after_its_last_entry() -> None:
    """ "When a leader first comes to power, it initializes all nextIndex values to the index just
    after the last one in its log." Its first append therefore names its own last entry as the
    predecessor (here followed by the new term's no-op)."""
    node = RaftNode("n1", PAPER, state_with_terms(THREE, [2, 2], term=2), 1)
    node.campaign()
    take(node)
    node.step(VoteResponse(3, "n2", "n1", granted=True))
    appends = of_type(sent(node), AppendEntries)
    assert {(m.dst, m.prev_log_index, m.prev_log_term) for m in appends} == {("n2", 3, 2), ("n3", 3, 2)}
    assert all([e.kind for e in m.entries] == [EntryKind.NOOP] for m in appends)


# -- §5.4 Safety ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate_last", "granted"),
    [
        ((3, 2), True),  # same last term, same length
        ((4, 2), True),  # same last term, longer
        ((2, 2), False),  # same last term, shorter
        ((2, 3), True),  # later last term wins even if shorter
        ((9, 1), False),  # earlier last term loses even if longer
    ],
)
def test_voter_denies_its_vote_if_its_own_log_is_more_up_to_date(
    candidate_last: tuple[int, int], granted: bool
) -> None:
    """ "The voter denies its vote if its own log is more up-to-date than that of the candidate. [...] If
    the logs have last entries with different terms, then the log with the later term is more
    up-to-date. If the logs end with the same term, then whichever log is longer is more up-to-date." """
    voter = RaftNode("n2", PAPER, state_with_terms(THREE, [2, 2], term=2), 1)  # last entry (3, term 2)
    last_index, last_term = candidate_last
    voter.step(VoteRequest(4, "n1", "n2", last_log_index=last_index, last_log_term=last_term))
    [reply] = of_type(sent(voter), VoteResponse)
    assert reply.granted is granted


def test_raft_never_commits_log_entries_from_previous_terms_by_counting_replicas() -> None:
    """ "Raft never commits log entries from previous terms by counting replicas. Only log entries from
    the leader's current term are committed by counting replicas." (Figure 8)"""
    s1 = RaftNode("s1", PAPER, state_with_terms(FIVE_S, [2], term=3), 1)  # Figure 8 (c): s1 leads term 4
    s1.campaign()
    for voter in ("s2", "s3"):
        s1.step(VoteResponse(4, voter, "s1", granted=True))
    assert s1.role is Role.LEADER and s1.term == 4 and log_terms(s1) == [1, 2, 4]
    for holder in ("s2", "s3"):  # the term-2 entry reaches a majority (s1, s2, s3)...
        s1.step(AppendResponse(4, holder, "s1", success=True, index=2))
    assert s1.commit == 1, "...and still is not committed: s5 (log [1, 3]) could be elected and erase it"
    for holder in ("s2", "s3"):  # once the leader's own entry is on a majority, both commit
        s1.step(AppendResponse(4, holder, "s1", success=True, index=3))
    assert s1.commit == 3


def test_an_entry_from_a_previous_term_on_a_majority_can_still_be_overwritten() -> None:
    """Figure 8 (d): "S1 crashes, S5 could be elected leader [...] and overwrite the entry from term 2"
    — why the previous test's leader must not commit it."""
    net = Lockstep(
        FIVE_S,
        config=PAPER,
        persisted={
            "s1": state_with_terms(FIVE_S, [2], term=4),
            "s2": state_with_terms(FIVE_S, [2], term=4),
            "s3": state_with_terms(FIVE_S, [2], term=4),
            "s5": state_with_terms(FIVE_S, [3], term=4),
        },
    )
    net.crash("s1")
    net.elect("s5")  # s2, s3, s4 vote: s5's last term 3 beats their 2 and 1
    assert [net.nodes[n].log_term(2) for n in ("s2", "s3", "s4", "s5")] == [3, 3, 3, 3]


# -- §8 Client interaction -----------------------------------------------------------------------------


def test_each_leader_commits_a_blank_no_op_entry_into_the_log_at_the_start_of_its_term() -> None:
    """ "Raft handles this by having each leader commit a blank no-op entry into the log at the start of
    its term." """
    net = Lockstep(THREE, config=PAPER)
    leader = net.elect("n2")
    [noop] = leader.entries(leader.last_index, leader.last_index + 1)
    assert noop.kind is EntryKind.NOOP and noop.term == leader.term and noop.data == b""
    assert all(net.nodes[n].commit == noop.index for n in THREE)
