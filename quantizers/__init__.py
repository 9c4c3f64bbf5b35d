"""quantizers: pure math on numpy arrays — schemes, INT4/INT8/FP8, AWQ/GPTQ, target layouts.

    from quantizers import Int4Config, quantize, pack_matmulnbits
    qt = quantize(weight, Int4Config(group_size=32), name="model.layers.0.mlp.up_proj.weight")
    ort_inputs = pack_matmulnbits(qt)

Imports nothing else of this repository. A linear weight is float32 [N out_features,
K in_features] (HF layout, y = x @ W.T); groups run along K.
"""
from . import awq, fp8, gptq, int4, int8, palettize  # noqa: F401  (importing registers their handlers)
from .awq import awq_quantize_shared, awq_search_shared
from .dispatch import HANDLERS, quantize, register_handler
from .e4m3 import decode_e4m3fn, encode_e4m3fn
from .errors import QuantizationError
from .gguf import GGUF_KINDS, from_gguf_blocks
from .kv import KVRange, quantize_kv
from .palettize import PalettizedTensor
from .pack import (make_tensor_proto, pack_coreml_blockwise, pack_dequantizelinear, pack_matmulnbits,
                   unpack_coreml_blockwise, unpack_dequantizelinear, unpack_matmulnbits)
from .schemes import (SCHEMES, SUPPORTED_GROUP_SIZES, Fp8Config, Int4Config, Int4LutConfig, Int8Config, Rules,
                      default_rules, fallback_group_size, register_scheme, scheme_from_dict)
from .stats import Stats
from .tensor import QuantizedTensor

__all__ = [
    "Fp8Config", "GGUF_KINDS", "HANDLERS", "Int4Config", "Int4LutConfig", "Int8Config", "KVRange", "QuantizationError", "QuantizedTensor",
    "Rules", "SCHEMES", "SUPPORTED_GROUP_SIZES", "Stats", "awq_quantize_shared", "awq_search_shared",
    "decode_e4m3fn", "default_rules", "encode_e4m3fn", "fallback_group_size", "from_gguf_blocks",
    "PalettizedTensor", "make_tensor_proto", "pack_coreml_blockwise", "pack_dequantizelinear", "pack_matmulnbits", "quantize",
    "quantize_kv",
    "register_handler", "register_scheme", "scheme_from_dict", "unpack_coreml_blockwise",
    "unpack_dequantizelinear", "unpack_matmulnbits",
]
