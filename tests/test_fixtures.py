"""Preset fixtures as the family's own tooling writes them, read back by transformers.

Phi-4-mini-reasoning's: q/k/v and gate/up stored fused, config.json in Phi-3's spelling (the
original context at the top level), a byte-level tokenizer of exactly 200,064 ids with Phi-4's
added tokens at their real ids, and the real chat template, which adds no <think>: the model
writes "<think>...</think>" itself, as plain text.
"""
import dataclasses
import json

import numpy as np
import pytest

from edge_export.checkpoint import open_checkpoint
from edge_export.checkpoint.safetensors_io import SafetensorsFile
from edge_export.manifest import tokenizer_fields
from edge_export.fixtures import write_fixture
from edge_export.presets import PHI4_MINI_CONFIG, preset_spec
from runtimes import rope
from runtimes.models import get_architecture, spec_from_config
from runtimes.generate import Detokenizer, ThinkSplitter
from runtimes.reference import ReferenceDecoder

torch = pytest.importorskip("torch", reason="transformers comparison needs torch (test-only dependency)")
transformers = pytest.importorskip("transformers")

# transformers' rendering of Phi-4-mini-reasoning's template for this chat, as recorded in
# microsoft/onnxruntime-extensions (test/tokenizer_test/test_... Phi4MiniReasoningChatTemplate)
KNIGHT = [{"role": "system", "content": "You are a medieval knight and must provide explanations to modern people."},
          {"role": "user", "content": "How should I explain the Internet?"}]
KNIGHT_RENDERED = ("<|system|>Your name is Phi, an AI math expert developed by Microsoft. You are a medieval knight "
                   "and must provide explanations to modern people.<|end|><|user|>How should I explain the "
                   "Internet?<|end|><|assistant|>")
PHI4_IDS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020,
            "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024,
            "<|tool_call|>": 200025, "<|/tool_call|>": 200026, "<|tool_response|>": 200027, "<|tag|>": 200028}


@pytest.fixture(scope="module")
def phi_tiny(tmp_path_factory):
    return write_fixture("phi-4-mini-reasoning", "tiny", tmp_path_factory.mktemp("phi") / "checkpoint")


def test_full_preset_reads_as_transformers_reads_the_published_config():
    spec = preset_spec("phi-4-mini-reasoning")
    config = transformers.Phi3Config(**PHI4_MINI_CONFIG)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.intermediate_size,
            spec.vocab_size, spec.tied_embeddings, spec.max_position_embeddings) == \
        (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
         config.intermediate_size, config.vocab_size, config.tie_word_embeddings, config.max_position_embeddings)
    assert spec.rotary_dim == 96 and spec.parameter_count == 3_836_021_760
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"]
    for seq_len, long in ((4096, False), (4097, True)):  # the long factors past the original context
        theirs, their_factor = init(config, "cpu", seq_len=seq_len)
        ours, factor = rope.inv_freq(spec.rotary_dim, spec.rope_theta, spec.rope_scaling, long=long)
        assert np.allclose(ours, theirs.double().numpy(), rtol=1e-6) and factor == pytest.approx(their_factor)
    assert spec.generation["temperature"] == 0.8 and spec.generation["top_p"] == 0.95
    written = get_architecture(spec.architecture).config_from_spec(spec)  # what the full fixture writes
    assert spec_from_config(written) == dataclasses.replace(spec, generation={})


def test_tiny_keeps_phi_structure():
    tiny, full = preset_spec("phi-4-mini-reasoning", "tiny"), preset_spec("phi-4-mini-reasoning")
    assert tiny.hidden_size == tiny.num_heads * tiny.head_dim  # Phi3Config derives the rotary width so
    assert tiny.rope_scaling["long_factor"] == full.rope_scaling["long_factor"][::2]  # every other real factor
    assert tiny.max_position_embeddings / tiny.rope_scaling["original_max_position_embeddings"] == 32
    assert (tiny.vocab_size, tiny.bos_token_id, tiny.eos_token_ids) == (200064, 199999, (199999,))


def test_weights_are_fused_as_phi3_stores_them(phi_tiny):
    names = set(SafetensorsFile(phi_tiny / "model.safetensors").keys())
    assert "model.layers.1.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight")) for n in names)
    assert "lm_head.weight" not in names  # tied


def test_transformers_loads_the_fixture_and_agrees_past_the_original_context(phi_tiny):
    config = transformers.AutoConfig.from_pretrained(phi_tiny)
    assert type(config).__name__ == "Phi3Config" and config.original_max_position_embeddings == 64
    assert config.rope_parameters["original_max_position_embeddings"] == 64
    model, info = transformers.AutoModelForCausalLM.from_pretrained(phi_tiny, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = np.random.default_rng(2).integers(0, 2000, 80)  # 80 tokens: LongRoPE's long factors
    with torch.no_grad():
        theirs = model(torch.tensor(ids[None])).logits[0].numpy()
    ckpt = open_checkpoint(phi_tiny)
    ours = ReferenceDecoder(ckpt.spec, ckpt.tensor, max_context=128).forward(ids, all_logits=True)
    assert np.abs(ours - theirs).max() < 1e-4


def test_tokenizer_has_phi4_specials_and_the_real_template(phi_tiny):
    theirs = transformers.AutoTokenizer.from_pretrained(phi_tiny)
    assert len(theirs) == 200064
    assert {t: theirs.convert_tokens_to_ids(t) for t in PHI4_IDS} == PHI4_IDS
    assert theirs.eos_token_id == theirs.bos_token_id == 199999
    rendered = theirs.apply_chat_template(KNIGHT, add_generation_prompt=True, tokenize=False)
    assert rendered == KNIGHT_RENDERED
    ours = open_checkpoint(phi_tiny).tokenizer
    assert ours.render(KNIGHT) == KNIGHT_RENDERED
    ids = ours.encode_chat(KNIGHT)
    assert ids == theirs(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 200022 and ids[-2:] == [200020, 200019]
    readme = (phi_tiny / "README.md").read_text()
    assert "byte-level" in readme and "<|end|> 200020" in readme


def test_thinking_is_split_from_text_tags(phi_tiny):
    """The template ends at <|assistant|>; the model writes <think> as plain text (several tokens),
    so no think prefix is added and the split switches on the text, held back across tokens."""
    ckpt = open_checkpoint(phi_tiny)
    tok = ckpt.tokenizer
    fields = tokenizer_fields(ckpt.spec, tok)
    assert "think_prefix" not in fields["generation"] and "think_open" not in fields["special_tokens"]
    assert {200020, 199999} <= set(fields["generation"]["eos_token_ids"])
    assert fields["generation"]["temperature"] == 0.8
    prompt = tok.encode_chat("What is 2+3?")
    assert not tok.decode(prompt).rstrip().endswith("<think>")
    reply = tok.encode("<think>\nAdd 2 and 3.\n</think>\n\nThe answer is 5.", parse_special=True)
    assert len(tok.encode("<think>")) > 1
    detok, splitter, events = Detokenizer(tok), ThinkSplitter(thinking=False), []
    for t in reply:
        events += splitter.feed(detok.add(t))
    events += splitter.feed(detok.flush()) + splitter.flush()
    text = {kind: "".join(e.text for e in events if e.kind == kind) for kind in ("thinking", "answer", "tag")}
    assert text == {"thinking": "\nAdd 2 and 3.\n", "answer": "\n\nThe answer is 5.", "tag": "<think></think>"}


def test_generation_config_stops_on_end_of_turn(phi_tiny):
    gen = json.loads((phi_tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [200020, 199999] and gen["temperature"] == 0.8
    assert open_checkpoint(phi_tiny).spec.generation["eos_token_ids"] == [200020, 199999]


def test_sharded_fixture_keeps_fused_tensors_whole(tmp_path, monkeypatch):
    """Past the shard size (lowered here from 2 GB), tensors go to numbered shards with an index; a
    fused tensor is never split across two, and both transformers and our reader follow the index."""
    import edge_export.fixtures as fixtures
    monkeypatch.setattr(fixtures, "SHARD_BYTES", 40 << 20)
    folder = write_fixture("phi-4-mini-reasoning", "tiny", tmp_path / "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not any(("q_proj" in n or "gate_proj" in n) for n in index["weight_map"])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ckpt = open_checkpoint(folder)
    q_rows, kv_rows = ckpt.spec.num_heads * ckpt.spec.head_dim, ckpt.spec.num_kv_heads * ckpt.spec.head_dim
    theirs = model.model.layers[1].self_attn.qkv_proj.weight.detach().numpy()[q_rows:q_rows + kv_rows]
    assert np.array_equal(ckpt.tensor("model.layers.1.self_attn.k_proj.weight"), theirs)
