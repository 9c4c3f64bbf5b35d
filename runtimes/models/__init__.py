"""Architectures and the ModelSpec they produce. Importing this package registers them all."""
from . import llama, phi3, qwen2, qwen3  # noqa: F401  (registration side effect)
from .base import (GLOBAL_TENSORS, LAYER_TENSORS, Architecture, ModelSpec, get_architecture, register,
                   spec_from_config, supported_architectures)
from .config_keys import strict_config
from .decoder import DecoderLayer, describe, layer_keys, layer_tensors

__all__ = ["Architecture", "DecoderLayer", "ModelSpec", "GLOBAL_TENSORS", "LAYER_TENSORS", "describe",
           "get_architecture", "layer_keys", "layer_tensors", "register", "spec_from_config", "strict_config",
           "supported_architectures"]
