"""Start-up checks: what a valid config points at is checked by --check-config and before start; each
problem is one line naming the key and the fix, exit 78, no traceback."""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from butterfly.cli import admin, node
from butterfly.net.auth import generate_secret, load_secret
from butterfly.weights.manifest import MANIFEST_FILE
from tests.nodeharness import free_port

SPEC_SHAPED = """
[cluster]
cluster_name = "my-cluster"
discovery_method = "static"
seed_nodes = ["10.0.1.10:7000", "10.0.1.11:7000"]
quorum_size = 3

[model]
source_type = "s3"
source_path = "s3://ml-models/llama-70b-v2"

[node]
role = "worker"  # or "coordinator"
bind_address = "0.0.0.0:7000"
"""


def _config(
    tmp_path: Path,
    model_dir: Path,
    *,
    secret: Path | None = None,
    quorum: int = 1,
    seeds: str = "",
    state_dir: Path | None = None,
    cache_dir: Path | None = None,
    bind_port: int | None = None,
    api_port: int | None = None,
    role: str = "coordinator",
) -> Path:
    if secret is None:
        secret = tmp_path / "cluster.key"
        if not secret.exists():
            generate_secret(secret)
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[cluster]
seed_nodes = [{seeds}]
quorum_size = {quorum}

[model]
source_type = "filesystem"
source_path = "{model_dir}"

[node]
id = "pre"
role = "{role}"
bind_address = "127.0.0.1:{bind_port or free_port()}"
state_dir = "{state_dir or tmp_path / "state"}"
cache_dir = "{cache_dir or tmp_path / "cache"}"

[api]
listen = "127.0.0.1:{api_port or free_port()}"

[security]
secret_file = "{secret}"
"""
    )
    return path


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = node.main(["--config", str(config), "--check-config"])
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_good_config_passes_and_prints_the_effective_config(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = node.main(["--config", str(_config(tmp_path, model_dir)), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 'id = "pre"' in out
    assert not (tmp_path / "state").exists() and not (tmp_path / "cache").exists()  # read-only check


@pytest.mark.skipif(
    Path("/etc/butterfly/cluster.key").exists(), reason="this host has a real /etc/butterfly/cluster.key"
)
def test_a_spec_shaped_config_gets_one_line_about_the_missing_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "spec.toml"
    config.write_text(SPEC_SHAPED)
    code, err = _check(config, capsys)
    assert code == 78
    line = _one_line(err)
    assert line == (
        f"butterfly-node: {config}: security.secret_file: the cluster secret /etc/butterfly/cluster.key "
        "does not exist (the default: the config sets no [security] secret_file); fix: run "
        "`butterfly-admin secret create /etc/butterfly/cluster.key` once and copy the file to every node"
    )


def test_secret_create_writes_a_private_random_key_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "cluster.key"
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        assert admin.main(["secret", "create", str(key)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = load_secret(key)
    assert len(first) == 64 and int(first, 16) >= 0
    assert "copy the same file to every node" in capsys.readouterr().out
    assert admin.main(["secret", "create", str(key)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert load_secret(key) == first
    other = tmp_path / "other.key"
    assert admin.main(["secret", "create", str(other)]) == 0
    assert load_secret(other) != first
    # A clumsy path is named as what it is (both read as "already exists" before).
    assert admin.main(["secret", "create", ""]) == 2
    assert "the path is empty" in capsys.readouterr().err
    assert admin.main(["secret", "create", str(tmp_path)]) == 1
    assert f"{tmp_path} is a directory; name a file in it" in capsys.readouterr().err


def test_a_missing_secret_names_the_key_and_the_command(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.key"
    code, err = _check(_config(tmp_path, model_dir, secret=missing), capsys)
    assert code == 78
    line = _one_line(err)
    assert f"security.secret_file: the cluster secret {missing} does not exist;" in line
    assert f"`butterfly-admin secret create {missing}`" in line


@pytest.mark.parametrize(
    ("make", "problem", "fix"),
    [
        (lambda p: p.mkdir(), "is a directory", "point secret_file at the key file"),
        (lambda p: (p.touch(), p.chmod(0o600)), "is empty", "butterfly-admin secret create"),
        (
            lambda p: (generate_secret(p), p.chmod(0o644)),
            "accessible to every user (mode 0644)",
            "chmod o-rwx",
        ),
        (
            lambda p: (p.write_text("ab" * 10), p.chmod(0o600)),
            "too short: 20 hex digits",
            "butterfly-admin secret create",
        ),
        (
            # A link is never followed; the fix used to say `secret create`, which refuses (it exists).
            lambda p: (generate_secret(p.with_name("real.key")), p.symlink_to(p.with_name("real.key"))),
            "is a symbolic link (to ",
            "set secret_file to the file itself (`readlink -f",
        ),
    ],
    ids=["directory", "empty", "world-readable", "short", "symlink"],
)
def test_a_bad_secret_file_is_refused_with_the_fix(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], make, problem: str, fix: str
) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "bad.key"
    make(key)
    code, err = _check(_config(tmp_path, model_dir, secret=key), capsys)
    assert code == 78
    line = _one_line(err)
    assert "security.secret_file: " in line and problem in line, line
    assert fix in line.split("; fix: ")[1], line


def test_state_and_cache_dirs_that_cannot_be_written_are_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    code, err = _check(_config(tmp_path, model_dir, state_dir=a_file), capsys)
    assert code == 78
    assert f"node.state_dir: {a_file} is not a directory; fix: create it writable" in _one_line(err)
    code, err = _check(_config(tmp_path, model_dir, cache_dir=a_file / "cache"), capsys)
    assert code == 78
    assert f"node.cache_dir: {a_file / 'cache'} cannot be created: {a_file} is not a directory" in _one_line(
        err
    )


def test_the_seeds_coordinator_without_seed_nodes_passes_whatever_its_quorum(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seed starts a coordinator, then workers given its address: the nodes that make its
    # quorum dial in, so a seed list shorter than quorum_size is no mistake (it was refused).
    assert _check(_config(tmp_path, model_dir, quorum=3, seeds=""), capsys)[0] == 0
    assert _check(_config(tmp_path, model_dir, quorum=3, seeds='"127.0.0.2:7000"'), capsys)[0] == 0


def test_a_filesystem_model_without_a_manifest_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name != MANIFEST_FILE:
            (bare / f.name).symlink_to(f)
    code, err = _check(_config(tmp_path, bare), capsys)
    assert code == 78
    assert (
        f"model.source_path: no manifest at {bare / MANIFEST_FILE}; fix: run `butterfly-admin manifest build "
        f"{bare}`"
    ) in _one_line(err)
    code, err = _check(_config(tmp_path, tmp_path / "absent"), capsys)
    assert code == 78
    assert f"model.source_path: {tmp_path / 'absent'} does not exist or is not a directory" in _one_line(err)


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_ports_in_use_are_refused(
    tmp_path: Path, model_dir: Path, held_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _check(_config(tmp_path, model_dir, bind_port=held_port), capsys)
    assert code == 78
    assert f"node.bind_address: 127.0.0.1:{held_port} is in use by another program; fix:" in _one_line(err)
    code, err = _check(_config(tmp_path, model_dir, api_port=held_port), capsys)
    assert code == 78
    assert f"api.listen: 127.0.0.1:{held_port} is in use by another program; fix:" in _one_line(err)


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    node_id = "pre"

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = json.dumps({"node_id": self.node_id, "state": "OPERATIONAL"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_check_config_beside_the_running_node_accepts_the_ports_it_holds(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _StatusHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, err = _check(_config(tmp_path, model_dir, api_port=port), capsys)
        assert code == 0, err
        _StatusHandler.node_id = "someone-else"
        code, err = _check(_config(tmp_path, model_dir, api_port=port), capsys)
        assert code == 78 and "is in use by another program" in err
    finally:
        _StatusHandler.node_id = "pre"
        server.shutdown()
        server.server_close()
        thread.join()


def _start_node(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``butterfly-node --config CONFIG`` in a child, as systemd starts it (a refused start exits)."""
    return subprocess.run(
        [sys.executable, "-m", "butterfly.cli.node", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_node_itself_refuses_to_start_with_one_line_and_no_traceback(
    tmp_path: Path, model_dir: Path
) -> None:
    config = _config(tmp_path, model_dir, secret=tmp_path / "missing.key")
    r = _start_node(config, timeout=60)
    assert r.returncode == 78
    assert "Traceback" not in r.stderr
    key = tmp_path / "missing.key"
    assert r.stderr.strip().splitlines() == [
        f"butterfly-node: {config}: security.secret_file: the cluster secret {key} does not exist; fix: "
        f"run `butterfly-admin secret create {key}` once and copy the file to every node"
    ]
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_a_start_on_a_port_that_stays_in_use_refuses_after_its_wait(
    tmp_path: Path, model_dir: Path, held_port: int
) -> None:
    config = _config(tmp_path, model_dir, api_port=held_port)
    r = _start_node(config)
    assert r.returncode == 78
    assert "Traceback" not in r.stderr
    assert f"api.listen: 127.0.0.1:{held_port} is in use by another program" in _one_line(r.stderr)


def test_a_second_start_of_a_running_node_says_it_is_running(tmp_path: Path, model_dir: Path) -> None:
    """Started twice (by hand beside systemd): after the port wait (a node on its way out frees its
    ports), "already running", not "in use by another program"."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _StatusHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = _config(tmp_path, model_dir, api_port=port)
        r = _start_node(config)
        assert r.returncode == 78, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"butterfly-node: {config}: node.id: node pre is already running: its API answers on "
            f"127.0.0.1:{port}; fix: stop it first (`systemctl stop butterfly-node`), or give this config "
            "its own [node] id and ports"
        ]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
