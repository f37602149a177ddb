"""Starts real butterfly-node processes for tests and watches them through their HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# Ports tests hand out come from below the kernel's ephemeral range (32768-60999 by default), so an
# outgoing connection never takes one between free_port() and the bind; each pytest-xdist worker has a
# slice of its own, so two workers never hand out the same port; and a port is never handed out twice
# by one process, with its neighbours kept free (a node's engine or a demo's nodes sit at port + 1...).
# Kernel-chosen ports were handed out twice: a node's API and its bind address alike (78), a demo's
# engine port taken by another worker's node.
_PORTS_LOW, _PORTS_HIGH, _NEIGHBOURS = 10000, 32700, 8
_handed_out: set[int] = set()


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    slot = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = (_PORTS_HIGH - _PORTS_LOW) // (count + 1)
    start = _PORTS_LOW + slot * width
    return range(start, start + width - _NEIGHBOURS)


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, and that no other test of this run is handed."""
    import random

    ports = _port_slice()
    for _ in range(1000):
        port = random.choice(ports)
        if any(p in _handed_out for p in range(port - _NEIGHBOURS, port + _NEIGHBOURS + 1)):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")


def run_admin(*args: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """`butterfly-admin ARGS` as an operator runs it: a child process; its exit status, stdout and
    stderr. ``preexec_fn`` runs in the child first (a resource limit, say)."""
    return subprocess.run(
        [sys.executable, "-m", "butterfly.cli.admin", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,
    )


def in_private_mounts(script: str) -> subprocess.CompletedProcess[str]:
    """``sh -c script`` in a private mount namespace (a user namespace too, so root is not needed):
    whatever it mounts vanishes with it."""
    if shutil.which("unshare") is None:
        raise AssertionError("util-linux's unshare is needed (scripts/test.sh installs it)")
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def secret_for(path: Path) -> Path:
    """A cluster key beside the config (every node of a cluster must be given the same one)."""
    from butterfly.net.auth import generate_secret

    key = path.parent / "cluster.key"
    if not key.exists():
        generate_secret(key)
    return key


def write_config(
    path: Path,
    model_dir: Path,
    *,
    node_id: str,
    api_port: int,
    quorum: int = 1,
    role: str = "coordinator",
    extra: str = "",
    secret: Path | None = None,
    bind: str | None = None,
    seeds: list[str] | None = None,
) -> Path:
    key = secret or secret_for(path)
    seed_list = ", ".join(f'"{s}"' for s in (seeds or []))
    bind_address = bind or f"127.0.0.1:{free_port()}"
    # Each node's engine on a port of its own (the default, bind port + 1, may be taken on a busy host).
    engine = "" if "[engine]" in extra else f"\n[engine]\nport = {free_port()}\n"
    path.write_text(
        f"""
[cluster]
cluster_name = "test"
discovery_method = "static"
seed_nodes = [{seed_list}]
quorum_size = {quorum}

[model]
source_type = "filesystem"
source_path = "{model_dir}"

[node]
id = "{node_id}"
role = "{role}"
bind_address = "{bind_address}"
state_dir = "{path.parent / "state"}"
cache_dir = "{path.parent / "cache"}"

[api]
listen = "127.0.0.1:{api_port}"

[security]
secret_file = "{key}"

[loader]
chunk_bytes = 65536

[supervisor]
restart_backoff_s = 0.1
stop_timeout_s = 6.0
heartbeat_timeout_s = 3.0
{"" if "failed_exit_after_s" in extra else "failed_exit_after_s = 300.0  # tests of the exit lower it"}
{extra}
{engine}"""
    )
    return path


class Node:
    def __init__(
        self, config: Path, api_port: int, *, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        self.config = config
        self.api_port = api_port
        self.log_path = config.parent / f"{config.stem}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.pop("JOURNAL_STREAM", None)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "butterfly.cli.node", "--config", str(config), *(args or [])],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict[str, Any] | None:
        try:
            code, body = self.get("/status")
        except (urllib.error.URLError, OSError):
            return None
        return json.loads(body) if code == 200 else None

    def wait_for(self, pred: Any, timeout: float = 30.0, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"node exited with {self.proc.returncode} waiting for {what}:\n{self.log()}"
                )
            last = self.status()
            if last is not None and pred(last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /ready answers 200; on timeout, fail naming its last answer (why it waits) and the log."""
        deadline = time.monotonic() + timeout
        code, body = self.get("/ready")
        while code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            code, body = self.get("/ready")
        assert code == 200, f"/ready still {code} after {timeout}s: {body!r}\n{self.log()[-6000:]}"

    def wait_state(self, state: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s["state"] == state, timeout, f"state {state}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"node did not stop within {timeout}s\n{self.log()[-4000:]}") from None
        finally:
            self._log.close()
        return rc


def segments_of(node_id: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"butterfly-{node_id}-*"))


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie still answers kill(0); it is gone for our purposes.
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    continue
        except OSError:
            continue
        alive.append(pid)
    return alive


class NotifyListener:
    """A NOTIFY_SOCKET that records every line of every datagram a node sends, with when it came."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def close(self) -> None:
        self._stop = True
        self._t.join()
        self.sock.close()

    def lines(self, prefix: str) -> list[str]:
        return [m for _, m in self.messages if m.startswith(prefix)]

    def times(self, line: str) -> list[float]:
        """When each datagram holding exactly ``line`` (e.g. "READY=1") arrived."""
        return [t for t, m in list(self.messages) if m == line]
