"""End-to-end: real butterfly-node processes (supervisor + cluster, loader, validator children)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nodeharness import Node, free_port, pids_alive, segments_of, write_config

SEED_PHASES = ["cold_start", "discovery", "election", "assignment", "loading_weights", "validation", "ready"]


@pytest.fixture
def node_factory(tmp_path: Path, model_dir: Path):  # type: ignore[no-untyped-def]
    started: list[Node] = []

    def make(
        name: str = "n1",
        *,
        env: dict[str, str] | None = None,
        extra: str = "",
        quorum: int = 1,
        model: Path | None = None,
        args: list[str] | None = None,
        seeds: list[str] | None = None,
    ) -> Node:
        port = free_port()
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        node_id = f"t{os.getpid()}-{name}-{port}"
        cfg = write_config(
            d / "node.toml", model or model_dir, node_id=node_id, api_port=port, quorum=quorum, extra=extra,
            seeds=seeds,
        )  # fmt: skip
        node = Node(cfg, port, env=env, args=args)
        node.node_id = node_id  # type: ignore[attr-defined]
        started.append(node)
        return node

    yield make
    for n in started:
        if n.proc.poll() is None:
            n.stop(signal.SIGKILL)
        for seg in segments_of(n.node_id):  # type: ignore[attr-defined]
            Path("/dev/shm", seg).unlink(missing_ok=True)


def phase_lines(log: str) -> list[tuple[str, str]]:
    return re.findall(r"phase (\w+) -> (\w+), state", log)


def child_pids(status: dict) -> list[int]:  # type: ignore[type-arg]
    return [c["pid"] for c in status["children"] if c["pid"]]


def stops_clean(node, pids: list[int], within_s: float) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM: the node exits 0 within ``within_s``, none of ``pids`` is left, nor its shared memory."""
    t0 = time.monotonic()
    assert node.stop(signal.SIGTERM) == 0
    took = time.monotonic() - t0
    assert took < within_s, f"the node took {took:.1f}s to stop; its log ends:\n{node.log()[-6000:]}"
    assert pids_alive(pids) == []
    assert segments_of(node.node_id) == []


def test_single_node_goes_through_every_phase_and_stops_clean(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory()
    seen_states = []
    deadline = time.monotonic() + 60
    st = None
    while time.monotonic() < deadline:
        st = node.status()
        if st and (not seen_states or seen_states[-1] != st["state"]):
            seen_states.append(st["state"])
        if st and st["state"] == "OPERATIONAL":
            break
        time.sleep(0.01)
    assert st and st["state"] == "OPERATIONAL", node.log()
    log = node.log()
    transitions = phase_lines(log)
    assert [a for a, _ in transitions] == SEED_PHASES[:-1], transitions
    assert [b for _, b in transitions] == SEED_PHASES[1:], transitions
    assert "state READY -> OPERATIONAL" in log
    # The supervisor began the arena before any child ran; the loader took it over (prewarm).
    assert "arena made before the plan (begun by the supervisor)" in log
    # Each transition is logged once with node id, term and the phase's duration.
    assert len(re.findall(r"phase loading_weights -> validation", log)) == 1
    assert re.search(
        r"phase validation -> ready, state LOADING -> READY, term [0-9]+, validation took [0-9.]+s", log
    )
    # States only ever move forward in this run.
    order = ["COLD", "JOINING", "LOADING", "READY", "OPERATIONAL"]
    assert [order.index(s) for s in seen_states] == sorted(order.index(s) for s in seen_states)

    assert st["phase"] == "ready" and st["progress_percent"] == 100.0
    assert st["cluster_size"] == 1 and st["coordinator"] == node.node_id and st["term"] >= 1
    assert st["model_root"] and len(st["model_root"]) == 64
    assert st["bytes_done"] == st["bytes_total"] > 0
    assert set(st["phase_durations"]) >= set(SEED_PHASES[:-1]) | {"total"}
    assert node.get("/ready")[0] == 200
    assert node.get("/health")[0] == 200
    code, metrics = node.get("/metrics")
    text = metrics.decode()
    assert 'node_state{state="OPERATIONAL"} 1.0' in text
    assert re.search(r"^model_bytes_downloaded_total ([0-9.e+]+)$", text, re.M)
    assert 'init_duration_seconds{phase="total"}' in text

    pids = child_pids(st)
    assert len(pids) == 4 and len(set(pids)) == 4
    stops_clean(node, pids, within_s=10)


def test_progress_is_live_while_loading_and_not_ready_before_validation(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-loading_weights").touch()
    node = node_factory(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = node.wait_for(lambda s: s["phase"] == "loading_weights" and s["bytes_done"] > 0, what="mid-load")
    assert st["state"] == "LOADING"
    assert 0 < st["progress_percent"] < 100
    assert st["load_step"] == "download"
    assert st["bytes_total"] > st["bytes_done"]
    code, _ = node.get("/ready")
    assert code == 503
    # The seed's `tail -f node.log | grep -E "phase|progress"` shows the load's progress as it goes.
    node.wait_for(lambda s: "progress " in node.log(), 10, "a progress log line")
    assert re.search(r"progress [0-9.]+% loading_weights/download: [0-9.]+ of [0-9.]+ MiB", node.log())
    (hold / "hold-loading_weights").unlink()
    node.wait_state("OPERATIONAL")
    assert node.stop() == 0


@pytest.mark.parametrize(
    "phase", ["discovery", "election", "assignment", "loading_weights", "validation", "ready"]
)
@pytest.mark.parametrize("child", ["cluster", "loader", "validator", "engine"])
def test_child_sigkilled_in_any_phase_is_restarted_and_node_recovers(
    node_factory, tmp_path, phase, child
) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    if phase != "ready":
        (hold / f"hold-{phase}").touch()
    node = node_factory(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    if phase == "ready":
        st = node.wait_state("OPERATIONAL")
    else:
        # The cluster child starts first and discovery with it: the others may still be starting.
        st = node.wait_for(
            lambda s: s["phase"] == phase and all(c["pid"] for c in s["children"]),
            what=f"phase {phase}, every child started",
        )
    victim = next(c for c in st["children"] if c["name"] == child)
    os.kill(victim["pid"], signal.SIGKILL)
    st = node.wait_for(
        lambda s: next(c for c in s["children"] if c["name"] == child)["restarts"] == 1,
        what=f"{child} restarted",
    )
    (hold / f"hold-{phase}").unlink(missing_ok=True)
    st = node.wait_state("OPERATIONAL")
    restarted = next(c for c in st["children"] if c["name"] == child)
    assert restarted["pid"] != victim["pid"]
    assert restarted["last_exit"] == "killed by SIGKILL"
    assert f"{child} child pid {victim['pid']} killed by SIGKILL" in node.log()
    # Only a node's first loader takes over the arena the supervisor began: a restarted one must not
    # adopt what may be the arena an engine still serves from.
    assert node.log().count("(begun by the supervisor)") <= 1
    # The state may stay OPERATIONAL while a killed engine restarts; /ready says 503 until it serves.
    node.wait_ready()
    assert node.stop() == 0
    assert segments_of(node.node_id) == []


def test_sigterm_during_loading_stops_everything_within_bound(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-loading_weights").touch()
    node = node_factory(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = node.wait_for(lambda s: s["phase"] == "loading_weights" and s["bytes_done"] > 0, what="mid-load")
    pids = child_pids(st)
    stops_clean(node, pids, within_s=8)
    # The loader heeds the Shutdown mid-load (not killed when its grace runs out).
    assert re.search(r"load of epoch \d+ interrupted by Shutdown", node.log())
    assert "stopped" in node.log() and "Traceback" not in node.log()


def test_the_cluster_forms_while_the_loader_starts_and_the_plan_waits_for_it(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The cluster child starts first and the node follows discovery, election and the plan while the
    others start (the loader's fork waits for torch's import); the plan's load waits for the loader,
    and nothing is served meanwhile."""
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-spawn-loader").touch()
    node = node_factory(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = node.wait_for(lambda s: s["phase"] == "loading_weights", what="the plan applied")
    assert st["state"] == "LOADING" and st["layers"]
    assert next(c for c in st["children"] if c["name"] == "loader")["pid"] is None
    time.sleep(0.5)
    assert node.get("/ready")[0] == 503 and node.status()["phase"] == "loading_weights"
    (hold / "hold-spawn-loader").unlink()
    node.wait_state("OPERATIONAL")
    assert node.stop() == 0


def test_sigterm_while_children_start_stops_everything_and_leaves_no_arena(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Stopped before its loader exists: the children that did start stop, none starts after, and the
    arena the supervisor began is gone with the rest of its shared memory."""
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-spawn-loader").touch()
    node = node_factory(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = node.wait_for(lambda s: s["phase"] == "loading_weights", what="the plan applied")
    pids = child_pids(st)
    assert len(pids) == 1  # the cluster child
    stops_clean(node, pids, within_s=8)
    assert "started loader child" not in node.log() and "Traceback" not in node.log()


def test_sigkilled_supervisor_leaves_no_children_and_next_start_removes_its_segments(
    node_factory, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-loading_weights").touch()
    node = node_factory(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = node.wait_for(lambda s: s["phase"] == "loading_weights", what="loading")
    pids = child_pids(st)
    old_pid = node.proc.pid
    node.stop(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive(pids) == [], "children must die with the supervisor"
    stale = segments_of(node.node_id)
    assert any(f"-{old_pid}-board" in s for s in stale), stale

    (hold / "hold-loading_weights").unlink()
    again = Node(node.config, node.api_port)
    try:
        again.wait_state("OPERATIONAL")
        assert not any(f"-{old_pid}-" in s for s in segments_of(node.node_id))
        assert "removed stale shared memory" in again.log()
    finally:
        assert again.stop() == 0


def test_child_dying_past_restart_budget_fails_visibly(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-loading_weights").touch()
    node = node_factory(
        env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)}, extra="restart_limit = 1\nrestart_window_s = 60\n"
    )
    for restarts in (0, 1):
        st = node.wait_for(
            lambda s, r=restarts: (
                (c := next(c for c in s["children"] if c["name"] == "loader"))["restarts"] == r
                and c["alive"]
                and s["phase"] == "loading_weights"
            ),
            what=f"loader with {restarts} restarts",
        )
        os.kill(next(c for c in st["children"] if c["name"] == "loader")["pid"], signal.SIGKILL)
    st = node.wait_state("FAILED")
    assert "loader child killed by SIGKILL 2 times" in st["last_error"]
    assert node.get("/health")[0] == 503
    assert node.get("/ready")[0] == 503
    assert "node failed (loader)" in node.log()
    assert node.stop() == 1


def test_hung_child_is_detected_by_heartbeat_and_replaced(node_factory) -> None:  # type: ignore[no-untyped-def]
    # Children take longer to start than heartbeat_timeout_s (3 s), as on a loaded machine: a child
    # that has not beaten yet is starting, not hung (a regression: children were killed in a loop
    # before their first beat until the node failed), and the replacement is judged from its own spawn.
    node = node_factory(env={"BUTTERFLY_TEST_START_DELAY_S": "4.0"})
    st = node.wait_state("OPERATIONAL")
    victim = next(c for c in st["children"] if c["name"] == "validator")
    os.kill(victim["pid"], signal.SIGSTOP)
    node.wait_for(lambda s: not s["healthy"], what="unhealthy", timeout=10)
    assert node.get("/health")[0] == 503
    st = node.wait_for(
        lambda s: (
            s["healthy"] and next(c for c in s["children"] if c["name"] == "validator")["restarts"] == 1
        ),
        what="validator replaced",
        timeout=20,
    )
    assert f"validator child pid {victim['pid']} missed heartbeats" in node.log()
    assert "did not start within" not in node.log()
    time.sleep(2.0)
    st = node.status()
    assert st is not None and st["healthy"]
    assert next(c for c in st["children"] if c["name"] == "validator")["restarts"] == 1
    assert node.stop() == 0


def test_a_whole_node_stall_is_not_mistaken_for_hung_children(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory()
    st = node.wait_state("OPERATIONAL")
    pids = [node.proc.pid, *child_pids(st)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(4.5)  # longer than heartbeat_timeout_s (3 s) for every process of the node at once
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    time.sleep(3.0)
    st = node.wait_state("OPERATIONAL")
    assert len(st["children"]) == len(pids) - 1, st["children"]  # every child was frozen with the node
    assert [c["restarts"] for c in st["children"]] == [0] * len(st["children"]), st["children"]
    assert "supervisor loop ran" in node.log()
    assert node.stop() == 0


def test_quorum_above_one_waits_visibly_in_discovery(node_factory) -> None:  # type: ignore[no-untyped-def]
    # Two seeds that never answer: quorum 3 is reachable on paper (start-up accepts it), never found.
    node = node_factory(quorum=3, seeds=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    st = node.wait_for(lambda s: s["waiting_reason"] is not None, what="waiting reason")
    assert st["state"] == "JOINING" and st["phase"] == "discovery"
    assert "found 1 of quorum_size 3" in st["waiting_reason"]
    assert node.get("/ready")[0] == 503
    assert node.stop() == 0


def test_corrupt_model_fails_visibly_with_the_file_named(node_factory, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    import shutil

    bad = tmp_path / "badmodel"
    shutil.copytree(model_dir, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    node = node_factory(model=bad)
    st = node.wait_state("FAILED")
    assert shard.name in st["last_error"]
    assert node.get("/health")[0] == 503
    assert node.stop() == 1


def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[cluster]\nquorum_size = 0\n[model]\nsource_type = "filesystem"\nsource_path = "/x"\n')
    r = subprocess.run(
        [sys.executable, "-m", "butterfly.cli.node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 78
    assert "cluster.quorum_size" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "butterfly.cli.node", "--config", str(cfg), "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 78


def test_check_config_prints_effective_config_with_flag_overrides(tmp_path: Path, model_dir: Path) -> None:
    cfg = write_config(tmp_path / "n.toml", model_dir, node_id="cc", api_port=free_port(), role="worker")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "butterfly.cli.node",
            "--config",
            str(cfg),
            "--check-config",
            "--role",
            "coordinator",
            "--seed-nodes",
            "10.0.0.1:7000,10.0.0.2:7000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert 'role = "coordinator"' in r.stdout
    assert '"10.0.0.1:7000"' in r.stdout and '"10.0.0.2:7000"' in r.stdout


def test_a_local_source_is_read_in_place_and_cached_only_behind_ready(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """READY while the cache is held shut; once written behind, a restart still reads the local source
    in place (the cache is a repair's copy, not a second source)."""
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-cache_write").touch()
    node = node_factory("inplace", env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = node.wait_state("OPERATIONAL")
    assert st["model_bytes_downloaded_total"] == st["bytes_total"] > 0
    cache = node.config.parent / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64]
    (hold / "hold-cache_write").unlink()
    node.wait_for(lambda s: "behind the load (0 could not be)" in node.log(), 60, "the cache written")
    assert [p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64]
    assert node.stop() == 0
    again = Node(node.config, node.api_port)
    try:
        st = again.wait_state("OPERATIONAL")
        assert st["model_bytes_downloaded_total"] == st["bytes_total"]
        assert re.search(
            r"tensors: 0 kept in memory from the previous range, 0 from cache, \d+ from /", again.log()
        )
    finally:
        assert again.stop() == 0


def test_clear_cache_is_refused_while_the_node_runs(node_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    """README: `clear-cache` empties the weight cache, "refused while a node uses it"; a running node
    holds the cache's shared lock from start to stop."""
    from butterfly.cli.admin import main as admin

    node = node_factory("clear")
    node.wait_state("OPERATIONAL")
    node.wait_for(lambda s: "behind the load (0 could not be)" in node.log(), 60, "the cache written")
    cache = node.config.parent / "cache"
    entries = sorted(p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64)
    assert entries
    capsys.readouterr()
    assert admin(["clear-cache", "--config", str(node.config)]) == 1
    assert "a node is using the cache" in capsys.readouterr().err
    assert sorted(p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64) == entries
    assert node.stop() == 0
    assert admin(["clear-cache", "--config", str(node.config)]) == 0
    assert f"removed {len(entries)} entries" in capsys.readouterr().out


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[1])


def test_children_come_from_the_fork_server_and_survive_its_death(node_factory) -> None:  # type: ignore[no-untyped-def]
    """Every child is forked by one fork server, itself the supervisor's child. SIGKILL it: its children
    die with it (PR_SET_PDEATHSIG), the supervisor counts them dead, forks them again from a new server
    and the node is OPERATIONAL again."""
    node = node_factory("fork")
    st = node.wait_state("OPERATIONAL")
    pids = child_pids(st)
    servers = {_ppid(p) for p in pids}
    assert len(servers) == 1
    server = servers.pop()
    assert server != node.proc.pid and _ppid(server) == node.proc.pid
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive(pids) == []
    st = node.wait_for(
        lambda s: (
            s["state"] == "OPERATIONAL"
            and all(c["alive"] and c["pid"] not in pids and c["restarts"] >= 1 for c in s["children"])
        ),
        60,
        "children forked again and the node OPERATIONAL",
    )
    new = child_pids(st)
    assert len({_ppid(p) for p in new} - {server}) == 1
    assert "fork server pid" in node.log()
    assert node.stop() == 0
    assert pids_alive(new) == []


def test_without_the_fork_server_children_are_fresh_interpreters(node_factory) -> None:  # type: ignore[no-untyped-def]
    """The plain twin (BUTTERFLY_NO_FORKSERVER=1): the supervisor starts each child with python -m."""
    node = node_factory("exec", env={"BUTTERFLY_NO_FORKSERVER": "1"})
    st = node.wait_state("OPERATIONAL")
    assert {_ppid(p) for p in child_pids(st)} == {node.proc.pid}
    assert "fork server" not in node.log()
    assert node.stop() == 0
