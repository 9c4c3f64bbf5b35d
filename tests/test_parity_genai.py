"""onnxruntime-genai, an implementation we did not write, runs each int4 layout we ship as it is.

genai loads the artifact through its genai_config.json, sizes its own buffers and drives its own
C++ loop; ``runtimes`` drives the same graph from Python. Both must give the same greedy tokens
for every int4 layout an export can produce: a GGUF's Q4_1 blocks carried (``keep``, on the real
SmolLM2), RTN g32 with an int8 head (the default for HF checkpoints), GPTQ g128 with an int4 head
(the fastest layout), and the int8 KV cache.
"""
from __future__ import annotations

import numpy as np
import onnxruntime_genai as og
import pytest

import runtimes
from edge_export.export import ExportOptions, export

NEW_TOKENS = 12
LAYOUTS = {
    "keep-smollm2": ("smollm2-135m", dict(method="keep")),
    "rtn-g32": ("tiny", dict(method="rtn")),
    "gptq-g128-int4-head": ("tiny", dict(method="gptq", group_size=128, head="int4")),
    "rtn-int8-cache": ("tiny", dict(method="rtn", kv_cache="int8")),
}


def genai_greedy(folder, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens,
                              min_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_genai_generates_our_greedy_tokens(layout, tiny_llama, tmp_path):
    source, options = LAYOUTS[layout]
    checkpoint = tiny_llama if source == "tiny" else source
    manifest = export(checkpoint, tmp_path / "a", ExportOptions(quant="int4", verify=False, max_context=512,
                                                               **options))
    rt = runtimes.load(tmp_path / "a")
    if source == "tiny":
        prompt = [int(t) for t in np.random.default_rng(7).integers(0, 500, 20)]
    else:
        prompt = rt.prompt_ids("What is the capital of France?")
    ours = rt.generator.generate(prompt, runtimes.Sampling(max_new_tokens=NEW_TOKENS, ignore_eos=True)).tokens
    assert genai_greedy(tmp_path / "a", prompt, NEW_TOKENS)[:NEW_TOKENS] == ours
    scheme = manifest["quantization"]
    assert scheme["method"] == options["method"]
    assert manifest["graph"].get("kv_dtype", "float32") == options.get("kv_cache", "float32")
