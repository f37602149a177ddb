"""Single-server voter changes through the log, and the forced recovery of a cluster whose quorum is
gone for good, on the lockstep network (``tests/raftsim.py``)."""

from __future__ import annotations

from raftsim import Lockstep

from butterfly.raft import (
    AddVoter,
    Entry,
    EntryKind,
    HardState,
    PersistedState,
    RaftConfig,
    RaftNode,
    RemoveVoter,
    Role,
    bootstrap_state,
    encode_conf_change,
    force_new_cluster_state,
)

T = 10
CFG = RaftConfig(election_ticks=T, heartbeat_ticks=1)
THREE = ("n1", "n2", "n3")


def change(net: Lockstep, leader: str, what: AddVoter | RemoveVoter) -> int:
    index = net.nodes[leader].propose_conf_change(what)
    assert index is not None, net.nodes[leader].conf_change_refusal(what)
    net.flush(leader)
    net.stabilize()
    return index


def learner_joined(net: Lockstep, leader: str, learner: str) -> None:
    assert net.nodes[leader].propose_add_learner(learner) is not None
    net.flush(leader)
    net.stabilize()
    net.tick_all(2)


def test_a_caught_up_learner_is_promoted_and_then_counts_towards_commit() -> None:
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    leader = net.elect("n1")
    learner_joined(net, "n1", "l1")
    assert leader.match_index("l1") == leader.last_index
    change(net, "n1", AddVoter("l1"))
    assert all(node.voters == ("l1", *THREE) for node in net.nodes.values())
    assert all(node.learners == () for node in net.nodes.values())
    # Four voters: a majority is three. With two voters down, leader + l1 no longer commit...
    net.crash("n2")
    net.crash("n3")
    index = net.propose("n1", b"needs three of four")
    net.stabilize()
    assert net.nodes["l1"].last_index == index and leader.commit < index
    # ...and with one back they do: l1's acknowledgement is counted.
    net.restart("n2")
    net.tick_all(2)
    assert leader.commit >= index


def test_a_dead_voter_is_demoted_then_a_learner_replaces_it() -> None:
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    leader = net.elect("n1")
    learner_joined(net, "n1", "l1")
    net.crash("n3")
    change(net, "n1", RemoveVoter("n3"))
    assert leader.voters == ("n1", "n2") and "n3" in leader.learners
    change(net, "n1", AddVoter("l1"))
    assert leader.voters == ("l1", "n1", "n2")
    # n2 dies as well: n1 + l1 are a majority of the new voters and keep committing.
    net.crash("n2")
    index = net.propose("n1", b"after the replacement")
    net.stabilize()
    assert leader.commit >= index
    # The demoted node comes back as a learner: it catches up, but may not campaign.
    net.restart("n3")
    net.tick_all(2)
    returned = net.nodes["n3"]
    assert not returned.is_voter and returned.commit == leader.commit
    net.tick("n3", 5 * T)
    assert returned.role is Role.FOLLOWER and not returned.campaign()


def test_a_new_leader_changes_no_voter_before_it_commits_an_entry_of_its_term() -> None:
    """The single-server-change bug in the thesis: a leader must commit its own no-op first."""
    net = Lockstep(THREE, config=CFG)
    n1 = net.nodes["n1"]
    n1.campaign()
    net.flush("n1")
    while n1.role is not Role.LEADER:
        m = net.queue.popleft()
        net.nodes[m.dst].step(m)
        net.flush(m.dst)
    net.cut |= {("n2", "n1"), ("n3", "n1")}  # no acknowledgement of its no-op comes back
    net.stabilize()
    assert n1.commit < n1.last_index
    assert n1.propose_conf_change(RemoveVoter("n3")) is None
    assert "not yet committed an entry of its term" in n1.conf_change_refusal(RemoveVoter("n3"))
    net.heal()
    net.tick_all(2)
    assert n1.role is Role.LEADER and n1.commit == n1.last_index
    assert n1.propose_conf_change(RemoveVoter("n3")) is not None


def test_a_promoted_voter_that_has_not_heard_of_it_still_votes() -> None:
    """Regression (found by the simulator): voters {n1,n2,l1} after promoting l1 and demoting n3, but l1
    was cut off and still thinks it is a learner. With n1 gone, n2 needs l1's vote; a "learner" that
    ignored vote requests left the cluster without a leader for good."""
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    net.elect("n1")
    learner_joined(net, "n1", "l1")
    net.isolate("l1")
    change(net, "n1", AddVoter("l1"))
    net.tick_all(1)
    change(net, "n1", RemoveVoter("n3"))
    net.tick_all(1)
    assert net.nodes["n2"].voters == ("l1", "n1", "n2") and not net.nodes["l1"].is_voter
    net.crash("n1")
    net.crash("n3")
    net.heal()
    net.tick_all(4 * T)
    n2 = net.nodes["n2"]
    assert n2.role is Role.LEADER
    net.tick_all(2)
    assert net.nodes["l1"].is_voter


def test_one_voter_change_at_a_time_and_never_the_leader_itself() -> None:
    net = Lockstep(THREE, learners=("l1", "l2"), config=CFG)
    leader = net.elect("n1")
    learner_joined(net, "n1", "l1")
    learner_joined(net, "n1", "l2")
    net.isolate("n2")
    net.isolate("n3")
    first = leader.propose_conf_change(AddVoter("l1"))
    assert first is not None
    assert leader.propose_conf_change(AddVoter("l2")) is None
    assert f"index {first} is not committed" in leader.conf_change_refusal(AddVoter("l2"))
    assert "does not demote itself" in leader.conf_change_refusal(RemoveVoter("n1"))
    assert "already a voter" in leader.conf_change_refusal(AddVoter("n2"))
    assert "not a voter" in leader.conf_change_refusal(RemoveVoter("l2"))
    net.heal()
    net.flush("n1")
    net.tick_all(2)
    assert leader.voters == ("l1", *THREE)
    assert leader.propose_conf_change(AddVoter("l2")) is not None


def test_a_leader_that_commits_its_own_demotion_steps_down() -> None:
    """A voter can win an election while an uncommitted change that demotes it sits in its log; when
    its no-op commits that change, it must stop leading (it is no longer part of any majority)."""
    boot = bootstrap_state(THREE, cluster_id="t")
    demote = Entry(2, 1, EntryKind.CONF, encode_conf_change(RemoveVoter("n1")))
    state = PersistedState(HardState(term=1, commit=1), (*boot.entries, demote))
    net = Lockstep(THREE, config=CFG, persisted=dict.fromkeys(THREE, state))
    n1 = net.nodes["n1"]
    n1.campaign()
    net.flush("n1")
    net.stabilize()
    assert n1.commit >= 3, "its no-op committed, and with it the demotion"
    assert n1.role is Role.FOLLOWER and not n1.is_voter
    # Regression (simulator, 5-node seed 2241651534): it tells the others before stepping down, so
    # they count the new voters at once rather than a majority that includes it.
    assert all(node.voters == ("n2", "n3") for node in net.nodes.values())
    net.tick_all(4 * T)
    leaders = [n for n, node in net.nodes.items() if node.role is Role.LEADER]
    assert len(leaders) == 1 and leaders[0] in ("n2", "n3")


def test_membership_is_rebuilt_from_the_log_after_a_restart() -> None:
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    net.elect("n1")
    learner_joined(net, "n1", "l1")
    change(net, "n1", AddVoter("l1"))
    change(net, "n1", RemoveVoter("n3"))
    net.tick_all(2)
    for n in ("n2", "l1", "n3"):
        net.crash(n)
        node = net.restart(n)
        assert node.voters == ("l1", "n1", "n2") and node.learners == ("n3",)


def test_force_new_cluster_makes_a_lone_survivor_the_only_voter_and_keeps_its_log() -> None:
    net = Lockstep(THREE, learners=("l1",), config=CFG)
    net.elect("n1")
    learner_joined(net, "n1", "l1")
    committed = net.propose("n1", b"before the disaster")
    net.stabilize()
    net.tick_all(2)
    for n in ("n1", "n3", "l1"):
        net.crash(n)  # n1 and n3 are gone for good: n2 alone cannot elect anyone
    net.tick("n2", 4 * T)
    net.stabilize()
    assert net.nodes["n2"].role is not Role.LEADER
    forced = force_new_cluster_state(net.disks["n2"].load(), "n2")
    net.disks["n2"].save(forced.hard_state, forced.entries)
    n2 = net.restart("n2")
    assert n2.voters == ("n2",) and set(n2.learners) == {"n1", "n3", "l1"}
    assert committed is not None and n2.commit > committed
    assert n2.entries(committed, committed + 1)[0].data == b"before the disaster"
    n2.campaign()
    net.flush("n2")
    net.stabilize()
    assert n2.role is Role.LEADER
    index = net.propose("n2", b"after recovery")
    net.stabilize()
    assert index is not None and n2.commit >= index
    # A learner that returns catches up from the forced leader, then is promoted back.
    net.restart("l1")
    net.tick_all(2)
    assert net.nodes["l1"].commit == n2.commit and net.nodes["l1"].voters == ("n2",)
    change(net, "n2", AddVoter("l1"))
    assert n2.voters == ("l1", "n2")


def test_force_new_cluster_refuses_a_node_that_never_joined() -> None:
    import pytest

    with pytest.raises(ValueError, match="never a member"):
        force_new_cluster_state(None, "n9")


def test_election_jitter_bounds_the_timeout() -> None:
    cfg = RaftConfig(election_ticks=T, heartbeat_ticks=1, election_jitter_ticks=3)
    for seed in range(50):
        node = RaftNode("n1", cfg, bootstrap_state(THREE, "t"), seed)
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
        assert T <= ticks < T + 3
