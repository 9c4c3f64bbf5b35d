"""`--device ssh://[user@]host[:port][/folder]`: a Linux board (Jetson, Raspberry Pi) over SSH.

One benchmark is a few ssh calls (devices/ssh_client.py runs the system client):

1. probe (devices/ssh_remote.py): python3 and its packages, free space, which artifact files the
   device already holds (their sha256, computed there, against the manifest's), whether this
   version of the toolkit is there; it also opens this run's folder and clears stale ones;
2. a venv with pip installs, only when the device's python3 lacks a runtime package (with the
   system's packages visible, so a board's own onnxruntime build, e.g. JetPack's, stays in use);
3. copy the missing files (scp, or rsync where both ends have it), after checking they fit;
4. unpack the `runtimes` and `devices` sources, when this version is not there yet;
5. run devices/remote_run.py, which runs `python -m devices.runner` with a time limit and prints
   its JSON.

Any failure is one EdgeError line naming the device and the fix, the remote run folder is
removed (blobs/ and toolkit/, the caches, stay), and no result is returned: a partial result is
never reported as complete.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shlex
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from runtimes.artifact import MANIFEST, Artifact, load_artifact, sha256_file

from .host import BenchError, runner_args
from .protocol import RESULT_FORMAT, bench_option
from .registry import Device, register_device
from .ssh_client import (RemoteDiskFullError, RemoteError, RemoteSetupError, RemoteTimeoutError, SshClient,
                         SshConnectionDroppedError, SshTarget, local_rsync)

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "~/.cache/edge-export"
MIN_PYTHON = (3, 10)
# setup.py's RUNTIME requirements, by the module each provides
REQUIREMENTS = {"numpy": "numpy>=1.26,<=2.3.5", "onnxruntime": "onnxruntime>=1.20", "tokenizers": "tokenizers>=0.20",
                "jinja2": "jinja2>=3.1"}
# Room beyond the files themselves: bytecode caches, file-system blocks, the run's own folders.
DISK_MARGIN_BYTES = 16 << 20
PROBE_TIMEOUT_S = 600      # it hashes the cached files: a few GB on a slow board
SETUP_TIMEOUT_S = 1800     # pip installs on a board
SHORT_TIMEOUT_S = 60
CLEANUP_TIMEOUT_S = 30
RUN_GRACE_S = 20           # the client waits this much longer than the remote time limit
MIN_COPY_RATE = 256 << 10  # bytes/s below which a copy counts as hung
# What the device's supervisor reports (devices/remote_run.py), as an error class and the fix.
REMOTE_ERRORS = {
    "timeout": (RemoteTimeoutError, "raise --timeout, or lower --runs / --new-tokens"),
    "disk": (RemoteDiskFullError, "free space there or name another folder (ssh://user@host/FOLDER)"),
    "disconnected": (SshConnectionDroppedError, "nothing was recorded, rerun when the device is reachable"),
    "stopped": (SshConnectionDroppedError, "nothing was recorded, rerun the bench"),
    "setup": (RemoteSetupError, "nothing was recorded, rerun the bench"),
    "runner": (RemoteError, "nothing was recorded"),
}
REQUIRED_FIGURES = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "model_bytes")


@register_device("ssh")
class SshDevice(Device):
    """A Linux device reached with the system ssh client; see the module docstring for the steps.

    Options beyond the protocol's: ``timeout`` (s, the remote run), ``ssh_config`` (an ssh_config
    file for ``ssh -F``; default ssh's own, or $EDGE_EXPORT_SSH_CONFIG), ``remote_python`` (the
    device's interpreter; default python3 on its PATH, or $EDGE_EXPORT_REMOTE_PYTHON),
    ``connect_timeout`` (s), ``copier`` (auto | scp | rsync).
    """

    def bench(self, artifact: str, options: dict) -> dict:
        return SshRun(self.target, options).bench(artifact)


@dataclass(frozen=True)
class Toolkit:
    """The `runtimes` and `devices` sources as a .tar.gz, named by a digest of their contents."""

    digest: str
    archive: bytes
    unpacked_bytes: int

    @classmethod
    @functools.cache
    def here(cls) -> "Toolkit":
        import runtimes
        files = []
        for package in (Path(runtimes.__file__).parent, Path(__file__).parent):
            files += [(p.relative_to(package.parent).as_posix(), p.read_bytes()) for p in sorted(package.rglob("*.py"))]
        digest, buffer = hashlib.sha256(), io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in files:
                digest.update(name.encode() + b"\0" + data)
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        return cls(digest.hexdigest()[:16], buffer.getvalue(), sum(len(d) for _, d in files))


def artifact_blobs(artifact: Artifact) -> dict[str, list[Path]]:
    """sha256 -> the artifact's local files with that content, the manifest included."""
    blobs: dict[str, list[Path]] = {sha256_file(artifact.path / MANIFEST): [artifact.path / MANIFEST]}
    for name, entry in artifact.manifest["files"].items():
        blobs.setdefault(entry["sha256"], []).append(artifact.path / name)
    return blobs


class SshRun:
    """One benchmark of one artifact on one device: every remote step, and the cleanup when one fails."""

    def __init__(self, target: str, options: dict):
        self.target = SshTarget.parse(target)
        config = options.get("ssh_config") or os.environ.get("EDGE_EXPORT_SSH_CONFIG")
        self.client = SshClient(self.target, config, **({"connect_timeout": options["connect_timeout"]}
                                                         if options.get("connect_timeout") else {}))
        self.options, self.url = options, self.target.url
        self.folder = self.target.folder or DEFAULT_FOLDER
        self.python = options.get("remote_python") or os.environ.get("EDGE_EXPORT_REMOTE_PYTHON") or "python3"
        self.run_id = uuid.uuid4().hex[:12]
        self.base: str | None = None  # the folder's absolute path on the device, once probed
        self.cleaned = False

    def bench(self, path: str) -> dict:
        """Benchmark the artifact at ``path`` on the device; returns the protocol's result dict."""
        artifact = load_artifact(path)  # a tampered artifact fails here, before anything is shipped
        blobs, toolkit = artifact_blobs(artifact), Toolkit.here()
        probe = self.probe(list(blobs), toolkit.digest)
        try:
            self.check_python(probe)
            python = self.ensure_packages(probe)
            missing = {sha: paths[0] for sha, paths in blobs.items() if not probe["blobs"][sha]}
            self.check_space(probe, missing, 0 if probe["toolkit"] else toolkit.unpacked_bytes)
            copier = self.upload(missing, probe)
            if not probe["toolkit"]:
                self.remote_python("install_toolkit", {"toolkit": toolkit.digest}, "installing the toolkit",
                                   SHORT_TIMEOUT_S, input=toolkit.archive)
            result = self.run(python, toolkit.digest, artifact, blobs)
        except BaseException as e:  # KeyboardInterrupt too: the remote run folder must not stay
            self.cleanup_after(e)
            raise
        self.cleaned = True  # the supervisor removed the run folder as it finished
        result.update(device=self.url, device_info={**probe["info"], "transport": "ssh"},
                      transfer=transfer_summary(artifact, blobs, missing, copier, not probe["toolkit"]))
        return result

    # ---- steps -------------------------------------------------------------------------------------
    def probe(self, blobs: list[str], toolkit: str) -> dict:
        args = {"base": self.folder, "blobs": blobs, "toolkit": toolkit, "modules": sorted(REQUIREMENTS)}
        probe = self.remote_python("probe", args, "probing the device", PROBE_TIMEOUT_S, base=False)
        self.base = probe["base"]
        if probe["stale_runs_removed"]:
            log.info("%s: removed %d run folders left by earlier runs", self.url, len(probe["stale_runs_removed"]))
        return probe

    def check_python(self, probe: dict) -> None:
        version = tuple(probe["python_version"])
        if version < MIN_PYTHON:
            raise RemoteSetupError(f"{self.url}: the device's python3 is {'.'.join(map(str, version))}; the runtime "
                                   f"needs {'.'.join(map(str, MIN_PYTHON))} or newer: install a newer python3 there")

    def ensure_packages(self, probe: dict) -> str:
        """The remote interpreter to run with: the device's python3, or a venv when it lacks a package."""
        if not probe["missing"]:
            return probe["python"]
        log.info("%s: creating a venv in %s for %s", self.url, self.base, ", ".join(probe["missing"]))
        made = self.remote_python("make_venv", {"requirements": [REQUIREMENTS[m] for m in probe["missing"]]},
                                  f"installing {', '.join(probe['missing'])} into a venv", SETUP_TIMEOUT_S)
        return made["python"]

    def check_space(self, probe: dict, missing: dict[str, Path], toolkit_bytes: int) -> None:
        need = sum(p.stat().st_size for p in missing.values()) + toolkit_bytes
        if need and need + DISK_MARGIN_BYTES > probe["free_bytes"]:
            raise RemoteDiskFullError(
                f"{self.url}: not enough space in {self.base} on the device: the files to copy need {_mib(need)} "
                f"plus {_mib(DISK_MARGIN_BYTES)} headroom, {_mib(probe['free_bytes'])} is free; "
                "free space there or name another folder (ssh://user@host/FOLDER)")

    def upload(self, missing: dict[str, Path], probe: dict) -> str | None:
        """Copy the missing blobs into the run's upload folder; returns the copier used."""
        if not missing:
            return None
        copier = self.copier(probe)
        total = sum(p.stat().st_size for p in missing.values())
        stage = f"copying {len(missing)} files ({_mib(total)})"
        with tempfile.TemporaryDirectory(prefix="edge-export-upload-") as staging:
            for sha, path in missing.items():  # named by content, as blobs/ holds them
                os.symlink(path.resolve(), os.path.join(staging, sha))
            sources = [os.path.join(staging, sha) for sha in missing]
            try:
                self.client.copy(sources, self.run_dir + "/upload", stage, copier == "rsync",
                                 timeout=120 + total / MIN_COPY_RATE)
            except RemoteError as e:
                raise self.copy_failure(e, total) from e
        return copier

    def copier(self, probe: dict) -> str:
        wanted = self.options.get("copier") or "auto"
        if wanted == "rsync" and not (local_rsync() and probe["rsync"]):
            raise RemoteSetupError(f"{self.url}: copier rsync needs rsync here and on the device")
        return "rsync" if wanted == "rsync" or (wanted == "auto" and local_rsync() and probe["rsync"]) else "scp"

    def copy_failure(self, error: RemoteError, total: int) -> RemoteError:
        """scp over SFTP reports a full disk as a bare 'Failure': ask the device how full it is."""
        if isinstance(error, (RemoteDiskFullError, SshConnectionDroppedError, RemoteTimeoutError)):
            return error
        space = self.cleanup()
        if space and (space.get("free_inodes") == 0 or space.get("free_bytes", total) < total):
            return RemoteDiskFullError(f"{self.url}: the remote disk at {self.base} filled up while copying the "
                                       f"artifact ({_mib(space['free_bytes'])} and {space['free_inodes']} inodes "
                                       "free); free space there or name another folder (ssh://user@host/FOLDER)")
        return error

    def run(self, python: str, toolkit: str, artifact: Artifact, blobs: dict[str, list[Path]]) -> dict:
        """Run the supervisor; returns the runner's complete result or raises."""
        timeout = float(bench_option(self.options, "timeout"))
        manifest_sha = next(sha for sha, paths in blobs.items() if paths[0].name == MANIFEST)
        command = shlex.join(["env", f"PYTHONPATH={self.base}/toolkit/{toolkit}", python, "-m", "devices.remote_run",
                              self.base, self.run_id, manifest_sha, artifact.path.name, "--timeout", f"{timeout:g}",
                              "--watch-stdin", "--", *runner_args(self.options)])
        # stdin stays open for the whole run: when the connection goes, the device sees end of file
        # there and stops the runner instead of measuring for nobody
        read_end, write_end = os.pipe()
        try:
            proc = self.client.run(command, "running the benchmark", timeout + RUN_GRACE_S, stdin=read_end)
        finally:
            os.close(read_end)
            os.close(write_end)
        return self.complete_result(proc.stdout, proc.stderr, proc.returncode)

    def complete_result(self, stdout: str, stderr: str, code: int) -> dict:
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        try:
            result = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            result = {}
        if "error" in result:
            error, fix = REMOTE_ERRORS.get(result.get("kind"), REMOTE_ERRORS["runner"])
            raise error(f"{self.url}: {result['error']}; {fix}")
        runs = int(bench_option(self.options, "runs"))
        if (code != 0 or result.get("format") != RESULT_FORMAT or result.get("runs") != runs
                or any(key not in result for key in REQUIRED_FIGURES)):
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            raise RemoteError(f"{self.url}: the benchmark returned no complete result (exit {code}: {tail}); "
                              "nothing was recorded")
        return result

    # ---- remote helpers ----------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return f"{self.base}/runs/{self.run_id}"

    def remote_python(self, mode: str, args: dict, stage: str, timeout: float, input: bytes | None = None,
                      base: bool = True) -> dict:
        """Run one mode of devices/ssh_remote.py on the device; returns its JSON or raises."""
        args = {"base": self.base if base else self.folder, "run_id": self.run_id, **args}
        command = shlex.join([self.python, "-c", _remote_source(), mode, json.dumps(args)])
        proc = self.client.run(command, stage, timeout, input=input)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == 127:
            raise RemoteSetupError(f"{self.url}: no {self.python} on the device ({tail}); install python3 there "
                                   "(e.g. apt-get install python3 python3-venv) or name one "
                                   "(EDGE_EXPORT_REMOTE_PYTHON)")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RemoteError(f"{self.url}: {stage} failed (exit {proc.returncode}): {tail}")
        out = json.loads(lines[-1])
        if "error" in out:
            if out.get("errno") in (28, 122):  # ENOSPC, EDQUOT
                raise RemoteDiskFullError(f"{self.url}: the remote disk is full while {stage} ({out['error']}); "
                                          "free space there or name another folder (ssh://user@host/FOLDER)")
            if out.get("errno") in (13, 30):  # EACCES, EROFS
                raise RemoteSetupError(f"{self.url}: {stage} failed: {out['error']}; name a folder you can write "
                                       "there (ssh://user@host/FOLDER)")
            raise RemoteSetupError(f"{self.url}: {stage} failed: {out['error']}")
        return out

    def cleanup(self) -> dict | None:
        """Remove this run's folder on the device; returns its free space, None if unreachable."""
        if self.cleaned or self.base is None:
            return None
        try:
            space = self.remote_python("cleanup", {}, "removing the run folder", CLEANUP_TIMEOUT_S)
        except BenchError as e:
            log.warning("%s: could not remove %s (%s); the next bench there removes it", self.url, self.run_dir, e)
            return None
        self.cleaned = space.get("removed", False)
        return space

    def cleanup_after(self, error: BaseException) -> None:
        self.cleanup()
        if not self.cleaned and self.base and isinstance(error, RemoteError):
            error.args = (f"{error}; {self.run_dir} is left on the device and the next bench there removes it",)


@functools.cache
def _remote_source() -> str:
    return (Path(__file__).parent / "ssh_remote.py").read_text()


def transfer_summary(artifact: Artifact, blobs: dict[str, list[Path]], missing: dict, copier: str | None,
                     toolkit_installed: bool) -> dict:
    """What was copied to the device and what its cache already held (file names, bytes)."""
    def names(shas):
        return sorted(p.relative_to(artifact.path).as_posix() for sha in shas for p in blobs[sha])
    return {"copied": names(missing), "skipped": names(set(blobs) - set(missing)),
            "copied_bytes": sum(p.stat().st_size for p in missing.values()), "copier": copier,
            "toolkit_installed": toolkit_installed}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"
