"""Founding and voter replacement with real ``ClusterDriver``s (real ``RaftStorage``, fsync'd) on an
in-memory network, in one event loop: any number of coordinators starting at once found exactly one
cluster, and a voter that stays silent past ``voter_grace_s`` is replaced by a live learner."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from butterfly.cluster.coordinator import ModelInfo
from butterfly.cluster.driver import ClusterDriver, Progress, choose_founder, first_voters
from butterfly.cluster.messages import NodeReport, PlanEntry
from butterfly.config import HostPort
from butterfly.ipc import PeerFault
from butterfly.raft import Role


class Hub:
    """Delivers payloads between live members; a dead member neither sends nor receives."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[tuple[str, str, bytes]]] = {}
        self.dead: set[str] = set()
        self.cut: set[tuple[str, str]] = set()  # (src, dst) links that drop everything

    def net(self, node_id: str) -> MemNet:
        self.queues[node_id] = asyncio.Queue()
        return MemNet(self, node_id)


class MemNet:
    def __init__(self, hub: Hub, node_id: str) -> None:
        self.hub, self.node_id = hub, node_id

    def send(self, peer: str, channel: str, payload: bytes) -> None:
        hub = self.hub
        if (
            self.node_id not in hub.dead
            and peer not in hub.dead
            and peer in hub.queues
            and (self.node_id, peer) not in hub.cut
        ):
            self.hub.queues[peer].put_nowait((self.node_id, channel, payload))

    def peers(self) -> set[str]:
        return {n for n in self.hub.queues if n != self.node_id and n not in self.hub.dead}

    async def recv(self) -> tuple[str, str, bytes]:
        return await self.hub.queues[self.node_id].get()


class QuietEvents:
    async def progress(self, p: Progress) -> None:
        return None

    async def plan(self, plan: PlanEntry, term: int) -> bool:
        return True

    async def operational(self, epoch: int, term: int) -> None:
        return None

    async def validation_rejected(self, epoch: int, reason: str) -> None:
        return None

    async def range_accepted(self, epoch: int) -> None:
        return None

    async def waiting(self, reason: str) -> None:
        return None

    async def peer_faults(self, faults: list[PeerFault]) -> None:
        return None

    async def plan_applied(self, plan: PlanEntry) -> None:
        return None

    def board(self, **fields: object) -> None:
        return None


async def no_model() -> ModelInfo:
    raise RuntimeError("no model in this test")


def make_drivers(
    root: Path,
    hub: Hub,
    n: int,
    quorum: int,
    *,
    grace: float = 30.0,
    roles: list[str] | None = None,
    founder: HostPort | None = None,
) -> list[ClusterDriver]:
    addrs = [HostPort(f"10.0.0.{i + 1}", 7000) for i in range(n)]
    drivers = []
    for i in range(n):
        node_id = f"n{i}"
        role = (roles or ["coordinator"] * n)[i]

        def report(node_id: str = node_id, role: str = role) -> NodeReport:
            return NodeReport(node_id, "test", role, 1 << 30, 1.0)

        d = ClusterDriver(
            node_id=node_id,
            cluster_name="test",
            role=role,
            quorum_size=quorum,
            state_dir=root / node_id,
            net=hub.net(node_id),
            events=QuietEvents(),
            local_report=report,
            load_model=no_model,
            reserve_bytes=0,
            voter_grace_s=grace,
        )
        # Every node lists every address (its own included), as the README asks of seed_nodes.
        d.is_founder, d.founder = choose_founder("static", tuple(addrs), founder, addrs[i], role)
        drivers.append(d)
    return drivers


async def wait_for(cond: object, timeout: float, what: str) -> None:
    assert callable(cond)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def leaders(drivers: list[ClusterDriver], hub: Hub) -> list[ClusterDriver]:
    return [
        d for d in drivers if d.node_id not in hub.dead and d.raft is not None and d.raft.role is Role.LEADER
    ]


async def one_leader_and_learner(drivers: list[ClusterDriver], hub: Hub, learner: str, what: str) -> None:
    """Until one node leads and every node has ``learner`` as a learner."""
    await wait_for(
        lambda: (
            len(leaders(drivers, hub)) == 1
            and all(d.raft is not None and learner in d.raft.learners for d in drivers)
        ),
        20.0,
        what,
    )


async def run_cluster(drivers: list[ClusterDriver], seed: int) -> list[asyncio.Task[None]]:
    rng = random.Random(seed)
    order = list(drivers)
    rng.shuffle(order)
    tasks = []
    for d in order:
        tasks.append(asyncio.create_task(d.run()))
        await asyncio.sleep(rng.uniform(0, 0.05))  # started together, as processes would be
    return tasks


async def stop(tasks: list[asyncio.Task[None]], drivers: list[ClusterDriver]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for d in drivers:
        if d.storage is not None:
            d.storage.close()


def test_the_founder_is_the_same_on_every_node_and_only_one_node() -> None:
    addrs = tuple(HostPort(f"10.0.0.{i}", 7000) for i in (3, 1, 12, 2))
    answers = [choose_founder("static", addrs, None, a) for a in addrs]
    assert [founds for founds, _ in answers].count(True) == 1
    assert {who for _, who in answers} == {"10.0.0.1:7000"}
    # Seed lists that leave the node itself out still agree (the node's own address is added).
    others = [choose_founder("static", tuple(b for b in addrs if b != a), None, a) for a in addrs]
    assert others == answers
    pinned = HostPort("10.0.0.12", 7000)
    assert [choose_founder("static", addrs, pinned, a)[0] for a in addrs] == [False, False, True, False]
    founds, why = choose_founder("dns", (), None, addrs[0])
    assert not founds and "set cluster.founder" in why
    # A worker, often given one seed only, never founds by default, even at the lowest address...
    low = HostPort("10.0.0.0", 7000)
    assert choose_founder("static", addrs, None, low, "worker") == (False, "10.0.0.1:7000")
    assert choose_founder("static", addrs, None, low, "coordinator") == (True, "10.0.0.0:7000")
    # ...unless cluster.founder names it.
    assert choose_founder("static", addrs, low, low, "worker") == (True, "10.0.0.0:7000")
    assert choose_founder("static", (), None, addrs[0])[0], "a node without seeds founds alone"


@pytest.mark.parametrize(("n", "quorum", "seed"), [(5, 3, s) for s in range(4)] + [(9, 3, 0), (8, 5, 1)])
def test_any_number_of_coordinators_starting_together_found_exactly_one_cluster(
    tmp_path: Path, n: int, quorum: int, seed: int
) -> None:
    """Regression: the pledge rule deadlocked about 1 in 9 five-node starts, and was unsafe beyond
    2 x quorum_size - 1 coordinators. With one founder neither can happen."""

    async def main() -> None:
        hub = Hub()
        drivers = make_drivers(tmp_path, hub, n, quorum)
        tasks = await run_cluster(drivers, seed)
        try:
            await wait_for(
                lambda: (
                    all(d.raft is not None and d.raft.cluster_id for d in drivers)
                    and len(leaders(drivers, hub)) == 1
                    and all(
                        d.raft is not None and len(d.raft.voters) + len(d.raft.learners) == n for d in drivers
                    )
                ),
                20.0,
                "every node in one cluster with a leader",
            )
            ids = {d.raft.cluster_id for d in drivers if d.raft is not None}
            assert len(ids) == 1
            voters = {d.raft.voters for d in drivers if d.raft is not None}
            assert voters == {tuple(f"n{i}" for i in range(quorum))}
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


def test_a_worker_named_founder_founds_without_being_a_voter(tmp_path: Path) -> None:
    async def main() -> None:
        hub = Hub()
        roles = ["worker", "coordinator", "coordinator", "coordinator"]
        drivers = make_drivers(tmp_path, hub, 4, 3, roles=roles, founder=HostPort("10.0.0.1", 7000))
        assert drivers[0].is_founder
        tasks = await run_cluster(drivers, 3)
        try:
            await one_leader_and_learner(drivers, hub, "n0", "one cluster, the worker a learner")
            assert {d.raft.voters for d in drivers if d.raft is not None} == {("n1", "n2", "n3")}
            assert leaders(drivers, hub)[0].node_id != "n0"
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


def test_a_voter_silent_past_the_grace_is_replaced_by_a_live_learner(tmp_path: Path) -> None:
    async def main() -> None:
        hub = Hub()
        drivers = make_drivers(tmp_path, hub, 4, 3, grace=0.6, roles=["coordinator"] * 4)
        tasks = await run_cluster(drivers, 7)
        try:
            await one_leader_and_learner(drivers, hub, "n3", "n3 added as a learner")
            leader = leaders(drivers, hub)[0]
            victim = next(d for d in drivers if d is not leader and d.node_id != "n3")
            hub.dead.add(victim.node_id)
            survivors = [d for d in drivers if d is not victim]
            expected = tuple(sorted(d.node_id for d in survivors))
            await wait_for(
                lambda: all(d.raft is not None and d.raft.voters == expected for d in survivors),
                20.0,
                f"voters {expected}",
            )
            assert all(d.raft is not None and victim.node_id in d.raft.learners for d in survivors)
            # The new voter counts: with the old leader gone too, the two others still elect one.
            hub.dead.add(leaders(drivers, hub)[0].node_id)
            await wait_for(lambda: len(leaders(drivers, hub)) == 1, 20.0, "a leader among the last two")
            last = leaders(drivers, hub)[0]
            assert last.raft is not None
            index = last.raft.propose(b"")
            assert index is not None
            await last._process_ready()
            await wait_for(lambda: last.raft is not None and last.raft.commit >= index, 10.0, "a commit")
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


def test_a_founder_that_lost_its_state_does_not_found_a_second_cluster(tmp_path: Path) -> None:
    async def main() -> None:
        hub = Hub()
        drivers = make_drivers(tmp_path, hub, 3, 3)
        tasks = await run_cluster(drivers, 1)
        try:
            await wait_for(lambda: len(leaders(drivers, hub)) == 1, 20.0, "a leader")
            first = {d.raft.cluster_id for d in drivers if d.raft is not None}
        finally:
            await stop(tasks, drivers)
        import shutil

        shutil.rmtree(tmp_path / "n0")  # the founder's disk is replaced
        hub2 = Hub()
        again = make_drivers(tmp_path, hub2, 3, 3)
        assert again[0].is_founder
        tasks = await run_cluster(again, 2)
        try:
            await wait_for(
                lambda: (
                    len(leaders(again, hub2)) == 1
                    and all(d.raft is not None and d.raft.cluster_id for d in again)
                ),
                20.0,
                "one cluster again",
            )
            assert {d.raft.cluster_id for d in again if d.raft is not None} == first
        finally:
            await stop(tasks, again)

    asyncio.run(main())


def test_first_voters_take_coordinators_first_and_workers_to_make_up_the_quorum() -> None:
    roles = {"w1": "worker", "c2": "coordinator", "a0": "worker", "c1": "coordinator", "c3": "coordinator"}
    assert first_voters(roles, 3) == ("c1", "c2", "c3")
    assert first_voters(roles, 2) == ("c1", "c2")
    # The seed's cluster: one coordinator, workers make up quorum_size (lowest ids first).
    assert first_voters({"coord": "coordinator", "w2": "worker", "w1": "worker", "w3": "worker"}, 3) == (
        "coord",
        "w1",
        "w2",
    )


def test_workers_make_up_the_quorum_and_a_lost_worker_voter_is_replaced_by_a_worker(tmp_path: Path) -> None:
    """The seed's cluster shape: one coordinator, workers. Workers are the other voters (they never
    stand), so the coordinator leads with a majority, and a worker voter lost for good is replaced."""

    async def main() -> None:
        hub = Hub()
        roles = ["coordinator", "worker", "worker", "worker"]
        drivers = make_drivers(tmp_path, hub, 4, 3, grace=0.6, roles=roles)
        tasks = await run_cluster(drivers, 5)
        try:
            await one_leader_and_learner(drivers, hub, "n3", "one cluster, n3 a learner")
            assert {d.raft.voters for d in drivers if d.raft is not None} == {("n0", "n1", "n2")}
            assert leaders(drivers, hub)[0].node_id == "n0"
            hub.dead.add("n1")
            survivors = [d for d in drivers if d.node_id != "n1"]
            await wait_for(
                lambda: all(d.raft is not None and d.raft.voters == ("n0", "n2", "n3") for d in survivors),
                20.0,
                "n3 in n1's place",
            )
            assert leaders(drivers, hub)[0].node_id == "n0"
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


def test_a_coordinator_that_comes_later_takes_a_worker_voters_place(tmp_path: Path) -> None:
    """Founded with workers making up the quorum, the cluster gives a coordinator-eligible node that
    joins later a worker's vote, so that more voters may lead: promoted first, the worker let go."""

    async def main() -> None:
        hub = Hub()
        roles = ["coordinator", "worker", "worker", "coordinator"]
        drivers = make_drivers(tmp_path, hub, 4, 3, roles=roles)
        tasks = await run_cluster(drivers[:3], 2)
        try:
            await wait_for(
                lambda: all(d.raft is not None and d.raft.voters == ("n0", "n1", "n2") for d in drivers[:3]),
                20.0,
                "founded with the two workers voting",
            )
            tasks.append(asyncio.create_task(drivers[3].run()))
            await wait_for(
                lambda: all(d.raft is not None and d.raft.voters == ("n0", "n2", "n3") for d in drivers),
                20.0,
                "n3 voting in worker n1's place",
            )
            assert all(d.raft is not None and "n1" in d.raft.learners for d in drivers)
            # n3 may lead: with n0 gone, n3 and the worker n2 elect it.
            hub.dead.add("n0")
            await wait_for(lambda: [d.node_id for d in leaders(drivers, hub)] == ["n3"], 20.0, "n3 leading")
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


def test_a_founder_waits_for_coordinators_before_workers_make_up_the_quorum(tmp_path: Path) -> None:
    """Coordinators started together show up within WORKERS_SETTLE_S: one a little late still becomes
    a first voter, and the worker that was up before it never votes."""

    async def main() -> None:
        hub = Hub()
        roles = ["coordinator", "coordinator", "worker", "coordinator"]
        drivers = make_drivers(tmp_path, hub, 4, 3, roles=roles)
        tasks = await run_cluster(drivers[:3], 4)
        seen: set[tuple[str, ...]] = set()
        try:
            for _ in range(10):  # 0.5 s: the view of n0, n1 and the worker n2 settled long since
                await asyncio.sleep(0.05)
                seen |= {d.raft.voters for d in drivers if d.raft is not None and d.raft.voters}
            tasks.append(asyncio.create_task(drivers[3].run()))

            def formed() -> bool:
                seen.update(d.raft.voters for d in drivers if d.raft is not None and d.raft.voters)
                return len(leaders(drivers, hub)) == 1 and all(
                    d.raft is not None and d.raft.voters == ("n0", "n1", "n3") for d in drivers
                )

            await wait_for(formed, 20.0, "the three coordinators the first voters")
            assert seen == {("n0", "n1", "n3")}, seen
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


class ProgressEvents(QuietEvents):
    def __init__(self) -> None:
        self.last: Progress | None = None

    async def progress(self, p: Progress) -> None:
        self.last = p


def test_workers_name_the_coordinator_that_went_silent_before_its_plan(tmp_path: Path) -> None:
    """The seed's shape, its only coordinator lost before it made a plan: workers never stand, so they
    keep it as their leader. They used to say only "waiting for the coordinator's plan"."""

    async def main() -> None:
        hub = Hub()
        drivers = make_drivers(tmp_path, hub, 3, 3, roles=["coordinator", "worker", "worker"])
        events = [ProgressEvents() for _ in drivers]
        for d, e in zip(drivers, events, strict=True):
            d.events = e
        tasks = await run_cluster(drivers, 7)
        try:
            await wait_for(
                lambda: all(d.raft is not None and d.raft.leader == "n0" for d in drivers), 20.0, "n0 leading"
            )
            # No model here, so no plan: the workers wait for one, and say only that.
            await wait_for(
                lambda: all(
                    e.last == Progress("assignment", "waiting for the coordinator's plan") for e in events[1:]
                ),
                5.0,
                "the workers waiting for a plan",
            )
            hub.dead.add("n0")
            await wait_for(
                lambda: all(
                    e.last is not None
                    and "coordinator n0 has not been heard from for" in e.last.waiting_reason
                    for e in events[1:]
                ),
                10.0,
                "the workers to name the silent coordinator",
            )
            assert all(
                d.raft is not None and d.raft.leader == "n0" for d in drivers[1:]
            )  # nobody else may lead
        finally:
            await stop(tasks, drivers)

    asyncio.run(main())


def test_a_worker_holding_an_entry_the_last_coordinator_lacks_hands_it_over_without_coordinating(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Voters: two coordinators and a worker. The leader commits an entry that only the worker
    acknowledged (the coordinators cannot hear each other), then dies. The other coordinator lacks
    the entry, so the worker refuses it, and a worker never stood: no coordinator ever again. The
    worker now leads Raft as a caretaker just long enough to hand the entry over; no node, the worker
    included, ever names it coordinator."""

    caplog.set_level(logging.INFO, logger="butterfly.raft.core")

    async def main() -> None:
        hub = Hub()
        drivers = make_drivers(tmp_path, hub, 3, 3, roles=["coordinator", "coordinator", "worker"])
        tasks = await run_cluster(drivers, 11)
        named: set[str] = set()

        async def watch() -> None:
            while True:
                named.update(d.raft.leader for d in drivers if d.raft is not None and d.raft.leader)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            await wait_for(lambda: len(leaders(drivers, hub)) == 1, 20.0, "a coordinator leading")
            first = leaders(drivers, hub)[0]
            other = drivers[1] if first is drivers[0] else drivers[0]
            hub.cut |= {(first.node_id, other.node_id), (other.node_id, first.node_id)}
            assert first.raft is not None and other.raft is not None
            index = first.raft.propose_add_learner("x9")
            assert index is not None
            await wait_for(lambda: first.raft is not None and first.raft.commit >= index, 5.0, "the commit")
            assert other.raft.last_index < index, "the other coordinator lacks the entry"
            hub.dead.add(first.node_id)
            hub.cut.clear()
            await wait_for(
                lambda: other.raft is not None and other.raft.role is Role.LEADER, 20.0, "a new leader"
            )
            assert other.raft.commit >= index and "x9" in other.raft.learners
            became = [r.getMessage() for r in caplog.records if r.getMessage().startswith("n2 became")]
            assert any("became caretaker" in m for m in became), became
            assert not any("became leader" in m for m in became), became
            assert "n2" not in named, f"the worker was named coordinator: {named}"
        finally:
            watcher.cancel()
            await stop(tasks, drivers)

    asyncio.run(main())
