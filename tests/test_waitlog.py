"""The repeated "waiting" line: written when the reason changes, then once per interval."""

from __future__ import annotations

from butterfly.supervisor.waitlog import WaitLog


def test_a_repeated_reason_is_written_once_then_periodically_and_a_change_at_once() -> None:
    wait = WaitLog(interval_s=30.0)
    lines = [wait.line("waiting for a quorum (1 of 2 voters)", t / 10) for t in range(0, 200)]  # 20 s
    assert [x for x in lines if x] == ["waiting for a quorum (1 of 2 voters)"]
    assert wait.line("waiting for a quorum (1 of 2 voters)", 29.9) is None
    assert wait.line("waiting for a quorum (1 of 2 voters)", 30.0) == (
        "waiting for a quorum (1 of 2 voters) (still, for 30 s)"
    )
    assert wait.line("waiting for a quorum (1 of 2 voters)", 45.0) is None
    assert wait.line("waiting for node n3 (layers 4-7)", 45.1) == "waiting for node n3 (layers 4-7)"
    assert wait.line("", 46.0) is None  # no longer waiting: nothing to say, but it is remembered
    assert wait.line("", 100.0) is None
    assert wait.line("waiting for node n3 (layers 4-7)", 101.0) == "waiting for node n3 (layers 4-7)"
