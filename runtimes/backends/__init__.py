"""Runtime backends, registered by name. Built-in ones register exactly as a plugin would."""
from . import coreml, onnxruntime, qnn, reference, tensorrt  # noqa: F401  (registration side effect)
from .base import Backend, backend_names, get_backend, register_backend

__all__ = ["Backend", "backend_names", "get_backend", "register_backend"]
