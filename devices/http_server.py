"""`--device http://HOST:PORT[/v1]`: any OpenAI-compatible server, timed by the shared protocol.

The protocol's prompt ids (protocol.py) are built with the model's own tokenizer (the bench
argument: the artifact the server runs, or its checkpoint), decoded to text and sent as one user
message: greedy, streamed, ``max_tokens`` = new_tokens. TTFT is from sending the request to the
first content or reasoning delta; decode_tok_s = (completion tokens - 1) / (time of the last delta
- time of the first). The server counts its prompt (the chat template adds to it) and its
completion tokens (it may stop at end-of-sequence before new_tokens): both are recorded as
``server_prompt_tokens`` and ``completion_tokens``. What a server cannot tell (its peak RSS, its
model's bytes) is absent, never made up. Only the standard library speaks HTTP here.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import statistics
import time
from urllib.parse import urlsplit

from runtimes.errors import EdgeError

from .protocol import BENCH_OPTIONS, RESULT_FORMAT, bench_option, ids_digest, percentile, prompt_ids
from .registry import Device, register_device

API_KEY_ENV = "EDGE_EXPORT_API_KEY"


class ServerBenchError(EdgeError):
    """An OpenAI-compatible server could not be benchmarked (unreachable, refused, malformed stream).
    ``status`` is the HTTP status when the server answered with an error, else 0."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@register_device("http")
class HttpDevice(Device):
    """An OpenAI-compatible server: edge-export serve, llama.cpp's server, vLLM, Ollama, ..."""

    scheme = "http"

    def bench(self, artifact: str, options: dict) -> dict:
        url = f"{self.scheme}://{self.target}"
        tokenizer = options.get("tokenizer") or artifact_tokenizer(artifact)
        result = bench_server(url, tokenizer, model=options.get("model"),
                              **{name: bench_option(options, name)
                                 for name in ("prompt_tokens", "new_tokens", "runs", "warmup", "timeout")})
        result["device"] = url
        return result


@register_device("https")
class HttpsDevice(HttpDevice):
    scheme = "https"


def artifact_tokenizer(artifact: str):
    """The tokenizer of an artifact folder (files not hashed: only its tokenizer is read)."""
    from runtimes.artifact import read_manifest
    from runtimes.tokenizer import ChatTokenizer
    found = read_manifest(artifact)
    tok = found.manifest["tokenizer"]
    return ChatTokenizer.from_files(found.file(tok["file"]), found.file(tok["config"]) if tok.get("config") else None)


class Endpoint:
    """One server's base URL (``.../v1`` added where missing) and how to reach it."""

    def __init__(self, url: str, timeout: float, api_key: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerBenchError(f"--device {url}: write http://HOST:PORT[/v1]")
        self.url, self.https, self.host, self.port = url, parts.scheme == "https", parts.hostname, parts.port
        path = parts.path.rstrip("/")
        self.prefix = path if path.endswith("/v1") else path + "/v1"
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)

    def connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def get_json(self, path: str) -> dict:
        conn = self.connect()
        try:
            conn.request("GET", self.prefix + path, headers=self.headers())
            resp = conn.getresponse()
            body = resp.read()
        except OSError as e:
            raise ServerBenchError(f"{self.url}: cannot reach the server ({e})") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise ServerBenchError(f"{self.url}{path}: HTTP {resp.status}: {_error_text(body)}")
        return json.loads(body)


def bench_server(url: str, tokenizer, model: str | None = None, prompt_tokens: int = BENCH_OPTIONS["prompt_tokens"].default,
                 new_tokens: int = BENCH_OPTIONS["new_tokens"].default, runs: int = BENCH_OPTIONS["runs"].default,
                 warmup: int = BENCH_OPTIONS["warmup"].default, timeout: float = BENCH_OPTIONS["timeout"].default,
                 api_key: str | None = None) -> dict:
    """Time the server at ``url`` by the protocol; returns the result dict (device left to the caller)."""
    endpoint = Endpoint(url, timeout, api_key)
    model = model or _first_model(endpoint)
    ids = prompt_ids(lambda text: tokenizer.encode(text, add_bos=False), prompt_tokens)
    body = {"model": model, "messages": [{"role": "user", "content": tokenizer.decode(ids)}],
            "max_tokens": new_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    for _ in range(warmup):
        timed_stream(endpoint, body)
    timings = [timed_stream(endpoint, body) for _ in range(runs)]
    return summarize(timings, model, url, ids, prompt_tokens, new_tokens, warmup)


def summarize(timings: list[dict], model: str, url: str, ids, prompt_tokens: int, new_tokens: int,
              warmup: int) -> dict:
    ttft = [t["ttft_s"] * 1000.0 for t in timings]
    decode = [t["decode_tok_s"] for t in timings if t["decode_tok_s"]]
    server_prompt = [t["prompt_tokens"] for t in timings if t["prompt_tokens"] is not None]
    out = {"format": RESULT_FORMAT, "measured": True, "model": model, "device_info": {"url": url, "model": model},
           "ttft_ms": round(statistics.median(ttft), 2), "ttft_ms_p90": round(percentile(ttft, 0.9), 2),
           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": len(timings), "warmup": warmup,
           "completion_tokens": int(statistics.median(t["completion_tokens"] for t in timings)),
           "completion_tokens_from": timings[-1]["completion_tokens_from"],
           "prompt_sha1": ids_digest(ids), "output_text_sha1": hashlib.sha1(timings[-1]["text"].encode()).hexdigest()[:12]}
    if decode:
        out["decode_tok_s"] = round(statistics.median(decode), 2)
        out["decode_tok_s_p10"] = round(percentile(decode, 0.1), 2)
    if server_prompt:
        out["server_prompt_tokens"] = int(statistics.median(server_prompt))
        out["prefill_tok_s"] = round(statistics.median(
            p / t["ttft_s"] for p, t in zip(server_prompt, timings)), 1)
    return out


def timed_stream(endpoint: Endpoint, body: dict) -> dict:
    """One streamed request: seconds to the first and last text delta, the text, and the usage counts."""
    conn = endpoint.connect()
    try:
        t0 = time.perf_counter()
        conn.request("POST", endpoint.prefix + "/chat/completions", body=json.dumps(body), headers=endpoint.headers())
        resp = conn.getresponse()
        if resp.status != 200:
            raise ServerBenchError(f"{endpoint.url}: HTTP {resp.status}: {_error_text(resp.read())}", resp.status)
        return read_events(resp, t0, endpoint.url)
    except OSError as e:
        raise ServerBenchError(f"{endpoint.url}: the stream broke off ({e})") from None
    finally:
        conn.close()


def read_events(resp, t0: float, url: str) -> dict:
    """A chat-completions event stream -> seconds to the first and last text delta (from t0), the
    completion and prompt tokens (the usage chunk where the server sends one), and the text."""
    times, pieces, usage = [], [], None
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("error"):
            raise ServerBenchError(f"{url}: the server ended the stream with an error: {chunk['error']}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
            if text:
                times.append(time.perf_counter() - t0)
                pieces.append(text)
    if not times:
        raise ServerBenchError(f"{url}: the stream carried no text")
    counted = usage is not None and usage.get("completion_tokens") is not None
    completion = usage["completion_tokens"] if counted else len(times)
    span = times[-1] - times[0]
    return {"ttft_s": times[0], "decode_tok_s": (completion - 1) / span if completion > 1 and span > 0 else None,
            "completion_tokens": completion, "completion_tokens_from": "usage" if counted else "deltas",
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "text": "".join(pieces)}


def _first_model(endpoint: Endpoint) -> str:
    data = endpoint.get_json("/models").get("data") or []
    if not data:
        raise ServerBenchError(f"{endpoint.url}: /models lists no model; pass --model NAME")
    return data[0]["id"]


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")
