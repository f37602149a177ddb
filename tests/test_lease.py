"""Serving leases (butterfly.cluster.lease): a lease never outlives the promises it stands on.

The property tests drive one coordinator and its members through pings and pongs with arbitrary
message delays, and check at every grant the rule that makes leases safe: a member's lease, read on
any clock, ends no later than the quorum's promises not to elect anyone else.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.cluster.lease import DRIFT, LeaderLease, MemberLease, promise_span
from butterfly.cluster.messages import LeasePing, LeasePong, decode_peer, encode

SPAN = promise_span(0.05, 10)
VOTERS = ("a", "b", "c")


def test_the_promise_is_shorter_than_any_election_timeout() -> None:
    assert SPAN < 0.5 and SPAN == (10 - 1) * 0.05 * DRIFT


def test_no_pongs_no_lease_and_one_follower_makes_a_quorum_of_three() -> None:
    ll = LeaderLease("a", term=2, span=SPAN)
    ll.new_round(10.0)
    assert ll.end(10.0, VOTERS) == 0.0
    ll.on_pong(0.0, "b", LeasePong(term=2, seq=1, pong_seq=1, promise_s=0.3))
    # Counted from when the ping left (10.0), not from when the pong came back.
    assert ll.end(10.2, VOTERS) == 10.3


def test_a_pong_of_another_term_or_an_unknown_round_promises_nothing() -> None:
    ll = LeaderLease("a", term=2, span=SPAN)
    ll.new_round(10.0)
    ll.on_pong(0.0, "b", LeasePong(term=1, seq=1, pong_seq=1, promise_s=0.4))
    ll.on_pong(0.0, "c", LeasePong(term=2, seq=99, pong_seq=1, promise_s=0.4))
    assert ll.end(10.0, VOTERS) == 0.0


def test_a_promise_longer_than_the_span_is_cut_to_the_span() -> None:
    ll = LeaderLease("a", term=2, span=SPAN)
    ll.new_round(10.0)
    ll.on_pong(0.0, "b", LeasePong(term=2, seq=1, pong_seq=1, promise_s=60.0))
    assert ll.end(10.0, VOTERS) == 10.0 + SPAN


def test_a_lone_voter_leads_by_itself_and_a_coordinator_outside_the_voters_never() -> None:
    ll = LeaderLease("a", term=1, span=SPAN)
    assert ll.end(5.0, ("a",)) == 5.0 + SPAN
    assert ll.end(5.0, ("b", "c", "d")) == 0.0


def test_five_voters_need_two_promises_and_the_lease_is_the_second_latest() -> None:
    voters = ("a", "b", "c", "d", "e")
    ll = LeaderLease("a", term=3, span=SPAN)
    ll.new_round(1.0)
    ll.on_pong(0.0, "b", LeasePong(3, 1, 1, 0.4))
    assert ll.end(1.0, voters) == 0.0
    ll.on_pong(0.0, "c", LeasePong(3, 1, 1, 0.2))
    assert ll.end(1.0, voters) == 1.2


def test_a_member_is_following_only_while_it_answers_pings_of_this_term() -> None:
    ll = LeaderLease("a", term=2, span=SPAN)
    assert ll.following(5.0, "a", 1.0) and not ll.following(5.0, "b", 1.0)
    ll.new_round(5.0)
    ll.on_pong(5.1, "b", LeasePong(term=2, seq=1, pong_seq=1, promise_s=0.0))
    ll.on_pong(5.1, "c", LeasePong(term=1, seq=1, pong_seq=1, promise_s=0.0))
    assert ll.following(6.1, "b", 1.0) and not ll.following(6.2, "b", 1.0)
    assert not ll.following(5.2, "c", 1.0)


def test_a_member_lease_counts_from_its_own_pong_and_a_revoke_ends_it_at_once() -> None:
    m = MemberLease()
    pong = m.on_ping(100.0, LeasePing(term=4, seq=1, grant_seq=0, grant_s=0.0, epoch=0), 0.4)
    assert (pong.seq, pong.pong_seq, pong.promise_s) == (1, 1, 0.4)
    assert m.until == 0.0
    m.on_ping(100.3, LeasePing(term=4, seq=2, grant_seq=1, grant_s=0.25, epoch=7), 0.0)
    assert (m.until, m.epoch) == (100.25, 7)
    m.on_ping(100.31, LeasePing(term=4, seq=3, grant_seq=2, grant_s=0.0, epoch=0), 0.0)
    assert (m.until, m.epoch) == (0.0, 0)


def test_a_grant_for_a_pong_the_member_never_sent_is_ignored() -> None:
    m = MemberLease()
    m.on_ping(1.0, LeasePing(4, 1, 42, 0.4, 7), 0.0)
    assert m.until == 0.0


def test_lease_messages_round_trip_on_the_wire() -> None:
    for msg in (LeasePing(1, 2, 3, 0.25, 9), LeasePong(1, 2, 3, 0.4)):
        assert decode_peer(encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 0.3),  # ping delay to b
            st.floats(0.0, 0.3),  # pong delay from b
            st.floats(0.0, 0.12),  # how long before the ping b last heard the coordinator's Raft beat
            st.floats(0.0, 0.3),  # delay of the next ping (carrying the grant) to b
        ),
        min_size=1,
        max_size=20,
    )
)
def test_no_lease_outlives_the_promises_under_any_delays(
    rounds: list[tuple[float, float, float, float]],
) -> None:
    """One clock for all (real time); b is the one other voter of three, c is silent. After each round
    b's promise ends at ``heard + SPAN``: no coordinator's lease, nor any lease it grants, may end later."""
    ll = LeaderLease("a", term=1, span=SPAN)
    member = MemberLease()
    t = 0.0
    latest_promise_end = 0.0
    for ping_delay, pong_delay, heard_before, grant_delay in rounds:
        t += 0.05
        ll.new_round(t)
        ping = ll.ping(t, "b", epoch=3, leader_end=ll.end(t, VOTERS))
        at_b = t + ping_delay
        heard = max(0.0, at_b - heard_before)
        promise = max(0.0, heard + SPAN - at_b)
        latest_promise_end = max(latest_promise_end, at_b + promise)
        pong = member.on_ping(at_b, ping, promise)
        at_a = at_b + pong_delay
        ll.on_pong(0.0, "b", pong)
        end = ll.end(at_a, VOTERS)
        assert end <= latest_promise_end + 1e-9
        grant = ll.ping(at_a, "b", epoch=3, leader_end=end)
        member.on_ping(at_a + grant_delay, grant, 0.0)
        assert member.until <= latest_promise_end + 1e-9
        t = at_a + grant_delay
