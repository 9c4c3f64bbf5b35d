"""The chat-completions request as this server accepts it: one explicit list of fields.

Accepted and honoured: messages, max_tokens / max_completion_tokens, temperature, top_p, seed,
stop, stream, stream_options.include_usage, reasoning_effort and the extension thinking_budget.
Accepted because they change nothing here: model, user, n = 1, logprobs = false, zero penalties,
response_format of type text, tools absent or empty. Anything else, and any value of those that
would change the output, is a 400 that names the field (UNSUPPORTED says why): never ignored.
Models are strict, so "1" is not 1 and "true" is not true.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRICT = ConfigDict(extra="forbid", strict=True)

# A field whose other values would change the output -> why it is refused (the 400's message).
UNSUPPORTED = {
    "n": "only n=1 is supported: this server returns one choice per request",
    "logprobs": "logprobs are not returned by this server; leave logprobs false or absent",
    "frequency_penalty": "penalties are not applied by this server; leave frequency_penalty 0 or absent",
    "presence_penalty": "penalties are not applied by this server; leave presence_penalty 0 or absent",
    "response_format": "only response_format {\"type\": \"text\"} is supported (no JSON mode or schema)",
    "tools": "tool calling is not supported; leave tools empty or absent",
}


class TextPart(BaseModel):
    """A text content part; other part types (images, audio) are refused."""

    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message. ``developer`` is OpenAI's newer name for ``system``. An assistant message's
    ``reasoning_content`` is accepted and dropped, as R1's template drops earlier thinking."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    reasoning_content: Optional[str] = None

    @model_validator(mode="after")
    def _content_rules(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError("reasoning_content belongs to assistant messages only")
        texts = [self.content] if isinstance(self.content, str) else [p.text for p in self.content or []]
        try:  # JSON may carry lone surrogates ("\ud800"); no tokenizer can encode them
            [t.encode("utf-8") for t in texts]
        except UnicodeEncodeError:
            raise ValueError("content is not valid Unicode (it holds a lone surrogate escape)") from None
        return self

    def to_template(self) -> dict:
        """The message as the chat template takes it: role and string content, thinking dropped."""
        content = self.content or ""
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. ``max_tokens`` / ``max_completion_tokens`` count every generated
    token, the thinking included; ``thinking_budget`` (an extension, tokens) wins over
    ``reasoning_effort``; ``stop`` applies to the answer and is not returned."""

    model_config = STRICT
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = Field(None, description="up to 4 strings that end the answer")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    reasoning_effort: Optional[Literal["low", "medium", "high"]] = None
    thinking_budget: Optional[int] = Field(None, ge=0, description="extension: thinking tokens before </think>")
    user: Optional[str] = None
    n: Optional[int] = Field(None, ge=1, le=1)
    logprobs: Optional[Literal[False]] = None
    frequency_penalty: Optional[float] = Field(None, ge=0, le=0)
    presence_penalty: Optional[float] = Field(None, ge=0, le=0)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict]] = Field(None, max_length=0)

    @field_validator("stop")
    @classmethod
    def _stop_rules(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty strings")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def budget(self, budgets: dict) -> Optional[int]:
        """Thinking tokens allowed: thinking_budget, else reasoning_effort's budget, else no cap."""
        if self.thinking_budget is not None:
            return self.thinking_budget
        return budgets.get(self.reasoning_effort) if self.reasoning_effort else None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error object."""

    error: ErrorBody


def error_field(loc) -> str:
    """A pydantic error location -> the request field it names: ('body', 'messages', 0, 'role') -> messages[0].role."""
    parts = [p for p in loc if p != "body"]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """The 400's message and param for pydantic's errors: the first one, named by its field."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", None
    field = error_field(loc)
    top = next((p for p in loc if p != "body"), None)
    if not field:
        return "the request body must be a JSON object with a messages list", None
    if top in UNSUPPORTED:
        return f"{top}: {UNSUPPORTED[top]}", str(top)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = ("this server does not accept this field (see the accepted fields in /openapi.json); "
                   "it is refused rather than ignored")
    elif first.get("type") == "literal_error" and loc[-1] == "role":
        message = "unknown role; use system, developer, user or assistant"
    return f"{field}: {message}", field
