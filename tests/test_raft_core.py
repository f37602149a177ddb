"""The consensus core beyond the paper's §5: pre-vote, check-quorum and the leader lease, learners,
``can_campaign=False``, restart from persisted state, the Ready contract, configuration and the wire
encoding of messages."""

from __future__ import annotations

import logging

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftsim import Lockstep, MemDisk, state_with_terms, take

from butterfly.raft import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Message,
    PersistedState,
    PreVoteRequest,
    PreVoteResponse,
    RaftConfig,
    RaftConfigError,
    RaftInvariantError,
    RaftNode,
    RaftUsageError,
    RemoveVoter,
    Role,
    VoteRequest,
    VoteResponse,
    bootstrap_state,
    decode_message,
    encode_conf_change,
    encode_message,
)

T = 10
CFG = RaftConfig(election_ticks=T, heartbeat_ticks=1)  # pre-vote and check-quorum on, as deployed
THREE = ("n1", "n2", "n3")


def fresh(
    node_id: str = "n1", config: RaftConfig = CFG, voters: tuple[str, ...] = THREE, seed: int = 1
) -> RaftNode:
    node = RaftNode(node_id, config, bootstrap_state(voters, "core"), seed)
    take(node)
    return node


def time_out(node: RaftNode) -> None:
    for _ in range(2 * T):
        node.tick()


def terms(net: Lockstep) -> dict[str, int]:
    return {n: node.term for n, node in net.nodes.items()}


def leaders(net: Lockstep) -> list[str]:
    return [n for n, node in net.nodes.items() if node.role is Role.LEADER and n not in net.crashed]


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (RaftConfig(election_ticks=1), "election_ticks"),
        (RaftConfig(election_ticks=5, heartbeat_ticks=5), "greater than heartbeat_ticks"),
        (RaftConfig(heartbeat_ticks=0), "heartbeat_ticks"),
        (RaftConfig(max_append_entries=0), "max_append_entries"),
        (RaftConfig(max_inflight_appends=0), "max_inflight_appends"),
    ],
)
def test_config_validation_names_the_bad_field(config: RaftConfig, names: str) -> None:
    with pytest.raises(RaftConfigError, match=names):
        config.validate()
    with pytest.raises(RaftConfigError):
        RaftNode("n1", config, None, 0)


def test_bootstrap_state_refuses_empty_or_duplicate_voters() -> None:
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_state([], "c")
    with pytest.raises(ValueError, match="duplicate"):
        bootstrap_state(["a", "b", "a"], "c")


def test_persisted_state_that_raft_cannot_produce_is_refused() -> None:
    boot = bootstrap_state(THREE, "c")
    with pytest.raises(RaftInvariantError, match="commit 5 beyond last index 1"):
        RaftNode("n1", CFG, PersistedState(HardState(term=1, commit=5), boot.entries), 0)
    gap = (*boot.entries, Entry(3, 1, EntryKind.NORMAL))
    with pytest.raises(RaftInvariantError, match="index 3 at 2"):
        RaftNode("n1", CFG, PersistedState(HardState(term=1, commit=1), gap), 0)


def test_same_seed_same_behaviour_and_different_seeds_differ() -> None:
    def first_campaign_tick(seed: int) -> int:
        node = fresh(seed=seed)
        for tick in range(1, 3 * T):
            node.tick()
            if node.role is not Role.FOLLOWER:
                return tick
        raise AssertionError("never campaigned")

    assert first_campaign_tick(7) == first_campaign_tick(7)
    assert len({first_campaign_tick(seed) for seed in range(20)}) > 1


# -- pre-vote ------------------------------------------------------------------------------------------


def test_pre_vote_asks_at_term_plus_one_without_raising_or_persisting_the_term() -> None:
    node = fresh()
    time_out(node)
    rd = take(node)
    assert node.role is Role.PRE_CANDIDATE and node.term == 1
    assert rd.hard_state is None, "a pre-campaign changes nothing durable"
    requests = [m for m in rd.messages if isinstance(m, PreVoteRequest)]
    # (a pre-candidate repeats unanswered requests every heartbeat interval: the same request)
    assert sorted({(m.dst, m.term) for m in requests}) == [("n2", 2), ("n3", 2)]


def test_pre_candidate_with_a_majority_of_pre_votes_starts_a_real_election() -> None:
    node = fresh()
    time_out(node)
    take(node)
    node.step(PreVoteResponse(2, "n2", "n1", granted=True))
    rd = take(node)
    assert node.role is Role.CANDIDATE and node.term == 2
    assert sorted(m.dst for m in rd.messages if isinstance(m, VoteRequest)) == ["n2", "n3"]


def test_pre_candidate_refused_by_a_majority_goes_back_to_follower_at_the_same_term() -> None:
    node = fresh()
    time_out(node)
    node.step(PreVoteResponse(1, "n2", "n1", granted=False))
    node.step(PreVoteResponse(1, "n3", "n1", granted=False))
    assert node.role is Role.FOLLOWER and node.term == 1


def test_granting_a_pre_vote_changes_neither_term_nor_vote() -> None:
    voter = fresh("n2")
    voter.step(PreVoteRequest(2, "n1", "n2", last_log_index=1, last_log_term=1))
    rd = take(voter)
    assert rd.messages == (PreVoteResponse(2, "n2", "n1", granted=True, commit=1, commit_term=1),)
    assert voter.term == 1 and voter.vote is None and rd.hard_state is None


def test_a_partitioned_node_rejoining_does_not_disrupt_a_healthy_leader() -> None:
    net = Lockstep(THREE, config=CFG)
    net.elect("n1")
    term = net.nodes["n1"].term
    net.isolate("n3")
    net.tick_all(10 * T)  # n3 times out again and again; its pre-votes never reach a majority
    assert net.nodes["n3"].term == term
    net.heal()
    net.tick_all(5 * T)
    assert leaders(net) == ["n1"]
    assert terms(net) == dict.fromkeys(THREE, term)
    assert net.nodes["n3"].leader == "n1"


def test_without_pre_vote_and_check_quorum_a_rejoining_node_deposes_the_leader() -> None:
    """The contrast that shows what the previous test protects against."""
    plain = RaftConfig(election_ticks=T, heartbeat_ticks=1, pre_vote=False, check_quorum=False)
    net = Lockstep(THREE, config=plain)
    net.elect("n1")
    net.isolate("n3")
    net.tick_all(10 * T)
    assert net.nodes["n3"].term > 2
    net.heal()
    net.tick_all(5 * T)
    assert all(term > 2 for term in terms(net).values())


def test_a_vote_request_refused_for_its_stale_log_does_not_push_back_our_election() -> None:
    """Without pre-vote, a candidate whose log can never win still raises terms. A node that refuses
    it follows the new term but keeps its timer (Figure 2: only a vote granted or a leader heard
    restarts it); before, every such candidacy pushed back the timeout of the nodes that could win,
    and a 4-voter cluster with two stale voters went 220 ticks without a leader (seed 7650841230)."""
    config = RaftConfig(
        election_ticks=T, heartbeat_ticks=1, pre_vote=False, check_quorum=False, election_jitter_ticks=1
    )
    refuser, granter = fresh("n2", config), fresh("n1", config)
    for node in (refuser, granter):
        for _ in range(T - 2):
            node.tick()
    stale = VoteRequest(5, "n3", "n2", last_log_index=0, last_log_term=0)
    refuser.step(stale)
    [answer] = take(refuser).messages
    assert isinstance(answer, VoteResponse) and not answer.granted
    assert refuser.term == 5 and refuser.role is Role.FOLLOWER
    granter.step(VoteRequest(5, "n3", "n1", last_log_index=1, last_log_term=granter.log_term(1)))
    [answer] = take(granter).messages
    assert isinstance(answer, VoteResponse) and answer.granted
    for node in (refuser, granter):
        node.tick()
        node.tick()
    assert refuser.role is Role.CANDIDATE and refuser.term == 6, "its timeout ran on"
    assert granter.role is Role.FOLLOWER and granter.term == 5, "a granted vote restarts the timer"


def with_removal(commit: int) -> PersistedState:
    """Voters n1-n4, then entry 2 (term 1) demotes n4; committed up to ``commit``."""
    boot = bootstrap_state(("n1", "n2", "n3", "n4"), "core")
    demote = Entry(2, 1, EntryKind.CONF, encode_conf_change(RemoveVoter("n4")))
    return PersistedState(HardState(term=1, commit=commit), (*boot.entries, demote))


def test_a_candidate_that_missed_a_committed_voter_change_learns_it_from_the_answers_and_wins() -> None:
    """A leader that commits its own demotion tells the others and steps down; a voter that missed
    that message counted the old voter set, and if the nodes ahead of it could not campaign, no one
    was ever elected again (simulator seed 7350362806). Vote answers now carry the commit index."""
    node = RaftNode("n1", CFG, with_removal(commit=1), 1)
    take(node)
    assert node.voters == ("n1", "n2", "n3", "n4")
    time_out(node)
    assert node.role is Role.PRE_CANDIDATE
    take(node)
    # n3 is ahead (it holds a longer log) and refuses, but it knows entry 2 committed.
    node.step(PreVoteResponse(1, "n3", "n1", granted=False, commit=2, commit_term=1))
    assert node.commit == 2 and node.voters == ("n1", "n2", "n3")
    assert node.role is Role.PRE_CANDIDATE
    node.step(PreVoteResponse(2, "n2", "n1", granted=True, commit=1, commit_term=1))
    assert node.role is Role.CANDIDATE and node.term == 2, "2 of the 3 voters it now counts"
    asked = {m.dst for m in take(node).messages if isinstance(m, VoteRequest)}
    assert asked == {"n2", "n3"}
    assert take(node).hard_state is None  # the commit went out with the previous Ready


def test_a_commit_index_whose_entry_differs_from_ours_teaches_nothing() -> None:
    node = RaftNode("n1", CFG, with_removal(commit=1), 1)
    take(node)
    time_out(node)
    take(node)
    node.step(PreVoteResponse(1, "n3", "n1", granted=False, commit=2, commit_term=3))  # another entry 2
    node.step(PreVoteResponse(1, "n4", "n1", granted=False, commit=5, commit_term=1))  # past our log
    assert node.commit == 1 and node.voters == ("n1", "n2", "n3", "n4")


# -- check-quorum and the leader lease -------------------------------------------------------------------


def test_a_leader_that_cannot_hear_a_majority_steps_down_within_two_election_timeouts() -> None:
    net = Lockstep(THREE, config=CFG)
    net.elect("n1")
    net.isolate("n1")
    net.tick("n1", 2 * T)
    assert net.nodes["n1"].role is Role.FOLLOWER
    net.tick_all(4 * T)  # the majority side elects a new leader; n1 cannot, being alone
    assert len(leaders(net)) == 1 and leaders(net) != ["n1"]


def test_a_cut_off_leader_that_has_not_noticed_yet_cannot_commit_so_there_is_no_split_brain() -> None:
    net = Lockstep(THREE, config=CFG)
    net.elect("n1")
    net.isolate("n1")
    for _ in range(4 * T):  # only the majority side's clocks run: n1 has not noticed anything yet
        for n in ("n2", "n3"):
            net.tick(n)
        net.stabilize()
    [new_leader] = [n for n in ("n2", "n3") if net.nodes[n].role is Role.LEADER]
    old = net.nodes["n1"]
    assert old.role is Role.LEADER, "two nodes believe they lead..."
    stale_index = net.propose("n1", b"from the old leader")
    net.propose(new_leader, b"from the new leader")
    net.stabilize()
    assert stale_index is not None and old.commit < stale_index, "...but only one of them can commit"
    net.heal()
    net.tick_all(3)
    everything_applied = [e.data for n in THREE for e in net.applied[n]]
    assert b"from the old leader" not in everything_applied
    assert everything_applied.count(b"from the new leader") == 3
    assert old.role is Role.FOLLOWER and old.leader == new_leader


def test_without_check_quorum_a_cut_off_leader_keeps_believing_it_leads() -> None:
    config = RaftConfig(election_ticks=T, heartbeat_ticks=1, check_quorum=False)
    net = Lockstep(THREE, config=config)
    net.elect("n1")
    net.isolate("n1")
    net.tick("n1", 10 * T)
    assert net.nodes["n1"].role is Role.LEADER


def test_a_follower_ignores_higher_term_vote_requests_while_it_hears_from_its_leader() -> None:
    node = fresh("n2")
    node.step(Heartbeat(1, "n1", "n2", commit=1))
    take(node)
    node.step(VoteRequest(5, "n3", "n2", last_log_index=1, last_log_term=1))
    assert node.term == 1 and take(node).messages == ()
    for _ in range(T):  # the lease runs out after a minimum election timeout of silence
        node.tick()
    node.step(VoteRequest(5, "n3", "n2", last_log_index=1, last_log_term=1))
    assert node.term == 5 and node.vote == "n3"


def test_a_node_whose_term_rose_while_cut_off_makes_the_leader_step_down_and_the_cluster_recovers() -> None:
    """With the lease, its vote requests are ignored; its reply to the leader's heartbeat carries the
    higher term instead, so the cluster moves past it."""
    net = Lockstep(THREE, config=CFG)
    net.elect("n1")
    node = net.nodes["n3"]
    node.step(Heartbeat(7, "n9", "n3", commit=1))  # a stray higher term
    net.flush("n3")
    net.tick_all(6 * T)
    assert len(leaders(net)) == 1 and net.nodes[leaders(net)[0]].term >= 7
    assert len(set(terms(net).values())) == 1


# -- learners and workers --------------------------------------------------------------------------------


def test_a_learner_receives_the_log_but_never_votes_campaigns_or_counts_towards_commit() -> None:
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    leader = net.elect("n1")
    assert leader.propose_add_learner("l1") is not None
    net.flush("n1")
    net.stabilize()
    net.tick_all(2)
    learner = net.nodes["l1"]
    assert learner.learners == ("l1",) and not learner.is_voter and leader.learners == ("l1",)
    assert learner.entries(1, 99) == leader.entries(1, 99)

    net.tick("l1", 10 * T)
    assert learner.role is Role.FOLLOWER and not learner.campaign()
    net.tick_all(1)
    assert net.nodes["n1"].role is Role.LEADER, "the learner's timeouts disturb nobody"

    net.crash("n2")
    net.crash("n3")
    index = net.propose("n1", b"needs a voter")
    net.stabilize()
    assert learner.last_index == index, "the learner holds it..."
    assert leader.commit < index, "...but leader + learner are not a majority of voters"


def test_a_node_not_yet_added_stays_silent_and_never_campaigns() -> None:
    node = RaftNode("late", CFG, None, 3)
    for _ in range(20 * T):
        node.tick()
    assert not node.has_ready() and node.voters == () and not node.campaign()


def test_adding_a_learner_twice_or_adding_a_voter_changes_nothing() -> None:
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    leader = net.elect("n1")
    for member in ("l1", "l1", "n2"):
        leader.propose_add_learner(member)
    net.flush("n1")
    net.stabilize()
    assert all(node.learners == ("l1",) for node in net.nodes.values())
    assert all(node.voters == THREE for node in net.nodes.values())


def test_a_worker_never_stands_for_election_but_still_votes() -> None:
    worker = RaftConfig(election_ticks=T, heartbeat_ticks=1, can_campaign=False)
    net = Lockstep(THREE, config=CFG, configs={"n3": worker})
    net.tick("n3", 20 * T)
    assert net.nodes["n3"].role is Role.FOLLOWER and not net.nodes["n3"].campaign()
    assert net.nodes["n3"].term == 1
    net.isolate("n2")
    net.elect("n1")  # only possible with the worker's vote


WORKER = RaftConfig(election_ticks=T, heartbeat_ticks=1, can_campaign=False)


def test_a_worker_ahead_of_the_only_candidate_caretakes_hands_over_and_is_never_named_leader() -> None:
    """Voters n1, n2 (coordinators) and the worker n3. n1 commits an entry that only n3 acknowledged,
    then dies: n2 lacks the entry, so n3 refuses it, and n3 could not stand, so no one was ever
    elected again (simulator seed 2500007721). n3 now leads as a caretaker just long enough to give
    n2 its log; n2 then wins. Nobody names n3 leader, and it accepts no proposal."""
    net = Lockstep(THREE, config=CFG, configs={"n3": WORKER})
    net.elect("n1")
    net.cut |= {("n1", "n2"), ("n2", "n1")}
    index = net.propose("n1", b"only n3 has it")
    net.stabilize()
    assert index is not None and net.nodes["n1"].commit == index and net.nodes["n2"].last_index < index
    net.crash("n1")
    roles: set[Role] = set()
    named: set[str | None] = set()
    for _ in range(20 * T):
        net.tick_all()
        n2, n3 = net.nodes["n2"], net.nodes["n3"]
        roles.add(n3.role)
        named |= {n2.leader, n3.leader}
        if n3.role is Role.CARETAKER:
            assert n3.propose(b"x") is None and n3.propose_add_learner("l9") is None
        if n2.role is Role.LEADER and n2.commit > index:
            break
    assert net.nodes["n2"].role is Role.LEADER, "n2 won once it held the worker's log"
    assert Role.CARETAKER in roles and Role.LEADER not in roles
    assert "n3" not in named, f"named leaders: {named}"
    assert [e.data for e in net.applied["n2"] if e.kind is EntryKind.NORMAL] == [b"only n3 has it"]


def caretaker() -> RaftNode:
    """The worker n3 of voters n2 and n3, elected caretaker after refusing n2, whose log is behind."""
    node = fresh("n3", WORKER, voters=("n2", "n3"))
    node.step(PreVoteRequest(2, "n2", "n3", last_log_index=0, last_log_term=0))
    [refusal] = take(node).messages
    assert isinstance(refusal, PreVoteResponse) and not refusal.granted
    for _ in range(2 * T - 1):
        node.tick()
    assert node.role is Role.FOLLOWER, "a would-be caretaker lets coordinators go first for a period"
    for _ in range(T):
        node.tick()
    assert node.role is Role.PRE_CANDIDATE
    node.step(PreVoteResponse(2, "n2", "n3", granted=True))
    node.step(VoteResponse(2, "n2", "n3", granted=True))
    assert node.role is Role.CARETAKER and node.term == 2 and node.leader is None
    appends = [m for m in take(node).messages if isinstance(m, AppendEntries)]
    assert appends and all(m.caretaker for m in appends)
    return node


def test_a_caretaker_stands_down_once_the_candidate_it_refused_holds_its_log() -> None:
    node = caretaker()
    node.step(AppendResponse(2, "n2", "n3", success=True, index=node.last_index))
    node.tick()
    assert node.role is Role.FOLLOWER and node.term == 2
    take(node)
    node.step(PreVoteRequest(3, "n2", "n3", last_log_index=node.last_index, last_log_term=2))
    [grant] = take(node).messages
    assert isinstance(grant, PreVoteResponse) and grant.granted


def test_a_caretaker_whose_candidate_never_catches_up_stands_down_after_a_period_and_stays_down() -> None:
    node = caretaker()
    beats = []
    for _ in range(T - 1):
        node.tick()
        beats += [m for m in take(node).messages if isinstance(m, Heartbeat)]
    assert node.role is Role.CARETAKER and beats and all(m.caretaker for m in beats)
    node.tick()
    assert node.role is Role.FOLLOWER
    for _ in range(10 * T):
        node.tick()
    assert node.role is Role.FOLLOWER, "it refused no one since: it does not stand again"


def test_a_follower_of_a_caretaker_names_no_leader_and_a_real_leader_clears_its_refusals() -> None:
    follower = fresh("n2")
    follower.step(Heartbeat(2, "n3", "n2", 1, caretaker=True))
    assert follower.leader is None and follower.term == 2
    follower.step(Heartbeat(3, "n1", "n2", 1))
    assert follower.leader == "n1"
    worker = fresh("n3", WORKER)
    worker.step(PreVoteRequest(2, "n2", "n3", last_log_index=0, last_log_term=0))
    worker.step(Heartbeat(1, "n1", "n3", 1))  # the leader is back: nothing to take care of
    for _ in range(10 * T):
        worker.tick()
    assert worker.role is Role.FOLLOWER, "the refusal was forgotten when the leader was heard"


# -- restart and the Ready contract --------------------------------------------------------------------


def test_restart_from_persisted_state_keeps_term_vote_log_and_commit_and_reapplies() -> None:
    net = Lockstep(THREE, config=CFG)
    net.elect("n2")
    for value in (b"a", b"b"):
        net.propose("n2", value)
    net.stabilize()
    before = net.nodes["n1"]
    snapshot = (before.term, before.vote, before.entries(1, 99), before.commit)
    net.crash("n1")
    after = net.restart("n1")
    assert (after.term, after.vote, after.entries(1, 99), after.commit) == snapshot
    assert after.role is Role.FOLLOWER and after.leader is None
    assert [e.index for e in net.applied["n1"]] == list(range(1, after.commit + 1))


def test_a_restarted_node_remembers_whom_it_voted_for() -> None:
    disk = MemDisk(bootstrap_state(THREE, "c"))
    node = RaftNode("n3", CFG, disk.load(), 1)
    node.step(VoteRequest(2, "n1", "n3", last_log_index=1, last_log_term=1))
    rd = node.ready()
    disk.save(rd.hard_state, rd.entries)
    restarted = RaftNode("n3", CFG, disk.load(), 2)
    restarted.step(VoteRequest(2, "n2", "n3", last_log_index=5, last_log_term=1))
    assert [m.granted for m in take(restarted).messages if isinstance(m, VoteResponse)] == [False]


def test_only_one_ready_may_be_outstanding() -> None:
    node = fresh()
    node.campaign()
    rd = node.ready()
    with pytest.raises(RaftUsageError):
        node.ready()
    with pytest.raises(RaftUsageError):
        node.advance(type(rd)(None, (), (), (), None, ()))
    node.advance(rd)
    assert not node.has_ready()


def test_entries_replaced_between_ready_and_advance_are_handed_out_again() -> None:
    node = fresh("n2")
    first = (Entry(2, 2, EntryKind.NORMAL, b"old"), Entry(3, 2, EntryKind.NORMAL, b"old"))
    node.step(AppendEntries(2, "n1", "n2", 1, 1, first, commit=1))
    rd = node.ready()
    assert rd.entries == first
    replacement = (Entry(2, 3, EntryKind.NORMAL, b"new"),)
    node.step(AppendEntries(3, "n3", "n2", 1, 1, replacement, commit=1))  # while rd is being saved
    node.advance(rd)
    assert node.ready().entries == replacement


def test_role_changes_are_logged_with_node_id_and_term(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="butterfly.raft.core")
    node = fresh()
    time_out(node)
    node.step(PreVoteResponse(2, "n2", "n1", granted=True))
    node.step(VoteResponse(2, "n2", "n1", granted=True))
    lines = [
        "n1 became pre-candidate at term 1",
        "n1 became candidate at term 2",
        "n1 became leader at term 2",
    ]
    assert [r.getMessage() for r in caplog.records] == lines
    rd = take(node)
    assert [str(change) for change in rd.role_changes] == lines
    assert rd.soft_state is not None and rd.soft_state.leader == "n1" and rd.soft_state.role is Role.LEADER


def test_a_single_voter_cluster_commits_its_own_proposals_at_once() -> None:
    node = fresh(voters=("n1",))
    assert node.campaign() and node.role is Role.LEADER
    index = node.propose(b"x")
    rd = take(node)
    assert node.commit == index
    assert [e.data for e in rd.committed_entries][-1] == b"x"


def test_only_the_leader_accepts_proposals() -> None:
    assert fresh().propose(b"x") is None
    assert fresh().propose_add_learner("l1") is None


def test_malformed_or_misaddressed_appends_are_dropped() -> None:
    node = fresh("n2")
    node.step(AppendEntries(2, "n1", "n2", 1, 1, (Entry(5, 2, EntryKind.NORMAL),), commit=1))  # gap
    node.step(AppendEntries(2, "n1", "n2", 1, 1, (Entry(2, 9, EntryKind.NORMAL),), commit=1))  # future term
    node.step(AppendEntries(2, "n1", "n3", 1, 1, (Entry(2, 2, EntryKind.NORMAL),), commit=1))  # not ours
    assert node.last_index == 1
    assert not any(isinstance(m, AppendResponse) and m.success for m in take(node).messages)


def test_a_leader_pipelines_appends_to_a_follower_that_is_far_behind() -> None:
    config = RaftConfig(election_ticks=T, heartbeat_ticks=1, max_append_entries=4, max_inflight_appends=3)
    leader = RaftNode("n1", config, state_with_terms(THREE, [2] * 40, term=2), 1)
    leader.campaign()
    leader.step(PreVoteResponse(3, "n2", "n1", granted=True))
    leader.step(VoteResponse(3, "n2", "n1", granted=True))
    take(leader)
    leader.step(AppendResponse(3, "n3", "n1", success=False, index=41, reject_hint=1, hint_term=1))
    appends = [m for m in take(leader).messages if isinstance(m, AppendEntries)]
    assert [m.prev_log_index for m in appends] == [1]  # one resend from where the logs match...
    leader.step(AppendResponse(3, "n3", "n1", success=True, index=5))
    appends = [m for m in take(leader).messages if isinstance(m, AppendEntries)]
    assert [m.prev_log_index for m in appends] == [5, 9, 13]  # ...then a full window of three


# -- wire encoding ---------------------------------------------------------------------------------------

ENTRY = Entry(7, 3, EntryKind.CONF, b"\x00\xff")
ALL_MESSAGES: list[Message] = [
    PreVoteRequest(4, "a", "b", 7, 3),
    PreVoteResponse(4, "b", "a", True, commit=6, commit_term=3),
    VoteRequest(4, "a", "b", 7, 3),
    VoteResponse(4, "b", "a", False, commit=6, commit_term=3),
    AppendEntries(4, "a", "b", 6, 3, (ENTRY,), 5),
    AppendResponse(4, "b", "a", False, 6, reject_hint=2, hint_term=1),
    Heartbeat(4, "a", "b", 5),
    Heartbeat(4, "a", "b", 5, caretaker=True),
    HeartbeatResponse(4, "b", "a"),
]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_the_wire_encoding(message: Message) -> None:
    decoded = decode_message(encode_message(message))
    assert decoded == message and type(decoded) is type(message)


entries_strategy = st.lists(
    st.builds(
        Entry,
        index=st.integers(0, 2**40),
        term=st.integers(0, 2**40),
        kind=st.sampled_from(EntryKind),
        data=st.binary(max_size=64),
    ),
    max_size=8,
).map(tuple)


@settings(max_examples=200, deadline=None)
@given(
    term=st.integers(0, 2**62),
    src=st.text(max_size=20),
    entries=entries_strategy,
    commit=st.integers(0, 2**62),
)
def test_appends_round_trip_for_any_content(
    term: int, src: str, entries: tuple[Entry, ...], commit: int
) -> None:
    message = AppendEntries(term, src, "dst", 3, 2, entries, commit)
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode({"type": "Nope", "term": 1}),
        msgspec.msgpack.encode({"type": "Heartbeat", "term": 1, "src": "a"}),
        msgspec.msgpack.encode({"type": "Heartbeat", "term": "1", "src": "a", "dst": "b", "commit": 0}),
    ],
)
def test_malformed_bodies_are_refused_not_half_decoded(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_message(body)


def test_two_pre_candidates_at_once_do_not_split_the_vote() -> None:
    """Regression (failover bench): the two survivors of a 3-node cluster timing out in the same tick
    both passed pre-vote, stood, voted for themselves and waited another election timeout (a 2 s
    failover). Now the better log, then the lower id, runs; the other stands down."""
    for first, second in (("n2", "n3"), ("n3", "n2")):
        net = Lockstep(THREE, config=CFG)
        net.elect("n1")
        term = net.nodes["n1"].term
        net.crash("n1")
        for n in (first, second):  # both campaign before either hears from the other
            net.nodes[n].campaign()
        net.flush(first)
        net.flush(second)
        net.stabilize()
        assert net.nodes["n2"].role is Role.LEADER and net.nodes["n2"].term == term + 1
        assert net.nodes["n3"].role is Role.FOLLOWER and net.nodes["n3"].leader == "n2"
    # A longer log outranks a lower id.
    net = Lockstep(THREE, config=CFG)
    net.elect("n1")
    net.cut.add(("n1", "n2"))
    net.propose("n1", b"only n3 has this")
    net.stabilize()
    net.crash("n1")
    net.heal()
    for n in ("n2", "n3"):
        net.nodes[n].campaign()
    net.flush("n2")
    net.flush("n3")
    net.stabilize()
    assert net.nodes["n3"].role is Role.LEADER and net.nodes["n2"].leader == "n3"


def test_a_candidate_asks_again_a_voter_that_dropped_its_request_inside_its_lease() -> None:
    """Regression (failover bench, 3 nodes): the other survivor was one tick short of leaving its leader
    lease, dropped the pre-vote request silently, and the candidate waited a whole election timeout."""
    net = Lockstep(THREE, config=CFG)
    net.elect("n1")
    net.crash("n1")
    net.tick("n3", T - 2)  # n3 heard the leader more recently than n2: still inside its lease
    n2 = net.nodes["n2"]
    n2.campaign()
    net.flush("n2")
    net.stabilize()
    assert n2.role is Role.PRE_CANDIDATE, "n3 dropped the request"
    for _ in range(2 * CFG.heartbeat_ticks + 2):
        net.tick("n2")
        net.tick("n3")
        net.stabilize()
    assert n2.role is Role.LEADER, "asked again once n3's lease ran out, well before another timeout"
