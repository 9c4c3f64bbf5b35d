"""What `--device ssh://` runs on the device before the toolkit is there, by ``python3 -c``.

Standard library only and old-Python friendly (no walrus, no 3.9+ calls): it runs on whatever
python3 the board has, to find out whether that one will do. Called as
``python3 -c SOURCE MODE JSON_ARGS``; prints one JSON object (``{"error": ..., "errno": ...}``
when a file operation fails) and exits 0, so a failure here is never mistaken for ssh's own.

The remote folder (``base``, default ``~/.cache/edge-export``):

    blobs/<sha256>            artifact files, named by content: the cache copies are skipped against
    toolkit/<digest>/         the `runtimes` and `devices` sources, one folder per version
    runs/<run id>/            one benchmark: upload/ (files arriving), the artifact assembled from
                              blobs by hard links, pid; removed when the run ends, however it ends
    venv/                     created only when the device's python3 lacks a package
"""
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time

# A run folder with no live owner, untouched this long, was left by a client that vanished mid-copy.
STALE_UPLOAD_S = 24 * 3600
# Python 3.12+ warns without an explicit extraction filter; older ones rely on the checks below.
EXTRACT_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def folders(base):
    base = os.path.abspath(os.path.expanduser(base))
    return {"base": base, "blobs": os.path.join(base, "blobs"), "runs": os.path.join(base, "runs"),
            "toolkit": os.path.join(base, "toolkit"), "venv": os.path.join(base, "venv")}


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_owner(run_dir):
    """The pid of the supervisor that owns a run folder, or None before it has started."""
    try:
        with open(os.path.join(run_dir, "pid")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def newest_mtime(folder):
    times = [os.path.getmtime(folder)]
    for root, dirs, files in os.walk(folder):
        times += [os.path.getmtime(os.path.join(root, name)) for name in dirs + files]
    return max(times)


def remove_stale_runs(runs):
    """Run folders left by a run whose supervisor died, or by an upload abandoned long ago."""
    removed = []
    for name in os.listdir(runs):
        run_dir = os.path.join(runs, name)
        owner = run_owner(run_dir)
        stale = (not pid_alive(owner)) if owner else time.time() - newest_mtime(run_dir) > STALE_UPLOAD_S
        if stale:
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(name)
    return removed


def missing_modules(python, modules):
    code = "import importlib.util,sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    proc = subprocess.run([python, "-c", code] + list(modules), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    return proc.stdout.split() if proc.returncode == 0 else list(modules)


def machine_info():
    ram_kb = 0
    try:
        with open("/proc/meminfo") as f:
            ram_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "ram_gb": round(ram_kb / 2 ** 20, 1),
            "python": platform.python_version(), "system": platform.platform()}


def free_space(path):
    # statvfs rather than parsing `df`: GNU and busybox print different columns
    st = os.statvfs(path)
    return {"free_bytes": st.f_bavail * st.f_frsize, "free_inodes": st.f_favail}


def probe(args):
    """Make the folders, clear stale runs, open this run's folder; say what is there and what is not."""
    f = folders(args["base"])
    for key in ("blobs", "runs", "toolkit"):
        if not os.path.isdir(f[key]):
            os.makedirs(f[key])
    stale = remove_stale_runs(f["runs"])
    os.makedirs(os.path.join(f["runs"], args["run_id"], "upload"))
    blobs = {}
    for digest in args["blobs"]:
        path = os.path.join(f["blobs"], digest)
        blobs[digest] = os.path.isfile(path) and sha256_file(path) == digest
    venv_python = os.path.join(f["venv"], "bin", "python")
    python = venv_python if os.access(venv_python, os.X_OK) else sys.executable
    out = {"base": f["base"], "blobs": blobs, "stale_runs_removed": stale, "python": python,
           "python_version": list(sys.version_info[:3]), "missing": missing_modules(python, args["modules"]),
           "toolkit": os.path.isdir(os.path.join(f["toolkit"], args["toolkit"])),
           "rsync": shutil.which("rsync") is not None, "info": machine_info()}
    out.update(free_space(f["base"]))
    return out


def install_toolkit(args):
    """Unpack the toolkit (a .tar.gz on stdin) into the run folder, then rename it into place:
    a half-unpacked toolkit is never found under its digest."""
    f = folders(args["base"])
    staging = os.path.join(f["runs"], args["run_id"], "toolkit")
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|gz") as tar:
        for member in tar:
            if member.name.startswith(("/", "..")) or "/../" in member.name or not (member.isfile() or member.isdir()):
                return {"error": "refusing toolkit archive member %r" % member.name}
            tar.extract(member, staging, **EXTRACT_FILTER)
    final = os.path.join(f["toolkit"], args["toolkit"])
    try:
        os.rename(staging, final)
    except OSError:
        if not os.path.isdir(final):  # another run installing the same version won the race
            raise
    return {"toolkit": final}


def make_venv(args):
    """A venv that sees the system's packages (a board's own onnxruntime build stays in use), plus
    pip installs of what is missing."""
    f = folders(args["base"])
    steps = [[sys.executable, "-m", "venv", "--system-site-packages", f["venv"]],
             [os.path.join(f["venv"], "bin", "python"), "-m", "pip", "install", "-q"] + args["requirements"]]
    for step in steps:
        proc = subprocess.run(step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if proc.returncode != 0:
            tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["no output"]
            return {"error": "%s failed: %s" % (" ".join(step[1:4]), tail[0])}
    return {"python": steps[1][0]}


def cleanup(args):
    """Stop a run's supervisor (it kills its runner and removes its folder), then remove the folder."""
    f = folders(args["base"])
    run_dir = os.path.join(f["runs"], args["run_id"])
    owner = run_owner(run_dir)
    if owner and pid_alive(owner):
        os.kill(owner, signal.SIGTERM)
        for _ in range(50):
            if not pid_alive(owner):
                break
            time.sleep(0.1)
    out = free_space(f["base"]) if os.path.isdir(f["base"]) else {}
    shutil.rmtree(run_dir, ignore_errors=True)
    out["removed"] = not os.path.exists(run_dir)
    return out


MODES = {"probe": probe, "install_toolkit": install_toolkit, "make_venv": make_venv, "cleanup": cleanup}


def main(argv):
    try:
        out = MODES[argv[1]](json.loads(argv[2]))
    except OSError as e:
        out = {"error": "%s: %s" % (e.filename or "", e.strerror) if e.strerror else str(e), "errno": e.errno}
    except Exception as e:  # noqa: BLE001  (reported to the client as one line, never a traceback)
        out = {"error": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
