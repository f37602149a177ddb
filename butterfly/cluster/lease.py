"""Serving leases: how long this node may serve, as promised by a quorum through the coordinator.

A node may serve only while it holds a lease that the current coordinator renews, and the
coordinator only while a quorum of voters has promised recently not to elect anyone else. Every
duration is measured on the monotonic clock of the node that relies on it, and every promise is
anchored at a moment the relying node knows to be no later than the promise was made, so message
delay can only shorten a lease, never lengthen it. The exchange (cluster channel, every
``RENEW_S``), for coordinator L and member M:

1. L sends ``LeasePing(term, seq, ...)`` to every member and remembers when it sent ``seq``.
2. M answers ``LeasePong(term, seq, pong_seq, promise_s)`` at once, and remembers when it sent
   ``pong_seq``. A member that follows L at ``term`` (a learner too: it may be a voter that has not
   applied its promotion yet) promises ``promise_s``: it will not vote for
   anyone (nor campaign) for that long. The promise is what Raft already guarantees: a follower's
   election timer was last reset when it heard L (``heard``) and cannot fire, nor can it grant a
   vote under check-quorum, within ``(ELECTION_TICKS - 1) * TICK_S`` of that (a tick may come at
   once after the reset); the driver also drops vote requests until the promise ends, so it holds
   even against a pre-vote race.
3. L counts voter V's promise from when it sent ``seq`` (earlier than V made it):
   ``ends[V] = sent[seq] + promise_s``. L's own lease ends at the quorum-th latest end, counting L
   itself as promising for as long as it leads (after stepping down it refuses votes until its last
   lease has ended). No other coordinator can be elected before then: any electing quorum shares a
   voter with the promising one.
4. L's next ping to M grants ``grant_s = leader_end - now`` for M's latest ``pong_seq`` and names the
   epoch it may serve (0: none, e.g. a planned node is dead or a new plan is on its way). M's lease
   ends at ``sent[pong_seq] + grant_s``: M sent that pong before L computed the grant.

Every span is multiplied by ``DRIFT`` (clock-rate margin between machines). Bounds, with the
driver's TICK_S = 0.05 and ELECTION_TICKS = 10 (a new coordinator needs at least 0.5 s):
- a promise lasts at most PROMISE_S = 0.45 s * DRIFT after the voter last heard the coordinator;
- so the coordinator's lease, and every lease it grants, ends at most 0.45 s after the coordinator
  last heard from a quorum; a member's at most 0.45 s after its last exchange with the coordinator.

This module is pure: no clock, no I/O; the driver passes ``now`` (``time.monotonic()``) in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from butterfly.cluster.messages import LeasePing, LeasePong

# A clock may run this much slower than another (crystal drift is ppm; keep a wide margin).
DRIFT = 0.98
# How often the coordinator pings its members.
RENEW_S = 0.05
# Sent-times kept for answers still in flight.
_KEEP = 64


def promise_span(tick_s: float, election_ticks: int) -> float:
    """How long after hearing its coordinator a voter is sure not to vote for another."""
    return (election_ticks - 1) * tick_s * DRIFT


def _trim(sent: dict[int, float]) -> None:
    while len(sent) > _KEEP:
        del sent[next(iter(sent))]


@dataclass
class LeaderLease:
    """The coordinator's side for one term: its pings, its voters' promises, its own lease."""

    node_id: str
    term: int
    span: float  # the longest promise a voter can make (promise_span)
    seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)
    pongs: dict[str, int] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # when each member's last pong arrived

    def ping(self, now: float, member: str, epoch: int, leader_end: float, reason: str = "") -> LeasePing:
        """The ping for ``member``; all pings of one round share a seq (call ``new_round`` first).
        ``reason``: why nobody may serve, when ``epoch`` is 0."""
        pong = self.pongs.get(member, 0)
        grant = max(0.0, leader_end - now) * DRIFT if pong and epoch else 0.0
        if grant <= 0 and epoch and not reason:
            reason = "the coordinator holds no lease from a quorum of voters"
        return LeasePing(self.term, self.seq, pong, grant, epoch if grant > 0 else 0, reason)

    def new_round(self, now: float) -> None:
        self.seq += 1
        self.sent[self.seq] = now
        _trim(self.sent)

    def on_pong(self, now: float, member: str, pong: LeasePong) -> None:
        if pong.term != self.term:
            return
        self.pongs[member] = pong.pong_seq
        self.seen[member] = now
        sent = self.sent.get(pong.seq)
        if sent is not None and pong.promise_s > 0:
            end = sent + min(pong.promise_s, self.span)
            self.ends[member] = max(self.ends.get(member, 0.0), end)

    def following(self, now: float, member: str, within: float) -> bool:
        """Whether ``member`` answered a ping of this term within the last ``within`` seconds."""
        return member == self.node_id or now - self.seen.get(member, -within - 1.0) <= within

    def end(self, now: float, voters: tuple[str, ...]) -> float:
        """When this coordinator's lease ends (<= now: it has none). Itself counts as promising."""
        quorum = len(voters) // 2 + 1
        ends = sorted(
            (now + self.span if v == self.node_id else self.ends.get(v, 0.0) for v in voters), reverse=True
        )
        if self.node_id not in voters or len(ends) < quorum:
            return 0.0
        return min(ends[quorum - 1], now + self.span)


@dataclass
class MemberLease:
    """A member's side: the pongs it sent, the lease (and epoch) its coordinator granted."""

    pong_seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)
    until: float = 0.0
    epoch: int = 0

    def on_ping(self, now: float, ping: LeasePing, promise_s: float) -> LeasePong:
        """Take the grant in ``ping`` (the caller checked it comes from the coordinator of its term)
        and answer it, promising ``promise_s`` (0 unless a voter following that coordinator)."""
        sent = self.sent.get(ping.grant_seq)
        if ping.epoch == 0 or ping.grant_s <= 0:
            self.until, self.epoch = 0.0, 0
        elif sent is not None:
            self.until, self.epoch = sent + ping.grant_s, ping.epoch
        self.pong_seq += 1
        self.sent[self.pong_seq] = now
        _trim(self.sent)
        return LeasePong(ping.term, ping.seq, self.pong_seq, promise_s)

    def drop(self) -> None:
        self.until, self.epoch = 0.0, 0
