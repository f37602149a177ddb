"""Integrity on a running node: bytes changed in memory, in the cache or at the source, tampered and
foreign manifests, each seen the way an operator sees it (/status, the log, /ready, systemd)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from butterfly.ipc import TensorPlacement
from butterfly.loader.process import place
from butterfly.weights.layout import LayerRange, load_layout
from butterfly.weights.manifest import MANIFEST_FILE, read_manifest
from tests.nodeharness import Node, NotifyListener, free_port, segments_of, write_config
from tests.tamper import copy_model, flip_byte, tamper_with_cheap_digests

NodeFactory = Callable[..., Node]
# Bounds on waits only protect against hangs: a machine shared by many test runs can be slow.
WAIT_S = 120.0


@pytest.fixture
def start_node(tmp_path: Path, model_dir: Path) -> Iterator[NodeFactory]:
    started: list[tuple[Node, str]] = []

    def make(
        name: str = "n1",
        *,
        model: Path | None = None,
        env: dict[str, str] | None = None,
        extra: str = "",
        model_extra: str = "",
    ) -> Node:
        port = free_port()
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        node_id = f"ti{os.getpid()}-{name}-{port}"
        cfg = write_config(d / "node.toml", model or model_dir, node_id=node_id, api_port=port, extra=extra)
        # These tests are not about hung children: on a machine shared by many test runs a child can
        # take seconds to start, and must not be killed for it.
        text = cfg.read_text().replace("heartbeat_timeout_s = 3.0", "heartbeat_timeout_s = 30.0")
        cfg.write_text(text.replace("\n[node]\n", f"{model_extra}\n[node]\n", 1))
        node = Node(cfg, port, env=env)
        started.append((node, node_id))
        return node

    yield make
    for node, node_id in started:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def arena_path(node: Node) -> Path:
    (path,) = Path("/dev/shm").glob(f"butterfly-*-{node.proc.pid}-arena")
    return path


def placements(model: Path, blocks: LayerRange) -> list[TensorPlacement]:
    """Where a node holding ``blocks`` keeps each tensor in its arena (the loader's own layout)."""
    manifest = read_manifest(model / MANIFEST_FILE)
    return place(load_layout(model).tensors_for_blocks(blocks), manifest)[0]


def test_a_byte_flipped_in_the_arena_before_validation_is_named_then_reloaded(
    start_node: NodeFactory, model_dir: Path, tmp_path: Path
) -> None:
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-validation").touch()
    node = start_node(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    node.wait_for(lambda s: s["phase"] == "validation", what="validation", timeout=WAIT_S)
    victim = next(
        p for p in placements(model_dir, LayerRange(0, 4)) if p.name.endswith("layers.1.mlp.down_proj.weight")
    )
    flip_byte(arena_path(node), victim.arena_offset + 1000)
    (hold / "hold-validation").unlink()
    st = node.wait_state("OPERATIONAL", timeout=WAIT_S)
    reason = st["last_error"]
    assert f"tensor {victim.name} (layer 1, arena offset {victim.arena_offset}) at byte 0 " in reason
    assert f"BLAKE3 expected {victim.blake3.hex()}, found " in reason
    log = node.log()
    assert "validation of epoch 1 failed: the weights in memory for blocks 0-3 are not the model's" in log
    assert "BufferError" not in log and "Traceback" not in log
    # The reload bypassed the cache and read the source again; the validator child never crashed.
    assert "retrying after:" in log
    assert not re.search(r"validator child pid \d+ exited", log)
    assert node.get("/ready")[0] == 200
    assert node.stop() == 0


def test_ready_1_and_ready_200_wait_until_the_coordinator_accepted_the_range(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-proof").touch()
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        node = start_node(
            env={"BUTTERFLY_TEST_HOLD_DIR": str(hold), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        )
        wait_until(lambda: "validated 1837312 bytes locally" in node.log(), WAIT_S, "local validation")
        # The arena is hashed; nothing has compared it with the manifest root yet. Give a premature
        # READY=1 every chance to show.
        time.sleep(0.5)
        st = node.status()
        assert st is not None and (st["state"], st["phase"]) == ("LOADING", "validation")
        assert node.get("/ready")[0] == 503
        assert notify.times("READY=1") == []
        released = time.monotonic()
        (hold / "hold-proof").unlink()
        node.wait_state("OPERATIONAL", timeout=WAIT_S)
        assert node.get("/ready")[0] == 200
        wait_until(lambda: notify.times("READY=1"), 10, "READY=1")
        (ready,) = notify.times("READY=1")
        assert ready > released
        # Lines of different processes reach the log through different pipes, so their order in the
        # file is the order they were read; their timestamps are the order they happened.
        log = node.log()

        def stamp(needle: str) -> str:
            return next(line for line in log.splitlines() if needle in line).split()[0]

        assert stamp("validation of ") <= stamp("phase validation -> ready")
        assert node.stop() == 0
    finally:
        notify.close()


def test_a_missing_manifest_refuses_the_start_at_once_with_the_fix(model_dir: Path, tmp_path: Path) -> None:
    """A filesystem model without its manifest is a configuration problem: exit 78 (systemd does not
    restart it) with one line naming the key and the command, before any child starts."""
    bare = copy_model(model_dir, tmp_path / "bare")
    (bare / MANIFEST_FILE).unlink()
    (tmp_path / "n1").mkdir()
    cfg = write_config(tmp_path / "n1" / "node.toml", bare, node_id="bare", api_port=free_port())
    r = subprocess.run(
        [sys.executable, "-m", "butterfly.cli.node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 78
    assert r.stderr.strip().splitlines() == [
        f"butterfly-node: {cfg}: model.source_path: no manifest at {bare}/{MANIFEST_FILE}; fix: run "
        f"`butterfly-admin manifest build {bare}` (it writes {MANIFEST_FILE} beside the weights)"
    ]


def test_a_manifest_with_another_root_than_the_pinned_one_is_refused(
    start_node: NodeFactory, model_dir: Path
) -> None:
    pinned = "0" * 64
    node = start_node(model_extra=f'expected_root = "{pinned}"')
    st = node.wait_state("FAILED", timeout=WAIT_S)
    root = read_manifest(model_dir / MANIFEST_FILE).merkle_root
    assert f"names model version {root}, but [model] expected_root pins {pinned}" in st["last_error"]
    assert st["bytes_done"] == 0  # refused before a byte of weights was read
    assert node.stop() == 1


def test_tampered_weights_with_matching_chunk_digests_never_reach_ready(
    start_node: NodeFactory, model_dir: Path, tmp_path: Path
) -> None:
    bad = copy_model(model_dir, tmp_path / "bad")
    victim = "model.layers.3.self_attn.o_proj.weight"
    tamper_with_cheap_digests(bad, victim)
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        node = start_node(model=bad, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        st = node.wait_state("FAILED", timeout=WAIT_S)
        expected = next(t.blake3 for t in read_manifest(bad / MANIFEST_FILE).tensors if t.name == victim)
        assert f"tensor {victim} (layer 3, arena offset " in st["last_error"]
        assert "the whole-tensor digest does not" in st["last_error"]
        assert f"BLAKE3 expected {expected}, found " in st["last_error"]
        assert node.get("/ready")[0] == 503
        assert node.stop() == 1
        assert notify.times("READY=1") == []
        assert notify.lines("STATUS=FAILED")
    finally:
        notify.close()


# ---- scrubbing: a node that serves keeps checking its weights ----------------------------------

FAST_SCRUB = "[validator]\nscrub_interval_s = 0.5\nscrub_cpu_percent = 50\n"


def metric(node: Node, name: str) -> float:
    text = node.get("/metrics")[1].decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


def serving_and_scrubbed(node: Node) -> dict[str, Any]:
    return node.wait_for(
        lambda s: s["state"] == "OPERATIONAL" and s["integrity"]["scrub_passes"] >= 1,
        what="a scrub pass",
        timeout=WAIT_S,
    )


def cache_entry(node: Node, digest: str) -> Path:
    return node.config.parent / "cache" / "blake3" / digest[:2] / digest


def test_a_byte_flipped_in_memory_while_serving_is_found_repaired_and_proven_again(
    start_node: NodeFactory, model_dir: Path, tmp_path: Path
) -> None:
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-repair").touch()
    node = start_node(extra=FAST_SCRUB, env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    st = serving_and_scrubbed(node)
    assert st["integrity"]["scrub_bytes"] >= st["bytes_total"] and st["integrity"]["scrubbing"]
    victim = next(
        p
        for p in placements(model_dir, LayerRange(0, 4))
        if p.name == "model.layers.2.self_attn.q_proj.weight"
    )
    flip_byte(arena_path(node), victim.arena_offset + 5000)
    # Not serving from the moment it is found, until it is proven again (the repair is held here).
    down = node.wait_for(lambda s: s["state"] == "LOADING", what="serving stopped", timeout=WAIT_S)
    assert not down["may_serve"] and down["integrity"]["fault"]
    assert node.get("/ready")[0] == 503
    assert (
        victim.name in down["last_error"] and f"BLAKE3 expected {victim.blake3.hex()}" in down["last_error"]
    )
    (hold / "hold-repair").unlink()
    st = node.wait_for(
        lambda s: s["state"] == "OPERATIONAL" and s["integrity"]["repairs"] == 1,
        what="repaired",
        timeout=WAIT_S,
    )
    assert not st["integrity"]["fault"] and st["may_serve"]
    (m,) = st["integrity"]["last_mismatch"]
    assert (m["tensor"], m["layer"], m["offset"], m["arena_offset"]) == (
        victim.name,
        "layer 2",
        0,
        victim.arena_offset,
    )
    assert m["expected"] == victim.blake3.hex() and m["found"] != m["expected"]
    found = "scrubbing found the weights in memory for blocks 0-3 changed: 1 tensor(s) differ: tensor"
    assert f"{found} {victim.name}" in st["last_error"]
    log = node.log()
    assert "not serving until repaired: scrubbing found the weights in memory" in log
    # From the cache (the first load filled it), verified on the way; then validated and proven.
    assert f"repaired {victim.name} (1 from the cache, 0 from the source): validating again" in log
    assert log.count("state READY -> OPERATIONAL") == 2
    assert node.get("/ready")[0] == 200
    assert metric(node, "weight_repairs_total") == 1
    assert metric(node, "weight_mismatches_total") == 1
    assert metric(node, "scrub_passes_total") >= 1 and metric(node, "scrub_bytes_total") > 0
    assert node.stop() == 0


def test_a_bad_cache_entry_met_during_a_repair_is_quarantined_and_the_source_read(
    start_node: NodeFactory, model_dir: Path
) -> None:
    node = start_node(extra=FAST_SCRUB)
    st = serving_and_scrubbed(node)
    victim = next(
        p for p in placements(model_dir, LayerRange(0, 4)) if p.name == "model.layers.0.mlp.down_proj.weight"
    )
    entry = cache_entry(node, victim.blake3.hex())
    flip_byte(entry, 70000)
    flip_byte(arena_path(node), victim.arena_offset + 70000)
    st = node.wait_for(
        lambda s: s["state"] == "OPERATIONAL" and s["integrity"]["repairs"] == 1,
        what="repaired",
        timeout=WAIT_S,
    )
    log = node.log()
    assert (
        f"cache entry {victim.blake3.hex()} removed: chunk 1 of {victim.name} does not match the manifest"
        in log
    )
    assert f"repaired {victim.name} (0 from the cache, 1 from the source)" in log
    assert st["model_bytes_downloaded_total"] == st["bytes_total"] + victim.length
    # What came from the source (checked chunk by chunk, then by the cache's own BLAKE3) is cached again.
    assert blake3.blake3(entry.read_bytes()).digest() == victim.blake3
    assert node.stop() == 0


def test_a_byte_flipped_at_the_source_is_named_and_nothing_wrong_is_served(
    start_node: NodeFactory, model_dir: Path, tmp_path: Path
) -> None:
    # Memory, cache and source all differ for one tensor: the repair finds no good copy, the reload
    # that follows neither, and the node fails naming the source's bytes.
    model = copy_model(model_dir, tmp_path / "m")
    node = start_node(model=model, extra=FAST_SCRUB)
    serving_and_scrubbed(node)
    victim = next(p for p in placements(model, LayerRange(0, 4)) if p.name == "model.norm.weight")
    record = next(t for t in read_manifest(model / MANIFEST_FILE).tensors if t.name == victim.name)
    flip_byte(model / record.file, record.offset + 3)
    flip_byte(cache_entry(node, victim.blake3.hex()), 3)
    flip_byte(arena_path(node), victim.arena_offset + 3)
    st = node.wait_state("FAILED", timeout=WAIT_S)
    end = record.offset + record.length
    assert st["last_error"].startswith(
        f"tensor {victim.name}: {record.file} bytes [{record.offset}, {end}) (chunk 0, arena offset "
    )
    assert "both reads agree, so the file is not the one the manifest describes" in st["last_error"]
    log = node.log()
    assert f"repair of epoch 1 failed: repair of {victim.name} failed: tensor {victim.name}" in log
    assert f"cache entry {victim.blake3.hex()} removed" in log
    assert not st["may_serve"] and node.get("/ready")[0] == 503
    assert node.stop() == 1
