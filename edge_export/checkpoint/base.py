"""The Checkpoint interface every reader returns: a ModelSpec plus lazy, one-at-a-time tensors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtimes.models import ModelSpec
from runtimes.tokenizer import ChatTokenizer

from ..errors import CheckpointError


class Checkpoint:
    """A readable model: ``spec``, ``tokenizer``, and float32 tensors by HF name on demand.

    Subclasses implement ``_names``, ``_read`` and ``stored_dtype``; tensors are never all held.
    """

    format = ""

    def __init__(self, path: Path, spec: ModelSpec, tokenizer: ChatTokenizer | None):
        self.path, self.spec, self.tokenizer = Path(path), spec, tokenizer

    def tensor_names(self) -> list[str]:
        return list(self.spec.tensor_shapes())

    def tensor(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """One tensor as float32, shape as in ModelSpec.tensor_shapes(); ``rows`` (a slice or an
        index array) reads only part of its first axis (an embedding's rows, a chunk of lm_head)."""
        if name == self.spec.tensor_name("lm_head") and self.spec.tied_embeddings:
            name = self.spec.tensor_name("embed")
        return self._read_rows(name, rows)

    def _read_rows(self, name: str, rows: slice | None) -> np.ndarray:
        """Readers that can read part of a tensor override this; the default slices the whole."""
        value = self._read(name)
        return value if rows is None else value[rows]

    def _read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def stored_dtype(self, name: str) -> str:
        raise NotImplementedError

    def quantized_blocks(self, name: str):
        """The tensor's original quantized blocks (GGUF), or None for float checkpoints."""
        return None

    @property
    def bytes_on_disk(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        """The dtype most weights are stored in (e.g. BF16, Q4_1)."""
        names = [n for n in self.tensor_names() if n.endswith("proj.weight")]
        counts: dict[str, int] = {}
        for n in names or self.tensor_names():
            counts[self.stored_dtype(n)] = counts.get(self.stored_dtype(n), 0) + 1
        return max(counts, key=counts.get)

    def check_shapes(self, found: dict[str, tuple[int, ...]], source: str) -> None:
        """Every tensor the spec needs is present with its shape, or a CheckpointError names it."""
        for name, shape in self.spec.tensor_shapes().items():
            if name == self.spec.tensor_name("lm_head") and self.spec.tied_embeddings:
                continue
            if name not in found:
                raise CheckpointError(f"{source}: tensor '{name}' is missing; the checkpoint is incomplete "
                                      "or its config.json describes another model")
            if tuple(found[name]) != tuple(shape):
                raise CheckpointError(f"{source}: tensor '{name}' has shape {list(found[name])}, "
                                      f"config.json implies {list(shape)}")


def inside(folder: Path, name: str, what: str) -> Path:
    """Resolve ``name`` under ``folder``; refuse absolute paths, '..' and symlinks that leave it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{folder}: {what} '{name}' points outside the checkpoint folder; refusing it")
    path = (folder / name)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder}: {what} '{name}' is a link that leaves the checkpoint folder; refusing it")
    return path
