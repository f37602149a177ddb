"""/status's progress and ETA cover every sub-step of loading, in order, and never claim done early."""

from __future__ import annotations

import dataclasses

from butterfly.board import BoardSnapshot, ClusterSection, HeaderSection, LoaderSection, NodeSection
from butterfly.board.layout import EngineSection, ValidatorSection
from butterfly.states import LoadStep, NodeState, Phase
from butterfly.supervisor.statusview import PROGRESS_WEIGHTS, build_status, progress_line

NOW = 1_000 * 10**9
TOTAL = 1 << 30


def snap(phase: Phase, **loader: object) -> BoardSnapshot:
    state = {Phase.READY: NodeState.READY}.get(phase, NodeState.LOADING)
    return BoardSnapshot(
        header=HeaderSection(node_id="n1"),
        node=NodeSection(state=int(state), phase=int(phase), phase_started_mono_ns=NOW - 2 * 10**9),
        cluster=ClusterSection(),
        loader=LoaderSection(bytes_total=TOTAL, **loader),  # type: ignore[arg-type]
        validator=ValidatorSection(),
        engine=EngineSection(),
    )


def status(s: BoardSnapshot) -> tuple[float, int | None]:
    st = build_status(s, "coordinator", [], 10.0, NOW)
    return st.progress_percent, st.eta_seconds


def test_every_sub_step_moves_progress_forward_and_only_ready_is_done() -> None:
    steps = [
        snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.DOWNLOAD), bytes_done=0, rate_bps=0.0),
        snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.DOWNLOAD), bytes_done=TOTAL // 4, rate_bps=TOTAL / 8),
        snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.UPLOAD), bytes_done=TOTAL // 2, rate_bps=TOTAL / 8),
        snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.UPLOAD), bytes_done=TOTAL, rate_bps=TOTAL / 8),
        snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.COMPILE), bytes_done=TOTAL),
        snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.WARMUP), bytes_done=TOTAL),
    ]
    validating = snap(Phase.VALIDATION, bytes_done=TOTAL)
    steps += [
        dataclasses.replace(validating, validator=ValidatorSection(bytes_total=TOTAL, bytes_hashed=0)),
        dataclasses.replace(
            validating, validator=ValidatorSection(bytes_total=TOTAL, bytes_hashed=TOTAL // 2)
        ),
        dataclasses.replace(validating, validator=ValidatorSection(bytes_total=TOTAL, bytes_hashed=TOTAL)),
    ]
    seen = [status(s) for s in steps]
    percents = [p for p, _ in seen]
    assert percents == sorted(percents), seen
    assert all(p < 100.0 for p in percents), seen  # every byte in memory is not done yet
    assert all(eta != 0 for _, eta in seen), seen  # no "ETA 0" before READY
    assert status(snap(Phase.READY, bytes_done=TOTAL)) == (100.0, 0)
    # Warmup after every byte: neither 100% nor ETA 0; its length is unknown.
    warmup = status(steps[5])
    assert warmup == (PROGRESS_WEIGHTS["bytes"] + PROGRESS_WEIGHTS["compile"], None)
    # Half the bytes at TOTAL/8 per second: 4 s of bytes left plus about 1 s of validation (1 GiB).
    assert seen[2] == (PROGRESS_WEIGHTS["bytes"] / 2, 5)
    # Half hashed in the 2 s validation has run: 2 s more at the measured speed.
    assert seen[7][1] == 2


def test_the_weights_add_up_to_the_whole() -> None:
    assert sum(PROGRESS_WEIGHTS.values()) == 100.0


def test_the_progress_log_line_names_phase_step_percent_bytes_rate_and_eta() -> None:
    """The seed watches loading with `tail -f node.log | grep -E "phase|progress"`: the periodic line
    says where the load is."""
    mid = snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.DOWNLOAD), bytes_done=TOTAL // 2, rate_bps=TOTAL / 8)
    line = progress_line(build_status(mid, "coordinator", [], 10.0, NOW))
    assert line == "progress 40.0% loading_weights/download: 512.0 of 1024.0 MiB at 128.0 MiB/s, ETA 5s"
    warmup = snap(Phase.LOADING_WEIGHTS, step=int(LoadStep.WARMUP), bytes_done=TOTAL)
    line = progress_line(build_status(warmup, "coordinator", [], 10.0, NOW))
    assert line == "progress 85.0% loading_weights/warmup: 1024.0 of 1024.0 MiB, ETA unknown"
