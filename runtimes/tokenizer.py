"""Tokenizer and chat template at run time: a `tokenizers` tokenizer plus a sandboxed jinja2 template.

User text can never become a special token: message contents are tokenized with special-token
parsing switched off, and only the template's own text may produce control tokens.
"""
from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime
from pathlib import Path

from .errors import TokenizerError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _raise(message: str):
    raise TokenizerError(f"chat template: {message}")


class ChatTokenizer:
    """Encode, decode and render chats for one model.

    ``chat_template`` is a jinja2 source string (HF convention: ``messages``, ``bos_token``,
    ``eos_token``, ``add_generation_prompt``). ``add_bos`` says whether plain text encoding
    starts with BOS.
    """

    def __init__(self, tokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, add_bos: bool = False):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        self._template = None
        # encode() flips the tokenizer's special-token switch for one call, and a server encodes new
        # requests while its generation thread encodes the budget's </think>: the flip and the encode
        # are one step (CPython 3.11 with tokenizers holding the GIL never splits them; a free-threaded
        # Python or a binding that releases the GIL would)
        self._encode_lock = threading.Lock()

    @classmethod
    def from_files(cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None) -> "ChatTokenizer":
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tokenizer_json}: not a valid tokenizer.json ({e})") from e
        config = {}
        if tokenizer_config and Path(tokenizer_config).exists():
            try:
                config = json.loads(Path(tokenizer_config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{tokenizer_config}: not valid JSON ({e})") from e
        return cls(tok, chat_template=_template_text(config.get("chat_template")),
                   bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")),
                   add_bos=bool(config.get("add_bos_token", False)))

    # ---- plain text ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Text -> ids. ``parse_special=False`` makes special-token strings plain text."""
        with self._encode_lock:
            self.tok.encode_special_tokens = not parse_special
            try:
                ids = self.tok.encode(text, add_special_tokens=False).ids
            finally:
                self.tok.encode_special_tokens = False
        bos = self.token_id(self.bos_token) if self.bos_token else None
        if (self.add_bos if add_bos is None else add_bos) and bos is not None:
            ids = [bos] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # ---- chat ----------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the template writes it (a string, special tokens as text)."""
        return self._compiled().render(messages=messages, bos_token=self.bos_token or "",
                                       eos_token=self.eos_token or "", add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict] | str, add_generation_prompt: bool = True) -> list[int]:
        """Messages (or one user string) -> prompt ids, with user text unable to inject control tokens."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        _check_messages(messages)
        marker = uuid.uuid4().hex
        contents, masked = [], []
        for m in messages:
            if m["role"] == "assistant":  # the template rewrites these (drops thinking): keep as is
                masked.append(dict(m))
                continue
            masked.append(dict(m, content=f"\x02{marker}{len(contents)}\x03"))
            contents.append(m["content"])
        text = self.render(masked, add_generation_prompt)
        ids: list[int] = []
        for i, part in enumerate(text.split("\x02" + marker)):
            if i > 0:
                index, _, part = part.partition("\x03")
                ids += self.encode(contents[int(index)], add_bos=False, parse_special=False)
            if part:
                ids += self.encode(part, add_bos=False, parse_special=True)
        return ids

    def _compiled(self):
        if self._template is None:
            if not self.chat_template:
                raise TokenizerError("this model has no chat template; pass a plain prompt with --raw "
                                     "or add chat_template to tokenizer_config.json")
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise TokenizerError(f"chat template does not compile: {e}") from e
        return self._template


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise TokenizerError(f"bad message {m!r}: need role system|user|assistant and string content")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_text(value) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {v.get("name"): v.get("template") for v in value if isinstance(v, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None
