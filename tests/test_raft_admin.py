"""``butterfly-admin force-new-cluster`` and ``raft-info`` on a real Raft file, and a recovered node
that leads alone and promotes a returning member (real drivers on an in-memory network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_raft_founding import Hub, leaders, make_drivers, one_leader_and_learner, stop, wait_for

from butterfly.cli.admin import main as admin
from butterfly.raft import RaftConfig, RaftNode, RaftStorage, bootstrap_state


def config_for(tmp_path: Path, node_id: str, state_dir: Path) -> Path:
    cfg = tmp_path / f"{node_id}.toml"
    cfg.write_text(
        f'[cluster]\nquorum_size = 3\n[model]\nsource_type = "filesystem"\nsource_path = "{tmp_path}"\n'
        f'[node]\nid = "{node_id}"\nrole = "coordinator"\nstate_dir = "{state_dir}"\n'
    )
    return cfg


def test_force_new_cluster_makes_the_stopped_node_the_only_voter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    path = state / "raft" / "raft.log"
    boot = bootstrap_state(["a", "b", "c"], "test/x")
    with RaftStorage.open(path) as storage:
        storage.save(boot.hard_state, boot.entries)
    cfg = config_for(tmp_path, "b", state)
    assert admin(["raft-info", "--config", str(cfg)]) == 0
    assert "voters a,b,c" in capsys.readouterr().out
    assert admin(["force-new-cluster", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "after:  node b: term 2, last index 2, commit 2" in out and "voters b," in out
    with RaftStorage.open(path) as storage:
        node = RaftNode("b", RaftConfig(), storage.load(), 1)
    assert node.voters == ("b",) and set(node.learners) == {"a", "c"} and node.cluster_id == "test/x"


def test_force_new_cluster_refuses_a_running_node_and_a_node_without_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    cfg = config_for(tmp_path, "b", state)
    assert admin(["force-new-cluster", "--config", str(cfg)]) == 1
    assert "never joined a cluster" in capsys.readouterr().err
    boot = bootstrap_state(["a", "b", "c"], "test/x")
    with RaftStorage.open(state / "raft" / "raft.log") as running:
        running.save(boot.hard_state, boot.entries)
        assert admin(["force-new-cluster", "--config", str(cfg)]) == 1
        assert "locked by another process (stop the node first)" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nquorum_size = 0\n")
    assert admin(["force-new-cluster", "--config", str(bad)]) == 78


def test_a_cluster_that_lost_its_quorum_recovers_after_force_new_cluster(tmp_path: Path) -> None:
    async def main() -> None:
        hub = Hub()
        drivers = make_drivers(tmp_path, hub, 4, 3, grace=60.0)
        tasks = [asyncio.create_task(d.run()) for d in drivers]
        try:
            await one_leader_and_learner(drivers, hub, "n3", "three voters and a learner")
            # Two of the three voters die for good: n2 (a voter) and n3 (a learner) are left.
            for gone in ("n0", "n1"):
                hub.dead.add(gone)
            await wait_for(lambda: not leaders(drivers, hub), 10.0, "no leader without a quorum")
        finally:
            await stop(tasks, drivers)
        # The operator stops n2, forces it, and starts n2 and n3 again.
        cfg = config_for(tmp_path, "n2", tmp_path / "n2")
        assert admin(["force-new-cluster", "--config", str(cfg)]) == 0
        hub2 = Hub()
        hub2.dead |= {"n0", "n1"}
        again = make_drivers(tmp_path, hub2, 4, 3, grace=60.0)
        alive = [d for d in again if d.node_id in ("n2", "n3")]
        tasks = [asyncio.create_task(d.run()) for d in alive]
        try:
            await wait_for(
                lambda: (
                    len(leaders(alive, hub2)) == 1
                    and all(d.raft is not None and d.raft.voters == ("n2", "n3") for d in alive)
                ),
                20.0,
                "n2 leads and promoted n3",
            )
        finally:
            await stop(tasks, alive)

    asyncio.run(main())
