"""scripts/demo.sh, run for real (one node): it reaches OPERATIONAL, prints a completion the node
served, says where to look, and however it is stopped (Ctrl-C, SIGTERM, the terminal closing, even
SIGKILL of the script) no node it started is left running and no shared memory is left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeharness import free_port

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 300.0  # bounds a hang only; a busy machine may be slow


def _node_pids(run_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", f"--config {run_dir}/"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _wait(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _terminal_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("demo") / "run"
    yield path
    for pid in _node_pids(path):  # a failed case must not leave nodes for the next test file
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("how", "group"),
    [("SIGINT", True), ("SIGTERM", False), ("SIGHUP", True), ("SIGKILL", False)],
    ids=["ctrl-c", "sigterm", "terminal-closed", "sigkill"],
)
def test_the_demo_reaches_operational_and_stops_every_node(run_dir: Path, how: str, group: bool) -> None:
    log = run_dir.parent / f"demo-{how}.log"
    env = {
        **os.environ,
        "BUTTERFLY_DEMO_DIR": str(run_dir),
        "BUTTERFLY_DEMO_API_PORT": str(free_port()),
        "BUTTERFLY_DEMO_PORT": str(free_port()),
    }
    with open(log, "wb") as out:
        # Its own session, like a terminal's foreground job: Ctrl-C and hang-up go to the whole group.
        # And their default dispositions, as a terminal gives them: a suite started in the background
        # or under nohup passes SIGINT/SIGHUP ignored, which no shell can trap again.
        demo = subprocess.Popen(
            [str(REPO / "scripts" / "demo.sh"), "1"], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, cwd=REPO, preexec_fn=_terminal_signals,
        )  # fmt: skip
        try:
            _wait(
                lambda: "Ctrl-C stops every node." in log.read_text() or demo.poll() is not None, "the demo"
            )
            text = log.read_text()
            assert "[demo] cluster OPERATIONAL" in text, text[-3000:]
            assert "butterfly-admin status" in text and "Ctrl-C stops every node." in text
            # It shows a completion the cluster served.
            served = re.search(
                r"\[demo\] completion: \[finish_reason=\w+, prompt_tokens=\d+, completion_tokens=(\d+)\]",
                text,
            )
            assert served and int(served[1]) > 0, text[-3000:]
            pids = _node_pids(run_dir)
            assert len(pids) == 1
            assert [n for n in os.listdir("/dev/shm") if n.startswith(f"butterfly-demo-node1-{pids[0]}-")]
            sig = getattr(signal, how)
            if group:
                os.killpg(demo.pid, sig)
            else:
                os.kill(demo.pid, sig)
            _wait(lambda: not _node_pids(run_dir), f"the node to stop after {how}")
            demo.wait(timeout=WAIT_S)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    text = log.read_text()
    if how != "SIGKILL":
        assert "[demo] all nodes stopped" in text, text[-3000:]
        assert demo.returncode == 128 + getattr(signal, how)
    assert "Traceback" not in text, text[-3000:]
    assert not [
        n for n in os.listdir("/dev/shm") if "demo-node1" in n and env["BUTTERFLY_DEMO_API_PORT"] in n
    ]
