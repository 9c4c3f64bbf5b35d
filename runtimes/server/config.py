"""What `edge-export serve` is told: where to listen, who may call, how much it queues and waits.

No web framework here: the CLI and an app that embeds the server build a ServeConfig, and the
bind rule (loopback, or a key, or ``insecure``) is checked before anything listens.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from ..errors import EdgeError

API_KEY_ENV = "EDGE_EXPORT_API_KEY"
# reasoning_effort -> thinking budget in tokens (None: no cap). DeepSeek-R1's traces run to
# thousands of tokens; "low" keeps a short answer affordable on a board.
REASONING_BUDGETS = {"low": 256, "medium": 1024, "high": 4096}


class ServeError(EdgeError):
    """The server cannot start as configured (address, key, missing package)."""


@dataclass
class ServeConfig:
    """Settings of one server.

    ``max_queue``: requests admitted at once (the one being generated and those waiting); past it a
    request gets 429. ``request_timeout_s``: from arrival to the last token. ``max_body_bytes``:
    larger request bodies get 413. ``reasoning_budgets``: thinking tokens per ``reasoning_effort``.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    max_queue: int = 16
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    model_name: str | None = None
    reasoning_budgets: dict = field(default_factory=lambda: dict(REASONING_BUDGETS))

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        for name, low in (("max_queue", 1), ("request_timeout_s", 0.001), ("max_body_bytes", 1024)):
            if getattr(self, name) < low:
                raise ServeError(f"--{name.replace('_', '-').removesuffix('-s')} must be at least {low}, "
                                 f"got {getattr(self, name)}")
        unknown = set(self.reasoning_budgets) - set(REASONING_BUDGETS)
        if unknown:
            raise ServeError(f"--reasoning-budget: unknown level(s) {', '.join(sorted(unknown))}; "
                             f"levels are {', '.join(REASONING_BUDGETS)}")

    def check_bind(self) -> None:
        """Refuse a non-loopback address without an API key, unless ``insecure``."""
        if is_loopback(self.host) or self.api_key or self.insecure:
            return
        raise ServeError(f"--host {self.host} is reachable from other machines and no API key is set: anyone there "
                         f"could use the model. Pass --api-key KEY (or set {API_KEY_ENV}), bind to 127.0.0.1, "
                         "or pass --insecure if the network is trusted")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def parse_budgets(items) -> dict:
    """``["low=128", "high=none"]`` -> REASONING_BUDGETS updated; ServeError names a bad item."""
    budgets = dict(REASONING_BUDGETS)
    for item in items or ():
        level, sep, value = item.partition("=")
        if not sep or level not in REASONING_BUDGETS:
            raise ServeError(f"--reasoning-budget {item!r}: write LEVEL=TOKENS with LEVEL one of "
                             f"{', '.join(REASONING_BUDGETS)} (TOKENS: a count, or none for no cap)")
        if value.lower() == "none":
            budgets[level] = None
        elif value.isdigit():
            budgets[level] = int(value)
        else:
            raise ServeError(f"--reasoning-budget {item!r}: TOKENS must be a whole number or none")
    return budgets
