"""Architectures and the ModelSpec they produce. Importing this package registers them all."""
from . import llama, qwen2, qwen3  # noqa: F401  (registration side effect)
from .base import (GLOBAL_TENSORS, LAYER_TENSORS, Architecture, ModelSpec, get_architecture, register,
                   spec_from_config, supported_architectures)
from .config_keys import strict_config

__all__ = ["Architecture", "ModelSpec", "GLOBAL_TENSORS", "LAYER_TENSORS", "get_architecture", "register",
           "spec_from_config", "strict_config", "supported_architectures"]
