"""The generation loop shared by every backend: sampling, stop tokens and strings, streaming, thinking budget.

Streaming events say whether a piece of text is thinking or answer. The ``<think>`` and
``</think>`` tags are events of their own (kind ``tag``) and belong to neither; a model that never
emits them produces only answer. Concatenating every event's text gives exactly the decoded
output (up to a stop string, which is not returned). The split is done on text, so it holds however
the tokenizer cuts the tags.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import ContextOverflowError, SamplingError, TokenizerError
from .tokenizer import THINK_CLOSE, THINK_OPEN

BUDGET_CLOSE = "\n</think>\n\n"


# Each sampling option's range: (what holds for a valid value, the range in words). NaN fails every test.
SAMPLING_RANGES = {
    "temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "> 0 and <= 1 (1 keeps every token)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 keeps every token)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "thinking_budget": (lambda v: v is None or v >= 0, ">= 0 tokens"),
    "seed": (lambda v: v is None or v >= 0, ">= 0"),
}


def check_sampling(sampling) -> None:
    """Raise SamplingError naming the first option of ``sampling`` that is out of its range."""
    for name, (holds, words) in SAMPLING_RANGES.items():
        value = getattr(sampling, name)
        try:
            ok = bool(holds(value))
        except TypeError:  # not a number
            ok = False
        if not ok:
            raise SamplingError(f"sampling option {name}={value!r} is out of range: it must be {words}")


@dataclass
class Sampling:
    """How to pick tokens. temperature 0 is greedy. ``thinking_budget`` caps thinking tokens.

    ``stop``: strings that end the answer (never the thinking); the stop string itself is not returned.
    Every option is range-checked on construction (SamplingError).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 256
    thinking_budget: int | None = None
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        check_sampling(self)


@dataclass
class Event:
    kind: str  # "thinking" | "answer" | "tag"
    text: str


@dataclass
class Result:
    thinking: str = ""
    answer: str = ""
    tokens: list = field(default_factory=list)
    prompt_tokens: int = 0
    thinking_tokens: int = 0
    finish_reason: str = ""  # eos | stop (a stop string) | length | context | cancelled
    ttft_ms: float = 0.0
    decode_tok_s: float = 0.0
    token_times: list = field(default_factory=list)  # seconds since start, one per new token

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {"thinking": self.thinking, "answer": self.answer, "new_tokens": self.new_tokens,
                "thinking_tokens": self.thinking_tokens, "prompt_tokens": self.prompt_tokens,
                "finish_reason": self.finish_reason, "ttft_ms": round(self.ttft_ms, 3),
                "decode_tok_s": round(self.decode_tok_s, 2)}


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Choose the next token from logits [vocab]."""
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < z.size:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < s.top_p  # smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


class Detokenizer:
    """Incremental decoding: the text each new token adds, holding back incomplete UTF-8."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class ThinkSplitter:
    """Cuts streamed text into thinking / answer / tag events."""

    def __init__(self, thinking: bool):
        self.thinking, self.pending = thinking, ""

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events = []
        while True:  # either tag switches mode, wherever it appears: tags never count as text
            found = [(at, tag) for tag in (THINK_OPEN, THINK_CLOSE) if (at := self.pending.find(tag)) >= 0]
            if not found:
                break
            at, tag = min(found)
            if at:
                events.append(Event(self._kind(), self.pending[:at]))
            events.append(Event("tag", tag))
            self.pending = self.pending[at + len(tag):]
            self.thinking = tag == THINK_OPEN
        keep = max(_partial_tag_suffix(self.pending, THINK_OPEN), _partial_tag_suffix(self.pending, THINK_CLOSE))
        emit = self.pending[:len(self.pending) - keep]
        if emit:
            events.append(Event(self._kind(), emit))
        self.pending = self.pending[len(emit):]
        return events

    def flush(self) -> list[Event]:
        events = [Event(self._kind(), self.pending)] if self.pending else []
        self.pending = ""
        return events

    def _kind(self) -> str:
        return "thinking" if self.thinking else "answer"


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StopFilter:
    """Ends the answer at the first stop string: answer text that could begin one is held back until
    it cannot. Thinking and tags pass through and release what is held (a stop string never spans a
    tag), so stop strings apply to the answer only."""

    def __init__(self, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.stops, self.pending, self.hit = [s for s in stops if s], "", False

    def feed(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for e in events:
            if e.kind != "answer" or not self.stops:
                out += self.flush() + [e]
                continue
            self.pending += e.text
            at = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
            if at >= 0:
                out += [Event("answer", self.pending[:at])] if at else []
                self.pending, self.hit = "", True
                return out
            keep = max(_partial_tag_suffix(self.pending, s) for s in self.stops)
            out += [Event("answer", self.pending[:len(self.pending) - keep])] if len(self.pending) > keep else []
            self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> list[Event]:
        events = [Event("answer", self.pending)] if self.pending else []
        self.pending = ""
        return events


class Generator:
    """Drives a backend (prefill / decode over its own KV cache) with a tokenizer."""

    def __init__(self, backend, tokenizer, eos_ids: list[int]):
        self.backend, self.tokenizer, self.eos_ids = backend, tokenizer, set(eos_ids)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise TokenizerError for an empty prompt, ContextOverflowError for one the context cannot hold."""
        limit = self.backend.max_context
        if not len(prompt_ids):
            raise TokenizerError("the prompt encodes to no tokens: give a non-empty prompt (or messages)")
        if len(prompt_ids) >= limit:
            raise ContextOverflowError(f"the prompt has {len(prompt_ids)} tokens; the artifact's context is "
                                       f"{limit}: shorten the prompt or re-export with a larger --max-context")

    def stream(self, prompt_ids: list[int], sampling: Sampling, result: Result | None = None,
               cancel: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Yield events as tokens arrive; fills ``result`` (if given) with the totals and timings.

        ``cancel`` is asked after every token; when it returns True, generation stops there (within
        one token) with finish_reason ``cancelled``."""
        result = result if result is not None else Result()
        result.prompt_tokens = len(prompt_ids)
        self.check_prompt(prompt_ids)
        limit = self.backend.max_context
        rng = np.random.default_rng(sampling.seed)
        detok = Detokenizer(self.tokenizer)
        prompt_text = self.tokenizer.decode(prompt_ids[-4:])
        splitter = ThinkSplitter(thinking=prompt_text.rstrip().endswith(THINK_OPEN))
        stopper = StopFilter(sampling.stop)
        forced: list[int] = []
        reserve = getattr(self.backend, "reserve", None)  # optional: prefill / decode / max_context suffice
        if reserve is not None:
            reserve(len(prompt_ids) + sampling.max_new_tokens)
        t0 = time.perf_counter()
        logits = self.backend.prefill(prompt_ids)
        position = len(prompt_ids)
        while True:
            token = forced.pop(0) if forced else pick(self._mask_eos(logits, sampling, result), sampling, rng)
            result.token_times.append(time.perf_counter() - t0)
            if token in self.eos_ids and not sampling.ignore_eos:
                result.finish_reason = "eos"
                break
            result.tokens.append(token)
            if splitter.thinking:
                result.thinking_tokens += 1
            yield from self._emit(stopper.feed(splitter.feed(detok.add(token))), result)
            if stopper.hit:
                result.finish_reason = "stop"
                break
            if (sampling.thinking_budget is not None and splitter.thinking and not forced
                    and result.thinking_tokens >= sampling.thinking_budget):
                close = self.tokenizer.encode(BUDGET_CLOSE, parse_special=True)
                # max_new_tokens counts every token: a closing tag that cannot fit is not started
                forced = close if len(result.tokens) + len(close) <= sampling.max_new_tokens else []
            if len(result.tokens) >= sampling.max_new_tokens:
                result.finish_reason = "length"
                break
            if position >= limit:  # the cache is full: stop cleanly rather than overflow it
                result.finish_reason = "context"
                break
            if cancel is not None and cancel():
                result.finish_reason = "cancelled"
                break
            logits = self.backend.decode(token)
            position += 1
        if not stopper.hit:  # what the detokenizer and splitter still hold, unless a stop string ended it all
            yield from self._emit(stopper.feed(splitter.feed(detok.flush()) + splitter.flush()) + stopper.flush(),
                                  result)
            if stopper.hit:
                result.finish_reason = "stop"
        times = result.token_times
        result.ttft_ms = times[0] * 1000.0
        n = len(result.tokens)
        if n > 1:
            result.decode_tok_s = (n - 1) / max(times[n - 1] - times[0], 1e-9)

    def _mask_eos(self, logits: np.ndarray, sampling: Sampling, result: Result) -> np.ndarray:
        if sampling.ignore_eos and self.eos_ids:
            logits = logits.copy()
            logits[list(self.eos_ids)] = -np.inf
        return logits

    @staticmethod
    def _emit(events: list[Event], result: Result) -> Iterator[Event]:
        for e in events:
            if e.kind == "thinking":
                result.thinking += e.text
            elif e.kind == "answer":
                result.answer += e.text
            yield e

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Result:
        result = Result()
        for _ in self.stream(prompt_ids, sampling, result):
            pass
        return result
