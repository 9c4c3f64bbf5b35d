"""Devices: where a benchmark runs, the benchmark protocol, device profiles and the roofline."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from runtimes.errors import EdgeError

from . import adb, estimate, host, http_server, ssh  # noqa: F401  (registration side effects)
from .protocol import BENCH_OPTIONS
from .registry import Device, parse_device, register_device
from .ssh_client import SshTarget

log = logging.getLogger(__name__)


def check_options(options: dict) -> None:
    """Raise BenchError naming the first option out of its range (as its CLI flag, e.g. --runs);
    the ranges are the protocol's (devices.protocol.BENCH_OPTIONS). None: the default."""
    for name, option in BENCH_OPTIONS.items():
        value = options.get(name)
        if value is not None and not value >= option.least:
            raise host.BenchError(f"--{name.replace('_', '-')} {value}: must be {option.words}")


def bench(artifact: str, device: str = "host", **options) -> dict:
    """Benchmark an artifact on one device by the shared protocol; returns the result dict."""
    check_options(options)
    return parse_device(device).bench(artifact, options)


def bench_devices(artifact: str, devices: list[str], **options) -> list[dict]:
    """Benchmark an artifact on several devices at once; one entry per device, in the order given:
    its result dict, or ``{"device": SPEC, "error": MESSAGE}`` when that device failed.

    Each device runs in a thread of its own, since its own hardware does the measuring; ``host``
    runs alone after the others, so their copying and ssh traffic do not disturb its timings. A
    device listed twice (``host`` included) is refused: two runs on one machine share its cores.
    A malformed or unknown ``--device`` refuses the whole list (EdgeError) before anything runs.
    """
    check_options(options)
    parsed = [parse_device(spec) for spec in devices]
    _refuse_repeats(devices, parsed)
    entries: list[dict | None] = [None] * len(devices)
    remote = [i for i, device in enumerate(parsed) if not isinstance(device, host.HostDevice)]
    with ThreadPoolExecutor(max_workers=max(1, len(remote)), thread_name_prefix="bench") as pool:
        futures = {i: pool.submit(_entry, devices[i], parsed[i], artifact, options) for i in remote}
        for i, future in futures.items():
            entries[i] = future.result()
    for i, device in enumerate(parsed):
        if entries[i] is None:
            entries[i] = _entry(devices[i], device, artifact, options)
    return entries


def _entry(spec: str, device: Device, artifact: str, options: dict) -> dict:
    """One device's result, or its error entry: a failing device must not lose the others' results."""
    try:
        return device.bench(artifact, dict(options))
    except EdgeError as e:
        return {"device": spec, "error": str(e)}
    except Exception as e:  # a bug, not a device failure: still this device's entry, traceback in the log
        log.exception("benchmark on %s failed unexpectedly", spec)
        return {"device": spec, "error": f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)"}


def _machine(spec: str, device: Device) -> tuple:
    """What identifies the machine a device spec measures on (an ssh folder or user does not)."""
    if isinstance(device, ssh.SshDevice):
        target = SshTarget.parse(device.target)
        return ("ssh", target.host.lower(), target.port or 22)
    return (spec.split(":", 1)[0], device.target)


def _refuse_repeats(specs: list[str], parsed: list[Device]) -> None:
    seen: dict[tuple, str] = {}
    for spec, device in zip(specs, parsed):
        key = _machine(spec, device)
        if key in seen:
            same = f"'{spec}' is listed twice" if seen[key] == spec else f"'{spec}' and '{seen[key]}' are one machine"
            raise EdgeError(f"--device {same}: two benchmarks there at once would share its cores and disturb each "
                            "other's timings; list each device once")
        seen[key] = spec


__all__ = ["Device", "bench", "bench_devices", "parse_device", "register_device"]
