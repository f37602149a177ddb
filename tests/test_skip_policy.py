"""The suite never goes quietly green: skips are listed, and under .ci/run (BUTTERFLY_FAIL_ON_SKIP=1)
a skip of anything but a test bound to hardware (a GPU, an x86-64 CPU) fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
INI = "[pytest]\nmarkers =\n    gpu: needs a CUDA device\n    x86: needs x86-64\n"
TESTS = """
import pytest

def test_runs():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA device here")
def test_on_a_gpu():
    pass

@pytest.mark.x86
def test_of_a_native_kernel():
    pytest.skip("an ARM machine")

def test_needs_a_tool():
    pytest.skip("frobnicate is not installed")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(test_mixed=TESTS)
    return pytester


def test_skips_are_listed_with_their_reasons(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUTTERFLY_FAIL_ON_SKIP", raising=False)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*skipped tests*",
            "needs a GPU (allowed): 1",
            "  test_mixed.py::test_on_a_gpu: no CUDA device here",
            "needs an x86-64 CPU (allowed): 1",
            "  test_mixed.py::test_of_a_native_kernel: an ARM machine",
            "NOT RUN: 1",
            "  test_mixed.py::test_needs_a_tool: frobnicate is not installed",
        ]
    )


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_under_ci_a_skip_of_a_test_not_bound_to_hardware_fails_the_run(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    monkeypatch.setenv("BUTTERFLY_FAIL_ON_SKIP", "1")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", *workers)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*BUTTERFLY_FAIL_ON_SKIP: 1 test(s) not bound to hardware did not run*"])


def test_under_ci_hardware_skips_alone_pass(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(test_gpu_only=TESTS.split("def test_needs_a_tool")[0])
    monkeypatch.setenv("BUTTERFLY_FAIL_ON_SKIP", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["needs a GPU (allowed): 1", "needs an x86-64 CPU (allowed): 1"])
