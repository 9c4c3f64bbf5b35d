"""A `tokenizers` tokenizer rebuilt from GGUF metadata, giving llama.cpp's ids for the same text.

Byte-level BPE only (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Qwen2/3, Llama 3, the R1
distills). The pre-tokenizer is chosen by ``tokenizer.ggml.pre`` from llama.cpp's own table
(src/llama-vocab.cpp), because GGUF stores the name, not the regexes. transformers' GGUF tokenizer
conversion is not used: it gets SmolLM2's wrong (adds BOS, wrong EOS, SentencePiece-style byte
fallback).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types that become added tokens

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's pre-tokenizer for one ``tokenizer.ggml.pre`` value: regexes applied in turn,
    each splitting the pieces of the one before (unmatched text stays a piece of its own)."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # llama3: a word that is itself a token is never split


_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", GPT2))
_QWEN2 = PreTokenizer((QWEN2,))
_LLAMA3 = PreTokenizer((LLAMA3,), ignore_merges=True)
# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llama-vocab.cpp maps them.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer((GPT2,)), "mpt": PreTokenizer((GPT2,)), "olmo": PreTokenizer((GPT2,)),
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "stablelm2": _QWEN2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3, "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
}


def tokenizer_from_gguf(source) -> tuple[Tokenizer, dict]:
    """A GGUF file path, a gguf.GGUFReader or a metadata dict -> (tokenizers.Tokenizer,
    tokenizer_config.json-style dict with chat_template, bos_token, eos_token, add_bos_token)."""
    return tokenizer_from_metadata(*_metadata_of(source))


def tokenizer_from_metadata(metadata: dict, source: str = "GGUF metadata") -> tuple[Tokenizer, dict]:
    """:func:`tokenizer_from_gguf` for metadata already read; errors name ``source``."""
    meta = _TokenizerMetadata(metadata, source)
    tokens, token_types = meta.tokens(), meta.token_types()
    tokenizer = _byte_level_bpe(meta, tokens, token_types)
    return tokenizer, _tokenizer_config(meta, tokens)


def _metadata_of(source) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "GGUF metadata"
    if isinstance(source, (str, Path)):
        from .gguf_header import read_gguf_metadata
        return read_gguf_metadata(source), str(source)
    if hasattr(source, "fields"):  # gguf.GGUFReader
        where = str(getattr(getattr(source, "data", None), "filename", "GGUF file"))
        return {name: _field_value(field) for name, field in source.fields.items()}, where
    raise TypeError(f"tokenizer_from_gguf takes a path, a GGUFReader or a metadata dict, not {type(source).__name__}")


def _field_value(field):
    value = field.contents()
    return np.asarray(value) if isinstance(value, list) and value and not isinstance(value[0], str) else value


class _TokenizerMetadata:
    """Typed access to the tokenizer.* keys; errors name the file and the key."""

    def __init__(self, metadata: dict, where: str):
        self.metadata, self.where = metadata, where
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{where}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2': "
                                  "Llama 3, Qwen, SmolLM2, the R1 distills) is supported; use the HF checkpoint's "
                                  "tokenizer.json")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
            raise CheckpointError(f"{where}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                                  f"(supported: {', '.join(sorted(PRE_TOKENIZERS))}); use the HF checkpoint")
        self.pre = PRE_TOKENIZERS[pre]

    def fail(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {key} {message}")

    def tokens(self) -> list[str]:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise self.fail("tokenizer.ggml.tokens", "is missing or not a list of strings")
        return tokens

    def token_types(self) -> np.ndarray:
        n = len(self.metadata["tokenizer.ggml.tokens"])
        types = self.metadata.get("tokenizer.ggml.token_type")
        if types is None:
            return np.ones(n, dtype=np.int32)
        types = np.asarray(types)
        if types.shape != (n,) or types.dtype.kind not in "iu":
            raise self.fail("tokenizer.ggml.token_type", f"must be {n} integers, one per token")
        return types

    def merges(self) -> list[tuple[str, str]]:
        merges = self.metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise self.fail("tokenizer.ggml.merges", "is missing or not a list of strings; a byte-level BPE "
                            "tokenizer needs its merges")
        pairs = []
        for i, merge in enumerate(merges):
            parts = merge.split(" ") if isinstance(merge, str) else ()
            if len(parts) != 2:
                raise self.fail("tokenizer.ggml.merges",
                                f"entry {i} ({merge!r}) is not two tokens separated by a space")
            pairs.append((parts[0], parts[1]))
        return pairs

    def token_id(self, key: str) -> int | None:
        value = self.metadata.get(f"tokenizer.ggml.{key}")
        n = len(self.metadata["tokenizer.ggml.tokens"])
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
            raise self.fail(f"tokenizer.ggml.{key}", f"is {value!r}, not a token id below {n}")
        return int(value)

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.metadata.get(f"tokenizer.ggml.{key}", default))


def _byte_level_bpe(meta: _TokenizerMetadata, tokens: list[str], token_types: np.ndarray):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # duplicate texts: llama.cpp also resolves text to the first id
    if len(vocab) < len(tokens):
        log.info("%s: %d duplicate token texts; text maps to the first id", meta.where, len(tokens) - len(vocab))
    merges = meta.merges()
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=meta.pre.ignore_merges,
                         byte_fallback=False, fuse_unk=False)
    except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
        raise CheckpointError(f"{meta.where}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from e
    tokenizer = Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in meta.pre.regexes]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp matches control tokens only when asked to parse special text, user-defined ones
    # always: exactly tokenizers' special / non-special added tokens.
    added = [AddedToken(tokens[i], special=bool(token_types[i] == TOKEN_CONTROL), normalized=False)
             for i in np.nonzero((token_types == TOKEN_CONTROL) | (token_types == TOKEN_USER_DEFINED))[0]
             if vocab[tokens[i]] == i]
    tokenizer.add_tokens(added)
    return tokenizer


def _tokenizer_config(meta: _TokenizerMetadata, tokens: list[str]) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": meta.flag("add_bos_token", False),
              "add_eos_token": meta.flag("add_eos_token", False)}
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = meta.token_id(f"{key}_token_id")
        if token_id is not None:
            config[{"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")] = tokens[token_id]
    template = meta.metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return config
