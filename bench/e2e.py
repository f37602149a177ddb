"""End-to-end rows for bench_load.py: a real single node from process start to READY, as a user waits.

A round starts ``butterfly-node`` (a fresh process, default config but for paths and ports: quorum 1,
coordinator, the model as a filesystem source, an empty cache dir) and times it from just before the
spawn to the READY=1 datagram it sends on ``$NOTIFY_SOCKET`` (the bench is its systemd): every cost
is in it (interpreters starting, discovery and election of one node, the arena's allocation and first
touch, the stream, the cache, validation, warmup). The node's own phase and step durations come from
its /status and log for the breakdown; then it is stopped with SIGTERM.

Other loaders' "from process start" figures come from bench_load's workers, which report the
monotonic time at which their last tensor was in memory (CLOCK_MONOTONIC is one clock for all
processes of a machine).

Must not: poll the node while it loads (a poll costs CPU on a 2-core machine; only the datagram is
awaited), or leave a node, a shared-memory segment or a temp dir behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.nodeharness import free_port  # noqa: E402


def ensure_manifest(model: Path) -> None:
    """The node reads the model version from ``butterfly-manifest.json``; build it once per model."""
    from butterfly.weights.build import build_manifest
    from butterfly.weights.manifest import MANIFEST_FILE, write_manifest

    if not (model / MANIFEST_FILE).exists():
        print(f"building the manifest of {model} ...", flush=True)
        manifest, _ = build_manifest(model)
        write_manifest(manifest, model / MANIFEST_FILE)


@dataclass
class NodeRun:
    """One node start: seconds from spawn to READY=1 (and to OPERATIONAL), and its own accounts."""

    ready_s: float
    operational_s: float | None
    phases: dict[str, float] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)


def _config(work: Path, model: Path, node_id: str, api_port: int, secret: Path) -> Path:
    cfg = work / "node.toml"
    cfg.write_text(
        f"""
[cluster]
cluster_name = "bench"
quorum_size = 1

[model]
source_type = "filesystem"
source_path = "{model}"

[node]
id = "{node_id}"
role = "coordinator"
bind_address = "127.0.0.1:{free_port()}"
state_dir = "{work / "state"}"
cache_dir = "{work / "cache"}"

[api]
listen = "127.0.0.1:{api_port}"

[security]
secret_file = "{secret}"
"""
    )
    return cfg


def _status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        return dict(json.loads(r.read()))


def run_node(model: Path, timeout_s: float = 600.0, keep_log: Path | None = None) -> NodeRun:
    """Start a node on ``model``, wait for READY=1 (then OPERATIONAL), stop it; raise if it fails.
    ``keep_log``: copy the node's log there before its work dir goes."""
    from butterfly.net.auth import generate_secret

    work = Path(tempfile.mkdtemp(prefix="butterfly-bench-node-"))
    node_id = f"bench-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    api_port = free_port()
    generate_secret(work / "cluster.key")
    cfg = _config(work, model, node_id, api_port, work / "cluster.key")
    sock_path = str(work / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = sock_path
    log = open(work / "node.log", "wb")  # noqa: SIM115 (closed in finally)
    proc: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "butterfly.cli.node", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        ready = _await_ready(sock, proc, t0 + timeout_s)
        ready_s = ready - t0
        operational_s = None
        deadline = time.monotonic() + 60
        st: dict[str, object] = {}
        while time.monotonic() < deadline:
            st = _status(api_port)
            if st.get("state") == "OPERATIONAL":
                operational_s = time.monotonic() - t0
                break
            time.sleep(0.01)
        durations = st.get("phase_durations")
        phases = {str(k): float(v) for k, v in durations.items()} if isinstance(durations, dict) else {}
        steps = _steps((work / "node.log").read_text(errors="replace"))
        return NodeRun(ready_s, operational_s, phases, steps)
    except Exception as e:
        tail = (work / "node.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{e}; node log tail:\n{tail}") from e
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        sock.close()
        if keep_log is not None:
            shutil.copyfile(work / "node.log", keep_log)
        for seg in os.listdir("/dev/shm"):
            if seg.startswith(f"butterfly-{node_id}-"):
                os.unlink(f"/dev/shm/{seg}")
        shutil.rmtree(work, ignore_errors=True)


def _await_ready(sock: socket.socket, proc: subprocess.Popen[bytes], deadline: float) -> float:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the node did not send READY=1 in time")
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with status {proc.returncode} before READY")
        sock.settimeout(min(left, 0.5))
        try:
            msg = sock.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in msg.split(b"\n"):
            return time.monotonic()


_LOADED = re.compile(r"loaded blocks .*?\((?P<steps>[^)]*)\)")


def _steps(log: str) -> dict[str, float]:
    """The loader's step seconds from the supervisor's "loaded blocks ... (download 1.2s, ...)" line."""
    m = _LOADED.search(log)
    out: dict[str, float] = {}
    if m:
        for part in m.group("steps").split(","):
            name, _, secs = part.strip().rpartition(" ")
            if name and secs.endswith("s"):
                out[name] = float(secs[:-1])
    return out


def main() -> None:
    """One node start on a model directory: its time to READY and its log (the timeline), for looking
    at where a start's seconds go: ``python bench/e2e.py MODEL_DIR [LOG_COPY]``."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model", type=Path)
    p.add_argument("log", type=Path, nargs="?", help="keep the node's log here")
    args = p.parse_args()
    ensure_manifest(args.model)
    run = run_node(args.model, keep_log=args.log)
    print(f"start -> READY {run.ready_s:.2f}s, -> OPERATIONAL {run.operational_s or float('nan'):.2f}s")
    print("phases:", ", ".join(f"{k} {v:.3f}" for k, v in run.phases.items()))
    print("loader steps:", ", ".join(f"{k} {v:.3f}" for k, v in run.steps.items()))


if __name__ == "__main__":
    main()
