"""The only skips CI accepts: a platform this machine cannot be. With the CI environment variable
set, any other skip fails the run (a skipped test cannot hide a failure there).

Tests that skip for one of these reasons use the constant itself as (the start of) their reason.
The conftest registers the hooks below; tests/test_skip_policy.py runs them on a small suite.
"""
from __future__ import annotations

import os

import pytest

NO_TENSORRT = "TensorRT absent (it installs from NVIDIA's index and needs an NVIDIA GPU)"
NO_COREML_PREDICTION = "Core ML prediction needs macOS 15+"
NO_OPTIMUM = "optimum-onnx pins transformers < 4.58"
# every skip reason expected in CI, as the start of the reason pytest reports
EXPECTED_IN_CI = (NO_TENSORRT, NO_COREML_PREDICTION, NO_OPTIMUM)

_unexpected: list[tuple[str, str]] = []  # (test id, reason) of skips outside EXPECTED_IN_CI


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report) -> str:
    """The reason of a skipped test or collection report ("Skipped: " dropped)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def expected(reason: str) -> bool:
    return reason.startswith(EXPECTED_IN_CI)


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        reason = skip_reason(report)
        if not expected(reason):
            _unexpected.append((report.nodeid, reason))


def pytest_runtest_logreport(report) -> None:
    _record(report)


def pytest_collectreport(report) -> None:
    _record(report)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _unexpected:
        return
    terminalreporter.section("skips CI does not accept", sep="=", red=True, bold=True)
    terminalreporter.line("CI is set: a skip is a failure unless its reason is one of: " + "; ".join(EXPECTED_IN_CI))
    for nodeid, reason in _unexpected:
        terminalreporter.line(f"UNEXPECTED SKIP {nodeid}: {reason}", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    if _unexpected and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
