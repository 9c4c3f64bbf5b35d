"""The `reference` backend: any artifact's weights, dequantized, run by the float32 numpy decoder."""
from __future__ import annotations

import numpy as np

from ..reference import ReferenceDecoder
from ..weights import ArtifactWeights
from .base import Backend, register_backend


@register_backend
class ReferenceBackend(Backend):
    name = "reference"
    targets = ("onnx", "coreml", "tensorrt")

    def __init__(self, artifact, provider=None, threads=None):
        super().__init__(artifact, provider, threads)
        self.decoder = ReferenceDecoder(artifact.spec, ArtifactWeights(artifact), max_context=self.max_context)

    def prefill(self, ids) -> np.ndarray:
        return self.decoder.prefill(ids)

    def decode(self, token: int) -> np.ndarray:
        return self.decoder.decode(token)
