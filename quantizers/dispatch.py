"""One function applies any config: handlers are registered per (scheme, method)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from .errors import QuantizationError
from .tensor import QuantizedTensor

Handler = Callable[..., QuantizedTensor]
HANDLERS: dict[tuple[str, str], Handler] = {}


def register_handler(scheme: str, method: str = "rtn") -> Callable[[Handler], Handler]:
    """Decorator: ``fn(weight, config, name, stats) -> QuantizedTensor`` handles ``(scheme, method)``."""
    def wrap(fn: Handler) -> Handler:
        HANDLERS[(scheme, method)] = fn
        return fn
    return wrap


def handler_key(config: Any) -> tuple[str, str]:
    """(scheme, method) of a config; schemes without methods are ``"rtn"``."""
    if not isinstance(getattr(config, "scheme", None), str):
        raise QuantizationError(f"{config!r} is not a quantization config (Int4Config, Int8Config, Fp8Config)")
    return (config.scheme, getattr(config, "method", "rtn"))


def check_weight(weight: np.ndarray, name: str) -> np.ndarray:
    """The weight as float32 [N, K]; raises QuantizationError naming the tensor on a bad
    rank or on NaN/Inf (they would poison every scale of their group)."""
    label = name or "<unnamed>"
    w = np.asarray(weight)
    if w.ndim != 2 or w.size == 0:
        raise QuantizationError(f"tensor {label}: expected a non-empty 2-D [out, in] weight, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise QuantizationError(f"tensor {label}: expected a float weight, got {w.dtype}")
    w = w.astype(np.float32, copy=False)
    bad = ~np.isfinite(w)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise QuantizationError(
            f"tensor {label}: {int(bad.sum())} NaN/Inf value(s), first at [{row}, {col}]; "
            "the checkpoint is corrupt or was saved from a diverged run")
    return w


def quantize(weight: np.ndarray, config: Any, name: str = "", stats: Optional[Any] = None) -> QuantizedTensor:
    """Quantize one linear weight W float [N out, K in] as ``config`` says.

    ``stats`` is a :class:`quantizers.Stats` over the layer's input (AWQ and GPTQ need it;
    fp8 uses it for ``activation_scales``). ``name`` only makes error messages specific.
    """
    key = handler_key(config)
    if key not in HANDLERS:
        raise QuantizationError(f"tensor {name or '<unnamed>'}: no quantizer for scheme/method {key}; "
                                f"known: {sorted(HANDLERS)}")
    return HANDLERS[key](check_weight(weight, name), config, name, stats)
