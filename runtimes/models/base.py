"""ModelSpec, the architecture registry, and the tensor-name table every stage shares.

A checkpoint of any layout (HF folder, GGUF) is turned into one :class:`ModelSpec`; the
architecture it names decides which tensors exist and how config.json maps onto the spec.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, UnsupportedArchitectureError
from .config_keys import COMMON_CHECKS, check_keys, check_rotary, read_rope
from .decoder import GLOBAL_TENSORS, LAYER_TENSORS, layer_tensors

MAX_VOCAB = 4_000_000
MAX_DIM = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """Everything the toolkit needs to know about a decoder-only model, independent of layout.

    Dims are counts; ``rope_scaling`` is the HF dict (``rope_type`` linear | llama3 | yarn |
    longrope, transformers' defaults filled in) or None; ``partial_rotary_factor`` the share of each
    head that rotates. ``generation`` holds sampling defaults (temperature, top_p, think_prefix).
    What a layer computes from these is ``runtimes.models.decoder.describe(spec)``.
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
    partial_rotary_factor: float = 1.0
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
    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotate (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def tensor_name(self, key: str, layer: int | None = None) -> str:
        """Canonical (HF) name of a tensor from the shared table."""
        if layer is None:
            return GLOBAL_TENSORS[key]
        return LAYER_TENSORS[key].format(bid=layer)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this model has, in checkpoint order, with its (out, in) shape."""
        h = self.hidden_size
        shapes = {GLOBAL_TENSORS["embed"]: (self.vocab_size, h)}
        layer = layer_tensors(self)
        for i in range(self.num_layers):
            shapes.update({self.tensor_name(key, i): shape for key, shape in layer.items()})
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
    ``partial_rotary``: whether ``partial_rotary_factor`` < 1 is implemented (else it is refused).
    ``rope_aliases``: this family's other names for a rope type (Phi-3's "su" is LongRoPE).
    ``fused``: checkpoint tensors that hold several of ours stacked along the rows, as
    {fused HF name template: (our keys in row order)}; see :meth:`sanitize`.
    ``config_defaults``: what transformers' config class of this family assumes for a key that
    config.json leaves out and that changes the arithmetic (read as if it were written).
    """

    name: str = ""
    model_type: str = ""
    attention_bias: bool = False
    qk_norm: bool = False
    partial_rotary: bool = False
    rope_types: tuple = ("default", "linear", "llama3", "yarn")
    rope_aliases: dict = {}
    checks: dict = {}
    harmless: frozenset = frozenset()
    fused: dict = {}
    config_defaults: dict = {}

    def sanitize(self, spec: ModelSpec, names) -> dict[str, tuple[str, int, int]]:
        """Checkpoint quirks: for each of our tensor names that a checkpoint (holding ``names``)
        stores inside a fused tensor, (fused name, first row, end row). Empty when nothing is fused."""
        names, views = set(names), {}
        shapes = layer_tensors(spec)
        for i in range(spec.num_layers):
            for template, keys in self.fused.items():
                fused = template.format(bid=i)
                if fused not in names:
                    continue
                start = 0
                for key in keys:
                    rows = shapes[key][0]
                    views[spec.tensor_name(key, i)] = (fused, start, start + rows)
                    start += rows
        return views

    def fuse(self, spec: ModelSpec, tensors: dict) -> dict:
        """The inverse of :meth:`sanitize`: our tensors stacked into this family's fused ones
        (to write a checkpoint as the family's own tooling does)."""
        out = dict(tensors)
        for i in range(spec.num_layers):
            for template, keys in self.fused.items():
                parts = [out.pop(spec.tensor_name(key, i)) for key in keys]
                out[template.format(bid=i)] = np.concatenate(parts, axis=0)
        return out

    def spec_from_config(self, config: dict, source: str = "config.json") -> ModelSpec:
        """Validate an HF config dict and turn it into a ModelSpec; errors name ``source``.
        A key that changes the arithmetic and is not implemented is refused; an unknown one reported."""
        if isinstance(config, dict):
            config = {**self.config_defaults, **config}
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
        rope_theta, rope_scaling, partial = read_rope(config, self.rope_types, self.name, source, self.rope_aliases)
        if partial != 1.0 and not self.partial_rotary:
            raise ConfigError(f"{source}: 'partial_rotary_factor' = {partial!r} changes the model's arithmetic and is "
                              f"not implemented for {self.name} (rotary over the whole head)")
        check_rotary(partial, head_dim, rope_scaling, source)
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
            partial_rotary_factor=partial,
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
        if spec.partial_rotary_factor != 1.0:
            config["partial_rotary_factor"] = spec.partial_rotary_factor
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

