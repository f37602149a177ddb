"""Integrity on a running node: bytes changed in memory, in the cache or at the source, tampered and
foreign manifests, each seen the way an operator sees it (/status, the log, /ready, systemd)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from butterfly.ipc import TensorPlacement
from butterfly.loader.process import place
from butterfly.manifest import MANIFEST_FILE, read_manifest
from butterfly.model.layout import LayerRange, load_layout
from tests.nodeharness import Node, free_port, segments_of, write_config

NodeFactory = Callable[..., Node]


@pytest.fixture
def start_node(tmp_path: Path, model_dir: Path) -> Iterator[NodeFactory]:
    started: list[tuple[Node, str]] = []

    def make(
        name: str = "n1",
        *,
        model: Path | None = None,
        env: dict[str, str] | None = None,
        extra: str = "",
    ) -> Node:
        port = free_port()
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        node_id = f"ti{os.getpid()}-{name}-{port}"
        cfg = write_config(d / "node.toml", model or model_dir, node_id=node_id, api_port=port, extra=extra)
        node = Node(cfg, port, env=env)
        started.append((node, node_id))
        return node

    yield make
    for node, node_id in started:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def arena_path(node: Node) -> Path:
    (path,) = Path("/dev/shm").glob(f"butterfly-*-{node.proc.pid}-arena")
    return path


def placements(model: Path, blocks: LayerRange) -> list[TensorPlacement]:
    """Where a node holding ``blocks`` keeps each tensor in its arena (the loader's own layout)."""
    manifest = read_manifest(model / MANIFEST_FILE)
    return place(load_layout(model).tensors_for_blocks(blocks), manifest)[0]


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x20]))


def test_a_byte_flipped_in_the_arena_before_validation_is_named_then_reloaded(
    start_node: NodeFactory, model_dir: Path, tmp_path: Path
) -> None:
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-validation").touch()
    node = start_node(env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    node.wait_for(lambda s: s["phase"] == "validation", what="validation")
    victim = next(
        p for p in placements(model_dir, LayerRange(0, 4)) if p.name.endswith("layers.1.mlp.down_proj.weight")
    )
    flip(arena_path(node), victim.arena_offset + 1000)
    (hold / "hold-validation").unlink()
    st = node.wait_state("OPERATIONAL")
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
