"""Random-weight checkpoints of each preset in the real HF layout, for tests and scale benchmarks.

``write_fixture(preset, scale, out)`` writes config.json, safetensors (sharded above 2 GB, with
its index), tokenizer.json, tokenizer_config.json (chat template), generation_config.json and a
README saying where the tokenizer came from. Weights are streamed tensor by tensor in bf16, so a
3.5 GB checkpoint is written with a few hundred MB of memory; a family that stores tensors fused
(Phi-3's qkv_proj and gate_up_proj) gets them fused, as its own tooling writes them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from runtimes.models import ModelSpec, get_architecture

from .checkpoint.safetensors_io import f32_to_bf16, write_safetensors
from .errors import ExportError
from .fixture_tokenizers import (LLAMA_FULL_SPECIAL_IDS, R1_SPECIALS, _r1_header, byte_level_tokenizer,  # noqa: F401
                                 fixture_tokenizer, r1_chat_template, r1_tokenizer)
from .presets import TINY_HIDDEN, get_preset, preset_spec

SHARD_BYTES = 2 << 30


def write_fixture(preset: str, scale: str, out: str | Path, seed: int = 0, init_std: float | None = None) -> Path:
    """Write the preset's random checkpoint to ``out`` (created); returns the folder."""
    spec = preset_spec(preset, scale)
    out = Path(out)
    weight_bytes = spec.parameter_count * 2
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if weight_bytes > free:
        raise ExportError(f"{out}: {preset} at scale {scale} needs {weight_bytes / 1e9:.1f} GB of disk, "
                          f"only {free / 1e9:.1f} GB free; choose another folder or --scale tiny")
    # made before anything is written: without the export extra (or with a bad preset), nothing is left
    entry = get_preset(preset)
    tokenizer = fixture_tokenizer(entry.tokenizer, spec)
    out.mkdir(parents=True, exist_ok=True)
    std = init_std if init_std is not None else (0.02 if scale == "full" else tiny_init_std(spec))
    _write_weights(spec, out, np.random.default_rng(seed), std)
    config = get_architecture(spec.architecture).config_from_spec(spec)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(_generation_config(spec), indent=2))
    tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer.config, ensure_ascii=False, indent=2))
    (out / "README.md").write_text(
        f"# Random-weight fixture\n\nPreset {preset} at scale {scale}: architecture {spec.architecture}, "
        f"{spec.parameter_count:,} parameters, random bf16 weights: it answers nothing meaningful.\n\n"
        f"Config: {entry.source}" + (" (reduced to test scale)" if scale == "tiny" else "") +
        f".\n\nTokenizer: {tokenizer.note}\n")
    return out


def tiny_init_std(spec: ModelSpec) -> float:
    """The random weights' standard deviation at tiny scale: 0.08 at hidden 128, scaled by
    1/sqrt(hidden) so a wider tiny model (Phi-3's 384) is no peakier than the others: its int8 KV
    cache then agrees with float as theirs does (top-1 0.96 instead of 0.89 at 0.08)."""
    return 0.08 * (TINY_HIDDEN / spec.hidden_size) ** 0.5


def _generation_config(spec: ModelSpec) -> dict:
    """generation_config.json: the sampling defaults, BOS, and every id that ends a turn."""
    sampling = {k: v for k, v in spec.generation.items() if k != "eos_token_ids"}
    eos = list(spec.generation.get("eos_token_ids") or spec.eos_token_ids)
    return dict(sampling, bos_token_id=spec.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0])


def _tensor_producer(shape: tuple[int, ...], name: str, rng: np.random.Generator, std: float):
    def produce() -> np.ndarray:
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("bias"):
            values = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = std * rng.standard_normal(shape, dtype=np.float32)
        return f32_to_bf16(values)
    return produce


def checkpoint_tensors(spec: ModelSpec, rng: np.random.Generator, std: float):
    """(name, shape, producer) of every tensor in checkpoint order, as the family stores them: our
    tensors that it keeps fused (``Architecture.fused``) stacked along the rows into one, produced
    one fused tensor at a time."""
    shapes = spec.tensor_shapes()
    fused_into: dict[str, tuple[str, list[str]]] = {}
    for i in range(spec.num_layers):
        for template, keys in get_architecture(spec.architecture).fused.items():
            parts = [spec.tensor_name(key, i) for key in keys]
            fused_into.update({part: (template.format(bid=i), parts) for part in parts})
    for name, shape in shapes.items():
        if name not in fused_into:
            yield name, shape, _tensor_producer(shape, name, rng, std)
        elif name == fused_into[name][1][0]:
            fused, parts = fused_into[name]
            producers = [_tensor_producer(shapes[p], p, rng, std) for p in parts]
            rows = sum(shapes[p][0] for p in parts)
            yield fused, (rows, *shape[1:]), (lambda producers=producers: np.concatenate([p() for p in producers]))


def _write_weights(spec: ModelSpec, out: Path, rng: np.random.Generator, std: float) -> None:
    shards, current, size = [], [], 0
    for name, shape, produce in checkpoint_tensors(spec, rng, std):
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, "BF16", produce))
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, shard, {"format": "pt"})
        weight_map.update({name: file for name, *_ in shard})
    index = {"metadata": {"total_size": spec.parameter_count * 2}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
