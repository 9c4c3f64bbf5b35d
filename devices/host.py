"""`--device host`: this machine, measured by the benchmark runner in a child process."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from runtimes.errors import EdgeError

from .protocol import RUNNER_OPTIONS, bench_option
from .registry import Device, register_device


class BenchError(EdgeError):
    """A benchmark could not be completed on its device."""


@register_device("host")
class HostDevice(Device):
    """The machine edge-export runs on."""

    def bench(self, artifact: str, options: dict) -> dict:
        cmd = [sys.executable, "-m", "devices.runner", str(artifact)] + runner_args(options)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bench_option(options, "timeout"))
        result = _parse(proc.stdout, proc.stderr, proc.returncode, "host")
        result.update(device="host", device_info=host_info())
        return result


def runner_args(options: dict) -> list[str]:
    args = []
    for key in ("backend", "provider", *RUNNER_OPTIONS):
        if options.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(options[key])]
    return args


def _parse(stdout: str, stderr: str, code: int, where: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"benchmark on {where} failed (exit {code}): {tail}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise BenchError(f"benchmark on {where}: {result['error']}")
    return result


def host_info() -> dict:
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "ram_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version()}
