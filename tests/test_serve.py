"""`edge-export serve` against real clients on real loopback sockets: the official `openai` client,
curl, raw HTTP for disconnects, Prometheus' parser for /metrics. The reference for every answer
is the same artifact driven in-process by runtimes (a second Runtime, so nothing is shared)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

import runtimes
from edge_export.cli import main
from runtimes.server import ServeConfig, running

from .conftest import terminal_signals

KEY = "test-key-0123"
BUDGETS = {"low": 3, "medium": 8, "high": None}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def r1_reference(r1_tiny_artifact):
    return runtimes.load(r1_tiny_artifact)


@pytest.fixture(scope="module")
def r1_server(r1_tiny_artifact):
    """The R1-template artifact behind a key, a queue of 2 and a 64 KiB body limit."""
    config = ServeConfig(port=0, api_key=KEY, max_queue=2, max_body_bytes=64 << 10, reasoning_budgets=BUDGETS)
    with running(r1_tiny_artifact, config) as url:
        yield url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(url: str, **fields):
    fields = {"model": "r1tiny-int4", "messages": MESSAGES, "temperature": 0, **fields}
    return client(url).chat.completions.create(**fields)


def streamed(url: str, **fields) -> tuple[list[tuple[str, str]], object, str | None]:
    """(deltas as (field, text) in order, the usage, the finish reason) of a streamed completion."""
    deltas, usage, finish = [], None, None
    for chunk in ask(url, stream=True, stream_options={"include_usage": True}, **fields):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for name in ("reasoning_content", "content"):
                text = getattr(choice.delta, name, None)
                if text:
                    deltas.append((name, text))
    return deltas, usage, finish


def joined(deltas, name: str) -> str:
    return "".join(text for field, text in deltas if field == name)


def metrics(url: str) -> dict:
    """/metrics parsed by prometheus_client: {(sample name, labels as a tuple): value}."""
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = conn.getresponse().read().decode()
    conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ended(url: str, how: str) -> float:
    return metrics(url).get(("edge_serve_generations_total", (("ended", how),)), 0.0)


# ---- the reasoning split ------------------------------------------------------------------------
def test_reasoning_split_usage_and_stream_match_the_runtime(r1_server, r1_reference):
    expected = r1_reference.generate(MESSAGES, temperature=0, max_new_tokens=24, thinking_budget=6)
    assert expected.thinking.strip() and expected.answer.strip()  # the budget closed </think>: both parts exist
    reply = ask(r1_server, max_tokens=24, extra_body={"thinking_budget": 6})
    message = reply.choices[0].message
    assert message.content == expected.answer.strip()
    assert message.reasoning_content == expected.thinking.strip()
    for text in (message.content, message.reasoning_content):
        assert "<think>" not in text and "</think>" not in text
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (
        expected.prompt_tokens, expected.new_tokens, expected.thinking_tokens)
    assert reply.choices[0].finish_reason == "length" and usage.completion_tokens == 24

    deltas, usage, finish = streamed(r1_server, max_tokens=24, extra_body={"thinking_budget": 6})
    fields = [name for name, _ in deltas]
    assert fields == sorted(fields, key=lambda n: n == "content")  # all reasoning, then all content
    assert joined(deltas, "reasoning_content") == message.reasoning_content
    assert joined(deltas, "content") == message.content
    assert finish == "length" and usage.completion_tokens == 24


def test_template_that_opens_think_itself(tiny_llama, tmp_path):
    """The newer R1 template writes `<think>\\n` itself; the model's output then carries only
    </think>, and the split must still start in the thinking (vllm #13125)."""
    from edge_export.export import ExportOptions, export
    art = tmp_path / "llama-int4"
    export(tiny_llama, art, ExportOptions(quant="int4", max_context=256, verify=False))
    rt = runtimes.load(art)
    assert rt.tokenizer.render(MESSAGES).endswith("<think>\n")
    expected = rt.generate(MESSAGES, temperature=0, max_new_tokens=20, thinking_budget=4)
    with running(rt, ServeConfig(port=0)) as url:
        message = client(url, "unused").chat.completions.create(
            model="x", messages=MESSAGES, temperature=0, max_tokens=20, extra_body={"thinking_budget": 4}
        ).choices[0].message
    assert message.reasoning_content == expected.thinking.strip() and message.content == expected.answer.strip()
    assert expected.thinking.strip() and "</think>" not in message.reasoning_content + message.content


def test_reasoning_effort_and_thinking_budget(r1_server, r1_reference):
    low = ask(r1_server, max_tokens=24, reasoning_effort="low")
    expected = r1_reference.generate(MESSAGES, temperature=0, max_new_tokens=24, thinking_budget=BUDGETS["low"])
    assert low.usage.completion_tokens_details.reasoning_tokens == expected.thinking_tokens
    assert low.choices[0].message.content == expected.answer.strip()
    # thinking_budget wins over reasoning_effort
    both = ask(r1_server, max_tokens=24, reasoning_effort="low", extra_body={"thinking_budget": 9})
    expected = r1_reference.generate(MESSAGES, temperature=0, max_new_tokens=24, thinking_budget=9)
    assert both.usage.completion_tokens_details.reasoning_tokens == expected.thinking_tokens > BUDGETS["low"] + 3


def test_stop_strings_cut_the_answer_not_the_thinking(r1_server, r1_reference):
    full = r1_reference.generate(MESSAGES, temperature=0, max_new_tokens=30, thinking_budget=6)
    answer = full.answer.strip()
    stop = answer[4:6]
    reply = ask(r1_server, max_tokens=30, stop=[stop, "never-appears"], extra_body={"thinking_budget": 6})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.message.content
    assert choice.message.content == answer[:answer.index(stop)].strip()
    assert choice.message.reasoning_content == full.thinking.strip()
    deltas, _, finish = streamed(r1_server, max_tokens=30, stop=stop, extra_body={"thinking_budget": 6})
    assert joined(deltas, "content") == choice.message.content and finish == "stop"
    # a string only the thinking contains stops nothing
    only_thinking = next(c for c in full.thinking.strip() if c not in full.answer)
    same = ask(r1_server, max_tokens=30, stop=only_thinking, extra_body={"thinking_budget": 6})
    assert same.choices[0].message.content == answer and same.choices[0].finish_reason == "length"


def test_max_completion_tokens_and_history(r1_server, r1_reference):
    reply = ask(r1_server, max_completion_tokens=5)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    # an earlier turn's reasoning_content is accepted and dropped, as R1's template drops thinking
    history = MESSAGES + [{"role": "assistant", "content": "5", "reasoning_content": "2 and 3 make 5"},
                          {"role": "user", "content": "And 3+4?"}]
    reply = ask(r1_server, messages=history, max_tokens=3)
    dropped = [m if m["role"] != "assistant" else {"role": "assistant", "content": "5"} for m in history]
    assert reply.usage.prompt_tokens == len(r1_reference.prompt_ids(dropped))


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, named", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1.0}, "presence_penalty"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"extra_body": {"top_k": 5}}, "top_k"), ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"), ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"extra_body": {"thinking_budget": "10"}}, "thinking_budget"), ({"messages": []}, "messages"),
])
def test_unsupported_or_malformed_fields_get_400_naming_them(r1_server, fields, named):
    with pytest.raises(openai.BadRequestError) as e:
        ask(r1_server, **{"max_tokens": 2, **fields})
    assert e.value.status_code == 400 and e.value.body["param"] == named and named in e.value.message


def test_harmless_fields_are_accepted(r1_server):
    reply = ask(r1_server, max_tokens=2, n=1, logprobs=False, frequency_penalty=0, presence_penalty=0, user="u",
                response_format={"type": "text"}, seed=3)
    assert reply.usage.completion_tokens == 2


def test_context_overflow_names_the_limit(r1_server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(r1_server, messages=[{"role": "user", "content": "lighthouse " * 600}], max_tokens=2)
    assert e.value.code == "context_length_exceeded" and "the artifact's context is 512" in e.value.message


def test_key_body_limit_and_malformed_json(r1_server):
    with pytest.raises(openai.AuthenticationError):
        client(r1_server, "wrong-key").chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    status, body = raw(r1_server, "POST", "/v1/chat/completions", json.dumps({"messages": MESSAGES}), key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert raw(r1_server, "GET", "/health", key=None)[0] == 200  # health needs no key
    with pytest.raises(openai.APIStatusError) as e:
        ask(r1_server, messages=[{"role": "user", "content": "x" * (100 << 10)}], max_tokens=2)
    assert e.value.status_code == 413
    # a chunked body declares no length: it is counted as it arrives
    status, body = raw(r1_server, "POST", "/v1/chat/completions", b"[" * (100 << 10), chunked=True)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = raw(r1_server, "POST", "/v1/chat/completions", '{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(r1_server, "POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert status == 400 and body["error"]["param"] == "messages[0]" and "surrogate" in body["error"]["message"]


def raw(url: str, method: str, path: str, body=None, key: str | None = KEY, chunked: bool = False):
    """(status, JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if chunked:
        conn.request(method, path, body=iter([body]), headers=headers, encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


# ---- the queue, disconnects, time limits --------------------------------------------------------
def open_stream(url: str, max_tokens: int = 480) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    return conn, resp


def wait_for(condition, what: str, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_full_queue_429_and_disconnects_stop_generation(r1_server):
    before = metrics(r1_server)
    tokens_before = before[("edge_serve_completion_tokens_total", ())]
    running_conn, running_resp = open_stream(r1_server)
    running_resp.readline()  # the role chunk: the stream is open and generating
    waiting_conn, _ = open_stream(r1_server)
    wait_for(lambda: metrics(r1_server)[("edge_serve_queue_depth", ())] == 1, "the second request to queue")
    with pytest.raises(openai.RateLimitError) as e:
        ask(r1_server, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1 and e.value.code == "queue_full"
    cancelled = ended(r1_server, "cancelled_disconnect")
    running_conn.close()  # leaves mid-stream: its generation stops, the queued one starts
    running_resp.close()
    wait_for(lambda: ended(r1_server, "cancelled_disconnect") == cancelled + 1, "the generation to stop")
    waiting_conn.close()
    wait_for(lambda: ended(r1_server, "cancelled_disconnect") == cancelled + 2, "the second to stop")
    after = metrics(r1_server)
    assert after[("edge_serve_generations_active", ())] == 0 and after[("edge_serve_queue_depth", ())] == 0
    assert after[("edge_serve_completion_tokens_total", ())] - tokens_before < 2 * 480  # neither ran to the end
    assert after[("edge_serve_requests_total", (("status", "429"),))] >= 1
    assert ask(r1_server, max_tokens=3).usage.completion_tokens == 3  # the next request is served


def test_non_streamed_client_that_leaves_is_cancelled(r1_server):
    cancelled = ended(r1_server, "cancelled_disconnect")
    conn = http.client.HTTPConnection(urlsplit(r1_server).hostname, urlsplit(r1_server).port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MESSAGES, "max_tokens": 480}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    time.sleep(0.3)
    conn.close()
    wait_for(lambda: ended(r1_server, "cancelled_disconnect") == cancelled + 1, "the generation to stop")
    assert ask(r1_server, max_tokens=2).usage.completion_tokens == 2


def test_time_limit_504_and_stream_error_event(r1_reference):
    with running(r1_reference, ServeConfig(port=0, request_timeout_s=0.05)) as url:  # 480 tokens take longer
        with pytest.raises(openai.APIStatusError) as e:
            client(url, "unused").chat.completions.create(model="m", messages=MESSAGES, max_tokens=480)
        assert e.value.status_code == 504 and e.value.code == "request_timeout"
        out = subprocess.run(["curl", "-sN", "--max-time", "60", url + "/v1/chat/completions", "-H",
                              "Content-Type: application/json", "-d",
                              json.dumps({"messages": MESSAGES, "max_tokens": 480, "stream": True})],
                             capture_output=True, text=True, timeout=90)
        events = [e for e in out.stdout.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"


# ---- wire format --------------------------------------------------------------------------------
def test_curl_sees_sse_framing(r1_server):
    body = json.dumps({"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "thinking_budget": 4})
    out = subprocess.run(["curl", "-sN", "-D", "-", "--max-time", "60", r1_server + "/v1/chat/completions",
                          "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, timeout=90)
    head, _, stream = out.stdout.decode().partition("\r\n\r\n")
    assert "content-type: text/event-stream" in head.lower()
    assert stream.endswith("data: [DONE]\n\n")
    events = stream.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_models_openapi_and_metrics_format(r1_server):
    models = client(r1_server).models.list()
    assert [m.id for m in models.data] == ["r1tiny-int4"]
    status, schema = raw(r1_server, "GET", "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in schema["paths"]
    values = metrics(r1_server)
    names = {name for name, _ in values}
    assert {"edge_serve_requests_total", "edge_serve_prompt_tokens_total", "edge_serve_completion_tokens_total",
            "edge_serve_queue_depth", "edge_serve_ttft_seconds_bucket", "edge_serve_decode_tokens_per_second_count",
            "edge_serve_generations_total"} <= names
    assert values[("edge_serve_requests_total", (("status", "200"),))] >= 5
    assert values[("edge_serve_ttft_seconds_count", ())] == values[("edge_serve_ttft_seconds_bucket", (("le", "+Inf"),))]


# ---- SmolLM2: a real model without thinking -----------------------------------------------------
def test_smollm2_answers_like_the_runtime(smollm2_int4_artifact):
    rt = runtimes.load(smollm2_int4_artifact)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = rt.generate(question, temperature=0, max_new_tokens=10)
    with running(smollm2_int4_artifact, ServeConfig(port=0)) as url:
        smol = client(url, "unused")
        reply = smol.chat.completions.create(model="smollm2-int4", messages=question, temperature=0, max_tokens=10)
        chunks = list(smol.chat.completions.create(model="smollm2-int4", messages=question, temperature=0,
                                                   max_tokens=10, stream=True))
        stop = expected.answer.split()[2]
        cut = smol.chat.completions.create(model="smollm2-int4", messages=question, temperature=0, max_tokens=10,
                                           stop=stop)
    message = reply.choices[0].message
    assert message.content == expected.answer.strip() and message.reasoning_content is None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert cut.choices[0].message.content == expected.answer[:expected.answer.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


# ---- the OpenAPI document, fuzzed ---------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_schema(r1_server):
    return schemathesis.openapi.from_url(r1_server + "/openapi.json")


FUZZ = schemathesis.pytest.from_fixture("fuzz_schema")
FUZZ_EXAMPLES = int(os.environ.get("EDGE_SERVE_FUZZ_EXAMPLES", "40"))  # per operation; raise it for a longer hunt
FUZZ_TOKENS = 4  # generations are cut to this many tokens so the fuzzing stays quick; every other field is as drawn


@FUZZ.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_fuzzed_never_5xx(case):
    body = case.body
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            if type(body.get(name)) is int and body[name] > FUZZ_TOKENS:
                body[name] = FUZZ_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = FUZZ_TOKENS
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"message", "type"}


# ---- the command line ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_and_bench_over_http(r1_tiny_artifact, tmp_path):
    """`edge-export serve` in its own process, timed by `bench --device http://...` (the tokenizer
    from the artifact, then from the checkpoint), then stopped by Ctrl-C."""
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(root))
    server = subprocess.Popen([sys.executable, "-m", "edge_export.cli", "serve", str(r1_tiny_artifact), "--port",
                               str(port), "--model-name", "tiny-r1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, preexec_fn=terminal_signals)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: server.poll() is None and _healthy(url), "the server to start", 60)
        args = ["bench", str(r1_tiny_artifact), "--device", url + "/v1", "--prompt-tokens", "32", "--new-tokens", "8",
                "--runs", "2", "--warmup", "1", "--json"]
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 0, out.output
        result = json.loads(out.output)
        assert result["measured"] and result["model"] == "tiny-r1" and result["device"] == url + "/v1"
        assert result["ttft_ms"] > 0 and result["decode_tok_s"] > 0 and result["completion_tokens"] == 8
        assert result["prompt_tokens"] == 32 and result["server_prompt_tokens"] > 32  # the template's tokens too
        assert "peak_rss_mb" not in result and "model_bytes" not in result  # a server cannot tell them
        checkpoint = r1_tiny_artifact.parent / "checkpoint"
        again = json.loads(CliRunner().invoke(main, args[:1] + [str(checkpoint)] + args[2:]).output)
        assert again["prompt_sha1"] == result["prompt_sha1"]  # the same prompt ids from the checkpoint's tokenizer
        refused = CliRunner().invoke(main, ["bench", str(r1_tiny_artifact), "--device", "http://127.0.0.1:1/v1"])
        assert refused.exit_code == 2 and "cannot reach the server" in refused.output
    finally:
        server.send_signal(signal.SIGINT)
        log, _ = server.communicate(timeout=60)
    assert server.returncode == 0, log
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log


def _healthy(url: str) -> bool:
    try:
        return raw(url, "GET", "/health", key=None)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "error: --host 0.0.0.0 is reachable from other machines and no API key is set"),
    (["--reasoning-budget", "extreme=5"], "error: --reasoning-budget 'extreme=5': write LEVEL=TOKENS"),
    (["--reasoning-budget", "low=many"], "error: --reasoning-budget 'low=many': TOKENS must be a whole number"),
    (["--max-queue", "0"], "error: --max-queue must be at least 1"),
])
def test_serve_refuses_unsafe_or_bad_options(args, message, monkeypatch):
    monkeypatch.delenv("EDGE_EXPORT_API_KEY", raising=False)
    out = CliRunner().invoke(main, ["serve", "any-artifact", *args])
    assert out.exit_code == 2 and out.output.startswith(message), out.output
