"""The CI skip policy (tests/skip_policy.py), run by pytest itself on a small suite: with CI set,
a skip whose reason is not a missing platform fails the run; the expected reasons, xfails, and
every skip outside CI do not."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .skip_policy import EXPECTED_IN_CI, expected

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest
from tests.skip_policy import NO_COREML_PREDICTION, NO_OPTIMUM, NO_TENSORRT

def test_passes():
    pass

@pytest.mark.skipif(True, reason=NO_TENSORRT)
def test_tensorrt():
    pass

def test_core_ml():
    pytest.skip(NO_COREML_PREDICTION + ": predicts on the Mac")

@pytest.mark.skipif(True, reason=NO_OPTIMUM + " (optimum-onnx 0.1.0)")
def test_optimum():
    pass

@pytest.mark.xfail(reason="a known failure is not a skip")
def test_known_failure():
    assert False
'''
WRONG = '''
import pytest

def test_skips_for_a_reason_ci_can_fix():
    pytest.skip("polygraphy is not on PATH")
'''
MODULE = '''
import pytest
pytest.importorskip("a_package_nobody_installed", reason="a_package_nobody_installed is missing")

def test_never_collected():
    pass
'''


def run_suite(tmp_path: Path, files: dict, ci: str | None) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the policy alone: quicker, and no third-party hook in the way
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.skip_policy", "-p", "no:cacheprovider",
                           "-q", "-rs", *files], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_expected_reasons_pass_in_ci(tmp_path):
    done = run_suite(tmp_path, {"test_platforms.py": SUITE}, ci="true")
    assert done.returncode == 0, done.stdout
    assert "3 skipped" in done.stdout and "1 xfailed" in done.stdout and "UNEXPECTED" not in done.stdout


@pytest.mark.parametrize("files,reason", [({"test_wrong.py": WRONG}, "polygraphy is not on PATH"),
                                          ({"test_module.py": MODULE}, "a_package_nobody_installed is missing")])
def test_any_other_skip_fails_the_run_in_ci(tmp_path, files, reason):
    done = run_suite(tmp_path, {"test_platforms.py": SUITE, **files}, ci="1")
    assert done.returncode == 1, done.stdout
    assert "skips CI does not accept" in done.stdout
    flagged = [line for line in done.stdout.splitlines() if line.startswith("UNEXPECTED SKIP")]
    assert len(flagged) == 1 and flagged[0].endswith(reason), flagged


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_a_skip_is_only_shown(tmp_path, ci):
    done = run_suite(tmp_path, {"test_platforms.py": SUITE, "test_wrong.py": WRONG}, ci=ci)
    assert done.returncode == 0, done.stdout
    assert "SKIPPED" in done.stdout and "polygraphy is not on PATH" in done.stdout  # -rs shows every reason
    assert "UNEXPECTED" not in done.stdout


def test_the_expected_reasons_are_platforms():
    assert len(EXPECTED_IN_CI) == 3
    assert expected("TensorRT absent (it installs from NVIDIA's index and needs an NVIDIA GPU)")
    assert not expected("sshd did not start") and not expected("rsync not installed")
    assert not expected("cannot mount a tmpfs here: needs root")


def test_pytest_ini_shows_skip_reasons():
    """The README's plain `python3 -m pytest` prints every skip's reason."""
    import configparser
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert "-rs" in ini["pytest"]["addopts"].split()
