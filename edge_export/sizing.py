"""Bytes an export's weights take under the default quantization rules (scales and zero points included).

Float tensors kept by a rule (norms, biases) are counted in fp16, the precision device targets
store them in; quantized tensors count their codes, float32 scales and packed zero points, as
the ONNX artifact stores them.
"""
from __future__ import annotations

import math

from runtimes.models import ModelSpec


def precision_config(precision: str):
    """A precision name (fp16 | int8 | int4 | fp8) -> the quantizer config, or None for fp16."""
    from quantizers import Fp8Config, Int4Config, Int8Config
    return {"fp16": None, "fp32": None, "int8": Int8Config(), "int4": Int4Config(), "fp8": Fp8Config()}[precision]


def tensor_bytes(shape: tuple[int, ...], config, float_bytes: int = 2) -> int:
    """Stored bytes of one tensor quantized with ``config`` (None: kept float)."""
    count = math.prod(shape)
    if config is None:
        return count * float_bytes
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    kind = config.to_dict()["scheme"]
    if kind == "int4":
        groups = rows * math.ceil(cols / config.group_size)
        zero_points = 0 if config.symmetric else rows * math.ceil(math.ceil(cols / config.group_size) / 2)
        return math.ceil(count / 2) + groups * 4 + zero_points
    if kind == "int4_lut":  # uint4 indices and a float16 table of 16 per rows_per_lut rows
        return math.ceil(count / 2) + math.ceil(rows / config.rows_per_lut) * 16 * 2
    if kind == "int8":
        group = getattr(config, "group_size", None) or cols
        return count + rows * math.ceil(cols / group) * 4
    if kind == "fp8":
        return count + (rows if getattr(config, "per_channel", False) else 1) * 4
    raise ValueError(f"no size rule for scheme {kind}")


def export_weight_bytes(spec: ModelSpec, precision: str) -> int:
    """Total weight bytes of an export of ``spec`` at ``precision`` under the default rules."""
    from quantizers import default_rules
    config = precision_config(precision)
    if config is None:
        return sum(tensor_bytes(s, None, 4 if precision == "fp32" else 2) for s in spec.tensor_shapes().values())
    rules = default_rules(config)
    return sum(tensor_bytes(shape, rules.resolve(name)) for name, shape in spec.tensor_shapes().items())
