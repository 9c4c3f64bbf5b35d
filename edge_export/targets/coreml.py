"""The `coreml` target: an ML Program for iOS 18 / macOS 15, in two variants.

`mlprogram` (the default) builds the program op by op with coremltools' MIL builder from the
decoder description (coreml_mil.py): weights go from the quantizer to the package one tensor at a
time, so a 7B model exports in about the memory of one tensor.

`traced`: checkpoint weights -> our quantizer's QuantizedTensors -> their Core ML stored form
(coreml_weights.py) -> the decoder module built from exactly those values (coreml_torch.py) ->
torch.jit.trace -> coremltools (fp16 compute, KV cache as state, flexible query length) -> each
weight const swapped for a constexpr_blockwise_shift_scale holding our codes and scales ->
model.mlpackage -> the weights table read back from its weight.bin, checked against the module.

Conversion runs anywhere coremltools does; prediction needs macOS 15. Where it cannot predict,
the export is verified by interpreting the saved ML Program in numpy (``verify_program``,
coreml_interp.py; the traced variant: with the converted torch module, ``verify_scorer``), and
the manifest says which.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ExportError
from . import Target, register_scorer, register_target

log = logging.getLogger(__name__)
PACKAGE = "model.mlpackage"
INSTALL = "pip install coremltools==9.0 torch==2.13.0 'numpy<=2.3.5'"


def lower(spec, weights, folder: Path, variant: str, options, calibration=None) -> dict:
    """Write model.mlpackage into ``folder``; return the manifest's graph, weights and backend."""
    return {"mlprogram": lower_built, "traced": lower_traced}[variant](spec, weights, folder, options)


def lower_built(spec, weights, folder: Path, options) -> dict:
    """`--variant mlprogram`: the program built with the MIL builder (coreml_mil.py)."""
    ct, _ = _import(torch=False)
    from .coreml_mil import build_program, save_program
    from .coreml_weights import weights_table

    clock = _Clock()
    with _quiet():
        program, packed, spill = build_program(spec, weights, folder, options.max_context)
        clock.lap("quantized and built")
        try:
            save_program(program, spill, folder / PACKAGE,
                         f"{spec.architecture} decoder, KV cache as state, max context {options.max_context}")
            clock.lap("saved")
            table = weights_table(folder / PACKAGE, PACKAGE, packed)
            _check_spilled(folder, table, spill)
            clock.lap("weights read back and checked")
        finally:
            spill.path.unlink(missing_ok=True)
    log.info("coreml: %s", clock)
    return {"graph": _graph(ct, folder / PACKAGE, spec, options.max_context), "weights": table, "backend": "coreml"}


def _check_spilled(folder: Path, table: dict, spill) -> None:
    """The bytes runtimes reads from weight.bin must be exactly the stored forms the builder wrote:
    each blob the weights table points at, compared with the spill file byte for byte, one blob at
    a time (a 4-bit one as its two-a-byte packing)."""
    from .coreml_weights import FORMATS, _op_name
    for name, entry in table.items():
        tag = _op_name(name)
        consts = ({key: f"{tag}_{key}" for key in FORMATS[entry["format"]][1]}
                  if entry["format"] != "float" else {"data": tag})
        for key, const in consts.items():
            ref = entry.get(key)
            if ref is None and const not in spill.entries:
                continue
            if ref is None or const not in spill.entries:
                raise ExportError(f"tensor {name}: its {key} is missing from {PACKAGE} or from what the builder wrote")
            written = spill.read(const).reshape(-1)
            if ref.get("packed"):
                written = _two_a_byte(written)
            if not np.array_equal(_read_bytes(folder / ref["file"], ref), written.view(np.uint8)):
                raise ExportError(f"tensor {name}: the {key} read back from {PACKAGE} differs from what the builder "
                                  "wrote; the package is not what was quantized")


def _read_bytes(path: Path, ref: dict) -> np.ndarray:
    """The bytes a weights-table reference points at, read (not memory-mapped: a 7B package's
    mapped pages would count toward the export's resident memory as it walks them)."""
    with open(path, "rb") as f:
        f.seek(int(ref["offset"]))
        return np.frombuffer(f.read(int(ref["length"])), np.uint8)


def _two_a_byte(values: np.ndarray) -> np.ndarray:
    """4-bit values (int4 as -8..7 or uint4 as 0..15) packed two a byte, low nibble first."""
    nibbles = (values.astype(np.uint8) & 0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _table_artifact(folder: Path, table: dict):
    from runtimes.artifact import Artifact
    files = {entry["file"]: {} for e in table.values() for entry in _refs(e)}
    return Artifact(folder, {"weights": table, "files": files})


def lower_traced(spec, weights, folder: Path, options) -> dict:
    """`--variant traced`: the torch module traced and converted by coremltools, its weight consts
    swapped for our stored forms; a cross-check of the builder whose numerics are coremltools' own."""
    ct, torch = _import()
    from .coreml_torch import CoreMLDecoder
    from .coreml_weights import pack_weight, replace_weight_consts, weights_table

    clock = _Clock()
    packed = {name: pack_weight(name, weights.get(name)) for name in spec.tensor_shapes()}
    module = CoreMLDecoder(spec, lambda name: packed[name].dequantized(), options.max_context).eval()
    const_names = _const_names(module)
    clock.lap("quantized")
    with _quiet():
        program = _convert(ct, torch, module, spec, options.max_context)
        clock.lap("traced and converted")
        replace_weight_consts(program, const_names, packed)
        model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.short_description = f"{spec.architecture} decoder, KV cache as state, max context {options.max_context}"
    model.save(str(folder / PACKAGE))
    clock.lap("constexpr weights swapped in and saved")
    table = weights_table(folder / PACKAGE, PACKAGE, packed)
    _check_read_back(folder, table, module)
    clock.lap("weights read back and checked")
    log.info("coreml: %s", clock)
    return {"graph": _graph(ct, folder / PACKAGE, spec, options.max_context), "weights": table, "backend": "coreml"}


class _Clock:
    def __init__(self):
        self.start, self.laps = time.perf_counter(), []

    def lap(self, what: str) -> None:
        self.laps.append(f"{what} {time.perf_counter() - self.start:.1f} s")

    def __str__(self) -> str:
        return ", ".join(self.laps)


def _import(torch: bool = True):
    try:
        with _quiet():
            import coremltools as ct
            if torch:
                import torch
    except ImportError as e:
        raise ExportError(f"--target coreml needs coremltools{' and torch' if torch else ''} ({e.name} is missing): "
                          f"{INSTALL}") from e
    return ct, torch


@contextmanager
def _quiet():
    """coremltools without its import notes (torch version untested, no Core ML framework on Linux)
    and progress bars: the export reports its own progress."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = []
    if "coremltools" in sys.modules:
        from coremltools.converters.mil.frontend.torch import ops
        from coremltools.converters.mil.mil.passes import pass_pipeline
        bars = [(ops, "_tqdm", ops._tqdm), (pass_pipeline, "tqdm", pass_pipeline.tqdm)]
        for module, attr, bar in bars:
            setattr(module, attr, functools.partial(bar, disable=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        for module, attr, bar in bars:
            setattr(module, attr, bar)


def _const_names(module) -> dict[str, str]:
    """The const op name coremltools gives each parameter after the fp16 cast -> HF tensor name."""
    by_id = {id(p): name for name, p in module.linear_weights().items()}
    return {f"{torch_name}_to_fp16": by_id[id(p)] for torch_name, p in module.named_parameters()}


def _convert(ct, torch, module, spec, max_context: int):
    """Trace the module and convert it to a pymil Program (fp16, iOS 18, KV cache as state)."""
    from runtimes.backends.coreml import causal_mask

    from .coreml_torch import KEY_CACHE, VALUE_CACHE
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(0, 2, max_context)).float())
    # check_trace would re-run and compare the trace (30 s for SmolLM2); the export's verification
    # runs this very module against the reference instead
    traced = torch.jit.trace(module, example, check_trace=False)
    seq, end = ct.RangeDim(1, max_context, default=1), ct.RangeDim(1, max_context, default=1)
    cache = (spec.num_layers, 1, spec.num_kv_heads, max_context, spec.head_dim)
    state = lambda name: ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name=name)  # noqa: E731
    return ct.convert(
        traced, convert_to="milinternal", minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        inputs=[ct.TensorType("input_ids", shape=(1, seq), dtype=np.int32),
                ct.TensorType("causal_mask", shape=(1, 1, seq, end), dtype=np.float16)],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        states=[state(KEY_CACHE), state(VALUE_CACHE)])


def _check_read_back(folder: Path, table: dict, module) -> None:
    """What runtimes reads from weight.bin must be exactly what the converted module computed with."""
    from runtimes.weights import ArtifactWeights

    weights = ArtifactWeights(_table_artifact(folder, table))
    for name, param in module.linear_weights().items():
        if not np.array_equal(weights(name), param.detach().numpy()):
            raise ExportError(f"tensor {name}: the weights read back from {PACKAGE} differ from the converted "
                              "module's; the package is not what was verified")


def _refs(entry: dict) -> list[dict]:
    return [v for v in entry.values() if isinstance(v, dict) and "file" in v]


def _graph(ct, package: Path, spec, max_context: int) -> dict:
    from .coreml_mil import KEY_CACHE, VALUE_CACHE
    from .coreml_weights import op_histogram

    model_spec = ct.utils.load_spec(str(package))
    cache = [spec.num_layers, 1, spec.num_kv_heads, max_context, spec.head_dim]
    return {"file": PACKAGE, "format": "mlprogram", "minimum_deployment_target": "iOS18",
            "compute_precision": "float16", "kv_dtype": "float16", "logits": "last",
            "inputs": {"input_ids": {"dtype": "int32", "shape": [1, "seq"]},
                       "causal_mask": {"dtype": "float16", "shape": [1, 1, "seq", "end"]}},
            "outputs": {"logits": {"dtype": "float16", "shape": [1, 1, spec.vocab_size]}},
            "states": {KEY_CACHE: {"dtype": "float16", "shape": cache},
                       VALUE_CACHE: {"dtype": "float16", "shape": cache}},
            "seq": [1, max_context], "end": "tokens already cached + seq, at most max_context",
            "spec_version": model_spec.specificationVersion, "ops": op_histogram(model_spec)}


def _core_ml_scorer(artifact, options):
    """Core ML itself, where it predicts (macOS 15+); None elsewhere."""
    from runtimes.backends.coreml import CoreMLBackend

    from ..verify import RuntimeScorer
    if not CoreMLBackend.available()[0]:
        return None
    scorer = RuntimeScorer(CoreMLBackend(artifact, threads=options.threads))
    scorer.verified_with = "Core ML"
    return scorer


def verify_scorer(artifact, options):
    """`coreml-module` (the traced variant's): Core ML where it predicts; elsewhere the converted
    torch module over the package's own weights, read back from weight.bin."""
    scorer = _core_ml_scorer(artifact, options)
    if scorer is not None:
        return scorer
    _import()
    from .coreml_torch import TorchModuleScorer, verification_module
    return TorchModuleScorer(verification_module(artifact), threads=options.threads)


def verify_program(artifact, options):
    """`coreml-program` (the built variant's): Core ML where it predicts; elsewhere the saved ML
    Program interpreted op by op in numpy (coreml_interp.py), which checks the program's wiring as
    well as its weights, in about one layer's memory."""
    scorer = _core_ml_scorer(artifact, options)
    if scorer is not None:
        return scorer
    _import(torch=False)
    from .coreml_interp import program_scorer
    return program_scorer(artifact, options)


def _available() -> tuple[bool, str]:
    from runtimes.backends.coreml import CoreMLBackend
    missing = [name for name in ("coremltools", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        return False, f"{' and '.join(missing)} not installed, so it cannot export here: {INSTALL}"
    return CoreMLBackend.available()


register_scorer("coreml-module", verify_scorer)
register_scorer("coreml-program", verify_program)
register_target(Target(name="coreml", needs="coremltools and torch to export (any OS); macOS 15+ to run",
                       lower=lower, available=_available, backend="coreml"))
