"""`edge-export serve` on SmolLM2-135M int4: the HTTP layer's cost, llama.cpp's server beside it, and load.

    python benchmarks/serve_load.py [--artifact DIR] [--rounds 8] [--out benchmarks/results/serve_load.json]

1. overhead: the same artifact driven in-process (runtimes, in this process) and over HTTP
   (`edge-export serve`, a process of its own), alternating A B / B A each round: the same
   messages (the protocol's 128 prompt ids decoded to one user message), greedy, 128 tokens at
   most, so both generate the same tokens. TTFT from the call (in-process) or from sending the
   request (HTTP) to the first text; decode = (tokens - 1) / (last text - first text).
2. peers: edge-export serve against llama.cpp's server (`python -m llama_cpp.server`, the same
   Q4_1 GGUF whose blocks the artifact carries), alternating, 2 threads each, greedy, 64 tokens
   at most. Each round's prompt starts differently, since llama.cpp's server reuses the KV of
   the prefix a request shares with the one before.
3. load: 8 concurrent streaming clients x 50 requests (max_tokens 64), one more client process
   killed mid-stream meanwhile; then 1,000 sequential requests (max_tokens 16), the server's RSS
   read at request 100 and 1,000; then 8 clients x 5 requests against --max-queue 4, counting
   the 429s (a refused client moves on; it does not retry).

Writes the JSON and a Markdown table beside it (the README quotes the table). The machine is
shared: figures are medians, and comparisons are ratios within one run. llama.cpp's server needs
llama-cpp-python's `server` extra; where llama-cpp-python is already built, its pure-Python part
suffices: `pip install sse-starlette starlette-context pydantic-settings`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from devices.host import host_info  # noqa: E402
from devices.http_server import Endpoint, ServerBenchError, timed_stream  # noqa: E402
from devices.protocol import PARAGRAPH, percentile, prompt_ids  # noqa: E402

THREADS = 2
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


# ---- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free loopback port, stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd + ["--port", str(self.port)], env=ENV, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not start; see {log}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return get(self.url, "/v1/models")[0] == 200
        except OSError:
            return False

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(2)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def ours(artifact: Path, log: Path, max_queue: int = 16) -> Server:
    return Server([sys.executable, "-m", "edge_export.cli", "serve", str(artifact), "--threads", str(THREADS),
                   "--max-queue", str(max_queue), "--model-name", "smollm2-int4"], log)


def llama_cpp(gguf: Path, log: Path) -> Server:
    return Server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
                   "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", "2048"], log)


def get(url: str, path: str) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def metric(url: str, name: str) -> float:
    """One sample of our server's /metrics (0 when absent)."""
    for line in get(url, "/metrics")[1].splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- one request --------------------------------------------------------------------------------
def chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed, greedy request: {status, ttft_s, decode_tok_s, completion_tokens, text} or {status, error}."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        return {"status": 200, **timed_stream(Endpoint(url, timeout=600, api_key=""), body)}
    except ServerBenchError as e:  # a refusal (429, ...) or a broken stream: counted as this request's error
        return {"status": e.status, "error": str(e)}
    except Exception as e:  # noqa: BLE001 -- counted as this request's error
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}


def in_process(rt, messages: list[dict], max_tokens: int) -> dict:
    """The same request through the runtime in this process, timed the same way."""
    import runtimes
    result, times, text = runtimes.Result(), [], []
    t0 = time.perf_counter()
    for event in rt.stream(messages, result=result, temperature=0, max_new_tokens=max_tokens):
        if event.kind != "tag" and event.text:
            times.append(time.perf_counter() - t0)
            text.append(event.text)
    n, span = result.new_tokens, times[-1] - times[0]
    return {"status": 200, "ttft_s": times[0], "decode_tok_s": (n - 1) / span if n > 1 and span > 0 else None,
            "completion_tokens": n, "text": "".join(text)}


def summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == 200]
    decode = [r["decode_tok_s"] for r in ok if r.get("decode_tok_s")]
    return {"runs": len(ok), "ttft_ms": round(statistics.median(r["ttft_s"] for r in ok) * 1000, 2),
            "decode_tok_s": round(statistics.median(decode), 1) if decode else None,
            "completion_tokens": int(statistics.median(r["completion_tokens"] for r in ok))}


# ---- 1. HTTP against in-process; 2. against llama.cpp's server ----------------------------------
def alternate(entries: dict, rounds: int, messages_for, max_tokens: int) -> dict:
    """Each round runs every entry once, the order rotated; one warm-up each first."""
    names = list(entries)
    for name in names:
        entries[name](messages_for(-1), max_tokens)
    runs = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            runs[name].append(entries[name](messages_for(i), max_tokens))
    out = {name: summary(r) for name, r in runs.items()}
    a, b = names
    ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs[a], runs[b])
              if x.get("decode_tok_s") and y.get("decode_tok_s")]
    out["decode_ratio_median"] = round(statistics.median(ratios), 3)
    out["same_text"] = all(x.get("text") == y.get("text") for x, y in zip(runs[a], runs[b]))
    return out


def overhead(artifact: Path, work: Path, rounds: int) -> dict:
    import runtimes
    rt = runtimes.load(artifact, threads=THREADS)
    text = rt.tokenizer.decode(prompt_ids(lambda t: rt.tokenizer.encode(t, add_bos=False), 128))
    messages = [{"role": "user", "content": text}]
    with ours(artifact, work / "serve_overhead.log") as server:
        out = alternate({"in-process": lambda m, n: in_process(rt, m, n), "http": lambda m, n: chat(server.url, m, n)},
                        rounds, lambda i: messages, 128)
    out["http_decode_cost"] = round(1 - out["http"]["decode_tok_s"] / out["in-process"]["decode_tok_s"], 4)
    return out


def peers(artifact: Path, gguf: Path, work: Path, rounds: int) -> dict:
    def messages(i):
        return [{"role": "user", "content": f"Request {i + 2}. Continue the story. {PARAGRAPH}"}]
    with ours(artifact, work / "serve_peers.log") as mine, llama_cpp(gguf, work / "llama_cpp_server.log") as theirs:
        return alternate({"edge-export serve": lambda m, n: chat(mine.url, m, n),
                          "llama.cpp server": lambda m, n: chat(theirs.url, m, n)}, rounds, messages, 64)


# ---- 3. load ------------------------------------------------------------------------------------
KILLED_CLIENT = """
import http.client, json, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=600)
body = {"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}], "max_tokens": 512,
        "stream": True}
conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
resp = conn.getresponse()
for line in resp:
    if b'"content":"' in line and b'"content":""' not in line:
        print("generating", flush=True)
        time.sleep(600)
"""


def clients(url: str, n_clients: int, per_client: int, max_tokens: int, during=None) -> list[dict]:
    """``n_clients`` threads, each sending ``per_client`` streamed requests one after another."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        for k in range(per_client):
            r = chat(url, [{"role": "user", "content": f"Client {c}, question {k}: what keeps a lighthouse lit?"}],
                     max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join()
    return results


def kill_mid_stream(server: Server) -> dict:
    """A client process that is killed (SIGKILL) once its answer is streaming."""
    before = metric(server.url, 'edge_serve_generations_total{ended="cancelled_disconnect"}')
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(server.port)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    return {"client_saw": line, "cancelled_before": before}


def load(artifact: Path, work: Path, per_client: int = 50, sequential: int = 1000) -> dict:
    out = {}
    with ours(artifact, work / "serve_load.log") as server:
        killed = {}
        results = clients(server.url, 8, per_client, 64, during=lambda: killed.update(kill_mid_stream(server)))
        ok = [r for r in results if r["status"] == 200]
        ttft = [r["ttft_s"] * 1000 for r in ok]
        cancelled = metric(server.url, 'edge_serve_generations_total{ended="cancelled_disconnect"}')
        out["concurrent"] = {
            "clients": 8, "requests_each": per_client, "max_tokens": 64, "sent": len(results), "completed": len(ok),
            "errors": len(results) - len(ok), "error_samples": [r.get("error") for r in results if r["status"] != 200][:3],
            "ttft_ms_p50": round(percentile(ttft, 0.5), 1), "ttft_ms_p99": round(percentile(ttft, 0.99), 1),
            "killed_client": {"saw": killed.get("client_saw"),
                              "generations_cancelled": cancelled - killed.get("cancelled_before", 0)}}
        rss, seq, early = {}, [], sequential // 10
        for i in range(1, sequential + 1):
            seq.append(chat(server.url, [{"role": "user", "content": f"Question {i}: name a colour."}], 16))
            if i in (1, early, sequential):
                rss[i] = round(server.rss_mb(), 1)
        ok = [r for r in seq if r["status"] == 200]
        out["sequential"] = {"requests": sequential, "max_tokens": 16, "completed": len(ok),
                             "errors": sequential - len(ok), "rss_mb": rss, "rss_at": [early, sequential],
                             "rss_change": round(rss[sequential] / rss[early] - 1, 4),
                             "ttft_ms_p50": round(percentile([r["ttft_s"] * 1000 for r in ok], 0.5), 1)}
    with ours(artifact, work / "serve_queue4.log", max_queue=4) as server:
        results = clients(server.url, 8, 5, 64)
        out["small_queue"] = {"max_queue": 4, "clients": 8, "requests_each": 5, "sent": len(results),
                              "completed": sum(r["status"] == 200 for r in results),
                              "rejected_429": sum(r["status"] == 429 for r in results),
                              "other_errors": sum(r["status"] not in (200, 429) for r in results)}
    return out


# ---- the table ----------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    o, p = data["overhead"], data["peers"]
    rows = [("in-process (runtimes)", o["in-process"], ""),
            ("over HTTP (edge-export serve)", o["http"], f"http ÷ in-process {1 / o['decode_ratio_median']:.3f}"),
            ("edge-export serve", p["edge-export serve"], f"edge-export ÷ llama.cpp {p['decode_ratio_median']:.3f}"),
            ("llama.cpp server (llama-cpp-python)", p["llama.cpp server"], "")]
    lines = ["| SmolLM2-135M int4, 2 threads, greedy, streamed | rounds | TTFT ms | decode tok/s | tokens | "
             "decode ratio (median over rounds) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {s['runs']} | {s['ttft_ms']} | {s['decode_tok_s']} | {s['completion_tokens']} | {ratio} |"
              for name, s, ratio in rows]
    if "load" not in data:
        return "\n".join(lines) + "\n"
    c = data["load"]
    cc, sq, sm = c["concurrent"], c["sequential"], c["small_queue"]
    early, last = sq["rss_at"]
    header = ("load on edge-export serve (an earlier run, machine under other load)"
              if c.get("measured_in_an_earlier_run") else "load on edge-export serve")
    lines += ["", f"| {header} | completed | errors | TTFT p50 / p99 ms | also |",
              "| --- | --- | --- | --- | --- |",
              f"| {cc['clients']} streaming clients x {cc['requests_each']} requests, max_tokens {cc['max_tokens']} | "
              f"{cc['completed']}/{cc['sent']} | {cc['errors']} | {cc['ttft_ms_p50']} / {cc['ttft_ms_p99']} | "
              f"a client process killed mid-stream: {cc['killed_client']['generations_cancelled']:g} generation "
              "cancelled, the others served |",
              f"| {sq['requests']:,} sequential requests, max_tokens {sq['max_tokens']} | {sq['completed']}/{sq['requests']} | "
              f"{sq['errors']} | {sq['ttft_ms_p50']} / - | server RSS {_at(sq['rss_mb'], early)} MB at request {early:,}, "
              f"{_at(sq['rss_mb'], last)} MB at {last:,} ({sq['rss_change'] * 100:+.1f}%) |",
              f"| {sm['clients']} clients x {sm['requests_each']} requests, --max-queue {sm['max_queue']} | "
              f"{sm['completed']}/{sm['sent']} | {sm['other_errors']} | - | {sm['rejected_429']} refused with 429 "
              "(not retried) |"]
    return "\n".join(lines) + "\n"


def export_artifact(work: Path) -> Path:
    out = work / "smollm2-int4"
    subprocess.run([sys.executable, "-m", "edge_export.cli", "export", "smollm2-135m", "-o", str(out), "--quant", "int4",
                    "--no-verify"], check=True, env=ENV, cwd=ROOT)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, help="a SmolLM2 int4 artifact (default: exported here, --no-verify)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.json")
    ap.add_argument("--skip-load", action="store_true", help="only the comparisons")
    ap.add_argument("--requests-each", type=int, default=50, help="per concurrent client")
    ap.add_argument("--sequential", type=int, default=1000)
    args = ap.parse_args()
    from edge_export.checkpoint.gguf_reader import smollm2_gguf_path
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        artifact = args.artifact or export_artifact(work)
        manifest = json.loads((artifact / "edge_manifest.json").read_text())
        data = {"machine": host_info(), "threads": THREADS, "rounds": args.rounds,
                "artifact": {"name": artifact.name, "quantization": {k: manifest["quantization"].get(k)
                                                                     for k in ("quant", "method", "group_size")},
                             "max_context": manifest.get("max_context"), "verified": "verification" in manifest},
                "overhead": overhead(artifact, work, args.rounds),
                "peers": peers(artifact, smollm2_gguf_path(), work, args.rounds)}
        if args.skip_load and args.out.is_file() and "load" in json.loads(args.out.read_text()):
            # keep the load phase of the run that measured it, marked as such
            earlier = json.loads(args.out.read_text())
            data["load"] = dict(earlier["load"], measured_in_an_earlier_run=earlier.get("machine"))
        write(data, args.out)  # the comparisons stand on their own if the load phase is cut short
        if not args.skip_load:
            data["load"] = load(artifact, work, args.requests_each, args.sequential)
            write(data, args.out)
    print(json.dumps(data, indent=2))


def _at(by_request: dict, request: int):
    """A per-request figure, keyed by int in a fresh run and by str once read back from JSON."""
    return by_request[request] if request in by_request else by_request[str(request)]


def write(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(data))


if __name__ == "__main__":
    main()
