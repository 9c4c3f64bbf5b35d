"""The `coreml` target, variant `mlprogram`: an ML Program for iOS 18 / macOS 15.

checkpoint weights -> our quantizer's QuantizedTensors -> their Core ML stored form
(coreml_weights.py) -> the decoder module built from exactly those values (coreml_torch.py) ->
torch.jit.trace -> coremltools (fp16 compute, KV cache as state, flexible query length) -> each
weight const swapped for a constexpr_blockwise_shift_scale holding our codes and scales ->
model.mlpackage -> the weights table read back from its weight.bin, checked against the module.

Conversion runs anywhere coremltools does; prediction needs macOS 15. Where it cannot predict,
the export is verified with the converted torch module (``verify_scorer``), and the manifest
says so.
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


def lower_mlprogram(spec, weights, folder: Path, variant: str, options, calibration=None) -> dict:
    """Write model.mlpackage into ``folder``; return the manifest's graph, weights and backend."""
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


def _import():
    try:
        with _quiet():
            import coremltools as ct
            import torch
    except ImportError as e:
        raise ExportError(f"--target coreml needs coremltools and torch ({e.name} is missing): {INSTALL}") from e
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
    from runtimes.artifact import Artifact
    from runtimes.weights import ArtifactWeights

    files = {entry["file"]: {} for e in table.values() for entry in _refs(e)}
    weights = ArtifactWeights(Artifact(folder, {"weights": table, "files": files}))
    for name, param in module.linear_weights().items():
        if not np.array_equal(weights(name), param.detach().numpy()):
            raise ExportError(f"tensor {name}: the weights read back from {PACKAGE} differ from the converted "
                              "module's; the package is not what was verified")


def _refs(entry: dict) -> list[dict]:
    return [v for v in entry.values() if isinstance(v, dict) and "file" in v]


def _graph(ct, package: Path, spec, max_context: int) -> dict:
    from .coreml_weights import op_histogram
    from .coreml_torch import KEY_CACHE, VALUE_CACHE

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


def verify_scorer(artifact, options):
    """What verifies the export (a verify.compare candidate): Core ML itself where it predicts
    (macOS 15+); elsewhere the converted torch module over the package's own weights, read back
    from weight.bin."""
    from runtimes.backends.coreml import CoreMLBackend

    from ..verify import RuntimeScorer
    if CoreMLBackend.available()[0]:
        scorer = RuntimeScorer(CoreMLBackend(artifact, threads=options.threads))
        scorer.verified_with = "Core ML"
        return scorer
    _import()
    from .coreml_torch import TorchModuleScorer, verification_module
    return TorchModuleScorer(verification_module(artifact), threads=options.threads)


def _available() -> tuple[bool, str]:
    from runtimes.backends.coreml import CoreMLBackend
    missing = [name for name in ("coremltools", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        return False, f"{' and '.join(missing)} not installed, so it cannot export here: {INSTALL}"
    return CoreMLBackend.available()


register_scorer("coreml-module", verify_scorer)
register_target(Target(name="coreml", needs="coremltools and torch to export (any OS); macOS 15+ to run",
                       lower=lower_mlprogram, available=_available, backend="coreml"))
