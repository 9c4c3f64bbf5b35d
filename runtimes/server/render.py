"""Generator results and events -> OpenAI's chat-completion objects, chunks and error objects.

The thinking goes to ``reasoning_content`` and the answer to ``content`` (as DeepSeek's API
returns R1's); the tags go to neither. Both are trimmed of the whitespace around them (R1 writes
``<think>\\n...\\n</think>\\n\\n``), the same way streamed and not, so the deltas of a stream join
to exactly the message a non-streamed request gets.
"""
from __future__ import annotations

import json
import time
import uuid

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def error_object(message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens,
            "completion_tokens_details": {"reasoning_tokens": result.thinking_tokens}}


def completion(result, ident: str, model: str, created: int) -> dict:
    """The non-streamed response."""
    message = {"role": "assistant", "content": result.answer.strip(),
               "reasoning_content": result.thinking.strip() or None}
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop")}],
            "usage": usage(result)}


class Trim:
    """Strips leading and trailing whitespace from text that arrives in pieces: leading whitespace
    is dropped, trailing whitespace held until more text follows it (and dropped at the end)."""

    def __init__(self):
        self.started, self.held = False, ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


class ChunkWriter:
    """Server-sent events of one streamed completion: ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``."""

    def __init__(self, ident: str, model: str, created: int | None = None):
        self.ident, self.model = ident, model
        self.created = created if created is not None else int(time.time())
        self.fields = {"thinking": ("reasoning_content", Trim()), "answer": ("content", Trim())}

    def chunk(self, delta: dict, finish_reason: str | None = None, with_choice: bool = True, **extra) -> bytes:
        body = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
                if with_choice else []}
        body.update(extra)
        return sse(body)

    def role(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""})

    def event(self, event) -> bytes | None:
        """A thinking or answer event -> its delta chunk (None for tags and held whitespace)."""
        if event.kind not in self.fields:
            return None
        name, trim = self.fields[event.kind]
        text = trim.feed(event.text)
        return self.chunk({name: text}) if text else None

    def finish(self, result, include_usage: bool) -> bytes:
        out = self.chunk({}, FINISH_REASONS.get(result.finish_reason, "stop"))
        if include_usage:  # OpenAI's shape: a last chunk with no choices and the usage
            out += self.chunk({}, with_choice=False, usage=usage(result))
        return out + DONE

    def error(self, message: str, kind: str, code: str) -> bytes:
        return sse(error_object(message, kind, code=code)) + DONE


DONE = b"data: [DONE]\n\n"


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
