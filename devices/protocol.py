"""The benchmark protocol, identical for edge-export and the peers (../shared/peers/README.md).

- prompt: PARAGRAPH tokenized with the model's own tokenizer (no special tokens, no chat
  template), repeated and cut to exactly ``prompt_tokens`` ids;
- ``new_tokens`` new ids, greedy, end-of-sequence suppressed until then;
- ``warmup`` runs, then ``runs`` measured runs; each figure is the median (and p90) over them;
- ``ttft_ms``: from the start of generation (ids ready) to the first new id;
  ``prefill_tok_s`` = prompt_tokens / ttft; ``decode_tok_s`` = (new_tokens - 1) / (time of the last
  new id - time of the first);
- ``peak_rss_mb``: the benchmarking process's peak resident memory (load and all runs);
  ``model_bytes``: the artifact's files.
"""
from __future__ import annotations

import hashlib
import resource
import statistics
from dataclasses import dataclass

RESULT_FORMAT = "edge-export-bench/1"


@dataclass(frozen=True)
class BenchOption:
    """One option of the protocol, declared once for the CLI, the runner, every device and the
    estimator: its default, its least value and what that means, and its help line."""

    default: int
    least: int
    words: str
    help: str


BENCH_OPTIONS = {
    "prompt_tokens": BenchOption(128, 1, "at least 1 token", "Tokens of prompt (the paragraph, repeated)."),
    "new_tokens": BenchOption(128, 1, "at least 1 token", "New tokens, greedy, end-of-sequence suppressed."),
    "runs": BenchOption(5, 1, "at least 1 (the figures are medians over the runs)", "Measured runs."),
    "warmup": BenchOption(1, 0, "0 or more", "Runs before the measured ones."),
    "threads": BenchOption(2, 1, "at least 1", "Intra-op threads."),
    "long_context": BenchOption(0, 0, "0 (off) or more tokens", "Also time decode after this many tokens of context."),
    "timeout": BenchOption(3600, 1, "at least 1 second", "Seconds the benchmark may run on the device."),
}
# The options `python -m devices.runner` takes (the rest belong to where it runs).
RUNNER_OPTIONS = ("threads", "prompt_tokens", "new_tokens", "runs", "warmup", "long_context")


def bench_option(options: dict, name: str) -> int:
    """``options[name]``, or the protocol's default where it is unset (None)."""
    value = options.get(name)
    return BENCH_OPTIONS[name].default if value is None else value
PARAGRAPH = (
    "The lighthouse stood at the edge of the northern cliffs for more than two hundred years. "
    "Every evening the keeper climbed the narrow stairs, trimmed the wick, polished the great "
    "glass lens and watched the beam sweep across the dark water. Fishermen returning late from "
    "the banks knew that as long as the light was turning they were close to home, and many of "
    "them said that the steady flash had saved their lives during the winter storms. When the "
    "old keeper finally retired, the village gathered on the headland to thank him, and the "
    "children asked him to tell once more the story of the night the ship without a name ran "
    "aground on the rocks below."
)


def prompt_ids(encode, n_tokens: int) -> list[int]:
    """The protocol's prompt: the paragraph's ids repeated and cut to ``n_tokens``."""
    base = [int(t) for t in encode(PARAGRAPH)]
    ids = []
    while len(ids) < n_tokens:
        ids.extend(base)
    return ids[:n_tokens]


def ids_digest(ids) -> str:
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:12]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB. VmHWM belongs to the address space, so unlike
    ru_maxrss it does not inherit the parent's peak when a large process spawns the benchmark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a few measurements."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_protocol(runtime, prompt_tokens: int = BENCH_OPTIONS["prompt_tokens"].default,
                 new_tokens: int = BENCH_OPTIONS["new_tokens"].default, runs: int = BENCH_OPTIONS["runs"].default,
                 warmup: int = BENCH_OPTIONS["warmup"].default, long_context: int = 0) -> dict:
    """Time ``runtime`` (a runtimes.Runtime) by the protocol; returns the result dict (no device info)."""
    from runtimes import Sampling
    ids = prompt_ids(lambda text: runtime.tokenizer.encode(text, add_bos=False), prompt_tokens)
    sampling = Sampling(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    for _ in range(warmup):
        runtime.generator.generate(ids, sampling)
    results = [runtime.generator.generate(ids, sampling) for _ in range(runs)]
    ttft = [r.ttft_ms for r in results]
    decode = [r.decode_tok_s for r in results]
    out = {
        "format": RESULT_FORMAT, "measured": True,
        "ttft_ms": round(statistics.median(ttft), 2), "ttft_ms_p90": round(percentile(ttft, 0.9), 2),
        "prefill_tok_s": round(statistics.median(prompt_tokens / (t / 1000.0) for t in ttft), 1),
        "decode_tok_s": round(statistics.median(decode), 2), "decode_tok_s_p10": round(percentile(decode, 0.1), 2),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
        "prompt_sha1": ids_digest(ids), "output_sha1": ids_digest(results[-1].tokens),
    }
    if long_context:
        out.update(long_context_decode(runtime, long_context, sampling))
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def long_context_decode(runtime, context: int, sampling) -> dict:
    """Decode rate after ``context`` tokens of prompt (where reasoning traces spend their time)."""
    from dataclasses import replace
    context = min(context, runtime.max_context - sampling.max_new_tokens - 1)
    ids = prompt_ids(lambda text: runtime.tokenizer.encode(text, add_bos=False), context)
    r = runtime.generator.generate(ids, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, 64)))
    return {"long_context_tokens": context, "long_context_decode_tok_s": round(r.decode_tok_s, 2),
            "long_context_ttft_ms": round(r.ttft_ms, 1)}
