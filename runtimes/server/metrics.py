"""GET /metrics in Prometheus' text exposition format (version 0.0.4), written by hand: a few
counters, two gauges read at scrape time, and two histograms. Updated from the request handlers
and from the generation thread, so every update holds one lock."""
from __future__ import annotations

import threading
from collections import defaultdict

PREFIX = "edge_serve"
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DECODE_BUCKETS_TOK_S = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.sum)}",
                      f"{name}_count {self.count}"]


class Metrics:
    """The server's counters. ``queue_depth`` and ``active`` are callables read at each scrape."""

    def __init__(self, queue_depth=lambda: 0, active=lambda: 0):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = defaultdict(int)        # by HTTP status
        self.generations: dict[str, int] = defaultdict(int)     # by how they ended
        self.prompt_tokens = self.completion_tokens = self.reasoning_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.decode = Histogram(DECODE_BUCKETS_TOK_S)
        self.queue_depth, self.active = queue_depth, active

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[str(status)] += 1

    def generation(self, ended: str, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int,
                   ttft_s: float | None, decode_tok_s: float | None) -> None:
        """One finished generation: how it ended (stop, length, cancelled_disconnect, ...), its tokens,
        its time to first token (seconds) and decode rate (tokens/s), where it had them."""
        with self.lock:
            self.generations[ended] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.reasoning_tokens += reasoning_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if decode_tok_s:
                self.decode.observe(decode_tok_s)

    def render(self) -> str:
        with self.lock:
            lines = _family("requests_total", "counter", "HTTP requests answered, by status code",
                            [f'{PREFIX}_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())])
            lines += _family("generations_total", "counter", "generations finished, by how they ended",
                             [f'{PREFIX}_generations_total{{ended="{e}"}} {n}'
                              for e, n in sorted(self.generations.items())])
            for name, value, about in (("prompt_tokens_total", self.prompt_tokens, "prompt tokens prefilled"),
                                       ("completion_tokens_total", self.completion_tokens,
                                        "tokens generated, thinking included"),
                                       ("reasoning_tokens_total", self.reasoning_tokens, "thinking tokens generated")):
                lines += _family(name, "counter", about, [f"{PREFIX}_{name} {value}"])
            lines += _family("queue_depth", "gauge", "requests admitted and waiting for the model",
                             [f"{PREFIX}_queue_depth {self.queue_depth()}"])
            lines += _family("generations_active", "gauge", "generations running now (0 or 1)",
                             [f"{PREFIX}_generations_active {self.active()}"])
            lines += _family("ttft_seconds", "histogram", "time from arrival to the first token",
                             self.ttft.lines(f"{PREFIX}_ttft_seconds"))
            lines += _family("decode_tokens_per_second", "histogram", "decode rate of each generation",
                             self.decode.lines(f"{PREFIX}_decode_tokens_per_second"))
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, about: str, samples: list[str]) -> list[str]:
    return [f"# HELP {PREFIX}_{name} {about}", f"# TYPE {PREFIX}_{name} {kind}", *samples]


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
