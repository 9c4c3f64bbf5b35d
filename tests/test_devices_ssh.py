"""`--device ssh://` against a real OpenSSH server on loopback (Debian's openssh-server).

A fixture starts /usr/sbin/sshd on a free port with a temporary host key and authorized key, and
writes an ssh_config (``ssh -F``) that names the key and a known_hosts holding the host key: the
client is the system's own ssh, so these tests also prove that the user's config is what it
follows. The "device" is this machine, so its python3 already has the runtime's packages.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

import devices
from devices.ssh_client import (RemoteDiskFullError, RemoteError, RemoteTimeoutError, SshAuthError,
                                SshConnectionDroppedError, SshHostKeyError, SshUnreachableError)
from edge_export.cli import main
from edge_export.export import ExportOptions, export

SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not (os.path.exists(SSHD) and os.path.exists("/usr/bin/ssh-keygen")),
                                reason="OpenSSH server not installed (apt-get install -y openssh-server)")
# Small enough that a run takes well under a second on this machine.
QUICK = dict(prompt_tokens=8, new_tokens=4, runs=1, warmup=0, threads=1)
# Long enough to still be running when a test breaks it (the tiny model decodes ~10k tok/s).
LONG = dict(prompt_tokens=8, new_tokens=200, runs=100_000, warmup=0, threads=1)


@dataclass
class Sshd:
    """A running sshd and the client files that reach it."""

    folder: Path
    port: int
    config: Path
    process: subprocess.Popen

    def url(self, base: Path, port: int | None = None) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{port or self.port}{base}"

    def client_config(self, name: str, identity: str = "id_user", known_hosts: str = "known_hosts") -> Path:
        """An ssh_config like a user's ~/.ssh/config, with this fixture's key and known_hosts."""
        path = self.folder / name
        path.write_text(f"Host *\n  IdentityFile {self.folder / identity}\n  IdentitiesOnly yes\n"
                        f"  UserKnownHostsFile {self.folder / known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
                        "  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
        return path

    def session_pids(self) -> list[int]:
        """The sshd processes serving connections (descendants of the listener named sshd)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], list(children.get(self.process.pid, []))
        while todo:
            pid = todo.pop()
            if _comm(pid) == "sshd":
                found.append(pid)
                todo += children.get(pid, [])
        return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sshd")
    host_pub = keygen(folder / "host_key")
    (folder / "authorized_keys").write_text(keygen(folder / "id_user") + "\n")
    keygen(folder / "id_other")  # a key the server does not accept
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin yes\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\nMaxStartups 50\nLogLevel VERBOSE\n")
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (folder / "empty_known_hosts").write_text("")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
    log = open(folder / "sshd.log", "w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stderr=log)
    server = Sshd(folder, port, folder / "client_config", process)
    server.client_config("client_config")
    try:
        _wait_listening(port, process, folder / "sshd.log")
        yield server
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.skip(f"sshd did not start: {log.read_text().strip().splitlines()[-1:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("sshd did not listen within 10 s")


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssh-art") / "tiny-int4"
    export(str(tiny_llama), str(out), ExportOptions(quant="int4", verify=False))
    return out


def bench(sshd: Sshd, artifact: Path, base: Path, config: Path | None = None, **options) -> dict:
    # this interpreter, which has the runtime's packages (the ssh session's PATH may find another)
    return devices.bench(str(artifact), sshd.url(base), ssh_config=str(config or sshd.config),
                         **{"remote_python": sys.executable, **QUICK, **options})


def runs_left(base: Path) -> list[str]:
    return sorted(p.name for p in (base / "runs").iterdir()) if (base / "runs").is_dir() else []


# ---- a real benchmark over ssh --------------------------------------------------------------------
def test_bench_over_ssh_measures_and_second_run_copies_nothing(sshd, artifact, tmp_path):
    base = tmp_path / "remote"
    first = bench(sshd, artifact, base)
    assert first["measured"] is True and first["device"] == f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}"
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
        assert first[key] > 0, key
    assert first["model_bytes"] == sum(e["bytes"] for e in json.loads(
        (artifact / "edge_manifest.json").read_text())["files"].values())
    assert first["device_info"]["transport"] == "ssh" and first["device_info"]["cpus"] >= 1
    listed = sorted(["edge_manifest.json", *json.loads((artifact / "edge_manifest.json").read_text())["files"]])
    assert first["transfer"]["copied"] == listed and first["transfer"]["skipped"] == []
    assert first["transfer"]["toolkit_installed"] is True and first["transfer"]["copied_bytes"] > 0

    dead = subprocess.Popen(["true"])
    dead.wait()
    (base / "runs" / "left-by-a-killed-run").mkdir()
    (base / "runs" / "left-by-a-killed-run" / "pid").write_text(str(dead.pid))  # its supervisor is gone
    second = bench(sshd, artifact, base)
    assert second["transfer"]["copied"] == [] and second["transfer"]["skipped"] == listed
    assert second["transfer"]["copied_bytes"] == 0 and second["transfer"]["toolkit_installed"] is False
    assert second["measured"] is True and second["decode_tok_s"] > 0
    assert runs_left(base) == []  # each run's folder is gone; the blobs stay as the cache
    assert {p.name for p in (base / "blobs").iterdir()} >= {e["sha256"] for e in json.loads(
        (artifact / "edge_manifest.json").read_text())["files"].values()}


def test_a_changed_blob_on_the_device_is_copied_again(sshd, artifact, tmp_path):
    base = tmp_path / "remote"
    bench(sshd, artifact, base)
    sha = json.loads((artifact / "edge_manifest.json").read_text())["files"]["tokenizer.json"]["sha256"]
    (base / "blobs" / sha).write_text("{}")  # a corrupted cache entry: its sha256 no longer matches its name
    again = bench(sshd, artifact, base, copier="scp")
    assert again["transfer"]["copied"] == ["tokenizer.json"] and again["transfer"]["copier"] == "scp"
    assert again["measured"] is True


def test_cli_bench_over_ssh_and_its_errors(sshd, artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_EXPORT_SSH_CONFIG", str(sshd.config))
    monkeypatch.setenv("EDGE_EXPORT_REMOTE_PYTHON", sys.executable)
    url = sshd.url(tmp_path / "remote")
    out = CliRunner().invoke(main, ["bench", str(artifact), "--device", url, "--prompt-tokens", "8",
                                    "--new-tokens", "4", "--runs", "1", "--warmup", "0", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["device"].startswith(f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}")
    human = CliRunner().invoke(main, ["bench", str(artifact), "--device", url, "--prompt-tokens", "8",
                                      "--new-tokens", "4", "--runs", "1", "--warmup", "0"])
    assert human.exit_code == 0 and "decode" in human.output and "already on the device" in human.output
    refused = CliRunner().invoke(main, ["bench", str(artifact), "--device", sshd.url(tmp_path, port=free_port())])
    lines = refused.output.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and "connection refused" in lines[0]


# ---- failures: each a clear error within bounded time, nothing reported, the run folder removed --------
def test_refused_connection_is_a_clear_error_fast(sshd, artifact, tmp_path):
    start = time.monotonic()
    with pytest.raises(SshUnreachableError, match=r"127\.0\.0\.1:\d+: connection refused while probing the device; "
                                                  "check that sshd runs"):
        devices.bench(str(artifact), sshd.url(tmp_path, port=free_port()), ssh_config=str(sshd.config), **QUICK)
    assert time.monotonic() - start < 10


def test_a_key_the_device_refuses_is_an_auth_error(sshd, artifact, tmp_path):
    config = sshd.client_config("wrong_key_config", identity="id_other")
    with pytest.raises(SshAuthError, match=r"the device refused the login \(.*Permission denied \(publickey\)\); "
                                           "install your public key there \\(ssh-copy-id"):
        bench(sshd, artifact, tmp_path / "remote", config)
    assert not (tmp_path / "remote").exists()


def test_an_unknown_host_key_is_refused_with_the_fix(sshd, artifact, tmp_path):
    config = sshd.client_config("no_known_hosts_config", known_hosts="empty_known_hosts")
    with pytest.raises(SshHostKeyError, match=r"host key is not in known_hosts or has changed \(Host key verification "
                                              r"failed\); connect once with `ssh -p \d+ \w+@127\.0\.0\.1`"):
        bench(sshd, artifact, tmp_path / "remote", config)


def _bench_in_thread(sshd, artifact, base, **options):
    outcome = {}

    def target():
        try:
            outcome["result"] = bench(sshd, artifact, base, **{**LONG, **options})
        except Exception as e:  # noqa: BLE001  (the test asserts on it)
            outcome["error"] = e
    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _runner_pids(base: Path) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")
            if "devices.runner" in _cmdline(int(p.name)) and str(base) in _cmdline(int(p.name))]


def _wait_for_runner(base: Path, thread: threading.Thread) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and thread.is_alive():
        if pids := _runner_pids(base):
            time.sleep(0.3)  # let it load the model and start timing
            return pids
        time.sleep(0.05)
    pytest.fail("the remote runner never started")


def _wait_gone(base: Path, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (runs_left(base) or _runner_pids(base)):
        time.sleep(0.1)
    assert runs_left(base) == [] and _runner_pids(base) == []


def test_connection_dropped_mid_run_is_an_error_and_the_run_folder_goes(sshd, artifact, tmp_path):
    base = tmp_path / "remote"
    bench(sshd, artifact, base)  # fill the cache, so the run stage starts at once
    thread, outcome = _bench_in_thread(sshd, artifact, base, timeout=120)
    _wait_for_runner(base, thread)
    start = time.monotonic()
    for pid in sshd.session_pids():  # the server side of the connection dies; the benchmark is still running
        os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - start < 30
    assert "result" not in outcome
    assert isinstance(outcome["error"], SshConnectionDroppedError), outcome["error"]
    assert "the connection dropped while running the benchmark" in str(outcome["error"])
    assert "nothing was recorded" in str(outcome["error"])
    _wait_gone(base)


def test_runner_killed_on_the_device_is_an_error_not_a_result(sshd, artifact, tmp_path):
    base = tmp_path / "remote"
    thread, outcome = _bench_in_thread(sshd, artifact, base, timeout=120)
    for pid in _wait_for_runner(base, thread):
        os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert "result" not in outcome and isinstance(outcome["error"], RemoteError)
    assert "the benchmark runner was killed by signal 9 (the out-of-memory killer does this" in str(outcome["error"])
    assert "nothing was recorded" in str(outcome["error"])
    _wait_gone(base)


def test_remote_timeout_is_a_clear_error_in_bounded_time(sshd, artifact, tmp_path):
    base = tmp_path / "remote"
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="the benchmark did not finish within 2 s; raise --timeout, or lower "
                                                "--runs / --new-tokens"):
        bench(sshd, artifact, base, **{**LONG, "timeout": 2})
    assert time.monotonic() - start < 20
    _wait_gone(base)


# ---- a full remote disk ------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems (root only); unmounted afterwards."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_full_remote_disk_is_refused_before_copying(sshd, artifact, tmpfs):
    base = tmpfs("tiny", "size=256k")
    with pytest.raises(RemoteDiskFullError, match=r"not enough space in .*tiny on the device: the files to copy "
                                                  r"need \d+\.\d MiB plus 16\.0 MiB headroom, 0\.\d MiB is free; "
                                                  "free space there"):
        bench(sshd, artifact, base)
    assert list((base / "blobs").iterdir()) == [] and runs_left(base) == []


@pytest.mark.parametrize("copier", ["scp", "rsync"])
def test_remote_disk_filling_during_the_copy_is_a_clear_error(sshd, artifact, tmpfs, copier):
    """The tmpfs has room for the bytes but only 7 inodes: its root, blobs/ runs/ toolkit/, this run's
    folder and its upload/, and one file, so the copy's second file fails to be created."""
    if copier == "rsync" and not shutil.which("rsync"):
        pytest.skip("rsync not installed")
    base = tmpfs("inodes", "size=64m,nr_inodes=7")
    with pytest.raises(RemoteDiskFullError, match=r"filled up while copying .*(No space left on device|0 inodes free)"):
        bench(sshd, artifact, base, copier=copier)
    assert list((base / "blobs").iterdir()) == [] and runs_left(base) == []


def test_the_device_side_stops_when_the_connection_closes(artifact, tmp_path):
    """devices/remote_run.py alone, as sshd would start it: when its stdin (the ssh channel) closes,
    it stops the runner and removes its run folder even if the client never comes back."""
    from runtimes.artifact import sha256_file
    base, run = tmp_path / "remote", "r1"
    (base / "runs" / run / "upload").mkdir(parents=True)
    (base / "blobs").mkdir()
    for path in artifact.iterdir():
        shutil.copyfile(path, base / "runs" / run / "upload" / sha256_file(path))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in LONG.items()]
    proc = subprocess.Popen([sys.executable, "-m", "devices.remote_run", str(base), run,
                             sha256_file(artifact / "edge_manifest.json"), artifact.name, "--timeout", "120",
                             "--watch-stdin", "--", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _runner_pids(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runner_pids(base), "the runner never started"
    proc.stdin.close()
    proc.wait(15)
    out = proc.stdout.read()
    assert proc.returncode == 6 and json.loads(out)["kind"] == "disconnected"
    assert runs_left(base) == [] and _runner_pids(base) == []
    assert len(list((base / "blobs").iterdir())) == len(list(artifact.iterdir()))  # the cache stays


def test_a_folder_the_device_cannot_write_is_named_with_the_fix(sshd, artifact, tmpfs):
    base = tmpfs("readonly", "ro,size=1m")
    with pytest.raises(RemoteError, match=r"probing the device failed: .*readonly/blobs: Read-only file system; "
                                          "name a folder you can write there"):
        bench(sshd, artifact, base)


def test_a_device_without_the_named_python_is_told_what_to_install(sshd, artifact, tmp_path):
    with pytest.raises(RemoteError, match=r"no /opt/no-such-python3 on the device \(.*No such file or directory\); "
                                          "install python3 there"):
        bench(sshd, artifact, tmp_path / "remote", remote_python="/opt/no-such-python3")
