"""`edge-export inspect`: what a checkpoint is and what each export precision would weigh."""
from __future__ import annotations

from .checkpoint import open_checkpoint
from .sizing import export_weight_bytes


def describe(source) -> dict:
    """A checkpoint -> a JSON-ready dict (keys documented in the README's CLI section)."""
    ckpt = open_checkpoint(source)
    spec = ckpt.spec
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": spec.architecture,
        "parameters": spec.parameter_count,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "tied_embeddings": spec.tied_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "rotary_dim": spec.rotary_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "dtype": ckpt.dtype,
        "bytes_on_disk": ckpt.bytes_on_disk,
        "chat_template": bool(ckpt.tokenizer and ckpt.tokenizer.chat_template),
        "kv_bytes_per_token": spec.kv_bytes_per_token(2),
        "weight_bytes": {p: export_weight_bytes(spec, p) for p in ("fp16", "int8", "int4", "fp8")},
    }


def render_description(info: dict) -> str:
    mb = 1 << 20
    lines = [
        f"{info['path']} ({info['format']})",
        f"  architecture      {info['architecture']}",
        f"  parameters        {info['parameters']:,} ({info['dtype']}, {info['bytes_on_disk'] / mb:,.1f} MiB on disk)",
        f"  layers            {info['num_layers']}, hidden {info['hidden_size']}, intermediate {info['intermediate_size']}",
        f"  attention         {info['num_heads']} heads / {info['num_kv_heads']} KV heads, head_dim {info['head_dim']}",
        f"  rope              {_rope_line(info)}",
        f"  vocab             {info['vocab_size']:,}{' (tied embeddings)' if info['tied_embeddings'] else ''}",
        f"  chat template     {'yes' if info['chat_template'] else 'no'}",
        f"  KV cache (fp16)   {info['kv_bytes_per_token'] / 1024:,.1f} KiB per token",
        "  export weights    " + ", ".join(f"{p} {b / mb:,.1f} MiB" for p, b in info["weight_bytes"].items()),
    ]
    return "\n".join(lines)


def _rope_line(info: dict) -> str:
    """theta, scaling type and its original context, and the rotated share of a head."""
    scaling = info["rope_scaling"] or {}
    kind = scaling.get("rope_type", "default")
    original = scaling.get("original_max_position_embeddings")
    parts = [f"theta {info['rope_theta']:g}", kind + (f" (original context {original:,})" if original else "")]
    if info["rotary_dim"] != info["head_dim"]:
        parts.append(f"{info['rotary_dim']} of {info['head_dim']} channels rotate")
    return ", ".join(parts)
