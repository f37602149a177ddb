"""A node loading its weights from a real S3 endpoint (s3rver on loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.nodeharness import Node, free_port, segments_of, write_config
from tests.s3harness import ACCESS_KEY, REGION, SECRET_KEY, S3Server, resign_sigv4, running_s3rver, upload_dir

BUCKET = "models"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_with_model(model_dir: Path) -> Iterator[S3Server]:
    with running_s3rver((BUCKET,)) as server:
        upload_dir(server.client(), model_dir, BUCKET, "llama")
        yield server


def s3_config(tmp_path: Path, model_dir: Path, node_id: str, port: int, endpoint: str) -> Path:
    """A node config whose model is the uploaded test model, read from ``endpoint``."""
    cfg = write_config(tmp_path / "node.toml", model_dir, node_id=node_id, api_port=port)
    text = cfg.read_text().replace(
        'source_type = "filesystem"\nsource_path = "' + str(model_dir) + '"',
        f'source_type = "s3"\nsource_path = "s3://{BUCKET}/llama"\n\n[model.s3]\n'
        f'endpoint_url = "{endpoint}"\nregion = "{REGION}"\npath_style = true',
    )
    assert "s3://" in text
    cfg.write_text(text)
    return cfg


def test_node_loads_only_from_s3_and_reaches_operational(
    s3_with_model: S3Server, tmp_path: Path, model_dir: Path
) -> None:
    port = free_port()
    cfg = s3_config(tmp_path, model_dir, f"s3-{os.getpid()}", port, s3_with_model.endpoint)
    node = Node(cfg, port, env=S3_ENV)
    try:
        st = node.wait_state("OPERATIONAL", timeout=60)
        assert st["model_bytes_downloaded_total"] == st["bytes_total"] > 0
        assert f"from s3://{BUCKET}/llama" in node.log()
    finally:
        assert node.stop() == 0
        for seg in segments_of(f"s3-{os.getpid()}"):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def test_node_loading_through_a_source_slower_than_the_heartbeat_timeout_reaches_ready(
    s3_with_model: S3Server, tmp_path: Path, model_dir: Path
) -> None:
    """Every range trickles in for longer than the heartbeat timeout, and the whole load takes several
    timeouts: the loader must keep beating while it waits for bytes, or the supervisor kills it in a
    loop until the node fails."""
    timeout_s = 1.5
    proxy = FaultProxy(int(s3_with_model.endpoint.rsplit(":", 1)[1]), resign=resign_sigv4).start()
    # 64 KiB chunks at 32 KiB/s: two seconds per range; the ~1.8 MB model takes ~14 s at 4 in flight.
    proxy.inject(Fault("throttle", times=None, rate_bps=32 << 10))
    node_id = f"slow-{os.getpid()}"
    port = free_port()
    cfg = s3_config(tmp_path, model_dir, node_id, port, proxy.endpoint)
    cfg.write_text(cfg.read_text().replace("heartbeat_timeout_s = 3.0", f"heartbeat_timeout_s = {timeout_s}"))
    node = Node(cfg, port, env=S3_ENV)
    try:
        st = node.wait_state("OPERATIONAL", timeout=120)
        assert st["model_bytes_downloaded_total"] == st["bytes_total"] > 0
        assert all(c["restarts"] == 0 for c in st["children"]), st["children"]
        assert st["phase_durations"]["loading_weights"] > 3 * timeout_s
        assert "missed heartbeats" not in node.log()
        ranged = [e for e in proxy.log("GET") if e.range is not None]
        assert ranged and all(e.fault == "throttle" for e in ranged)
    finally:
        assert node.stop() == 0
        proxy.stop()
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64)


def test_s3_cache_is_written_behind_ready_and_a_warm_restart_reads_nothing_from_s3(
    s3_with_model: S3Server, tmp_path: Path, model_dir: Path
) -> None:
    """READY does not wait for the cache (it is held shut until the node is OPERATIONAL); once written
    behind, a restart loads from it alone, and a corrupt entry is refetched from S3."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "hold-cache_write").touch()
    node_id = f"wb-{os.getpid()}"
    port = free_port()
    cfg = s3_config(tmp_path, model_dir, node_id, port, s3_with_model.endpoint)
    cache = tmp_path / "cache"
    node = Node(cfg, port, env={**S3_ENV, "BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    try:
        first = node.wait_state("OPERATIONAL", timeout=60)
        assert first["model_bytes_downloaded_total"] == first["bytes_total"] > 0
        assert _entries(cache) == []
        (hold / "hold-cache_write").unlink()
        node.wait_for(lambda s: "behind the load" in node.log(), 60, "the write-behind to finish")
        assert re.search(r"cached (\d+) tensors behind the load \(0 could not be\)", node.log())
    finally:
        assert node.stop() == 0
    entries = _entries(cache)
    assert entries
    again = Node(cfg, port, env=S3_ENV)
    try:
        st = again.wait_state("OPERATIONAL", timeout=60)
        assert st["model_bytes_downloaded_total"] == 0, "a warm restart must not read the source"
        assert st["model_root"] == first["model_root"]
        assert re.search(
            r"tensors: 0 kept in memory from the previous range, \d+ from cache, 0 from", again.log()
        )
    finally:
        assert again.stop() == 0

    victim = max(entries, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    third = Node(cfg, port, env=S3_ENV)
    try:
        st = third.wait_state("OPERATIONAL", timeout=60)
        assert 0 < st["model_bytes_downloaded_total"] < st["bytes_total"]
        assert st["model_root"] == first["model_root"]
        assert "does not match the manifest" in third.log()
    finally:
        assert third.stop() == 0
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def test_a_missing_manifest_on_s3_is_shown_on_status_and_by_admin_status(
    s3_with_model: S3Server, tmp_path: Path, model_dir: Path
) -> None:
    """Start-up cannot check an S3 source's manifest; the node fails with the reason where an operator
    looks: /status's last_error and `butterfly-admin status`."""
    from butterfly.weights.manifest import MANIFEST_FILE

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name != MANIFEST_FILE:
            (bare / f.name).symlink_to(f)
    upload_dir(s3_with_model.client(), bare, BUCKET, "bare")
    node_id = f"nomf-{os.getpid()}"
    port = free_port()
    cfg = s3_config(tmp_path, model_dir, node_id, port, s3_with_model.endpoint)
    cfg.write_text(cfg.read_text().replace(f"s3://{BUCKET}/llama", f"s3://{BUCKET}/bare"))
    node = Node(cfg, port, env=S3_ENV)
    try:
        st = node.wait_state("FAILED", timeout=60)
        where = f"s3://{BUCKET}/bare/{MANIFEST_FILE}"
        assert st["last_error"].startswith(f"cannot use the model's manifest: no manifest at {where}: run ")
        r = subprocess.run(
            [sys.executable, "-m", "butterfly.cli.admin", "status", "--url", f"http://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "400"},
        )
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"no manifest at {where}" in r.stdout, r.stdout
    finally:
        node.stop()
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)
