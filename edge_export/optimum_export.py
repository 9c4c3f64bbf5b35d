"""`--via optimum`: architectures outside the registry, through optimum-onnx's exporter.

HF folder -> optimum-onnx's decoder (task text-generation-with-past: standard ops, present =
[past, new], position_ids, logits at every position) -> for int4, onnxruntime's MatMulNBitsQuantizer
-> tokenizer -> manifest (target onnx, variant ``optimum``) -> verified against the transformers
model itself in torch -> published atomically like every export.

Our numpy reference decoder does not know these architectures, so the artifact carries no weights
table and its manifest names onnxruntime as the only backend that runs it.
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np

from runtimes.models import ModelSpec
from runtimes.tokenizer import ChatTokenizer

from .artifact import publish, staging_folder, write_manifest
from .checkpoint.hf import generation_defaults
from .checkpoint.hf import read_tokenizer as hf_tokenizer
from .errors import ExportError
from .export import _check_thresholds
from .manifest import tokenizer_fields, write_tokenizer
from .optimum_graph import DATA_FILE, MODEL_FILE, float_weights, gemm_to_matmul, graph_section, quantize, quantized_weights
from .verify import N_NEW, FixedReference, RuntimeScorer, compare, load_prompts, log_softmax

log = logging.getLogger(__name__)
VARIANT = "optimum"
TASK = "text-generation-with-past"
INSTALL = "pip install 'edge-export[optimum]'"
BACKENDS_NOTE = ("its graph comes from optimum-onnx for an architecture our numpy reference decoder may not know, "
                 "so it carries no weights table")


def export_via_optimum(checkpoint, out, options, progress=lambda s: None) -> dict:
    """Export the HF folder ``checkpoint`` through optimum-onnx to the artifact folder ``out``.

    ``options`` is an ExportOptions (quant int4 or fp32; group_size, symmetric, head, accuracy_level,
    max_context, verify thresholds apply). Returns the manifest; on failure nothing is left at ``out``.
    """
    options = _check_options(options)
    folder = _hf_folder(checkpoint)
    main_export = _optimum_exporter()
    t0 = time.perf_counter()
    spec, tokenizer = model_spec(folder), read_tokenizer(folder)
    if options.max_context > spec.max_position_embeddings:
        log.info("max_context %d capped at the model's %d positions", options.max_context, spec.max_position_embeddings)
        options = replace(options, max_context=spec.max_position_embeddings)
    with staging_folder(out, options.overwrite) as staging:
        progress(f"exporting {spec.architecture} with optimum-onnx ({TASK})")
        scratch = staging / ".optimum"
        _run_exporter(main_export, folder, scratch)
        progress(f"quantizing ({options.quant}) with onnxruntime's MatMulNBitsQuantizer" if options.quant == "int4"
                 else "keeping float32 weights")
        quantization = _lower(scratch, staging, spec, options)
        shutil.rmtree(scratch)
        write_tokenizer(tokenizer, staging, folder)
        manifest = _manifest(folder, spec, tokenizer, options, quantization, staging / MODEL_FILE)
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        write_manifest(staging, manifest)
        if options.verify:
            progress("verifying against the transformers model (torch, float32)")
            manifest["verification"] = verify_against_transformers(staging, folder, tokenizer, options)
            write_manifest(staging, manifest)
            _check_thresholds(manifest["verification"], options)
        publish(staging, Path(out).absolute(), options.overwrite)
    from runtimes.artifact import read_manifest
    return read_manifest(out).manifest


# ---- inputs ------------------------------------------------------------------------------------
def _check_options(options):
    """Only what this route can honour; everything else is refused by name."""
    if options.target != "onnx" or options.variant not in (None, VARIANT):
        raise ExportError(f"--via optimum writes --target onnx --variant {VARIANT}; "
                          f"drop --target {options.target}" + (f" --variant {options.variant}" if options.variant else ""))
    if options.quant not in ("int4", "fp32"):
        raise ExportError(f"--via optimum takes --quant int4 or fp32, not {options.quant} "
                          "(onnxruntime's MatMulNBitsQuantizer does the int4)")
    if options.method not in (None, "rtn"):
        raise ExportError(f"--via optimum quantizes by round-to-nearest only; --method {options.method} "
                          "needs our own exporter (a registered architecture, without --via)")
    if options.kv_cache != "float32":
        raise ExportError("--via optimum keeps optimum's float32 KV cache; drop --kv-cache")
    if options.clip_search:
        raise ExportError("--via optimum quantizes with onnxruntime's MatMulNBitsQuantizer, which has no clip "
                          "search; drop --clip-search")
    if options.quant == "int4" and options.head not in ("int8", "int4", "float"):
        raise ExportError(f"--head '{options.head}' must be int8, int4 or float")
    return replace(options, method="rtn" if options.quant == "int4" else "none")


def _hf_folder(checkpoint) -> Path:
    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{checkpoint}: --via optimum needs an HF model folder (config.json + safetensors)")
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"{folder}: no *.safetensors; --via optimum never unpickles weights "
                          "(convert with model.save_pretrained(dir, safe_serialization=True))")
    return folder


def _optimum_exporter():
    """optimum-onnx's main_export, or an ExportError that says what to install."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        try:
            needs = [r for r in metadata.requires("optimum-onnx") or [] if r.startswith("transformers")]
        except metadata.PackageNotFoundError:
            raise ExportError(f"--via optimum needs optimum-onnx, which is not installed: {INSTALL}") from e
        have = _version("transformers")
        fix = f"pip install '{needs[0]}' (in a virtual environment of its own if other tools need this one)" \
            if needs else INSTALL
        raise ExportError(f"--via optimum: optimum-onnx {_version('optimum-onnx')} cannot be imported ({e}); it "
                          f"needs {', '.join(needs) or 'another transformers'} and this environment has "
                          f"transformers {have}: {fix}") from e
    return main_export


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def model_spec(folder: Path) -> ModelSpec:
    """The manifest's model section from transformers' reading of config.json (any architecture)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{folder}/config.json: transformers cannot read it ({e})") from e
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, heads, layers = int(config.hidden_size), int(config.num_attention_heads), int(config.num_hidden_layers)
    except (AttributeError, TypeError) as e:
        raise ExportError(f"{folder}/config.json: not a decoder transformers describes by hidden size, heads "
                          f"and layers ({e})") from e
    eos = config.eos_token_id
    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    return ModelSpec(
        architecture=architecture, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        intermediate_size=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                              or 4 * hidden),
        vocab_size=int(config.vocab_size),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", None) or 2048),
        bos_token_id=config.bos_token_id if isinstance(config.bos_token_id, int) else None,
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ()),
        torch_dtype=str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
                        ).replace("torch.", ""),
        generation=generation_defaults(folder))


def read_tokenizer(folder: Path) -> ChatTokenizer:
    tok = hf_tokenizer(folder)
    if tok is None:
        raise ExportError(f"{folder}: no tokenizer.json; an artifact needs a fast tokenizer to run (save one with "
                          "AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    return tok


# ---- export and quantization -------------------------------------------------------------------
def _run_exporter(main_export, folder: Path, scratch: Path) -> None:
    """optimum-onnx's export (its own output check skipped: ours against transformers follows)."""
    try:
        import torch
        tracer_warning = torch.jit.TracerWarning
    except (ImportError, AttributeError):
        tracer_warning = UserWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tracer_warning)  # the tracer's notes on Python control flow
        try:
            main_export(str(folder), output=str(scratch), task=TASK, device="cpu", local_files_only=True,
                        do_validation=False, library_name="transformers")
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ExportError(f"{folder}: optimum-onnx cannot export it ({e})") from e
    if not (scratch / MODEL_FILE).is_file():
        raise ExportError(f"{folder}: optimum-onnx wrote no {MODEL_FILE} (files: "
                          f"{', '.join(sorted(p.name for p in scratch.iterdir()))})")


def _lower(scratch: Path, staging: Path, spec: ModelSpec, options) -> dict:
    """Write staging/model.onnx (+ .data); return the manifest's quantization section."""
    import onnx
    model = onnx.load(str(scratch / MODEL_FILE))
    record = {"quant": options.quant, "method": options.method, "exporter": "optimum-onnx"}
    if options.quant == "int4":
        rewritten = gemm_to_matmul(model.graph)
        model = quantize(model, spec, options)
        record.update(quantizer="onnxruntime MatMulNBitsQuantizer", group_size=options.group_size,
                      symmetric=options.symmetric, accuracy_level=options.ort.accuracy_level, head=options.head,
                      gemm_rewritten=rewritten, **quantized_weights(model.graph))
    else:
        record.update(kept_float=float_weights(model.graph))
    onnx.save_model(model, str(staging / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    return record


# ---- manifest --------------------------------------------------------------------------------
def _manifest(folder: Path, spec: ModelSpec, tokenizer, options, quantization: dict, model_path: Path) -> dict:
    graph = graph_section(model_path)
    for name in ("input_ids", "attention_mask", "past_key_values.{i}.key", "past_key_values.{i}.value"):
        if name not in graph["inputs"]:
            raise ExportError(f"{folder}: optimum-onnx's graph has no input '{name}' (inputs: "
                              f"{', '.join(graph['inputs'])}); the onnxruntime backend cannot run it")
    return {
        "target": "onnx", "variant": VARIANT, "backend": "onnxruntime",
        "backends": ["onnxruntime"], "backends_note": BACKENDS_NOTE,
        "model": spec.to_dict(),
        "source": {"path": str(folder), "format": "hf", "dtype": spec.torch_dtype,
                   "exporter": {"name": "optimum-onnx", "version": _version("optimum-onnx"), "task": TASK,
                                "optimum": _version("optimum"), "transformers": _version("transformers"),
                                "torch": _version("torch")}},
        "quantization": quantization,
        "max_context": options.max_context,
        "graph": graph,
        **tokenizer_fields(spec, tokenizer),
    }


# ---- verification ------------------------------------------------------------------------------
def verify_against_transformers(staging: Path, folder: Path, tokenizer, options) -> dict:
    """The artifact's next-token distributions against the transformers model's in torch float32:
    the same figures (kl_mean, top1_agreement, greedy_match_tokens) as a verification against our
    reference decoder, with ``verified_against: transformers``."""
    import runtimes
    from runtimes.artifact import read_manifest
    prompts = prompt_ids(tokenizer, load_prompts(options.prompts))
    ref_tokens, ref_logprobs = transformers_greedy(folder, prompts, N_NEW, options.threads)
    artifact = read_manifest(staging, staging_ok=True)
    backend = runtimes.get_backend("onnxruntime")(artifact, threads=options.threads)
    figures = compare(FixedReference(ref_tokens, ref_logprobs), RuntimeScorer(backend), prompts).to_dict()
    return {**figures, "verified_against": "transformers"}


def prompt_ids(tokenizer: ChatTokenizer, prompts: list) -> list[list[int]]:
    """Prompts through the chat template, or as plain text where the model has none (GPT-2)."""
    if tokenizer.chat_template:
        return [tokenizer.encode_chat(p) for p in prompts]
    texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
    return [tokenizer.encode(t) for t in texts]


def transformers_greedy(folder: Path, prompts: list[list[int]], n_new: int, threads: int | None = None):
    """Each prompt's greedy continuation by the transformers model (torch, float32, its KV cache)
    and the log-probs [n_new, vocab] that chose it. The model is freed before returning."""
    import torch
    from transformers import AutoModelForCausalLM
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokens, logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            out = model(torch.tensor([p]), use_cache=True)
            new, rows = [], []
            for step in range(n_new):
                rows.append(log_softmax(out.logits[0, -1].numpy()))
                new.append(int(np.argmax(rows[-1])))
                if step < n_new - 1:
                    out = model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(new)
            logprobs.append(np.stack(rows))
    del model
    return tokens, logprobs
