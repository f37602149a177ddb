"""The chaos soak profile: many runs over random scenarios, figures at the end.

    flock /tmp/butterfly-bigmem.lock .venv/bin/python -m tests.chaos.soak --runs 200 [--seed S]
        [--faults kill,isolate] [--phases operational] [--targets coordinator] [--keep DIR]
        [--topologies mesh,1coord,2coord]

Each run's history and node logs stay under ``--keep`` (default: a temp dir, failures only are kept).
Prints one line per run and a summary: runs, violations by rule, recovery time p50/p90/max per
topology (runs left with no coordinator-eligible node are counted apart: they must not recover).
Exit status 1 if any run found a violation.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.chaos.history import Bounds
from tests.chaos.netns import require_netns
from tests.chaos.runner import FAULTS, PHASES, TARGETS, TOPOLOGIES, Outcome, Scenario, run


def make_model(root: Path) -> tuple[Path, Path]:
    from butterfly.net.auth import generate_secret
    from butterfly.weights.build import build_manifest
    from butterfly.weights.manifest import MANIFEST_FILE, write_manifest
    from butterfly.weights.testmodel import make_test_model

    model = make_test_model(root / "model", layers=4, hidden=128, vocab=512, shards=2)
    manifest, _ = build_manifest(model, chunk_bytes=64 * 1024)
    write_manifest(manifest, model / MANIFEST_FILE)
    secret = root / "cluster.key"
    generate_secret(secret)
    return model, secret


def _rule(violation: str) -> str:
    for needle, rule in (
        ("leaders", "two leaders in a term"),
        ("never committed", "served an uncommitted epoch"),
        ("in state", "served while not OPERATIONAL"),
        ("after epoch", "served a superseded epoch"),
        ("into its own", "served through its own fault"),
        ("whose layers", "served an epoch missing a faulted node"),
        ("went back", "term/epoch went back"),
        ("below committed", "lost a committed epoch"),
        ("after the last heal", "did not recover in bound"),
        ("worker", "a worker led"),
        ("no coordinator-eligible", "served with no coordinator left"),
        ("without a waiting_reason", "leaderless without saying why"),
    ):
        if needle in violation:
            return rule
    return "other"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--recover-bound", type=float, default=Bounds().recover_bound_s)
    parser.add_argument(
        "--scenarios", default="", help="fault/target/phase[/topology],... to run in turn instead"
    )
    parser.add_argument("--minutes", type=float, default=0.0, help="stop starting runs after this long")
    args = parser.parse_args(argv)
    require_netns()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwind through each run's cleanup: namespaces, nodes, shared memory

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(args.seed)
    print(f"chaos soak: seed {args.seed}, up to {args.runs} runs", flush=True)
    root = Path(tempfile.mkdtemp(prefix="butterfly-chaos-"))
    keep = args.keep or root / "failed"
    model, secret = make_model(root)
    outcomes: list[Outcome] = []
    errors: list[str] = []
    try:
        _soak(args, rng, root, keep, model, secret, outcomes, errors)
    except KeyboardInterrupt:
        print("interrupted: the figures below cover the runs that finished", flush=True)
    finally:
        shutil.rmtree(root / "model", ignore_errors=True)
    return _summary(outcomes, errors, keep, root)


def _soak(
    args: argparse.Namespace,
    rng: random.Random,
    root: Path,
    keep: Path,
    model: Path,
    secret: Path,
    outcomes: list[Outcome],
    errors: list[str],
) -> None:
    started = time.monotonic()
    for k in range(args.runs):
        if args.minutes and time.monotonic() - started > args.minutes * 60:
            break
        fixed = [tuple(x.split("/")) for x in args.scenarios.split(",") if x]
        fault, target, phase, topology = (
            (*fixed[k % len(fixed)], "mesh")[:4]
            if fixed
            else (
                rng.choice(args.faults.split(",")),
                rng.choice(args.targets.split(",")),
                rng.choice(args.phases.split(",")),
                rng.choice(args.topologies.split(",")),
            )
        )
        seed = rng.randrange(1 << 30)
        scenario = Scenario(fault, target, phase, n=args.nodes, seed=seed, topology=topology)
        workdir = root / f"run{k:04d}"
        try:
            outcome = run(scenario, workdir, model, secret, Bounds(recover_bound_s=args.recover_bound))
        except Exception as exc:  # a run that could not even start is reported, not fatal
            errors.append(f"{scenario}: {exc}")
            print(f"[{k}] {scenario}: ERROR {exc}", flush=True)
            shutil.copytree(workdir, keep / workdir.name, dirs_exist_ok=True)
            continue
        outcomes.append(outcome)
        took = f"{outcome.recovery_s:.1f}s" if outcome.recovery_s is not None else "never"
        verdict = "ok" if not outcome.violations else f"{len(outcome.violations)} VIOLATIONS"
        print(
            f"[{k}] {scenario} (struck in {outcome.fault_phase_seen}): recovered {took}, {verdict}",
            flush=True,
        )
        for v in outcome.violations[:5]:
            print(f"      {v}", flush=True)
        if outcome.violations:
            shutil.copytree(workdir, keep / workdir.name, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(outcomes: list[Outcome], errors: list[str], keep: Path, root: Path) -> int:
    failed = [o for o in outcomes if o.violations]
    rules = Counter(_rule(v) for o in failed for v in set(o.violations))
    runs_by_rule = Counter(r for o in failed for r in {_rule(v) for v in o.violations})
    print(f"\nruns {len(outcomes)} (+{len(errors)} could not run), {len(failed)} with violations")
    for rule, count in runs_by_rule.most_common():
        print(f"  {rule}: {count} runs ({rules[rule]} distinct lines)")
    for topology in sorted({o.scenario.topology for o in outcomes}):
        mine = [o for o in outcomes if o.scenario.topology == topology]
        leaderless = [o for o in mine if o.history.leaderless()]
        recoveries = [o.recovery_s for o in mine if o.recovery_s is not None and not o.history.leaderless()]
        line = f"{topology}: {len(mine)} runs"
        if recoveries:
            line += (
                f", recovery after heal p50 {_pct(recoveries, 0.5):.1f}s "
                f"p90 {_pct(recoveries, 0.9):.1f}s max {max(recoveries):.1f}s"
            )
        if leaderless:
            line += f", {len(leaderless)} left leaderless (nobody may serve)"
        print(line)
    by_kind = Counter(f"{o.scenario.fault}/{o.scenario.target}" for o in failed)
    if by_kind:
        print("failing scenarios:", ", ".join(f"{k} x{v}" for k, v in by_kind.most_common()))
    print(f"kept: {keep}" if failed or errors else f"work dir: {root}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
