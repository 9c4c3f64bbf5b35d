"""What `export` takes (ExportOptions, with each target's own options typed per target), and the
one check of those options against the target's declaration in runtimes/capabilities.py.

An option a target does not honour, set away from its default, is refused with one line naming
the target and the option, never silently dropped; a KV dtype, precision, context length or device
the target cannot carry is refused the same way.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields, replace

from runtimes.capabilities import (DEFAULT_QNN_SOC, KV_BYTES, KV_CACHE_NAMES, PALETTIZE, QNN_SOCS, RUNS_AS,
                                   TARGET_OPTIONS, TARGETS, TargetCapabilities, kv_dtype)

from .errors import ExportError

# Verification thresholds an export must pass (overridable): the mean KL over the built-in prompts'
# 32 reference tokens, and the share of those positions whose argmax agrees.
MAX_KL = 0.5
MIN_TOP1 = 0.70


@dataclass(frozen=True)
class OrtOptions:
    """onnx/ort only. ``accuracy_level``: MatMulNBits' 4 = int8 activations per block (fast on CPU),
    0 = exact float."""

    accuracy_level: int = 4


@dataclass(frozen=True)
class QnnOptions:
    """onnx/qnn only. ``soc``: the Snapdragon it is compiled for (QNN_SOCS; None: the --device
    profile's, else DEFAULT_QNN_SOC). ``prefill_chunk``: tokens per static prefill graph run."""

    soc: str | None = None
    prefill_chunk: int = 64


@dataclass(frozen=True)
class TensorrtOptions:
    """tensorrt only. ``opt_tokens``: the prompt length the engine's optimization profile is tuned
    for ("opt" shape; min 1, max --max-context)."""

    opt_tokens: int = 128


# Per-target option -> (its group on ExportOptions, its class).
TARGET_GROUPS = {"accuracy_level": ("ort", OrtOptions), "soc": ("qnn", QnnOptions),
                 "prefill_chunk": ("qnn", QnnOptions), "opt_tokens": ("tensorrt", TensorrtOptions)}
# How a command line spells an option, for messages that Python callers read too.
FLAGS = {"symmetric": "--asymmetric", "fp8_activations": "--fp8-activations", "via": "--via",
         "accuracy_level": "--accuracy-level", "soc": "--soc", "prefill_chunk": "--prefill-chunk",
         "opt_tokens": "--opt-tokens", "kv_cache": "--kv-cache", "max_context": "--max-context",
         "device": "--device", "quant": "--quant", "lut_rows": "--lut-rows"}


@dataclass(frozen=True)
class ExportOptions:
    """Everything `export` takes. Options for one target only are in its group (``ort``, ``qnn``,
    ``tensorrt``); their flat names (``accuracy_level=0``, ``soc="SM8750"``, ``prefill_chunk=32``,
    ``opt_tokens=256``) are accepted too and read back the same way (``options.accuracy_level``)."""

    target: str = "onnx"
    variant: str | None = None
    quant: str = "int4"  # see runtimes.capabilities: each target's quants
    method: str | None = None  # rtn | awq | gptq | keep | palettize (int4); None: keep for a GGUF, else rtn
    group_size: int = 32
    lut_rows: int = 16  # --method palettize: consecutive output rows sharing one 16-entry table
    symmetric: bool = True
    act_order: bool = False
    clip_search: bool = False  # int4: shrink each group's range where that lowers its squared error
    head: str = "int8"  # lm_head (and a tied embedding): int8 per row | int4 (the main scheme) | float
    max_context: int = 2048
    kv_cache: str | None = None  # fp32/float32 | fp16/float16 | int8; None: the target's own (its kv_caches[0])
    device: str | None = None  # a device profile the artifact is for: its engine and precisions are checked
    fp8_activations: bool | None = None  # fp8: also quantize each linear's input (per-tensor scale
    # from calibration); None: the target decides (tensorrt: yes, FP8 GEMMs; others: weights only)
    calibration: str | None = None
    verify: bool = True
    max_kl: float = MAX_KL
    min_top1: float = MIN_TOP1
    prompts: str | None = None  # JSONL replacing the built-in verification prompts
    verify_tokens: int = 32  # tokens verification decodes after each prompt
    overwrite: bool = False
    threads: int | None = None
    via: str | None = None  # another exporter (EXPORTERS): optimum, for architectures outside the registry
    tensor_loss: str = "auto"  # a GGUF tensor not carried exactly: kl | relative_output_error | auto (tensor_loss.py)
    ort: OrtOptions = field(default_factory=OrtOptions)
    qnn: QnnOptions = field(default_factory=QnnOptions)
    tensorrt: TensorrtOptions = field(default_factory=TensorrtOptions)
    accuracy_level: InitVar[int | None] = None
    soc: InitVar[str | None] = None
    prefill_chunk: InitVar[int | None] = None
    opt_tokens: InitVar[int | None] = None

    def __post_init__(self, accuracy_level, soc, prefill_chunk, opt_tokens):
        flat = {"accuracy_level": accuracy_level, "soc": soc, "prefill_chunk": prefill_chunk, "opt_tokens": opt_tokens}
        for name, value in flat.items():
            if value is not None:
                group = TARGET_GROUPS[name][0]
                object.__setattr__(self, group, replace(getattr(self, group), **{name: value}))
        object.__setattr__(self, "kv_cache", kv_dtype(self.kv_cache))


# The flat names read back from their group (InitVars with a default would otherwise read as None).
for _name, (_group, _) in TARGET_GROUPS.items():
    setattr(ExportOptions, _name, property(lambda self, g=_group, n=_name: getattr(getattr(self, g), n)))


def option_default(name: str):
    """An option's default, where a user has not set it."""
    if name in TARGET_GROUPS:
        return getattr(TARGET_GROUPS[name][1](), name)
    return next(f for f in fields(ExportOptions) if f.name == name).default


def honoured_by(name: str) -> list[str]:
    """The declared targets that honour option ``name``."""
    return [t.name for t in TARGETS.values() if name in t.honours]


def check_options(options: ExportOptions, caps: TargetCapabilities) -> ExportOptions:
    """Refuse what ``caps``' target does not honour or carry (ExportError, one line); return the
    options with the target's own values filled in (its KV dtype, its SoC)."""
    if options.quant not in caps.quants:
        raise ExportError(f"--quant {options.quant} cannot be carried by target {caps.name} "
                          f"(it takes: {', '.join(caps.quants)})")
    _check_method(options, caps)
    for name in (n for n in TARGET_OPTIONS if n not in caps.honours):
        value = getattr(options, name)
        if value != option_default(name):
            raise ExportError(f"target {caps.name} does not honour {FLAGS[name]} ({name}={value!r}): it applies to "
                              f"{', '.join(honoured_by(name))} only; drop it for {caps.name}")
    if options.fp8_activations is not None and options.quant != "fp8":
        raise ExportError(f"{FLAGS['fp8_activations']} (fp8_activations={options.fp8_activations!r}) applies to "
                          f"--quant fp8 only, not --quant {options.quant}; drop it")
    kv = _check_kv_cache(options.kv_cache, caps)
    least = caps.max_context[0]
    if options.max_context < least:
        raise ExportError(f"--max-context {options.max_context} (max_context) for {caps.name} must be at least {least}")
    profile = check_device(options.device, caps, options.quant) if options.device else None
    changes = {"kv_cache": kv}
    if "soc" in caps.honours:
        changes["qnn"] = replace(options.qnn, soc=_qnn_soc(options.qnn.soc, profile))
    _check_positive(options, caps)
    return replace(options, **changes)


def _check_method(options: ExportOptions, caps: TargetCapabilities) -> None:
    """An int4 method the target's artifact cannot store, or a block-wise int4 option given with
    --method palettize (its tables are shared by output rows: no groups of inputs, no zero points)."""
    method = options.method
    if method != PALETTIZE and options.lut_rows != option_default("lut_rows"):
        raise ExportError(f"{FLAGS['lut_rows']} {options.lut_rows} (lut_rows) applies to --method {PALETTIZE} only; "
                          "drop it")
    if method is None:
        return
    if method not in caps.methods and any(method in t.methods for t in TARGETS.values()):
        carriers = [t.name for t in TARGETS.values() if method in t.methods]
        raise ExportError(f"--method {method} cannot be carried by target {caps.name} (its int4 methods: "
                          f"{', '.join(caps.methods)}); {', '.join(carriers)} store(s) it")
    if method != PALETTIZE:
        return
    if options.quant != "int4":
        raise ExportError(f"--method {PALETTIZE} applies to --quant int4, not --quant {options.quant}")
    if not (isinstance(options.lut_rows, int) and options.lut_rows >= 1):
        raise ExportError(f"{FLAGS['lut_rows']} {options.lut_rows} (lut_rows) must be a positive number of rows")
    blockwise = {"--group-size": (options.group_size, option_default("group_size")),
                 FLAGS["symmetric"]: (options.symmetric, True), "--clip-search": (options.clip_search, False),
                 "--act-order": (options.act_order, False)}
    for flag, (value, default) in blockwise.items():
        if value != default:
            raise ExportError(f"{flag} ({value!r}) applies to block-wise int4, not --method {PALETTIZE}, whose "
                              f"16-entry tables are shared by output rows ({FLAGS['lut_rows']}); drop it")


def check_context(options: ExportOptions, caps: TargetCapabilities, spec) -> None:
    """``max_context`` against the target's rule for this model (ExportError, one line)."""
    allowed = caps.context_range(spec.max_position_embeddings)
    if options.max_context not in allowed:
        raise ExportError(f"--max-context {options.max_context} (max_context) for {caps.name} must be in "
                          f"{allowed.start}..{allowed.stop - 1} (the model has {spec.max_position_embeddings} "
                          "positions)")


def _check_kv_cache(asked: str | None, caps: TargetCapabilities) -> str:
    if asked is None:
        return caps.kv_caches[0]
    if asked not in KV_BYTES:
        raise ExportError(f"--kv-cache '{asked}' (kv_cache) is not a KV dtype: use one of "
                          f"{', '.join(f'{k} ({v})' for k, v in KV_CACHE_NAMES.items())}")
    if asked not in caps.kv_caches:
        short = {v: k for k, v in KV_CACHE_NAMES.items()}
        carriers = [t.name for t in TARGETS.values() if asked in t.kv_caches]
        raise ExportError(f"target {caps.name} holds its KV cache in {', '.join(caps.kv_caches)} only, not "
                          f"--kv-cache {short.get(asked, asked)} (kv_cache={asked!r})"
                          + (f", which {', '.join(carriers)} carry" if carriers else "")
                          + "; leave it unset for the target's own")
    return asked


def check_device(device: str, caps: TargetCapabilities, quant: str):
    """The profile ``device`` names, once checked to run ``caps``' target (an engine for its kind,
    or for a target it runs as) and ``quant`` on its hardware; ExportError otherwise."""
    from devices.profiles import ProfileError, get_profile
    try:
        profile = get_profile(device)
    except ProfileError as e:
        raise ExportError(f"--device: {e}") from None
    runs_there = [caps.name, *RUNS_AS.get(caps.name, ())]
    if not any(name in profile.targets for name in runs_there):
        there = ", ".join(profile.targets) or "none of edge-export's targets"
        raise ExportError(f"--device {profile.name} ({profile.kind}) has no engine for target {caps.name}; "
                          f"the targets that run there: {there}")
    precision = "fp16" if quant in ("fp16", "fp32") else quant
    if precision not in profile.precisions:
        raise ExportError(f"--quant {quant} for --device {profile.name}: {profile.missing_precision}; "
                          "use --quant int4 (weight-only, fp16 activations) instead")
    return profile


def _qnn_soc(asked: str | None, profile) -> str:
    """The SoC a qnn export compiles for: --soc, else the --device profile's, else the default."""
    from_profile = (profile.extra or {}).get("qnn_soc") if profile is not None else None
    if asked and from_profile and asked != from_profile:
        raise ExportError(f"--soc {asked} contradicts --device {profile.name}, which is {from_profile}; "
                          "give one of them")
    soc = asked or from_profile or DEFAULT_QNN_SOC
    if soc not in QNN_SOCS:
        raise ExportError(f"--soc {soc} is not a Snapdragon the qnn variant knows (known: {', '.join(QNN_SOCS)})")
    return soc


def _check_positive(options: ExportOptions, caps: TargetCapabilities) -> None:
    if options.accuracy_level not in range(5):
        raise ExportError(f"--accuracy-level {options.accuracy_level} (accuracy_level) must be 0..4")
    for name in ("prefill_chunk", "opt_tokens"):
        value = getattr(options, name)
        if name in caps.honours and not (isinstance(value, int) and value >= 1):
            raise ExportError(f"{FLAGS[name]} {value} ({name}) must be a positive number of tokens")
