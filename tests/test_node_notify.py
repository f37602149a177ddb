"""The supervisor's systemd protocol, against a real NOTIFY_SOCKET datagram listener."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.nodeharness import Node, NotifyListener, free_port, segments_of, write_config


def test_supervisor_notifies_ready_status_watchdog_extend_and_stopping(
    tmp_path: Path, model_dir: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = NotifyListener(sock_path)
    port = free_port()
    cfg = write_config(tmp_path / "node.toml", model_dir, node_id="notify-test", api_port=port)
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-loading_weights").touch()
    node = Node(
        cfg,
        port,
        env={
            "NOTIFY_SOCKET": str(sock_path),
            "WATCHDOG_USEC": "1000000",
            "BUTTERFLY_TEST_HOLD_DIR": str(hold),
        },
    )
    try:
        node.wait_for(lambda s: s["phase"] == "loading_weights", what="loading")
        # The load is held half-way; the loader may still be starting (its fork waits for torch's
        # import), so wait for its download step rather than a fixed time (a busy machine took >1.2 s).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            any(m.startswith("STATUS=LOADING loading_weights/download") for m in listener.lines("STATUS="))
            and listener.lines("EXTEND_TIMEOUT_USEC=")
        ):
            time.sleep(0.1)
        assert any(
            line.startswith("STATUS=LOADING loading_weights/download") for line in listener.lines("STATUS=")
        ), listener.lines("STATUS=")
        assert listener.lines("EXTEND_TIMEOUT_USEC="), "loading progress must extend the start timeout"
        time.sleep(0.5)  # held: nothing may say READY meanwhile
        assert listener.lines("READY=1") == [], "READY=1 must not be sent before the node is READY"
        (hold / "hold-loading_weights").unlink()
        node.wait_state("OPERATIONAL")
        time.sleep(1.2)
        watchdogs = [t for t, m in listener.messages if m == "WATCHDOG=1"]
        # Half of WATCHDOG_USEC: about two a second.
        assert len(watchdogs) >= 3
        assert max(b - a for a, b in zip(watchdogs, watchdogs[1:], strict=False)) < 0.9
        assert listener.lines("READY=1") == ["READY=1"]
        assert node.stop(signal.SIGTERM) == 0
        time.sleep(0.3)
        assert listener.lines("STOPPING=1") == ["STOPPING=1"]
        ready_at = next(i for i, (_, m) in enumerate(listener.messages) if m == "READY=1")
        statuses_before = [m for _, m in listener.messages[:ready_at] if m.startswith("STATUS=")]
        assert not any(
            s.startswith("STATUS=READY") or s.startswith("STATUS=OPERATIONAL") for s in statuses_before
        )
    finally:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        listener.close()


def test_watchdog_is_withheld_while_a_child_is_hung(tmp_path: Path, model_dir: Path) -> None:
    import os

    sock_path = tmp_path / "notify.sock"
    listener = NotifyListener(sock_path)
    port = free_port()
    cfg = write_config(
        tmp_path / "node.toml", model_dir, node_id="notify-hang", api_port=port, extra="restart_limit = 0\n"
    )
    node = Node(cfg, port, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    try:
        st = node.wait_state("OPERATIONAL")
        loader = next(c for c in st["children"] if c["name"] == "loader")
        os.kill(loader["pid"], signal.SIGSTOP)
        node.wait_for(lambda s: not s["healthy"], what="unhealthy", timeout=10)
        stalled_from = time.monotonic()
        time.sleep(1.5)
        late = [t for t, m in listener.messages if m == "WATCHDOG=1" and t > stalled_from + 0.1]
        assert late == [], "WATCHDOG=1 must stop while a child is unhealthy"
    finally:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        listener.close()
        for seg in segments_of("notify-hang"):
            Path("/dev/shm", seg).unlink(missing_ok=True)
