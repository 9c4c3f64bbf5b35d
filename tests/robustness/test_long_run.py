"""A generation of thousands of tokens up to the context limit keeps memory flat (the KV buffer is
allocated once) and stops cleanly at the limit."""
import runtimes
from edge_export.export import ExportOptions, export


def vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))


def test_generation_to_the_context_limit(tiny_llama, tmp_path):
    art = tmp_path / "art"
    export(tiny_llama, art, ExportOptions(quant="int4", verify=False, max_context=3000))
    rt = runtimes.load(art)
    rt.generate("warm up", max_new_tokens=300, temperature=0, ignore_eos=True)
    before = vm_rss_mb()
    result = rt.generate("hello", max_new_tokens=10_000, temperature=0.8, seed=0, ignore_eos=True)
    grown = vm_rss_mb() - before
    assert result.finish_reason == "context"
    assert result.prompt_tokens + result.new_tokens == 3001  # every cache slot used, then a clean stop
    assert grown < 32, f"resident memory grew {grown:.1f} MB over {result.new_tokens} tokens"
