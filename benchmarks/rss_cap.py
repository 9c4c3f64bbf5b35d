"""Run a command and stop it once the resident memory of its process tree passes a cap.

    python3 benchmarks/rss_cap.py CAP_GIB COMMAND...

For a peer that would run this machine out of memory (and take the other jobs on it along): the
memory it had reached and the cap are printed on its last line, exit code 137. /usr/bin/time -v
around it still reports the peak. Linux only (reads /proc)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of root and every descendant (from /proc/*/stat: ppid, rss pages)."""
    parents, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], rss[pid] = int(fields[1]), int(fields[21])
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(p, 0) for p in tree) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    cap = float(sys.argv[1]) * 2**30
    process = subprocess.Popen(sys.argv[2:], start_new_session=True)
    start, peak = time.monotonic(), 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        if peak > cap:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            print(f"stopped after {time.monotonic() - start:.0f} s: its memory reached {peak / 2**30:.1f} GiB, "
                  f"past the {cap / 2**30:g} GiB cap, and was still growing", flush=True)
            return 137
        time.sleep(0.5)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
