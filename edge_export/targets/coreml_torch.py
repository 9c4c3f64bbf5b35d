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
is how a `--variant traced` export is verified where Core ML cannot predict (Linux); the default
variant's is verified by interpreting its saved program (coreml_interp.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from runtimes import rope
from runtimes.backends.coreml import causal_mask
from runtimes.models import describe, layer_keys

from ..verify import RuntimeScorer, log_softmax
from .coreml_mil import KEY_CACHE, VALUE_CACHE  # noqa: F401 (the Core ML state names)

NORM_FLOOR = 1.0  # rms_norm's pre-scale is max|x| but at least this, so eps / scale**2 <= eps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed on x / max|x|, so the sum of squares cannot overflow float16 (a Llama's
    hidden states reach thousands, whose squares do); equal to the plain form in exact math."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=NORM_FLOOR)
    y = x / scale
    variance = (y * y).mean(-1, keepdim=True)
    return y * torch.rsqrt(variance + eps / (scale * scale)) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's rotate_half convention over the first 2 * cos.shape[-1] channels
    (the rest pass through): x [..., seq, hd], cos/sin [seq, rotary_dim/2]."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    """The description's attention step (runtimes.models.decoder.Attention) in torch."""

    def __init__(self, spec, tensors: dict):
        super().__init__()
        self.step = a = describe(spec).attention
        biases = [tensors[key] for key in a.bias] if a.bias else [None] * 3
        self.q_proj = _linear(tensors[a.q], biases[0])
        self.k_proj = _linear(tensors[a.k], biases[1])
        self.v_proj = _linear(tensors[a.v], biases[2])
        self.o_proj = _linear(tensors[a.o])
        if a.head_norm:
            self.q_norm, self.k_norm = (_param(tensors[norm.weight]) for norm in a.head_norm)

    def forward(self, x, cos, sin, mask, key_cache, value_cache, layer: int, past, end):
        a, seq = self.step, x.shape[1]
        heads, kv, hd = a.heads, a.kv_heads, a.head_dim
        q = self.q_proj(x).view(1, seq, heads, hd).transpose(1, 2)  # [1, heads, seq, hd]
        k = self.k_proj(x).view(1, seq, kv, hd).transpose(1, 2)
        v = self.v_proj(x).view(1, seq, kv, hd).transpose(1, 2)
        if a.head_norm:
            q = rms_norm(q, self.q_norm, a.head_norm[0].eps)
            k = rms_norm(k, self.k_norm, a.head_norm[1].eps)
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
    """The description's layer (runtimes.models.decoder.DecoderLayer) in torch."""

    def __init__(self, spec, tensors: dict):
        super().__init__()
        self.steps = steps = describe(spec)
        self.input_layernorm = _param(tensors[steps.attn_norm.weight])
        self.post_attention_layernorm = _param(tensors[steps.mlp_norm.weight])
        self.self_attn = Attention(spec, tensors)
        m = steps.mlp
        self.gate_proj, self.up_proj = _linear(tensors[m.gate]), _linear(tensors[m.up])
        self.down_proj = _linear(tensors[m.down])

    def forward(self, h, cos, sin, mask, key_cache, value_cache, layer: int, past, end):
        x = rms_norm(h, self.input_layernorm, self.steps.attn_norm.eps)
        h = h + self.self_attn(x, cos, sin, mask, key_cache, value_cache, layer, past, end)
        x = rms_norm(h, self.post_attention_layernorm, self.steps.mlp_norm.eps)
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
        r = rope.Rope.for_spec(spec)
        self.long_from = r.switch  # LongRoPE: a sequence longer than this rotates with the long factors
        tables = [r.table(np.arange(max_context))] + ([r.table(np.arange(max_context), long=True)]
                                                      if r.switch is not None else [])
        # [1 or 2, max_context, rotary_dim/2]: the short (or only) set, then LongRoPE's long one
        self.register_buffer("rope_cos", torch.from_numpy(np.stack([t[0] for t in tables])), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(np.stack([t[1] for t in tables])), persistent=False)

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        """What Core ML runs: logits [1, 1, vocab] of the last position."""
        return self.run(input_ids, causal_mask)

    def run(self, input_ids: torch.Tensor, causal_mask: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Append ``input_ids`` [1, seq] to the cache; logits [1, 1 or seq, vocab]."""
        seq, end = input_ids.shape[1], causal_mask.shape[-1]
        past = end - seq
        h = F.embedding(input_ids, self.embed_tokens)  # [1, seq, hidden]
        cos, sin = self._rope_rows(causal_mask, past, end)
        mask = causal_mask.to(h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, self.key_cache, self.value_cache, i, past, end)
        h = rms_norm(h if all_positions else h[:, -1:], self.norm, self.spec.rms_norm_eps)
        head = self.embed_tokens if self.spec.tied_embeddings else self.lm_head
        return F.linear(h, head)

    def _rope_rows(self, causal_mask: torch.Tensor, past, end) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows past..end-1; with LongRoPE the long set when the sequence (``end``, the
        mask's width, as a tensor so a trace keeps it) is longer than the original context."""
        if self.long_from is None:
            return self.rope_cos[0, past:end], self.rope_sin[0, past:end]
        width = torch.ones_like(causal_mask[0, 0, 0]).sum()
        long = (width > self.long_from).to(self.rope_cos.dtype)
        pick = lambda t: t[0, past:end] * (1 - long) + t[1, past:end] * long  # noqa: E731
        return pick(self.rope_cos), pick(self.rope_sin)

    def linear_weights(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the parameter the module computes with (every tensor of the spec)."""
        spec = self.spec
        out = {spec.tensor_name("embed"): self.embed_tokens, spec.tensor_name("final_norm"): self.norm}
        if not spec.tied_embeddings:
            out[spec.tensor_name("lm_head")] = self.lm_head
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            steps, a = layer.steps, attn.step
            params = {steps.attn_norm.weight: layer.input_layernorm, steps.mlp_norm.weight: layer.post_attention_layernorm,
                      a.q: attn.q_proj.weight, a.k: attn.k_proj.weight, a.v: attn.v_proj.weight,
                      a.o: attn.o_proj.weight, steps.mlp.gate: layer.gate_proj.weight,
                      steps.mlp.up: layer.up_proj.weight, steps.mlp.down: layer.down_proj.weight}
            if a.bias:
                params.update(zip(a.bias, (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)))
            if a.head_norm:
                params.update(zip((norm.weight for norm in a.head_norm), (attn.q_norm, attn.k_norm)))
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

    Teacher forcing runs a prompt and its continuation as one forward (two where LongRoPE switches
    factors inside the continuation, see :meth:`_forwards`). Greedy decoding then reuses
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
            sequence = list(prompt) + list(cont[:-1])
            logits = np.concatenate([self.backend.run(part, all_positions=True)
                                     for part in self._forwards(len(prompt), sequence)])
            logprobs = log_softmax(logits[len(prompt) - 1:])
            self._forced[tuple(prompt)] = (list(cont), logprobs.argmax(-1))
            out.append(logprobs)
        return out

    def _forwards(self, prompt_length: int, sequence: list[int]) -> list[list[int]]:
        """The forwards that compute what prefill + one decode step per token computes. One, but
        for LongRoPE where the continuation passes the original context: decode steps up to it
        rotate with the short factors, those after with the long ones, so split there."""
        switch = self.backend.module.long_from
        if switch is None or prompt_length > switch or len(sequence) <= switch:
            return [sequence]
        return [sequence[:switch], sequence[switch:]]

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
