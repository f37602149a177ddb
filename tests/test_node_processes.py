"""A node's processes under faults: a child that cannot be started, a node that failed for good."""

from __future__ import annotations

import os
import signal
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
