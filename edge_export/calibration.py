"""The calibration prompts an export quantizes with (AWQ / GPTQ statistics, fp8 activation and int8
KV-cache scales, the qnn variant's uint16 activation ranges), rendered as the model sees them."""
from __future__ import annotations

from .errors import ExportError


def calibration_ids(tokenizer, path: str | None) -> list[list[int]]:
    """The calibration prompts (built-in reasoning set, or a JSONL file) rendered with the chat
    template, which for R1 ends in ``<think>\\n`` as the model sees it: token ids per prompt."""
    from .verify import data_file, load_prompts
    prompts = load_prompts(path or data_file("calibration.jsonl"))
    if tokenizer is None:
        raise ExportError("calibration needs the checkpoint's tokenizer; this checkpoint has none")
    return [tokenizer.encode_chat(p) for p in prompts]
