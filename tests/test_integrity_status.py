"""Reasons reach every reader whole: /status, STATUS=, butterfly-admin status; and the integrity
fields (peer faults, scrubbing, the last mismatch, the fault flag) as /status and /metrics show them."""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator

import pytest

from butterfly.api.metrics import render_families
from butterfly.board import Board, ClusterSection, LoaderSection, ValidatorSection
from butterfly.cli.admin_client import make_console
from butterfly.cli.admin_status import _status_tables
from butterfly.ipc import Mismatch, PeerFault
from butterfly.states import NodeState, Phase
from butterfly.status import Notes
from butterfly.supervisor.statusview import build_status, status_line

# Far longer than any fixed-size field the board ever had (128 and 256 bytes), with text at the end.
LONG = "tensor model.layers.7.mlp.up_proj.weight differs: " + "detail " * 300 + "THE END"


@pytest.fixture
def board() -> Iterator[Board]:
    b = Board.create(f"butterfly-ts{os.getpid()}-{os.urandom(3).hex()}-board", "ts")
    yield b
    b.close()
    b.unlink()


def test_reasons_reach_status_status_line_and_admin_whole(board: Board) -> None:
    from butterfly.board import NodeSection

    board.update(NodeSection, state=int(NodeState.READY), phase=int(Phase.READY))
    notes = Notes(
        last_error=LONG,
        waiting_reason="waiting: " + LONG,
        peer_faults=[PeerFault(node_id="n2", reason=LONG, failed=True, start=2, stop=4)],
    )
    st = build_status(board.snapshot(), "coordinator", [], 10.0, None, notes)
    assert st.last_error == LONG and st.waiting_reason == "waiting: " + LONG
    (fault,) = st.peer_faults
    assert (fault.node_id, fault.layers, fault.failed, fault.reason) == ("n2", "2-3", True, LONG)
    line = status_line(st)
    assert line.count("THE END") == 3 and "peer n2 (layers 2-3) failed: " in line

    import msgspec

    doc = msgspec.json.decode(msgspec.json.encode(st))
    out = io.StringIO()
    console = make_console(out)
    for table in _status_tables(doc):
        console.print(table)
    flat = re.sub(r"\s+", " ", out.getvalue())
    assert flat.count("THE END") == 3  # last error, waiting, and the peer's reason
    assert "peers that cannot serve" in flat and "n2 2-3 yes" in flat


def test_a_fault_found_in_memory_stops_serving_before_the_supervisor_reacts(board: Board) -> None:
    from butterfly.board import EngineSection, NodeSection

    now = time.monotonic_ns()
    # A node serving epoch 1 under a live lease from its coordinator.
    board.update(
        ClusterSection, heartbeat_mono_ns=now, epoch=1, lease_epoch=1, lease_until_mono_ns=now + 10**9
    )
    board.update(LoaderSection, heartbeat_mono_ns=now)
    board.update(
        NodeSection,
        state=int(NodeState.OPERATIONAL),
        phase=int(Phase.READY),
        serving_epoch=1,
        heartbeat_mono_ns=now,
        repairs=2,
    )
    board.update(ValidatorSection, heartbeat_mono_ns=now)
    board.update(EngineSection, heartbeat_mono_ns=now, serving=1, epoch=1)
    assert build_status(board.snapshot(), "worker", [], 10.0, now, Notes()).may_serve
    board.update(ValidatorSection, fault=1, mismatches=3, scrub_passes=4, scrub_bytes=4096, scrub_cpu_s=0.5)
    mismatch = Mismatch(
        tensor="lm_head.weight", unit=5, layer="head", arena_offset=64, expected="aa" * 32, found="bb" * 32
    )
    st = build_status(board.snapshot(), "worker", [], 10.0, now, Notes(mismatches=[mismatch]))
    # The gate says no at once (and the state shown follows it): the supervisor has not reacted yet.
    assert not st.may_serve and st.state == "READY"
    assert st.waiting_reason == "the validator found weights in memory that are not the model's"
    i = st.integrity
    assert i is not None and i.fault and i.last_mismatch == [mismatch]
    assert (i.mismatches, i.repairs, i.scrub_passes, i.scrub_bytes) == (3, 2, 4, 4096)
    metrics = {f.name: f.samples[0].value for f in render_families(st) if f.samples}
    assert metrics["weight_fault"] == 1.0 and metrics["weight_repairs"] == 2
    assert metrics["weight_mismatches"] == 3 and metrics["scrub_passes"] == 4
    assert metrics["scrub_bytes"] == 4096 and metrics["scrub_cpu_seconds"] == 0.5
