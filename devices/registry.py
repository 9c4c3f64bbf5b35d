"""Device kinds, registered by the scheme users type in ``--device`` (host, ssh://, adb://, estimate:)."""
from __future__ import annotations

from runtimes.errors import EdgeError

_DEVICES: dict[str, type] = {}


class Device:
    """Where a benchmark runs. ``target`` is what follows the scheme (a host, a serial, a profile)."""

    def __init__(self, target: str = ""):
        self.target = target

    def bench(self, artifact: str, options: dict) -> dict:
        raise NotImplementedError


def register_device(scheme: str):
    def wrap(cls):
        _DEVICES[scheme] = cls
        return cls
    return wrap


def parse_device(spec: str) -> Device:
    """'host' | 'ssh://user@host[:port]' | 'adb://SERIAL' | 'estimate:PROFILE' | 'http://HOST:PORT[/v1]' -> a Device."""
    if "://" in spec:
        scheme, target = spec.split("://", 1)
    elif ":" in spec:
        scheme, target = spec.split(":", 1)
    else:
        scheme, target = spec, ""
    if scheme not in _DEVICES:
        raise EdgeError(f"--device '{spec}': unknown kind '{scheme}' (known: {', '.join(sorted(_DEVICES))})")
    return _DEVICES[scheme](target)
