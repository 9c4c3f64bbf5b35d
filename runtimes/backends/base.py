"""The backend contract: prefill a prompt, decode one token, over a KV cache the backend owns."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import BackendUnavailableError


class Backend(ABC):
    """A way to run an artifact. Subclasses register with ``@register_backend``.

    ``max_context`` is the number of positions the KV cache holds. Capability flags say what a
    caller may rely on.
    """

    name = ""
    targets: tuple = ()  # artifact targets this backend can run
    needs = ""           # the install command when it cannot run here
    supports_providers = False

    def __init__(self, artifact, provider: str | None = None, threads: int | None = None):
        self.artifact, self.provider, self.threads = artifact, provider, threads
        self.max_context = int(artifact.manifest.get("max_context", 2048))

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(can it run on this machine, why not)."""
        return True, ""

    def reserve(self, positions: int) -> None:
        """Before a prefill: the generation will need up to ``positions`` positions of cache (the
        cache's contents may be dropped). A backend whose cache can be resized may size it to
        this; running past it stays valid."""

    @abstractmethod
    def prefill(self, ids: list[int]) -> np.ndarray:
        """Reset the cache, run the prompt; logits of its last position [vocab] float32."""

    @abstractmethod
    def decode(self, token: int) -> np.ndarray:
        """Append one token; its logits [vocab] float32."""


_BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"unknown backend '{name}' (known: {', '.join(backend_names())})")
    cls = _BACKENDS[name]
    ok, why = cls.available()
    if not ok:
        raise BackendUnavailableError(f"backend '{name}' cannot run here: {why}")
    return cls
