"""`bench --device A --device B ...`: several devices at once, one entry per device, failures kept apart.

The ssh:// cases reuse test_devices_ssh's real OpenSSH server on loopback (its `sshd` fixture is
imported, not copied). There the "remote" devices are this machine under two names, so they share
its cores: that is fine for showing that the runs overlap and fail separately, not for timings.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
import threading
import time

import pytest
from click.testing import CliRunner

import devices
from edge_export.cli import main
from edge_export.export import ExportOptions, export
from runtimes.errors import EdgeError
from tests.test_devices_ssh import LONG, QUICK, SSHD, _runner_pids, free_port, runs_left, sshd  # noqa: F401  (fixture)

PROFILE = "jetson-orin-nano-8gb"
QUICK_ARGS = ["--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--warmup", "0", "--threads", "1"]
needs_sshd = pytest.mark.skipif(not (os.path.exists(SSHD) and os.path.exists("/usr/bin/ssh-keygen")),
                                reason="OpenSSH server not installed (apt-get install -y openssh-server)")


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi-art") / "tiny-int4"
    export(str(tiny_llama), str(out), ExportOptions(quant="int4", verify=False))
    return out


def bench_cli(artifact, *args):
    return CliRunner().invoke(main, ["bench", str(artifact), *args, *QUICK_ARGS])


# ---- host + estimate ---------------------------------------------------------------------------------
def test_host_and_an_estimate_give_one_result_each_in_order(artifact):
    entries = devices.bench_devices(str(artifact), [f"estimate:{PROFILE}", "host"], **QUICK)
    assert [e["device"] for e in entries] == [f"estimate:{PROFILE}", "host"]
    estimate, host = entries
    assert estimate["estimated"] is True and estimate["measured"] is False and estimate["decode_tok_s"] > 0
    assert host["measured"] is True and host["decode_tok_s"] > 0 and host["ttft_ms"] > 0 and host["runs"] == 1


def test_cli_lists_every_device_and_a_failed_one_keeps_the_others(artifact):
    ok = bench_cli(artifact, "--device", "host", "--device", f"estimate:{PROFILE}", "--json")
    assert ok.exit_code == 0, ok.output
    listed = json.loads(ok.stdout)
    assert isinstance(listed, list) and [e["device"] for e in listed] == ["host", f"estimate:{PROFILE}"]
    human = bench_cli(artifact, "--device", "host", "--device", f"estimate:{PROFILE}")
    lines = human.stdout.strip().splitlines()
    assert human.exit_code == 0 and len(lines) == 2
    assert lines[0].startswith("host: TTFT") and lines[1].startswith(f"estimate:{PROFILE} (estimate, not measured)")

    failed = bench_cli(artifact, "--device", "estimate:no-such-profile", "--device", "host", "--json")
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    bad, host = json.loads(failed.stdout)
    assert set(bad) == {"device", "error"} and bad["device"] == "estimate:no-such-profile"
    assert "unknown device profile 'no-such-profile'" in bad["error"] and "\n" not in bad["error"]
    assert host["device"] == "host" and host["measured"] is True and host["decode_tok_s"] > 0
    human = bench_cli(artifact, "--device", "estimate:no-such-profile", "--device", "host")
    assert human.exit_code == 2 and human.stdout.startswith("host: TTFT") and len(human.stdout.splitlines()) == 1
    assert human.stderr.strip().splitlines() == [f"estimate:no-such-profile: error: {bad['error']}"]


@pytest.mark.parametrize("listed, message", [
    (["host", "host"], "--device 'host' is listed twice: two benchmarks there at once would share its cores"),
    (["ssh://me@board/a", "ssh://you@board:22/b"], "'ssh://you@board:22/b' and 'ssh://me@board/a' are one machine"),
    (["host", "nosuch://x"], "unknown kind 'nosuch'"),
])
def test_a_bad_device_list_is_refused_before_anything_runs(artifact, listed, message):
    start = time.monotonic()
    out = bench_cli(artifact, *[arg for spec in listed for arg in ("--device", spec)])
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert time.monotonic() - start < 5  # nothing was benchmarked
    with pytest.raises(EdgeError, match="list each device once" if "twice" in message or "one machine" in message
                       else "unknown kind"):
        devices.bench_devices(str(artifact), listed)


# ---- with ssh:// devices (a real sshd) ---------------------------------------------------------------
def _config(sshd) -> str:
    """A client config whose known_hosts also vouches for the server as `localhost`: a second name for it."""
    key = (sshd.folder / "host_key.pub").read_text().split()[:2]
    (sshd.folder / "known_hosts_two_names").write_text(
        "".join(f"[{name}]:{sshd.port} {' '.join(key)}\n" for name in ("127.0.0.1", "localhost")))
    return str(sshd.client_config("two_names_config", known_hosts="known_hosts_two_names"))


@needs_sshd
def test_host_ssh_and_estimate_together(sshd, artifact, tmp_path):
    url = sshd.url(tmp_path / "remote")
    entries = devices.bench_devices(str(artifact), ["host", url, f"estimate:{PROFILE}"], ssh_config=_config(sshd),
                                    remote_python=sys.executable, **QUICK)
    host, remote, estimate = entries
    assert host["device"] == "host" and host["measured"] is True
    assert remote["device"] == f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}" and remote["measured"] is True
    assert remote["decode_tok_s"] > 0 and remote["transfer"]["copied_bytes"] > 0
    assert estimate["estimated"] is True
    assert runs_left(tmp_path / "remote") == []


@needs_sshd
def test_remote_devices_run_at_once_and_each_fails_on_its_own(sshd, artifact, tmp_path):
    """Two ssh devices whose benchmarks outlast --timeout, one refusing connections, and an estimate:
    both remote runners are seen alive at the same moment, each failure is its own one-line entry,
    the estimate survives, and no run folder stays on either device."""
    user, port = getpass.getuser(), sshd.port
    bases = [tmp_path / "one", tmp_path / "two"]
    listed = [f"ssh://{user}@127.0.0.1:{port}{bases[0]}", f"ssh://{user}@localhost:{port}{bases[1]}",
              f"ssh://{user}@127.0.0.1:{free_port()}{tmp_path / 'refused'}", f"estimate:{PROFILE}"]
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(entries=devices.bench_devices(
        str(artifact), listed, ssh_config=_config(sshd), remote_python=sys.executable, **{**LONG, "timeout": 4})))
    thread.start()
    together, deadline = False, time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline and not together:
        together = all(_runner_pids(base) for base in bases)
        time.sleep(0.05)
    thread.join(60)
    assert not thread.is_alive() and together, "the two remote runners never ran at the same time"
    one, two, refused, estimate = outcome["entries"]
    for entry, spec in ((one, listed[0]), (two, listed[1])):
        assert entry == {"device": spec, "error": entry["error"]}
        assert "the benchmark did not finish within 4 s; raise --timeout" in entry["error"]
    assert refused["device"] == listed[2] and "connection refused" in refused["error"]
    assert all("\n" not in e["error"] for e in (one, two, refused))
    assert estimate["estimated"] is True and estimate["decode_tok_s"] > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(runs_left(b) or _runner_pids(b) for b in bases):
        time.sleep(0.1)
    assert all(runs_left(b) == [] and _runner_pids(b) == [] for b in bases)


def test_a_devices_file_lists_them(artifact, tmp_path):
    listed = tmp_path / "devices.txt"
    listed.write_text(f"# the lab\nhost\n\nestimate:{PROFILE}  # spec sheet only\n")
    out = bench_cli(artifact, "--device", f"@{listed}", "--json")
    assert out.exit_code == 0, out.output
    assert [e["device"] for e in json.loads(out.stdout)] == ["host", f"estimate:{PROFILE}"]
    missing = bench_cli(artifact, "--device", f"@{tmp_path / 'nope.txt'}")
    assert missing.exit_code == 2 and "devices file" in missing.stderr and "Traceback" not in missing.output
