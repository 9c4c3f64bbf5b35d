"""The system OpenSSH client (`ssh`, `scp`, or `rsync` over ssh) run as subprocesses.

Running the user's own `ssh` means ~/.ssh/config (Host aliases, User, Port, IdentityFile,
ProxyJump), the agent's keys and known_hosts apply exactly as they do for `ssh` itself.
edge-export adds only options that bound how long a call can hang: BatchMode (no prompt waits
for a password or a host-key answer), ConnectTimeout, and ServerAliveInterval x CountMax (a
connection that stops answering is given up within 15 s). Failures become one-line errors that
name the device, the stage and the fix.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from .host import BenchError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
ALIVE_INTERVAL_S = 5
ALIVE_COUNT = 3


class RemoteError(BenchError):
    """A benchmark on a remote device could not be completed."""


class SshUnreachableError(RemoteError):
    """The device did not answer, or refused the connection."""


class SshAuthError(RemoteError):
    """The device refused the user's key (or there is none it accepts)."""


class SshHostKeyError(RemoteError):
    """The device's host key is not in known_hosts, or differs from the one there."""


class SshConnectionDroppedError(RemoteError):
    """An established connection was lost before the stage finished."""


class RemoteDiskFullError(RemoteError):
    """The remote folder has too little space (or no free inodes) for the artifact."""


class RemoteTimeoutError(RemoteError):
    """The remote benchmark did not finish within its time limit."""


class RemoteSetupError(RemoteError):
    """The device lacks what the benchmark needs (python3, a writable folder, packages)."""


@dataclass(frozen=True)
class SshTarget:
    """``[user@]host[:port][/folder]`` as typed after ``ssh://``. Unset parts are left to ssh's config."""

    host: str
    user: str | None = None
    port: int | None = None
    folder: str | None = None

    @classmethod
    def parse(cls, text: str) -> "SshTarget":
        match = re.fullmatch(r"(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]]+\]|[^:/@\[]+)(?::(?P<port>\d+))?(?P<folder>/.*)?",
                             text)
        if not match:
            raise RemoteSetupError(f"--device 'ssh://{text}': expected ssh://[user@]host[:port][/folder]")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise RemoteSetupError(f"--device 'ssh://{text}': port {port} is out of range")
        return cls(match["host"].strip("[]"), match["user"], port, match["folder"])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return "ssh://" + (f"{self.user}@" if self.user else "") + host + (f":{self.port}" if self.port else "")

    def destination(self, bracket: bool = False) -> str:
        """``user@host`` for ssh; scp wants IPv6 addresses in brackets."""
        host = f"[{self.host}]" if bracket and ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    @property
    def port_hint(self) -> str:
        return f"-p {self.port} " if self.port else ""


class SshClient:
    """Runs commands on, and copies files to, one device through the system ssh client.

    ``config``: an ssh_config file passed as ``ssh -F`` (default: ssh's own, ~/.ssh/config).
    """

    def __init__(self, target: SshTarget, config: str | None = None, connect_timeout: int = CONNECT_TIMEOUT_S):
        if not shutil.which("ssh"):
            raise RemoteSetupError("ssh is not installed here; install the OpenSSH client "
                                   "(apt-get install openssh-client)")
        self.target, self.config, self.connect_timeout = target, config, connect_timeout

    def options(self) -> list[str]:
        """Options common to ssh, scp and rsync's ssh; command-line -o wins over the config file."""
        opts = ["-F", self.config] if self.config else []
        for option in ("BatchMode=yes", f"ConnectTimeout={self.connect_timeout}",
                       f"ServerAliveInterval={ALIVE_INTERVAL_S}", f"ServerAliveCountMax={ALIVE_COUNT}"):
            opts += ["-o", option]
        return opts

    def ssh_argv(self, command: str) -> list[str]:
        port = ["-p", str(self.target.port)] if self.target.port else []
        return ["ssh", *self.options(), *port, self.target.destination(), command]

    def run(self, command: str, stage: str, timeout: float, input: bytes | None = None,
            stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        """Run ``command`` in the device's shell; returns the finished process (stdout/stderr as text).

        Raises the matching connection error when ssh itself fails (exit 255), RemoteTimeoutError
        when ``timeout`` seconds pass. ``stdin``: a file descriptor to hand ssh instead of input.
        """
        argv = self.ssh_argv(command)
        log.debug("%s: %s", stage, shlex.join(argv[:-1]) + " <command>")
        try:
            proc = subprocess.run(argv, input=input, stdin=None if input is not None else stdin,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RemoteTimeoutError(f"{self.target.url}: {stage} did not finish within {timeout:.0f} s; "
                                     "check the device, or raise --timeout") from e
        result = subprocess.CompletedProcess(argv, proc.returncode, proc.stdout.decode(errors="replace"),
                                             proc.stderr.decode(errors="replace"))
        if proc.returncode == 255:
            raise self.connection_error(result.stderr, stage)
        return result

    def copy(self, sources: list[str], remote_folder: str, stage: str, use_rsync: bool, timeout: float) -> None:
        """Copy local files (symlinks followed) into an existing remote folder, keeping their names."""
        argv = self.rsync_argv(sources, remote_folder) if use_rsync else self.scp_argv(sources, remote_folder)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RemoteTimeoutError(f"{self.target.url}: {stage} did not finish within {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise self.copy_error(proc.stderr, proc.returncode, stage)

    def scp_argv(self, sources: list[str], remote_folder: str) -> list[str]:
        port = ["-P", str(self.target.port)] if self.target.port else []
        return ["scp", "-q", *self.options(), *port, *sources,
                f"{self.target.destination(bracket=True)}:{remote_folder}/"]

    def rsync_argv(self, sources: list[str], remote_folder: str) -> list[str]:
        port = ["-p", str(self.target.port)] if self.target.port else []
        shell = shlex.join(["ssh", *self.options(), *port])
        return ["rsync", "--copy-links", "--protect-args", "-e", shell, *sources,
                f"{self.target.destination(bracket=True)}:{remote_folder}/"]

    # ---- what a failure means ------------------------------------------------------------------
    def connection_error(self, stderr: str, stage: str) -> RemoteError:
        """The error class and one-line message for an ssh failure (exit 255) during ``stage``."""
        reason = _last_line(stderr)
        url, login = self.target.url, f"ssh {self.target.port_hint}{self.target.destination()}"
        if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            return SshHostKeyError(f"{url}: the device's host key is not in known_hosts or has changed ({reason}); "
                                   f"connect once with `{login}` to check and accept it")
        if "Permission denied" in stderr or "Too many authentication failures" in stderr:
            return SshAuthError(f"{url}: the device refused the login ({reason}); install your public key there "
                                f"(ssh-copy-id {self.target.port_hint}{self.target.destination()}) or name the key "
                                "with IdentityFile in ~/.ssh/config (passwords are not asked for: BatchMode)")
        if "Connection refused" in stderr:
            return SshUnreachableError(f"{url}: connection refused while {stage}; check that sshd runs on the "
                                       "device and the port is right")
        if any(s in stderr for s in ("Connection timed out", "No route to host", "Network is unreachable",
                                     "Could not resolve hostname", "Name or service not known")):
            return SshUnreachableError(f"{url}: host unreachable while {stage} ({reason}); check the address, the "
                                       "network, or its Host entry in ~/.ssh/config")
        return SshConnectionDroppedError(f"{url}: the connection dropped while {stage} ({reason or 'no message'}); "
                                         "nothing was recorded, rerun when the device is reachable")

    def copy_error(self, stderr: str, code: int, stage: str) -> RemoteError:
        full = [line.strip() for line in stderr.splitlines()
                if "No space left on device" in line or "Disk quota exceeded" in line]
        if full:
            return RemoteDiskFullError(f"{self.target.url}: the remote disk filled up while {stage} "
                                       f"({full[0]}); free space there or name another folder (ssh://user@host/FOLDER)")
        if code == 255 or "lost connection" in stderr or "connection unexpectedly closed" in stderr:
            return self.connection_error(stderr, stage)
        return RemoteError(f"{self.target.url}: {stage} failed (exit {code}): {_last_line(stderr) or 'no message'}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else ""


def local_rsync() -> bool:
    """Whether rsync is installed here (it must be on the device too to be used)."""
    return shutil.which("rsync") is not None
