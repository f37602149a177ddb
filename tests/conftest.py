"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama test model (4 blocks, 2 shards) with its manifest, shared by the end-to-end tests."""
    from butterfly.weights.build import build_manifest
    from butterfly.weights.manifest import MANIFEST_FILE, write_manifest
    from butterfly.weights.testmodel import make_test_model

    model = make_test_model(tmp_path_factory.mktemp("model") / "m", layers=4, hidden=128, vocab=512, shards=2)
    manifest, _ = build_manifest(model, chunk_bytes=64 * 1024)
    write_manifest(manifest, model / MANIFEST_FILE)
    return model


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _kernels_built() -> Any:
    """``butterfly._native.halfmm`` on x86-64, where scripts/bootstrap.sh builds it for every CPU with
    AVX2 (every CPU this project runs on): missing there means the build lost it, which is a failure,
    not a reason to skip. None elsewhere (only the plain twins exist)."""
    from butterfly.engine import model

    if _x86():
        assert model.NATIVE_KERNEL is not None, (
            "butterfly._native.halfmm is missing or this CPU lacks AVX2/FMA/F16C"
        )
    return model.NATIVE_KERNEL


@pytest.fixture(params=["native", "torch"])
def half_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The engine's native kernels (half-precision rows, csrc/halfmm.h; decode attention,
    csrc/attention.h), or their plain twins, torch's own operators. A test taking this fixture runs
    on both."""
    from butterfly.engine import model

    monkeypatch.setattr(model, "NATIVE", _kernels_built() if request.param == "native" else None)
    return str(request.param)


@pytest.fixture
def native_kernel(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The native kernels, in use, for a test of the kernels themselves (mark it ``x86``); other CPUs
    have only the plain twins, so there it skips."""
    from butterfly.engine import model

    if not _x86():
        pytest.skip(f"the native kernels are x86-64 only; this is {platform.machine()}")
    monkeypatch.setattr(model, "NATIVE", _kernels_built())
    return model.NATIVE


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cluster secret for every node a test starts."""
    from butterfly.net.auth import generate_secret

    path = tmp_path_factory.mktemp("secret") / "cluster.key"
    generate_secret(path)
    return path


# ---- skips are reported, and under CI only hardware-bound tests may skip ---------------------------
# Every skipped test is listed with its reason at the end of the run. With BUTTERFLY_FAIL_ON_SKIP=1
# (set by .ci/run) a skip of any test not marked ``gpu`` or ``x86`` fails the run: a missing tool or
# privilege must not turn the suite quietly green. Mark a test ``@pytest.mark.gpu`` when it can only
# run on a CUDA device, ``@pytest.mark.x86`` when it calls the x86-64 native kernels themselves (other
# CPUs run their plain twins, which the ``half_kernel`` tests cover).

_ALLOWED_SKIP = "butterfly_allowed_skip"
_ALLOWED = {"gpu": "needs a GPU (allowed)", "x86": "needs an x86-64 CPU (allowed)"}
_skips: list[tuple[str, str, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    allowed = [m for m in _ALLOWED if item.get_closest_marker(m) is not None]
    if report.skipped and allowed:
        # user_properties travel with the report from an xdist worker to the controller.
        report.user_properties.append((_ALLOWED_SKIP, allowed[0]))


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        allowed = next((str(v) for name, v in report.user_properties if name == _ALLOWED_SKIP), "")
        _skips.append((report.nodeid, _skip_reason(report), allowed))


def _failing_on_skip() -> bool:
    return os.environ.get("BUTTERFLY_FAIL_ON_SKIP", "") not in ("", "0")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _skips:
        return
    others = [s for s in _skips if not s[2]]
    groups = [(title, [s for s in _skips if s[2] == m]) for m, title in _ALLOWED.items()]
    terminalreporter.section("skipped tests")
    for title, group in [*groups, ("NOT RUN", others)]:
        if group:
            terminalreporter.write_line(f"{title}: {len(group)}")
            for nodeid, reason, _ in group:
                terminalreporter.write_line(f"  {nodeid}: {reason}")
    if others and _failing_on_skip():
        terminalreporter.write_line(
            f"BUTTERFLY_FAIL_ON_SKIP: {len(others)} test(s) not bound to hardware did not run; install what "
            "their reasons name (scripts/test.sh does, as root on Debian)",
            red=True,
            bold=True,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _failing_on_skip() and any(not allowed for _, _, allowed in _skips) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
