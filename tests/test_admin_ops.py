"""`butterfly-admin status | watch | diagnose` as an operator runs them: real nodes, real exit codes.

One node (``live``) is started for the module and followed by ``watch`` from its first second to
OPERATIONAL; ``status`` and ``diagnose`` then read that running node. A second node with a corrupt
model shows the FAILED exit codes. Every command runs as a child process, so what is checked is
what a shell script sees: stdout, stderr and the exit status.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from butterfly.cli.admin_client import human_bytes, human_seconds
from butterfly.cli.admin_status import status_line
from tests.nodeharness import Node, free_port, in_private_mounts, segments_of, write_config

ROOT = Path(__file__).resolve().parent.parent
STATE_ORDER = ["COLD", "JOINING", "LOADING", "READY", "OPERATIONAL"]


def admin(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real command line in a child process; stdout is a pipe, so watch prints plain lines."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("COLUMNS", None)
    return subprocess.run(
        [sys.executable, "-m", "butterfly.cli.admin", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def check_lines(out: str) -> dict[str, tuple[str, str]]:
    """diagnose's output as {check name: (PASS|FAIL|SKIP, the rest of the line plus its hint)}."""
    checks: dict[str, tuple[str, str]] = {}
    last = None
    for line in out.splitlines():
        m = re.match(r"(PASS|FAIL|SKIP)  (\S+(?: \S+)?)\s{2,}(.*)", line)
        if m:
            last = m.group(2)
            checks[last] = (m.group(1), m.group(3))
        elif line.strip().startswith("hint: ") and last is not None:
            status, text = checks[last]
            checks[last] = (status, text + " | " + line.strip())
    return checks


@dataclass
class Live:
    node: Node
    config: Path
    node_id: str
    watch_rc: int
    watch_lines: list[str]
    watch_stderr: str


def _start(tmp: Path, model: Path, name: str, env: dict[str, str] | None = None) -> tuple[Node, Path, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    node_id = f"ops{os.getpid()}-{name}"
    cfg = write_config(tmp / "node.toml", model, node_id=node_id, api_port=port)
    return Node(cfg, port, env=env), cfg, node_id


def _cleanup(node: Node, node_id: str) -> None:
    if node.proc.poll() is None:
        node.stop(signal.SIGKILL)
    for seg in segments_of(node_id):
        Path("/dev/shm", seg).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Live]:
    """A node watched from its start: loading is held until watch has shown it, then released."""
    tmp = tmp_path_factory.mktemp("live")
    holds = tmp / "holds"
    holds.mkdir()
    hold = holds / "hold-loading_weights"
    hold.touch()
    node, cfg, node_id = _start(tmp / "n", model_dir, "live", env={"BUTTERFLY_TEST_HOLD_DIR": str(holds)})
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "butterfly.cli.admin", "watch", "--config", str(cfg)]
            + ["--interval", "0.05", "--until", "operational", "--timeout", "60"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None
        lines = []
        for line in watch.stdout:
            lines.append(line.rstrip("\n"))
            if " LOADING loading_weights" in line:
                hold.unlink(missing_ok=True)  # watch has shown the load: let it finish
        stderr = watch.stderr.read() if watch.stderr else ""
        rc = watch.wait(timeout=10)
        hold.unlink(missing_ok=True)
        yield Live(node, cfg, node_id, rc, lines, stderr)
    finally:
        _cleanup(node, node_id)


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Node]:
    """A node whose model shard is truncated: it ends FAILED and stays up to say why."""
    tmp = tmp_path_factory.mktemp("failed")
    bad = Path(shutil.copytree(model_dir, tmp / "badmodel"))
    shard = sorted(bad.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    node, _, node_id = _start(tmp / "n", bad, "failed")
    try:
        node.wait_state("FAILED", timeout=60)
        yield node
    finally:
        _cleanup(node, node_id)


# ---- watch ---------------------------------------------------------------------------------------


def test_watch_follows_a_node_from_start_to_operational(live: Live) -> None:
    assert live.watch_rc == 0, (live.watch_lines, live.watch_stderr, live.node.log()[-3000:])
    *changes, summary = live.watch_lines
    assert all(re.match(r"\+\d+\.\d\ds ", line) for line in changes), changes
    assert summary.startswith(f"node {live.node_id} is OPERATIONAL after ")
    st = live.node.status()
    assert st is not None and f"model root {st['model_root']}" in summary
    states = [line.split()[1] for line in changes if not line.split()[1].startswith("unreachable")]
    # Seen in the order the node goes through them, each change once (consecutive lines differ).
    assert states[0] in ("COLD", "JOINING") and states[-1] == "OPERATIONAL", changes
    order = [STATE_ORDER.index(s) for s in states]
    assert order == sorted(order), changes
    assert "LOADING" in states and "JOINING" in states, changes
    texts = [line.split(" ", 1)[1] for line in changes]
    assert all(a != b for a, b in itertools.pairwise(texts)), changes  # a line per change, not per poll
    loading = next(line for line in changes if " LOADING loading_weights" in line)
    assert "%" in loading, loading
    assert changes[-1].endswith("OPERATIONAL ready"), changes


def test_watch_exit_codes_for_unreachable_timeout_and_failed(failed: Node) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = admin("watch", "--url", dead, "--grace", "0.3", "--interval", "0.05")
    assert r.returncode == 3, r
    assert r.stdout.startswith("+") and "unreachable: cannot reach" in r.stdout
    assert "unreachable for more than 0.3s" in r.stderr
    # --timeout before the grace runs out: 4, and it says it never got an answer.
    r = admin("watch", "--url", dead, "--grace", "30", "--timeout", "0.4", "--interval", "0.05")
    assert r.returncode == 4, r
    assert "timed out after 0.4s; last: never answered" in r.stderr
    r = admin("watch", "--url", failed.url, "--interval", "0.05")
    assert r.returncode == 1, r
    assert " FAILED failed" in r.stdout and "FAILED: " in r.stderr
    st = failed.status()
    assert st is not None and st["last_error"] in r.stderr
    r = admin("watch", "--url", failed.url, "--interval", "0")
    assert r.returncode == 2 and "must be > 0" in r.stderr


class ScriptedStatus(http.server.BaseHTTPRequestHandler):
    """Answers /status with the next body of ``bodies`` per request, repeating the last one."""

    bodies: list[dict[str, object]] = []
    served = 0

    def do_GET(self) -> None:
        cls = type(self)
        body = json.dumps(cls.bodies[min(cls.served, len(cls.bodies) - 1)]).encode()
        cls.served += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_watch_prints_a_line_per_change_not_per_poll() -> None:
    """A clock inside a waiting reason, or progress within the same tenth, is not a change."""

    def st(state: str, phase: str, pct: float = 0.0, waiting: str | None = None) -> dict[str, object]:
        return {
            "state": state, "phase": phase, "load_step": "download" if phase == "loading_weights" else "none",
            "progress_percent": pct, "bytes_done": int(pct * 1024), "bytes_total": 100 * 1024,
            "rate_bytes_per_second": 2048.0, "eta_seconds": 3, "waiting_reason": waiting, "last_error": None,
            "node_id": "scripted", "term": 3, "epoch": 2, "model_root": "ab" * 32,
        }  # fmt: skip

    class Handler(ScriptedStatus):
        bodies = [
            st("JOINING", "election", waiting="no coordinator for 1.0s"),
            st("JOINING", "election", waiting="no coordinator for 1.1s"),
            st("JOINING", "election", waiting="no coordinator for 12.5s"),
            st("LOADING", "loading_weights", 5.0),
            st("LOADING", "loading_weights", 8.0),
            st("LOADING", "loading_weights", 15.0),
            st("LOADING", "loading_weights", 19.5),
            st("LOADING", "loading_weights", 55.0),
            st("READY", "ready", 100.0),
        ]
        served = 0

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = admin("watch", "--url", f"http://127.0.0.1:{server.server_address[1]}", "--interval", "0.01")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r
    assert Handler.served == len(Handler.bodies)  # it stopped polling at READY
    *changes, summary = r.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in changes] == [
        "JOINING election (waiting: no coordinator for 1.0s)",
        "LOADING loading_weights/download 5.0% 5.0 KiB/100.0 KiB 2.0 KiB/s ETA 3s",
        "LOADING loading_weights/download 15.0% 15.0 KiB/100.0 KiB 2.0 KiB/s ETA 3s",
        "LOADING loading_weights/download 55.0% 55.0 KiB/100.0 KiB 2.0 KiB/s ETA 3s",
        "READY ready",
    ]
    assert summary.startswith("node scripted is READY after ")
    assert summary.endswith(f"(term 3, epoch 2, model root {'ab' * 32})")


def test_watch_in_a_terminal_draws_a_live_view(live: Live) -> None:
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "butterfly.cli.admin", "watch", "--url", live.node.url, "--timeout", "20"],
        cwd=ROOT,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(timeout=20) == 0
    text = out.decode(errors="replace")
    assert "\x1b[" in text  # drawn with terminal control sequences, not plain lines
    assert "OPERATIONAL" in text and "ready" in text and "MiB" in text
    assert not re.search(r"^\+\d", text, re.MULTILINE)
    assert f"node {live.node_id} is OPERATIONAL" in text


# ---- status --------------------------------------------------------------------------------------


def test_status_table_and_json_of_a_running_node(live: Live) -> None:
    st = live.node.status()
    assert st is not None and st["state"] == "OPERATIONAL"
    r = admin("status", "--url", live.node.url)
    assert r.returncode == 0, r
    rows = {}
    for line in r.stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2:
            rows[parts[0]] = parts[1]
    assert rows["state"] == "OPERATIONAL"
    assert rows["phase"] == "ready"
    assert rows["node"].startswith(f"{live.node_id} (coordinator; configured coordinator, version ")
    # The node's actual role and every node's layers (here: one node holding them all).
    assert st["cluster_role"] == "coordinator" and st["layers"] is not None
    assert st["plan"] == [{"node_id": live.node_id, "layers": st["layers"]}]
    assert rows["layers"] == st["layers"]
    assert rows["plan"] == f"{live.node_id} {st['layers']}"
    assert rows["coordinator"] == live.node_id
    assert rows["term"] == str(st["term"]) and rows["epoch"] == str(st["epoch"])
    assert rows["model root"] == st["model_root"]
    assert rows["cluster size"] == "1 node(s) (1 operational, quorum 1)"
    assert rows["progress"].startswith("100.0% (1.8 MiB of 1.8 MiB")
    assert rows["healthy"] == "yes (may serve: yes)"
    assert rows["waiting"] == "-" and rows["last error"] == "-"
    for child in st["children"]:
        # name, pid, alive, heartbeat age, restarts
        row = rf"^\s*{child['name']}\s+{child['pid']}\s+yes\s+\d+\.\ds\s+0\s"
        assert re.search(row, r.stdout, re.MULTILINE), r.stdout

    # --json is the node's own body; --config finds the URL from [api] listen.
    r = admin("status", "--config", str(live.config), "--json")
    assert r.returncode == 0, r
    body = json.loads(r.stdout)
    assert body["node_id"] == live.node_id and body["state"] == "OPERATIONAL"
    assert body["model_root"] == st["model_root"] and len(body["children"]) == 4


def test_status_of_a_failed_node_exits_1_with_the_error(failed: Node) -> None:
    r = admin("status", "--url", failed.url)
    assert r.returncode == 1, r
    assert re.search(r"^state\s+FAILED\s*$", r.stdout, re.MULTILINE), r.stdout
    st = failed.status()
    assert st is not None
    error_line = next(line for line in r.stdout.splitlines() if line.startswith("last error"))
    assert st["last_error"][:60] in error_line
    r = admin("status", "--url", failed.url, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["state"] == "FAILED"


def test_status_unreachable_not_a_node_and_bad_config(tmp_path: Path) -> None:
    r = admin("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3, r
    assert "cannot reach" in r.stderr and r.stdout == ""

    class NotANode(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"hello": "world"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotANode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = admin("status", "--url", f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 3 and "not a butterfly node" in r.stderr, r

    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nsource_type = "filesystem"\nsource_path = "/m"\n[api]\nlisten = 8080\n')
    r = admin("status", "--config", str(bad))
    assert r.returncode == 78 and "api.listen" in r.stderr, r
    r = admin("status", "--url", "http://x", "--config", str(bad))
    assert r.returncode == 2  # mutually exclusive


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("localhost:8080", "is not an http:// or https:// URL: did you mean http://localhost:8080?"),
        ("ftp://node:8080", "is not an http:// or https:// URL"),
        ("http://", "names no host"),
        ("http://[::1", "is not a URL: Invalid IPv6 URL"),
        ("http://node:99999", "is not a URL: Port out of range"),
        ("http://no de:8080", "contains spaces or control characters"),
        ("http://node:8080\n", "contains spaces or control characters"),
        ("http://node:0", "port 0 is not a port a node listens on"),
        ("http://node:8080/?x=1", "without ? or #"),
    ],
)
def test_a_bad_url_is_a_usage_error_naming_it(url: str, why: str) -> None:
    # Such values reached urllib: a traceback (a space), or "cannot reach" and exit 3 as if a node were down.
    for command in (("status",), ("watch", "--timeout", "1"), ("generate", "hi")):
        r = admin(*command, "--url", url)
        assert r.returncode == 2, (command, r)
        assert f"argument --url: {url!r}" in r.stderr and why in r.stderr, r
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_status_gives_up_on_a_server_that_trickles_its_answer() -> None:
    """Each read got the socket timeout afresh: a byte a second kept `status` waiting for ever."""
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not stop.wait(0.5):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        r = admin("status", "--url", url, timeout=30)
        took = time.monotonic() - started
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    assert r.returncode == 3, r
    assert r.stderr == f"butterfly-admin: {url} did not send its whole /status within 3s\n"
    assert took < 10


# ---- diagnose ------------------------------------------------------------------------------------


def _config(tmp: Path, model: Path, **kw: object) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return write_config(tmp / "node.toml", model, node_id="diag", api_port=free_port(), **kw)  # type: ignore[arg-type]


def test_diagnose_a_good_config_before_and_while_the_node_runs(
    live: Live, tmp_path: Path, model_dir: Path
) -> None:
    # Not started yet: ports free, everything else present.
    cfg = _config(tmp_path, model_dir)
    r = admin("diagnose", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    checks = check_lines(r.stdout)
    assert list(checks) == [
        "config", "api port", "cluster port", "peers", "dns srv", "model dir", "manifest",
        "cluster secret", "directories", "disk", "gpu",
    ]  # fmt: skip
    assert {s for s, _ in checks.values()} <= {"PASS", "SKIP"}
    assert checks["api port"][0] == checks["cluster port"][0] == "PASS"
    assert "is free" in checks["api port"][1] and "is free" in checks["cluster port"][1]
    assert checks["peers"] == ("SKIP", "no seed_nodes: this node forms a cluster of its own")
    assert checks["dns srv"] == ("SKIP", 'discovery_method is "static"')
    assert "config.json present" in checks["model dir"][1]
    assert checks["manifest"][0] == "PASS" and "4 blocks" in checks["manifest"][1]
    assert (
        checks["disk"][0] == "PASS"
        and "this node caches the whole model (quorum_size 1), 1.8 MiB: "
        "it needs 1.8 MiB more (0 B already cached)"
        in checks["disk"][1]
    )
    assert checks["gpu"][0] in ("PASS", "SKIP")
    assert re.search(r"^\d PASS, 0 FAIL, \d SKIP$", r.stdout, re.MULTILINE), r.stdout

    # The running node's own config: its ports are held by it, its cache holds the whole model (once
    # the loader has written it behind READY).
    live.node.wait_for(lambda s: "behind the load" in live.node.log(), 60, "the cache written")
    r = admin("diagnose", "--config", str(live.config), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    by_name = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert by_name["api port"]["status"] == "PASS"
    assert f"answered by this node ({live.node_id}, OPERATIONAL)" in by_name["api port"]["message"]
    assert by_name["cluster port"]["message"].endswith(f"is held by this node ({live.node_id})")
    assert "needs 0 B more (1.8 MiB already cached)" in by_name["disk"]["message"]


def test_diagnose_reaches_a_running_seed(live: Live, tmp_path: Path, model_dir: Path) -> None:
    from butterfly.config import load_config

    seed = str(load_config(live.config).node.bind_address)
    cfg = _config(tmp_path, model_dir, seeds=[seed])
    r = admin("diagnose", "--config", str(cfg))
    assert r.returncode == 0, r.stdout
    assert check_lines(r.stdout)["peers"] == ("PASS", f"1 reachable: {seed}")


@pytest.mark.parametrize("fault", ["model dir", "cluster secret", "peers"])
def test_diagnose_names_each_failure_with_a_hint(fault: str, tmp_path: Path, model_dir: Path) -> None:
    if fault == "model dir":
        cfg = _config(tmp_path, tmp_path / "no-such-model")
        expected, hint = "no-such-model does not exist or is not a directory", "set [model] source_path"
    elif fault == "cluster secret":
        cfg = _config(tmp_path, model_dir, secret=tmp_path / "missing.key")
        expected, hint = "missing.key does not exist", "every node of the cluster needs the same file"
    else:
        dead = f"127.0.0.1:{free_port()}"
        cfg = _config(tmp_path, model_dir, seeds=[dead])
        expected, hint = f"1 of 1 unreachable: {dead} (Connection refused)", "start those nodes"
    r = admin("diagnose", "--config", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    checks = check_lines(r.stdout)
    status, text = checks[fault]
    assert status == "FAIL" and expected in text and f"hint: {hint}" in text, r.stdout
    # Only the fault fails; a model dir that is not there also leaves nothing to read a manifest from.
    others = {name for name, (s, _) in checks.items() if s == "FAIL"}
    assert others == {fault}, r.stdout
    if fault == "model dir":
        assert checks["manifest"][0] == "SKIP"
        assert checks["disk"][0] == "PASS" and "model size unknown" in checks["disk"][1]
    assert re.search(r"\b1 FAIL\b", r.stdout)


def test_diagnose_and_the_node_refuse_a_cache_dir_on_a_read_only_file_system(
    tmp_path: Path, model_dir: Path
) -> None:
    """diagnose used to PASS every check of a config whose cache_dir the node refuses (exit 78), and
    both said "not writable by this user" of a read-only mount, which no chmod fixes."""
    mount = tmp_path / "ro"
    mount.mkdir()
    cfg = _config(tmp_path, model_dir)
    cfg.write_text(
        cfg.read_text().replace(f'cache_dir = "{tmp_path / "cache"}"', f'cache_dir = "{mount}/cache"')
    )
    python = f'"{sys.executable}"'
    script = (
        f'mount -t tmpfs -o ro tmpfs "{mount}" && {python} -m butterfly.cli.admin diagnose --config "{cfg}"; '
        f'echo "diagnose exit $?"; {python} -m butterfly.cli.node --config "{cfg}" --check-config; '
        'echo "node exit $?"'
    )
    r = in_private_mounts(script)
    problem = (
        f"{mount}/cache does not exist and cannot be created: "
        f"{mount} is not writable (it is on a read-only file system)"
    )
    assert "diagnose exit 1" in r.stdout and "node exit 78" in r.stdout, r.stdout + r.stderr
    status, text = check_lines(r.stdout)["directories"]
    assert status == "FAIL" and f"node.cache_dir: {problem}" in text, r.stdout
    assert "hint: create it writable by the user running the node, or set node.cache_dir" in text
    assert f"node.cache_dir: {problem}; fix: create it writable" in r.stderr, r.stderr


def test_diagnose_port_taken_by_another_program(tmp_path: Path, model_dir: Path) -> None:
    from butterfly.config import load_config

    cfg = _config(tmp_path, model_dir)
    listen = load_config(cfg).api.listen
    # Some other web server on the port: it answers, but 501 for GET /status.
    other = http.server.ThreadingHTTPServer((listen.host, listen.port), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        r = admin("diagnose", "--config", str(cfg))
    finally:
        other.shutdown()
        other.server_close()
    assert r.returncode == 1
    status, text = check_lines(r.stdout)["api port"]
    assert status == "FAIL" and "in use by a program that is not a butterfly node" in text
    assert "hint: stop that program or set [api] listen to another port" in text


def test_diagnose_invalid_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nquorum_size = 0\n[model]\nsource_type = "filesystem"\nsource_path = "/x"\n')
    r = admin("diagnose", "--config", str(bad))
    assert r.returncode == 78, r
    status, text = check_lines(r.stdout)["config"]
    assert status == "FAIL" and "cluster.quorum_size: expected an integer >= 1, found 0" in text
    assert "hint: fix the value named above" in text
    r = admin("diagnose", "--config", str(tmp_path / "absent.toml"), "--json")
    assert r.returncode == 78
    assert json.loads(r.stdout)["checks"][0]["status"] == "FAIL"


def test_diagnose_dns_srv(live: Live, tmp_path: Path, model_dir: Path) -> None:
    from butterfly.config import load_config
    from tests.dnsmasq import Dnsmasq, SrvRecord

    seed = load_config(live.config).node.bind_address
    dns = Dnsmasq(tmp_path)
    dns.start(
        {"_butterfly._tcp.butterfly.test": [SrvRecord("a.butterfly.test", seed.port)]},
        host_records={"a.butterfly.test": "127.0.0.1"},
    )
    try:
        results = {}
        for name in ("_butterfly._tcp.butterfly.test", "_nothing._tcp.butterfly.test"):
            extra = (
                f'discovery_method = "dns"\ndns_srv_name = "{name}"\ndns_servers = ["127.0.0.1:{dns.port}"]\n'
            )
            cfg = _config(tmp_path / name, model_dir)
            cfg.write_text(cfg.read_text().replace('discovery_method = "static"\n', extra))
            results[name] = admin("diagnose", "--config", str(cfg))
    finally:
        dns.stop()
    good = results["_butterfly._tcp.butterfly.test"]
    assert good.returncode == 0, good.stdout
    checks = check_lines(good.stdout)
    assert checks["dns srv"] == ("PASS", f"_butterfly._tcp.butterfly.test: 1 targets (127.0.0.1:{seed.port})")
    assert checks["peers"] == ("PASS", f"1 reachable: 127.0.0.1:{seed.port}")
    empty = results["_nothing._tcp.butterfly.test"]
    assert empty.returncode == 1
    status, text = check_lines(empty.stdout)["dns srv"]
    assert status == "FAIL" and "no SRV records" in text and "hint: publish an SRV record" in text


def test_diagnose_s3_source_with_good_and_refused_credentials(tmp_path: Path, model_dir: Path) -> None:
    from tests.s3harness import ACCESS_KEY, DENIED_KEY, REGION, SECRET_KEY, running_s3rver, upload_dir

    with running_s3rver(("models",)) as server:
        upload_dir(server.client(), model_dir, "models", "llama")
        cfg = _config(tmp_path, model_dir)
        cfg.write_text(
            cfg.read_text().replace(
                'source_type = "filesystem"\nsource_path = "' + str(model_dir) + '"',
                f'source_type = "s3"\nsource_path = "s3://models/llama"\n\n[model.s3]\n'
                f'endpoint_url = "{server.endpoint}"\nregion = "{REGION}"\npath_style = true',
            )
        )
        base = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}
        good = admin("diagnose", "--config", str(cfg), env={**base, "AWS_ACCESS_KEY_ID": ACCESS_KEY})
        denied = admin("diagnose", "--config", str(cfg), env={**base, "AWS_ACCESS_KEY_ID": DENIED_KEY})
    assert good.returncode == 0, good.stdout
    checks = check_lines(good.stdout)
    assert checks["s3"][0] == "PASS" and "s3://models/llama/config.json readable" in checks["s3"][1]
    assert checks["manifest"][0] == "PASS"
    assert denied.returncode == 1, denied.stdout
    checks = check_lines(denied.stdout)
    assert checks["s3"][0] == "FAIL" and "hint: check [model.s3]" in checks["s3"][1]
    assert checks["manifest"][0] == "SKIP"


# ---- formatting ----------------------------------------------------------------------------------


def test_human_units_and_the_status_line() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 << 10, 5 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 GiB",
    ]  # fmt: skip
    assert [human_seconds(s) for s in (None, 0, 59.4, 61, 3600 + 120)] == ["-", "0s", "59s", "1m01s", "1h02m"]
    loading = {
        "state": "LOADING", "phase": "loading_weights", "load_step": "download", "progress_percent": 42.0,
        "bytes_done": 42 << 20, "bytes_total": 100 << 20, "rate_bytes_per_second": 10 << 20,
        "eta_seconds": 6, "waiting_reason": None, "last_error": None,
    }  # fmt: skip
    assert (
        status_line(loading) == "LOADING loading_weights/download 42.0% 42.0 MiB/100.0 MiB 10.0 MiB/s ETA 6s"
    )
    waiting = {"state": "JOINING", "phase": "discovery", "waiting_reason": "found 1 of quorum_size 3"}
    assert status_line(waiting) == "JOINING discovery (waiting: found 1 of quorum_size 3)"


# ---- checks that need hardware this machine may not have -----------------------------------------


def test_gpu_and_disk_verdicts_against_the_model_size(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU and disk checks' arithmetic, in-process with the machine's answers replaced: the
    test machines have no GPU and a roomy disk, so the other verdicts cannot be reached for real."""
    import butterfly.hardware
    from butterfly.cli.admin_diagnose import _Diagnosis
    from butterfly.config import load_config
    from butterfly.hardware import GpuInfo, Hardware
    from butterfly.weights.manifest import MANIFEST_FILE, read_manifest

    cfg = _config(tmp_path, model_dir)
    manifest = read_manifest(model_dir / MANIFEST_FILE)
    total = manifest.total_bytes
    # The cache stores a tensor by its digest: identical tensors take the room of one.
    to_cache = sum({t.blake3: t.length for t in manifest.tensors}.values())

    def diagnosis(gpu_mode: str = "auto", quorum: int = 1) -> _Diagnosis:
        original = cfg.read_text()
        text = original.replace("quorum_size = 1", f"quorum_size = {quorum}")
        cfg.write_text(text.replace("[node]\n", f'[node]\ngpu = "{gpu_mode}"\n', 1))
        d = _Diagnosis(load_config(cfg))
        d.manifest = manifest
        cfg.write_text(original)  # the next call starts from quorum_size = 1 again
        return d

    def machine(*memories: int) -> None:
        gpus = [GpuInfo(i, "Test GPU", m) for i, m in enumerate(memories)]
        monkeypatch.setattr(butterfly.hardware, "detect", lambda mode="auto": Hardware(2, 8 << 30, gpus))

    machine()
    assert diagnosis("required").gpu().status == "FAIL"
    assert "install the gpu extra" in diagnosis("required").gpu().hint
    assert diagnosis("auto").gpu().message == "no GPU: CPU path"
    machine(1 << 40)
    assert diagnosis("off").gpu().status == "SKIP"
    ok = diagnosis("auto").gpu()
    assert ok.status == "PASS" and "1 GPUs (0: Test GPU 1.0 TiB)" in ok.message
    machine(total // 2)
    assert diagnosis("auto").gpu().status == "FAIL"
    # Split over a quorum of two, half the weights fit.
    assert diagnosis("auto", quorum=2).gpu().status == "PASS"

    class Usage:
        def __init__(self, free: int) -> None:
            self.free = free

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(to_cache - 1))
    low = diagnosis().disk()
    assert low.status == "FAIL" and "needs 1.8 MiB more" in low.message and "cache_dir" in low.hint
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(to_cache))
    assert diagnosis().disk().status == "PASS"
    # Over a quorum of two the node caches about half the model, not all of it.
    share = -(-to_cache // 2)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(share))
    half = diagnosis(quorum=2).disk()
    assert half.status == "PASS" and "its share, about 1/2 of the model (quorum_size 2)" in half.message
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(share - 1))
    assert diagnosis(quorum=2).disk().status == "FAIL"
    # A running node's range is what it says it loads.
    ranged = diagnosis(quorum=2)
    ranged.running_node = {"node_id": "n", "bytes_total": 1000}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1000))
    assert (
        ranged.disk().status == "PASS" and "its layer range (from the running node)" in ranged.disk().message
    )
    # Without a manifest only a nearly full disk fails.
    d = diagnosis()
    d.manifest = None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2 << 30))
    assert d.disk().status == "PASS"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 20))
    assert d.disk().status == "FAIL" and "model size unknown" in d.disk().message
