"""What each config.json key means to the toolkit: read, harmless, refused, or unknown.

A config key either changes the model's arithmetic or it does not. One that does is read into the
ModelSpec (``READ``), or checked against the value the toolkit implements (``Architecture.checks``:
a value it does not implement is refused with one line naming the key and value). One that does
not is listed as harmless. Anything else is unknown: it is reported once through logging, and
refused under ``strict_config()`` (the CLI's ``--strict-config``). Nothing is silently ignored.

The rope keys are read here too, in both spellings: transformers 5's ``rope_parameters`` (with
``rope_theta`` inside) and 4.x's top-level ``rope_theta`` + ``rope_scaling``.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Callable

from ..errors import ConfigError

log = logging.getLogger(__name__)

# Keys the spec is built from (their values are validated where they are read).
READ = frozenset({
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id", "torch_dtype",
    "dtype", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "original_max_position_embeddings",
})

# Keys that change nothing a forward pass computes (training, bookkeeping, generation flags).
HARMLESS = frozenset({
    "transformers_version", "use_cache", "initializer_range", "pad_token_id", "attention_dropout",
    "_name_or_path", "name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "pretraining_tp", "tokenizer_class", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "torchscript",
    "prefix", "task_specific_params", "finetuning_task", "sep_token_id", "decoder_start_token_id",
    "architectures_note", "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
    "use_bfloat16", "cross_attention_hidden_size", "tf_legacy_loss", "pruned_heads", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
    "auto_map", "torch_compile", "keys_to_ignore_at_inference", "router_aux_loss_coef",
    "embd_pdrop", "resid_pdrop", "attn_pdrop", "hidden_dropout", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "mlp_dropout", "gradient_checkpointing",
})

# Values that leave the arithmetic as the toolkit computes it; any other value is refused.
_NEUTRAL_ONE = (None, 1, 1.0)


def _falsy(value: Any) -> bool:
    return not value


def _neutral_multiplier(value: Any) -> bool:
    return value in _NEUTRAL_ONE


def _none(value: Any) -> bool:
    return value is None


Check = Callable[[Any, dict], bool]  # (value, whole config) -> implemented as is


def value(accepts: Callable[[Any], bool]) -> Check:
    """A check that needs only the key's own value."""
    return lambda v, config: accepts(v)


# key -> (check, what the toolkit computes instead). Shared by every architecture.
COMMON_CHECKS: dict[str, tuple[Check, str]] = {
    "hidden_act": (value(lambda v: v in ("silu", "swish")), "SiLU (gated) MLPs only"),
    "mlp_bias": (value(_falsy), "MLP projections without bias"),
    "quantization_config": (value(_none), "float checkpoints only: give the float model or a GGUF"),
    "embedding_multiplier": (value(_neutral_multiplier), "unscaled embeddings"),
    "residual_multiplier": (value(_neutral_multiplier), "unscaled residuals"),
    "attention_multiplier": (value(_neutral_multiplier), "attention scaled by 1/sqrt(head_dim)"),
    "logits_scaling": (value(_neutral_multiplier), "unscaled logits"),
    "logit_scale": (value(_neutral_multiplier), "unscaled logits"),
    "final_logit_softcapping": (value(_none), "logits without soft-capping"),
    "attn_logit_softcapping": (value(_none), "attention scores without soft-capping"),
    "query_pre_attn_scalar": (value(_none), "attention scaled by 1/sqrt(head_dim)"),
    "scale_embeddings": (value(_falsy), "unscaled embeddings"),
    "use_parallel_residual": (value(_falsy), "sequential attention then MLP"),
    "num_experts": (value(lambda v: v in (None, 0, 1)), "dense MLPs only"),
    "num_local_experts": (value(lambda v: v in (None, 0, 1)), "dense MLPs only"),
}


def sliding_attention_on(config: dict) -> bool:
    """transformers' Qwen2/Qwen3 rule: a window applies only with use_sliding_window, a window size,
    and a layer of type sliding_attention (given, or every layer from max_window_layers on); a window
    at least the whole context changes nothing."""
    window = config.get("sliding_window")
    if not config.get("use_sliding_window") or window is None:
        return False
    if window >= config.get("max_position_embeddings", 0):
        return False
    layers = config.get("num_hidden_layers", 0)
    types = config.get("layer_types") or ["sliding_attention" if i >= config.get("max_window_layers", layers)
                                          else "full_attention" for i in range(layers)]
    return "sliding_attention" in types


# Qwen2/Qwen3's sliding-window keys: refused only when the window is actually on.
SLIDING_CHECKS: dict[str, tuple[Check, str]] = {
    "use_sliding_window": (lambda v, config: not sliding_attention_on(config),
                           "full causal attention in every layer (sliding_window, max_window_layers and "
                           "layer_types put a window on some layers)"),
    "layer_types": (value(lambda v: v is None or set(v) <= {"full_attention", "sliding_attention"}),
                    "full or sliding attention layers only"),
}

_strict = contextvars.ContextVar("edge_export_strict_config", default=False)
_reported: set[tuple[str, str]] = set()


@contextlib.contextmanager
def strict_config(on: bool = True):
    """Within this block an unknown config key is refused instead of reported."""
    token = _strict.set(on)
    try:
        yield
    finally:
        _strict.reset(token)


def check_keys(config: dict, checks: dict[str, tuple[Check, str]], harmless: frozenset, arch: str,
               source: str) -> None:
    """Refuse a key whose value changes the arithmetic in a way not implemented; report unknown keys."""
    for key, value in config.items():
        if key in checks:
            accepts, implemented = checks[key]
            if not accepts(value, config):
                raise ConfigError(f"{source}: '{key}' = {value!r} changes the model's arithmetic and is not "
                                  f"implemented for {arch} (it computes {implemented})")
    unknown = sorted(k for k in config if k not in READ and k not in HARMLESS and k not in checks
                     and k not in harmless)
    if not unknown:
        return
    if _strict.get():
        raise ConfigError(f"{source}: unknown config key(s) {', '.join(unknown)} for {arch}; remove them if they "
                          "do not change the model, or drop --strict-config to only warn")
    if (source, ",".join(unknown)) not in _reported:
        _reported.add((source, ",".join(unknown)))
        log.warning("%s: config key(s) %s not known to edge-export for %s; assumed not to change the model "
                    "(--strict-config refuses them)", source, ", ".join(unknown), arch)


# ---- rope, in both spellings -------------------------------------------------------------
ROPE_PARAMS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"long_factor", "short_factor", "factor", "attention_factor", "original_max_position_embeddings"},
}
ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
# rope types whose original context is read from the top level or the rope dict (transformers' rule)
ORIGINAL_CONTEXT = ("llama3", "yarn", "longrope")


def read_rope(config: dict, rope_types: tuple, arch: str, source: str,
              aliases: dict | None = None) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling dict or None, partial_rotary_factor) from either spelling; every
    parameter checked. ``aliases`` maps a family's own rope type names onto ours."""
    params, legacy = config.get("rope_parameters"), config.get("rope_scaling")
    if params is not None and legacy is not None and _rope_body(params) != _rope_body(legacy):
        raise ConfigError(f"{source}: both 'rope_parameters' and 'rope_scaling' are set and disagree; keep one")
    rope = params if params is not None else legacy
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(f"{source}: '{'rope_parameters' if params is not None else 'rope_scaling'}' must be an "
                          f"object, got {type(rope).__name__}")
    rope = dict(_flatten_layer_types(rope, source) if rope else {})
    theta = rope.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"{source}: 'rope_theta' must be a positive number, got {theta!r}")
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    kind = (aliases or {}).get(kind, kind)
    if kind not in rope_types:
        raise ConfigError(f"{source}: rope type '{kind}' is not implemented for {arch} "
                          f"(implemented: {', '.join(rope_types)}); transformers computes it differently")
    partial = rope.pop("partial_rotary_factor", None)
    partial = config.get("partial_rotary_factor") if partial is None else partial
    partial = 1.0 if partial is None else partial
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ConfigError(f"{source}: 'partial_rotary_factor' must be a number in (0, 1], got {partial!r}")
    unknown = sorted(set(rope) - ROPE_PARAMS[kind])
    if unknown:
        raise ConfigError(f"{source}: rope parameter(s) {', '.join(unknown)} are not understood for rope type "
                          f"'{kind}'; expected only {', '.join(sorted(ROPE_PARAMS[kind])) or 'rope_theta'}")
    if kind == "default":
        return float(theta), None, float(partial)
    return float(theta), _complete_scaling(kind, rope, config, source), float(partial)


def check_rotary(partial: float, head_dim: int, scaling: dict | None, source: str) -> None:
    """The rotated width is even, and LongRoPE gives one factor per rotated pair."""
    dim = int(head_dim * partial)
    if dim < 2 or dim % 2:
        raise ConfigError(f"{source}: partial_rotary_factor={partial} of head_dim={head_dim} rotates {dim} channels; "
                          "rotary needs an even number of at least 2")
    if scaling and scaling.get("rope_type") == "longrope":
        for key in ("long_factor", "short_factor"):
            factors = scaling.get(key)
            if (not isinstance(factors, list) or len(factors) != dim // 2
                    or not all(isinstance(f, (int, float)) and f > 0 for f in factors)):
                raise ConfigError(f"{source}: longrope '{key}' must be {dim // 2} positive numbers (one per rotated "
                                  f"pair of {dim} channels), got {_brief(factors)}")


def _brief(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else repr(value)


def _rope_body(rope: Any) -> Any:
    """A rope dict without its spelling differences, to compare the two spellings."""
    if not isinstance(rope, dict):
        return rope
    body = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
    body.setdefault("rope_type", rope.get("type", "default"))
    return body


def _flatten_layer_types(rope: dict, source: str) -> dict:
    """transformers 5 may nest rope parameters per layer type; one shared set is all we implement."""
    nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
    if not nested:
        return rope
    distinct = {repr(sorted(v.items())) for v in nested.values()}
    if len(distinct) > 1:
        raise ConfigError(f"{source}: 'rope_parameters' differs per layer type ({', '.join(nested)}); "
                          "per-layer rope is not implemented")
    return next(iter(nested.values()))


def _complete_scaling(kind: str, rope: dict, config: dict, source: str) -> dict:
    """The scaling dict with transformers' defaults filled in, so every emitter reads the same values."""
    for key in ROPE_REQUIRED.get(kind, ()):
        if not isinstance(rope.get(key), (int, float)) or isinstance(rope.get(key), bool):
            raise ConfigError(f"{source}: rope type '{kind}' needs a number for '{key}', got {rope.get(key)!r}")
    scaling = dict(rope, rope_type=kind)
    if kind in ORIGINAL_CONTEXT:
        # transformers' rule: a top-level original_max_position_embeddings wins, else max_position_embeddings
        original = (config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                    or config.get("max_position_embeddings"))
        if not isinstance(original, int) or original <= 0:
            raise ConfigError(f"{source}: rope type '{kind}' needs original_max_position_embeddings, got {original!r}")
        scaling["original_max_position_embeddings"] = original
    if kind in ("yarn", "longrope") and scaling.get("factor") is None:
        scaling["factor"] = config.get("max_position_embeddings", 0) / scaling["original_max_position_embeddings"]
    if kind == "longrope" and scaling.get("attention_factor") is None:
        # transformers' default: sqrt(1 + ln(factor) / ln(original context)), 1 without extension
        factor, original = float(scaling["factor"]), scaling["original_max_position_embeddings"]
        scaling["attention_factor"] = (math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
    return scaling
