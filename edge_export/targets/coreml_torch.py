"""The decoder the `coreml` target converts: a self-written torch module, traced with torch.jit.trace.

It is written for Core ML rather than taken from transformers (whose models do not convert): the
KV cache is two registered buffers updated in place by slice assignment, which coremltools turns
into Core ML state (``ct.StateType``); the query length is flexible, and where the new tokens go
is read from the shapes of the inputs, so prefill and decode are the same program:

- ``input_ids`` int32 [1, seq]: the new tokens;
- ``causal_mask`` float [1, 1, seq, end]: additive (0 where a query may attend, MASK_VALUE where
  not) over the cache positions 0..end-1, where ``end`` = tokens already cached + seq;
- ``logits`` [1, 1, vocab]: the last position's.

The same module, built from the weights the package holds, runs in torch on any machine: that
is how a Core ML export is verified where Core ML cannot predict (Linux).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from runtimes import rope
from runtimes.backends.coreml import causal_mask
from runtimes.reference import layer_keys

from ..verify import RuntimeScorer, log_softmax

KEY_CACHE, VALUE_CACHE = "key_cache", "value_cache"  # the Core ML state names
NORM_FLOOR = 1.0  # rms_norm's pre-scale is max|x| but at least this, so eps / scale**2 <= eps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed on x / max|x|, so the sum of squares cannot overflow float16 (a Llama's
    hidden states reach thousands, whose squares do); equal to the plain form in exact math."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=NORM_FLOOR)
    y = x / scale
    variance = (y * y).mean(-1, keepdim=True)
    return y * torch.rsqrt(variance + eps / (scale * scale)) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's rotate_half convention: x [..., seq, hd], cos/sin [seq, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, spec, tensors: dict):
        super().__init__()
        self.spec = spec
        bias = spec.attention_bias
        self.q_proj = _linear(tensors["q_proj"], tensors.get("q_bias") if bias else None)
        self.k_proj = _linear(tensors["k_proj"], tensors.get("k_bias") if bias else None)
        self.v_proj = _linear(tensors["v_proj"], tensors.get("v_bias") if bias else None)
        self.o_proj = _linear(tensors["o_proj"])
        if spec.qk_norm:
            self.q_norm, self.k_norm = _param(tensors["q_norm"]), _param(tensors["k_norm"])

    def forward(self, x, cos, sin, mask, key_cache, value_cache, layer: int, past, end):
        spec, seq = self.spec, x.shape[1]
        heads, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q = self.q_proj(x).view(1, seq, heads, hd).transpose(1, 2)  # [1, heads, seq, hd]
        k = self.k_proj(x).view(1, seq, kv, hd).transpose(1, 2)
        v = self.v_proj(x).view(1, seq, kv, hd).transpose(1, 2)
        if spec.qk_norm:
            q = rms_norm(q, self.q_norm, spec.rms_norm_eps)
            k = rms_norm(k, self.k_norm, spec.rms_norm_eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # in place: coremltools turns these slice assignments into Core ML state updates
        key_cache[layer:layer + 1, :, :, past:end] = k.to(key_cache.dtype).unsqueeze(0)
        value_cache[layer:layer + 1, :, :, past:end] = v.to(value_cache.dtype).unsqueeze(0)
        keys = key_cache[layer, :, :, :end].to(x.dtype).unsqueeze(2)  # [1, kv, 1, end, hd]
        values = value_cache[layer, :, :, :end].to(x.dtype).unsqueeze(2)
        group = heads // kv
        qg = q.reshape(1, kv, group, seq, hd) * (1.0 / math.sqrt(hd))  # head h uses kv head h // group
        scores = torch.matmul(qg, keys.transpose(-1, -2)) + mask.unsqueeze(1)  # [1, kv, group, seq, end]
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [1, kv, group, seq, hd]
        out = out.reshape(1, heads, seq, hd).transpose(1, 2).reshape(1, seq, heads * hd)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, spec, tensors: dict):
        super().__init__()
        self.eps = spec.rms_norm_eps
        self.input_layernorm = _param(tensors["attn_norm"])
        self.post_attention_layernorm = _param(tensors["mlp_norm"])
        self.self_attn = Attention(spec, tensors)
        self.gate_proj, self.up_proj = _linear(tensors["gate_proj"]), _linear(tensors["up_proj"])
        self.down_proj = _linear(tensors["down_proj"])

    def forward(self, h, cos, sin, mask, key_cache, value_cache, layer: int, past, end):
        x = rms_norm(h, self.input_layernorm, self.eps)
        h = h + self.self_attn(x, cos, sin, mask, key_cache, value_cache, layer, past, end)
        x = rms_norm(h, self.post_attention_layernorm, self.eps)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CoreMLDecoder(nn.Module):
    """The whole decoder over ``weights(name) -> float32 [out, in]`` (HF names), with a KV cache
    of ``max_context`` positions held in ``kv_dtype`` (Core ML states are float16)."""

    def __init__(self, spec, weights, max_context: int, kv_dtype=torch.float16):
        super().__init__()
        self.spec, self.max_context = spec, max_context
        self.embed_tokens = _param(weights(spec.tensor_name("embed")))
        self.layers = nn.ModuleList(
            DecoderLayer(spec, {k: weights(spec.tensor_name(k, i)) for k in layer_keys(spec)})
            for i in range(spec.num_layers))
        self.norm = _param(weights(spec.tensor_name("final_norm")))
        if not spec.tied_embeddings:
            self.lm_head = _param(weights(spec.tensor_name("lm_head")))
        cache = (spec.num_layers, 1, spec.num_kv_heads, max_context, spec.head_dim)
        self.register_buffer(KEY_CACHE, torch.zeros(cache, dtype=kv_dtype))
        self.register_buffer(VALUE_CACHE, torch.zeros(cache, dtype=kv_dtype))
        cos, sin = rope.cos_sin(spec.head_dim, spec.rope_theta, spec.rope_scaling, np.arange(max_context))
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        """What Core ML runs: logits [1, 1, vocab] of the last position."""
        return self.run(input_ids, causal_mask)

    def run(self, input_ids: torch.Tensor, causal_mask: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Append ``input_ids`` [1, seq] to the cache; logits [1, 1 or seq, vocab]."""
        seq, end = input_ids.shape[1], causal_mask.shape[-1]
        past = end - seq
        h = F.embedding(input_ids, self.embed_tokens)  # [1, seq, hidden]
        cos, sin = self.rope_cos[past:end], self.rope_sin[past:end]
        mask = causal_mask.to(h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, self.key_cache, self.value_cache, i, past, end)
        h = rms_norm(h if all_positions else h[:, -1:], self.norm, self.spec.rms_norm_eps)
        head = self.embed_tokens if self.spec.tied_embeddings else self.lm_head
        return F.linear(h, head)

    def linear_weights(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the parameter the module computes with (every tensor of the spec)."""
        spec = self.spec
        out = {spec.tensor_name("embed"): self.embed_tokens, spec.tensor_name("final_norm"): self.norm}
        if not spec.tied_embeddings:
            out[spec.tensor_name("lm_head")] = self.lm_head
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            params = {"attn_norm": layer.input_layernorm, "mlp_norm": layer.post_attention_layernorm,
                      "q_proj": attn.q_proj.weight, "k_proj": attn.k_proj.weight, "v_proj": attn.v_proj.weight,
                      "o_proj": attn.o_proj.weight, "gate_proj": layer.gate_proj.weight,
                      "up_proj": layer.up_proj.weight, "down_proj": layer.down_proj.weight}
            if spec.attention_bias:
                params.update(q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias, v_bias=attn.v_proj.bias)
            if spec.qk_norm:
                params.update(q_norm=attn.q_norm, k_norm=attn.k_norm)
            out.update({spec.tensor_name(k, i): p for k, p in params.items()})
        return out


def verification_module(artifact) -> CoreMLDecoder:
    """What a Core ML export is verified with where Core ML cannot predict: the converted module
    rebuilt from the package's own weights (read back from weight.bin), its cache at max_context."""
    from runtimes.weights import ArtifactWeights
    return CoreMLDecoder(artifact.spec, ArtifactWeights(artifact), int(artifact.manifest["max_context"])).eval()


class TorchModuleBackend:
    """The module run in torch behind the runtime backend calls (prefill / decode), on ``threads``
    torch threads (None: torch's default)."""

    def __init__(self, module: CoreMLDecoder, threads: int | None = None):
        self.module, self.threads, self.position = module.eval(), threads, 0
        self.max_context = module.max_context

    def run(self, ids: list[int], all_positions: bool = False) -> np.ndarray:
        """Append ids to the cache; float32 logits [vocab] of the last position, or [len(ids), vocab]."""
        previous = torch.get_num_threads()
        torch.set_num_threads(int(self.threads or previous))
        try:
            with torch.inference_mode():
                tokens = torch.tensor([ids], dtype=torch.int32)
                mask = torch.from_numpy(causal_mask(self.position, len(ids), self.max_context)).float()
                logits = self.module.run(tokens, mask, all_positions)[0].float().numpy()
        finally:
            torch.set_num_threads(previous)
        self.position += len(ids)
        return logits if all_positions else logits[-1]

    def prefill(self, ids) -> np.ndarray:
        self.position = 0
        return self.run(list(ids))

    def decode(self, token: int) -> np.ndarray:
        return self.run([int(token)])


class TorchModuleScorer(RuntimeScorer):
    """The converted module as the candidate of verify.compare (teacher-forced log-probs, greedy).

    Teacher forcing runs a prompt and its continuation as one forward. Greedy decoding then reuses
    those argmaxes: until the first position where the module's argmax leaves the reference's
    continuation, its own greedy run has the very same context, so it picks the same tokens; it
    decodes on from there. (Called in any other order, it decodes everything.)
    """

    verified_with = "torch module converted to Core ML"

    def __init__(self, module: CoreMLDecoder, threads: int | None = None):
        super().__init__(TorchModuleBackend(module, threads))
        self._forced: dict[tuple, tuple[list[int], np.ndarray]] = {}

    def teacher_forced(self, prompts, continuations) -> list[np.ndarray]:
        out = []
        for prompt, cont in zip(prompts, continuations):
            self.backend.position = 0
            logprobs = log_softmax(self.backend.run(list(prompt) + list(cont[:-1]), all_positions=True)[len(prompt) - 1:])
            self._forced[tuple(prompt)] = (list(cont), logprobs.argmax(-1))
            out.append(logprobs)
        return out

    def greedy(self, prompts, n_new) -> tuple[list[list[int]], None]:
        return [self._greedy(list(p), n_new, self._forced.pop(tuple(p), None)) for p in prompts], None

    def _greedy(self, prompt: list[int], n_new: int, forced) -> list[int]:
        new = []
        if forced is not None:
            cont, choices = forced
            for ref, choice in zip(cont[:n_new], choices):
                new.append(int(choice))
                if choice != ref:
                    break
        if len(new) == n_new:
            return new
        logits = self.backend.prefill(prompt + new)
        while True:
            new.append(int(np.argmax(logits)))
            if len(new) == n_new:
                return new
            logits = self.backend.decode(new[-1])


def _param(value) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)), requires_grad=False)


def _linear(weight, bias=None) -> nn.Linear:
    n, k = weight.shape
    layer = nn.Linear(k, n, bias=bias is not None, device="meta")
    layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    return layer
