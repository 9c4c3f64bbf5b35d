"""`python -m devices.remote_run`: one benchmark on a remote device, from uploaded files to result.

`--device ssh://` starts it over ssh with the uploaded toolkit on PYTHONPATH. It

1. moves the files that arrived in the run folder's ``upload/`` into the content-addressed
   ``blobs/`` (each checked against the sha256 it is named by),
2. assembles the artifact inside the run folder from blobs (hard links; copies where the file
   system has none),
3. runs ``python -m devices.runner`` on it in a child process, stopped after ``--timeout`` s,
4. prints one JSON line: the runner's result, or ``{"error": ..., "kind": ...}``,

and removes the run folder however it ends (SIGTERM and SIGHUP included). With ``--watch-stdin``
it treats end of file on stdin, which the client holds open for the whole run, as the ssh
connection being gone, and stops the runner rather than leave it measuring for nobody.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

EXIT_CODES = {"runner": 3, "timeout": 4, "disk": 5, "disconnected": 6, "stopped": 7, "setup": 8}
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Stopped(Exception):
    """A signal asked the supervisor to stop."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _stop(signum, frame):
    for other in STOP_SIGNALS:  # once stopping, the cleanup itself must not be interrupted
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def commit_uploads(upload: Path, blobs: Path) -> None:
    """Move arrived files into blobs/ once their content matches their name (a sha256)."""
    for path in sorted(upload.iterdir()) if upload.is_dir() else []:
        if sha256_file(path) != path.name:
            raise ValueError(f"{path.name[:12]}... arrived with different content (sha256 mismatch); rerun the bench")
        os.replace(path, blobs / path.name)


def assemble(blobs: Path, manifest_sha: str, folder: Path) -> Path:
    """The artifact folder, every file linked from its blob; returns the folder."""
    manifest_bytes = (blobs / manifest_sha).read_bytes()
    files = json.loads(manifest_bytes)["files"]
    folder.mkdir(parents=True)
    (folder / "edge_manifest.json").write_bytes(manifest_bytes)
    for name, entry in files.items():
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ValueError(f"manifest entry '{name}' points outside the artifact")
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blobs / entry["sha256"], dest)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            shutil.copyfile(blobs / entry["sha256"], dest)
    return folder


class Supervisor:
    """Runs the benchmark child; kills it on timeout, on a lost connection, or when stopped."""

    def __init__(self, timeout: float, watch_stdin: bool):
        self.timeout, self.watch_stdin = timeout, watch_stdin
        self.child: subprocess.Popen | None = None
        self.disconnected = threading.Event()

    def _watch(self) -> None:
        # the raw descriptor: a daemon thread blocked in sys.stdin's buffered reader aborts
        # the interpreter at exit (it cannot take the buffer's lock)
        while os.read(0, 1 << 16):
            pass
        self.disconnected.set()
        self.kill()

    def kill(self) -> None:
        if self.child and self.child.poll() is None:
            self.child.kill()

    def run(self, cmd: list[str]) -> dict:
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.watch_stdin:
            threading.Thread(target=self._watch, daemon=True).start()
        try:
            out, err = self.child.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.child.communicate()
            return {"error": f"the benchmark did not finish within {self.timeout:g} s", "kind": "timeout"}
        if self.disconnected.is_set():
            return {"error": "the client went away (ssh connection closed)", "kind": "disconnected"}
        return runner_result(out, err, self.child.returncode)


def runner_result(stdout: str, stderr: str, code: int) -> dict:
    """The runner's JSON result; an error dict when it failed or printed no complete result."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if result is not None and "error" in result:
        return {"error": result["error"], "kind": "runner"}
    if code != 0 or result is None:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if code == -signal.SIGKILL:
            how += " (the out-of-memory killer does this: check `dmesg` on the device)"
        tail = stderr.strip().splitlines()
        return {"error": f"the benchmark runner {how}" + (f": {tail[-1]}" if tail else ""), "kind": "runner"}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="devices.remote_run")
    ap.add_argument("base")
    ap.add_argument("run_id")
    ap.add_argument("manifest_sha")
    ap.add_argument("name")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--watch-stdin", action="store_true")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # what follows goes to devices.runner as it is
    args, runner_args = ap.parse_args(argv[:split]), argv[split + 1:]
    base = Path(args.base)
    run_dir = base / "runs" / args.run_id
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    supervisor = Supervisor(args.timeout, args.watch_stdin)
    try:
        (run_dir / "pid").write_text(str(os.getpid()))
        commit_uploads(run_dir / "upload", base / "blobs")
        artifact = assemble(base / "blobs", args.manifest_sha, run_dir / "artifact" / args.name)
        result = supervisor.run([sys.executable, "-m", "devices.runner", str(artifact), *runner_args])
    except Stopped as e:
        result = {"error": f"stopped by {e}", "kind": "stopped"}
    except OSError as e:
        kind = "disk" if e.errno in DISK_ERRNOS else "setup"
        result = {"error": f"{e.filename or ''}: {e.strerror or e}", "kind": kind}
    except ValueError as e:
        result = {"error": str(e), "kind": "setup"}
    finally:
        supervisor.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
    return emit(result)


def emit(result: dict) -> int:
    try:
        print(json.dumps(result), flush=True)
    except OSError:  # the connection is gone; the exit code is all that is left
        pass
    return EXIT_CODES.get(result.get("kind"), 1) if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
