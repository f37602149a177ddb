"""A node's processes under faults: a child that cannot be started, a node that failed for good, a
loader that dies while counting what it downloaded, a child or fork server whose supervisor is gone."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.nodeharness import Node, free_port, segments_of, write_config

MakeNode = Callable[..., Node]


@pytest.fixture
def make_node(tmp_path: Path, model_dir: Path) -> Iterator[MakeNode]:
    started: list[tuple[Node, str]] = []

    def make(*, env: dict[str, str] | None = None, extra: str = "") -> Node:
        port = free_port()
        node_id = f"p{os.getpid()}-{port}"
        cfg = write_config(tmp_path / "node.toml", model_dir, node_id=node_id, api_port=port, extra=extra)
        node = Node(cfg, port, env=env)
        started.append((node, node_id))
        return node

    yield make
    for node, node_id in started:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def child(st: dict, name: str) -> dict:  # type: ignore[type-arg]
    return next(c for c in st["children"] if c["name"] == name)  # type: ignore[no-any-return]


def test_a_child_that_cannot_be_started_is_retried_forever_and_the_node_does_not_serve(
    make_node: MakeNode, tmp_path: Path
) -> None:
    holds = tmp_path / "holds"
    holds.mkdir()
    node = make_node(env={"BUTTERFLY_TEST_HOLD_DIR": str(holds)})
    st = node.wait_state("OPERATIONAL", timeout=90)
    assert node.get("/ready")[0] == 200
    (holds / "hold-spawn-validator").touch()
    os.kill(child(st, "validator")["pid"], signal.SIGKILL)
    # Every start fails; it keeps trying (attempts counting up, restart budget untouched) and the
    # node says why and does not serve.
    st = node.wait_for(
        lambda s: (
            "validator child could not be started" in (s["last_error"] or "")
            and "(attempt 3)" in s["last_error"]
        ),
        what="three failed starts",
        timeout=60,
    )
    assert st["state"] != "FAILED" and not st["may_serve"]
    assert all(node.get("/ready")[0] == 503 for _ in range(20))
    (holds / "hold-spawn-validator").unlink()
    st = node.wait_for(
        lambda s: s["state"] == "OPERATIONAL" and child(s, "validator")["alive"],
        what="validator back and serving again",
        timeout=60,
    )
    assert node.get("/ready")[0] == 200
    assert "validator child started after" in node.log()
    assert node.stop() == 0


def test_a_node_failed_for_good_shows_why_then_exits_1_for_systemd_to_restart(
    make_node: MakeNode, tmp_path: Path
) -> None:
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "hold-loading_weights").touch()
    node = make_node(
        env={"BUTTERFLY_TEST_HOLD_DIR": str(holds)},
        extra="restart_limit = 0\nfailed_exit_after_s = 2.0\n",
    )
    st = node.wait_for(
        lambda s: s["phase"] == "loading_weights" and child(s, "loader")["alive"], what="loading", timeout=90
    )
    os.kill(child(st, "loader")["pid"], signal.SIGKILL)
    st = node.wait_state("FAILED", timeout=30)
    # Until it exits, /status says why (whole) and /ready refuses.
    assert "loader child killed by SIGKILL" in st["last_error"]
    assert node.get("/ready")[0] == 503
    deadline = time.monotonic() + 60
    while node.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.proc.returncode == 1, node.log()[-3000:]
    log = node.log()
    assert "node failed (loader)" in log
    assert "exiting with status 1 after failing (loader child killed by SIGKILL" in log


def test_downloaded_bytes_counter_goes_on_across_loader_restarts(make_node: MakeNode, tmp_path: Path) -> None:
    """model_bytes_downloaded_total is a Prometheus counter of the node: it may reset only when the
    node (the supervisor, which exports it) restarts, not when its loader child does. Killed half-way
    through a load and again once serving, each new loader counts on from the dead one's bytes."""
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "hold-loading_weights").touch()
    node = make_node(env={"BUTTERFLY_TEST_HOLD_DIR": str(holds)})
    seen: list[float] = []  # every value /metrics showed, in order
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                code, body = node.get("/metrics")
            except OSError:
                code, body = 0, b""
            m = re.search(rb"^model_bytes_downloaded_total ([0-9.e+]+)$", body, re.M) if code == 200 else None
            if m:
                seen.append(float(m.group(1)))
            time.sleep(0.01)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        # The first loader is held half-way through the model, its bytes so far published.
        st = node.wait_for(
            lambda s: s["phase"] == "loading_weights" and s["model_bytes_downloaded_total"] > 0,
            what="the load held half-way",
            timeout=90,
        )
        half, total = st["model_bytes_downloaded_total"], st["bytes_total"]
        assert 0 < half < total
        os.kill(child(st, "loader")["pid"], signal.SIGKILL)
        # Its successor reads the same first half again and is held there too: both halves count.
        st = node.wait_for(
            lambda s: child(s, "loader")["restarts"] == 1 and s["model_bytes_downloaded_total"] == 2 * half,
            what="the restarted loader held half-way, counting on from the dead one",
            timeout=60,
        )
        assert st["phase"] == "loading_weights"
        (holds / "hold-loading_weights").unlink()
        st = node.wait_state("OPERATIONAL", timeout=90)
        assert st["model_bytes_downloaded_total"] == half + total
        # Killed while serving: the node loads its range again, all of it from the source.
        os.kill(child(st, "loader")["pid"], signal.SIGKILL)
        st = node.wait_for(
            lambda s: child(s, "loader")["restarts"] == 2 and s["state"] == "OPERATIONAL",
            what="the node serving again after the second loader restart",
            timeout=90,
        )
        assert st["model_bytes_downloaded_total"] == half + 2 * total
        time.sleep(0.2)  # a few more scrapes of the final value
    finally:
        done.set()
        scraper.join(timeout=10)
    assert seen, "/metrics never showed model_bytes_downloaded_total"
    drops = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
    assert not drops, f"the counter went down: {drops[:5]} (of {len(seen)} scrapes)"
    assert seen[-1] == half + 2 * total
    assert node.stop() == 0


def _run_with_dead_peer(code: str, fd_env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter holding one end of a socket pair (its number in ``fd_env``)
    whose other end, the supervisor's, is already closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    try:
        env = {**os.environ, fd_env: str(theirs.fileno())}
        env.pop("BUTTERFLY_SUPERVISOR_PID", None)
        return subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            pass_fds=[theirs.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        theirs.close()


@pytest.mark.parametrize("kind", ["cluster", "validator", "loader", "engine"])
def test_a_child_whose_node_stops_before_its_init_exits_0_and_says_nothing(kind: str) -> None:
    """SIGTERM while a child is being forked: the supervisor closes the child's channel before the Init
    frame. The child leaves quietly (regression: each printed a ChannelClosed traceback to the journal)."""
    r = _run_with_dead_peer(
        f"from butterfly.supervisor.forkserver import module_name\n"
        f"import importlib; importlib.import_module(module_name({kind!r})).main()",
        "BUTTERFLY_CHILD_FD",
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_the_fork_server_whose_supervisor_is_gone_stops_quietly_as_a_child_exits() -> None:
    """The supervisor closed its end while one of the server's children exited: reporting that exit
    fails (EPIPE), and the server stops without a traceback (regression: BrokenPipeError on stop)."""
    r = _run_with_dead_peer(
        "import os, time\n"
        "if os.fork() == 0: os._exit(0)\n"
        "time.sleep(0.2)  # the child is a zombie: the server's first reap reports it\n"
        "from butterfly.supervisor import forkserver; forkserver.main()",
        "BUTTERFLY_FORKSERVER_FD",
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def _children_running(module: str) -> list[int]:
    """Pids of this process's children whose command line names ``module``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and module.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_a_node_stop_does_not_wait_for_a_fork_server_busy_importing() -> None:
    """The fork server notices its closed socket only between preloads, and torch's import takes
    seconds on a loaded machine: a node's stop waited up to 5 s for it (regression: CI's stop during
    start-up took 8.7 s). A server that cannot answer (here frozen) is killed after a moment."""
    import asyncio

    from butterfly.supervisor.launcher import CLOSE_GRACE_S, Launcher

    async def main() -> tuple[list[int], float]:
        launcher = Launcher()
        await launcher.start()
        servers = _children_running("butterfly.supervisor.forkserver")
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGSTOP)  # as if deep in an import: it reads nothing
        t0 = time.monotonic()
        await launcher.close()
        return servers, time.monotonic() - t0

    servers, took = asyncio.run(main())
    assert took < CLOSE_GRACE_S + 1.5, took
    assert _children_running("butterfly.supervisor.forkserver") == []
    with pytest.raises(ProcessLookupError):
        os.kill(servers[0], 0)
