"""Shared fixtures: tiny random checkpoints of every architecture, written in the real HF layout;
the record of which backends generated tokens in this session; and the CI skip policy's hooks."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from edge_export.fixtures import _write_weights, byte_level_tokenizer, tiny_init_std
from edge_export.presets import preset_spec
from runtimes.generate import Generator, Result
from runtimes.models import get_architecture

from .skip_policy import (pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401
                          pytest_terminal_summary)

ARCH_PRESETS = {"LlamaForCausalLM": "r1-distill-llama-8b", "Qwen2ForCausalLM": "r1-distill-qwen-1.5b",
                "Qwen3ForCausalLM": "r1-0528-qwen3-8b", "Phi3ForCausalLM": "phi-4-mini-reasoning"}
SMALL_VOCAB = 512


def small_vocab_checkpoint(preset: str, folder: Path, seed: int = 0, std: float | None = None) -> Path:
    """The preset's tiny structure with a 512-token byte-level tokenizer: fast for numeric tests.
    ``std`` defaults to the tiny fixtures' width-scaled init (``tiny_init_std``)."""
    spec = dataclasses.replace(preset_spec(preset, "tiny"), vocab_size=SMALL_VOCAB,
                               bos_token_id=SMALL_VOCAB - 6, eos_token_ids=(SMALL_VOCAB - 5,))
    folder.mkdir(parents=True, exist_ok=True)
    _write_weights(spec, folder, np.random.default_rng(seed), tiny_init_std(spec) if std is None else std)
    config = get_architecture(spec.architecture).config_from_spec(spec)
    (folder / "config.json").write_text(json.dumps(config))
    write_small_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "do_sample": True}))
    return folder


def write_small_tokenizer(folder: Path) -> None:
    """The 512-id byte-level tokenizer with R1's special tokens at ids 506..511 and an R1-shaped template."""
    from edge_export.fixtures import R1_SPECIALS
    tok = byte_level_tokenizer(SMALL_VOCAB, [SMALL_VOCAB - 6 + i for i in range(6)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1], "add_bos_token": True,
        "chat_template": SIMPLE_R1_TEMPLATE}, ensure_ascii=False))


# The R1 template's shape (system, <｜User｜>, <｜Assistant｜>, thinking dropped from history, <think>\n).
SIMPLE_R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'].split('</think>')[-1] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


@pytest.fixture(scope="session", params=sorted(ARCH_PRESETS))
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    """One small-vocab tiny checkpoint per registered architecture."""
    preset = ARCH_PRESETS[request.param]
    return small_vocab_checkpoint(preset, tmp_path_factory.mktemp(preset))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return small_vocab_checkpoint("r1-distill-llama-8b", tmp_path_factory.mktemp("llama"))



@pytest.fixture(scope="session")
def r1_tiny_artifact(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the real R1-Distill tokenizer and chat template (the template adds no
    <think>; the manifest's think_prefix does), exported to onnx/ort int4 with a 512-token context."""
    from edge_export.export import ExportOptions, export
    from edge_export.fixtures import write_fixture
    folder = tmp_path_factory.mktemp("r1tiny")
    checkpoint = write_fixture("r1-distill-qwen-1.5b", "tiny", folder / "checkpoint")
    export(checkpoint, folder / "r1tiny-int4", ExportOptions(quant="int4", max_context=512, verify=False))
    return folder / "r1tiny-int4"


@pytest.fixture(scope="session")
def smollm2_int4_artifact(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (its GGUF's Q4_1 blocks carried) exported to onnx/ort, 512 positions."""
    from edge_export.export import ExportOptions, export
    folder = tmp_path_factory.mktemp("smollm2")
    export("smollm2-135m", folder / "smollm2-int4", ExportOptions(quant="int4", max_context=512, verify=False))
    return folder / "smollm2-int4"


def greedy_match_both_ways(reference, make_candidate, prompts, n_new):
    """verify.compare's figures for a candidate that declares ``greedy_from_forcing`` (its greedy
    match read off teacher forcing), the same with the candidate made to generate its greedy tokens
    (the flag hidden), and each prompt's match from a fresh candidate's own greedy run."""
    from edge_export.verify import FixedReference, _common_prefix, compare

    class Generating:
        greedy_from_forcing = False

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    tokens, logprobs = reference.greedy(prompts, n_new)
    candidate = make_candidate()
    assert candidate.greedy_from_forcing
    read = compare(FixedReference(tokens, logprobs), candidate, prompts, n_new)
    made = compare(FixedReference(tokens, logprobs), Generating(make_candidate()), prompts, n_new)
    generated = make_candidate().greedy(prompts, n_new)[0]
    return read, made, [_common_prefix(a, b) for a, b in zip(tokens, generated)]


# ---- which backends generated tokens in this session (test_completeness reads it at the end) ----
GENERATED_TOKENS: dict[str, int] = {}  # backend name -> tokens the shared Generator produced over it


@pytest.fixture(autouse=True, scope="session")
def record_generated_tokens():
    """Every Generator.stream of the session adds its tokens to GENERATED_TOKENS under its backend's name."""
    original = Generator.stream
    signature = inspect.signature(original)

    def stream(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        result = bound.arguments.get("result")
        if result is None:
            result = bound.arguments["result"] = Result()
        yield from original(*bound.args, **bound.kwargs)
        name = getattr(self.backend, "name", "") or type(self.backend).__name__
        GENERATED_TOKENS[name] = GENERATED_TOKENS.get(name, 0) + result.new_tokens

    Generator.stream = stream
    yield GENERATED_TOKENS
    Generator.stream = original


def pytest_configure(config):
    config.addinivalue_line("markers", "session_end: run after every other test (it reads what they recorded)")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("session_end") is not None)  # stable: others keep order


def terminal_signals() -> None:
    """preexec_fn for a child that a test interrupts: Ctrl-C's default disposition, as a terminal gives it.

    A suite started in the background by a non-interactive shell (`cmd &`, nohup) ignores SIGINT and SIGQUIT,
    children inherit that, and Python then installs no KeyboardInterrupt handler, so the child never sees Ctrl-C.
    """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
