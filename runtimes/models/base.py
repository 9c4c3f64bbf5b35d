"""ModelSpec, the architecture registry, and the tensor-name table every stage shares.

A checkpoint of any layout (HF folder, GGUF) is turned into one :class:`ModelSpec`; the
architecture it names decides which tensors exist and how config.json maps onto the spec.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsupportedArchitectureError
from .config_keys import COMMON_CHECKS, check_keys, read_rope

# One table of tensor names, `{bid}` standing for the layer index (gguf-py's TensorNameMap idea).
LAYER_TENSORS = {
    "attn_norm": "model.layers.{bid}.input_layernorm.weight",
    "q_proj": "model.layers.{bid}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{bid}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{bid}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{bid}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{bid}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{bid}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{bid}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{bid}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{bid}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{bid}.post_attention_layernorm.weight",
    "gate_proj": "model.layers.{bid}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{bid}.mlp.up_proj.weight",
    "down_proj": "model.layers.{bid}.mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}

MAX_VOCAB = 4_000_000
MAX_DIM = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """Everything the toolkit needs to know about a decoder-only model, independent of layout.

    Dims are counts; ``rope_scaling`` is the HF dict (``rope_type`` llama3 | linear) or None.
    ``generation`` holds sampling defaults (temperature, top_p, think_prefix).
    """

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    torch_dtype: str = "float32"
    generation: dict = field(default_factory=dict)

    # ---- derived figures -------------------------------------------------------------
    def tensor_name(self, key: str, layer: int | None = None) -> str:
        """Canonical (HF) name of a tensor from the shared table."""
        if layer is None:
            return GLOBAL_TENSORS[key]
        return LAYER_TENSORS[key].format(bid=layer)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this model has, in checkpoint order, with its (out, in) shape."""
        h, q, kv, f = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        shapes = {GLOBAL_TENSORS["embed"]: (self.vocab_size, h)}
        for i in range(self.num_layers):
            layer = {
                "attn_norm": (h,), "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "mlp_norm": (h,), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
            }
            if self.attention_bias:
                layer.update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
            if self.qk_norm:
                layer.update(q_norm=(self.head_dim,), k_norm=(self.head_dim,))
            for key in LAYER_TENSORS:
                if key in layer:
                    shapes[self.tensor_name(key, i)] = layer[key]
        shapes[GLOBAL_TENSORS["final_norm"]] = (h,)
        if not self.tied_embeddings:
            shapes[GLOBAL_TENSORS["lm_head"]] = (self.vocab_size, h)
        return shapes

    @property
    def parameter_count(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of K and V cache one token costs across all layers (fp16 by default)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["eos_token_ids"] = tuple(kwargs.get("eos_token_ids", ()))
        return cls(**kwargs)


class Architecture:
    """One decoder family. Subclasses set flags and say which config keys they understand.

    ``checks`` maps a config key that changes the arithmetic to (accepts(value), what is computed);
    ``harmless`` lists keys of this family that change nothing. See ``config_keys``.
    """

    name: str = ""
    model_type: str = ""
    attention_bias: bool = False
    qk_norm: bool = False
    rope_types: tuple = ("default", "linear", "llama3", "yarn")
    checks: dict = {}
    harmless: frozenset = frozenset()

    def spec_from_config(self, config: dict, source: str = "config.json") -> ModelSpec:
        """Validate an HF config dict and turn it into a ModelSpec; errors name ``source``.
        A key that changes the arithmetic and is not implemented is refused; an unknown one reported."""
        cfg = _ConfigReader(config, source)
        check_keys(config, {**COMMON_CHECKS, **self.checks}, self.harmless, self.name, source)
        hidden = cfg.dim("hidden_size")
        heads = cfg.dim("num_attention_heads")
        kv_heads = cfg.dim("num_key_value_heads", default=heads)
        head_dim = cfg.dim("head_dim", default=hidden // heads if hidden % heads == 0 else 0)
        if "head_dim" not in config and hidden % heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} does not divide hidden_size={hidden}; "
                              "fix the config or give head_dim explicitly")
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_key_value_heads={kv_heads} does not divide "
                              f"num_attention_heads={heads}; grouped-query attention needs a divisor")
        vocab = cfg.dim("vocab_size", limit=MAX_VOCAB)
        rope_theta, rope_scaling = read_rope(config, self.rope_types, self.name, source)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return ModelSpec(
            architecture=self.name,
            hidden_size=hidden,
            num_layers=cfg.dim("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=cfg.dim("intermediate_size"),
            vocab_size=vocab,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=cfg.number("rms_norm_eps", 1e-6),
            attention_bias=self.attention_bias,
            qk_norm=self.qk_norm,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.dim("max_position_embeddings", default=4096, limit=1 << 24),
            bos_token_id=config.get("bos_token_id") if isinstance(config.get("bos_token_id"), int) else None,
            eos_token_ids=eos_ids,
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )

    def config_from_spec(self, spec: ModelSpec) -> dict:
        """The HF config.json that describes ``spec`` (used by fixtures and GGUF conversion)."""
        config = {
            "architectures": [self.name],
            "model_type": self.model_type,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "vocab_size": spec.vocab_size,
            "rope_theta": spec.rope_theta,
            "rope_scaling": spec.rope_scaling,
            "rms_norm_eps": spec.rms_norm_eps,
            "tie_word_embeddings": spec.tied_embeddings,
            "max_position_embeddings": spec.max_position_embeddings,
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": list(spec.eos_token_ids) if len(spec.eos_token_ids) > 1 else
            (spec.eos_token_ids[0] if spec.eos_token_ids else None),
            "torch_dtype": spec.torch_dtype,
            "hidden_act": "silu",
            "use_cache": True,
        }
        config.update(self.extra_config(spec))
        return config

    def extra_config(self, spec: ModelSpec) -> dict:
        return {}


class _ConfigReader:
    """Typed access to config.json fields with errors that name the field and the file."""

    def __init__(self, config: dict, source: str):
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        self.config, self.source = config, source

    def dim(self, key: str, default: int | None = None, limit: int = MAX_DIM) -> int:
        value = self.config.get(key, default)
        if value is None:
            raise ConfigError(f"{self.source}: required field '{key}' is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.source}: '{key}' must be an integer, got {value!r}")
        if value <= 0 or value > limit:
            raise ConfigError(f"{self.source}: '{key}'={value} is out of range (1..{limit})")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{self.source}: '{key}' must be a positive number, got {value!r}")
        return float(value)


_REGISTRY: dict[str, Architecture] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make an architecture available under its HF name and model_type."""
    arch = cls()
    _REGISTRY[arch.name] = arch
    _ALIASES[arch.model_type] = arch.name
    return cls


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(name: str, source: str = "config.json") -> Architecture:
    """Look an architecture up by HF class name or model_type."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"{source}: model type '{name}' is not supported (supported: {', '.join(supported_architectures())})")
    return _REGISTRY[key]


def spec_from_config(config: dict, source: str = "config.json") -> ModelSpec:
    """Pick the architecture named in an HF config and build the ModelSpec."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        name = names[0]
    elif isinstance(config.get("model_type"), str):
        name = config["model_type"]
    else:
        raise ConfigError(f"{source}: neither 'architectures' nor 'model_type' names the model")
    return get_architecture(name, source).spec_from_config(config, source)

