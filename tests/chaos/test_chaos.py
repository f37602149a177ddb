"""The chaos suite's CI profile: real node processes, one per network namespace, a fault in a phase
for the coordinator or a worker, and the history checked by ``history.check`` (see ``runner``).

The normal suite runs this profile (marked ``chaos``; a few minutes). The soak profile runs the same
test over random scenarios, hundreds of them (seeded; the seed is printed with any failure):

    BUTTERFLY_CHAOS_SOAK=200 pytest tests/chaos/test_chaos.py      # or, with a summary of figures:
    flock /tmp/butterfly-bigmem.lock .venv/bin/python -m tests.chaos.soak --runs 200

Needs root, iproute2 and nftables (skipped, saying so, without them).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.chaos.history import Bounds
from tests.chaos.netns import NetnsUnavailable, require_netns
from tests.chaos.runner import FAULTS, PHASES, TARGETS, TOPOLOGIES, Outcome, Scenario, run
from tests.nodeharness import segments_of

pytestmark = pytest.mark.chaos

CI_SEED = int(os.environ.get("BUTTERFLY_CHAOS_SEED", random.randrange(1 << 30)))

# One of each kind of fault that matters most, the coordinator and workers, a phase each (the soak
# profile covers the whole product of faults x targets x phases).
CI_PROFILE = [
    Scenario("kill", "coordinator", "loading"),
    Scenario("stop_cluster_child", "coordinator", "operational"),
    # A worker's stage of the pipeline frozen: it stops serving, is killed as hung and replaced.
    Scenario("stop_engine_child", "worker", "operational"),
    Scenario("isolate", "worker", "operational"),
    Scenario("drop_in", "worker", "operational"),
    # The spec's start (one coordinator, workers seeded with it, quorum_size 3) losing its coordinator
    # for good: the workers must serve nothing, say why, and never lead.
    Scenario("crash", "coordinator", "operational", topology="1coord"),
]
SOAK_RUNS = int(os.environ.get("BUTTERFLY_CHAOS_SOAK", "0"))


def _soak_profile(runs: int) -> list[Scenario]:
    rng = random.Random(CI_SEED)
    return [
        Scenario(
            rng.choice(FAULTS),
            rng.choice(TARGETS),
            rng.choice(PHASES),
            seed=rng.randrange(1 << 30),
            topology=rng.choice(TOPOLOGIES),
        )
        for _ in range(runs)
    ]


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    try:
        require_netns()
    except NetnsUnavailable as exc:
        pytest.skip(f"chaos suite: {exc}")


def _explain(outcome: Outcome) -> str:
    logs = []
    for node in outcome.history.nodes:
        for log in sorted((outcome.workdir / node).glob("node.*.log")):
            logs.append(f"--- {node} {log.name}\n{log.read_text(errors='replace')[-2500:]}")
    lines = "\n".join(outcome.violations)
    return f"{outcome.scenario} (BUTTERFLY_CHAOS_SEED={CI_SEED}) broke the rules:\n{lines}\n" + "\n".join(
        logs
    )


def _assert_clean(outcome: Outcome) -> None:
    """The run left nothing behind: no namespace, no node process, no shared memory."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert outcome.prefix not in names
    for node in outcome.history.nodes:
        assert segments_of(node) == []
        ps = subprocess.run(["pgrep", "-f", str(outcome.workdir / node)], capture_output=True, text=True)
        assert ps.stdout == ""


@pytest.mark.parametrize("scenario", _soak_profile(SOAK_RUNS) if SOAK_RUNS else CI_PROFILE, ids=str)
def test_chaos_run_keeps_every_rule(
    scenario: Scenario, tmp_path: Path, model_dir: Path, secret_file: Path
) -> None:
    seed = scenario.seed or CI_SEED
    seeded = dataclasses.replace(scenario, seed=seed)
    outcome = run(seeded, tmp_path / "run", model_dir, secret_file, Bounds())
    _assert_clean(outcome)
    assert outcome.violations == [], _explain(outcome)
    assert outcome.history.answers, "the pollers recorded nothing"
