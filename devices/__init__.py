"""Devices: where a benchmark runs, the benchmark protocol, device profiles and the roofline."""
from . import adb, estimate, host, ssh  # noqa: F401  (registration side effects)
from .registry import Device, parse_device, register_device


def bench(artifact: str, device: str = "host", **options) -> dict:
    """Benchmark an artifact on one device by the shared protocol; returns the result dict."""
    return parse_device(device).bench(artifact, options)


__all__ = ["Device", "bench", "parse_device", "register_device"]
