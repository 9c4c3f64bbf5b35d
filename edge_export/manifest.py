"""What an export writes beside its graph: the manifest's fields (model, source, quantization with
each tensor's record, graph, weights, tokenizer and generation defaults) and the tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError


def build_manifest(ckpt, options, target, variant, rules, weights, lowered) -> dict:
    """The manifest of an export of ``ckpt`` lowered (``lowered``: the target's graph, weights and
    backend fields) to ``target``/``variant`` under ``rules``; export adds its timing and figures."""
    spec = ckpt.spec
    return {
        "target": target.name, "variant": variant, "backend": lowered.get("backend", target.backend),
        "model": spec.to_dict(),
        "source": {"path": str(ckpt.path), "format": ckpt.format, "dtype": ckpt.dtype},
        "quantization": {"quant": options.quant, "method": options.method, "rules": rules.to_list(),
                         "tensors": tensor_records(weights.records, lowered, target.name, variant)},
        "max_context": options.max_context,
        "graph": lowered["graph"], "weights": lowered["weights"],
        **({"engine": lowered["engine"]} if "engine" in lowered else {}),
        **tokenizer_fields(spec, ckpt.tokenizer),
    }


def tensor_records(records: dict, lowered: dict, target: str, variant: str | None) -> dict:
    """The per-tensor records; a tensor the target re-quantized in its own form (qnn's
    ``graph.quantization.requantized_weights``) is recorded as such, whatever it arrived as."""
    out = {name: record.to_dict() for name, record in records.items()}
    for name in lowered.get("graph", {}).get("quantization", {}).get("requantized_weights", []):
        if name in out and out[name]["source"] != "requantized":
            out[name].update(source="requantized", requantized_by=f"{target}/{variant}" if variant else target)
    return out


def tokenizer_fields(spec, tok) -> dict:
    """The manifest's tokenizer files, chat template, special token ids and generation defaults."""
    special = {name: tok.token_id(text) for name, text in (("bos", tok.bos_token), ("eos", tok.eos_token),
                                                            ("think_open", "<think>"), ("think_close", "</think>"))
               if text and tok.token_id(text) is not None}
    generation = {k: v for k, v in spec.generation.items() if k in ("temperature", "top_p", "top_k", "do_sample")}
    if tok.token_id("<think>") is not None and tok.token_id("</think>") is not None:
        generation["think_prefix"] = "<think>\n"  # DeepSeek's advice for the R1 distills
    generation["eos_token_ids"] = sorted(set(spec.eos_token_ids) | set(spec.generation.get("eos_token_ids", [])))
    return {
        "tokenizer": {"file": "tokenizer.json", "config": "tokenizer_config.json"},
        "chat_template": tok.chat_template, "special_tokens": special, "generation": generation,
    }


def write_tokenizer(tok, folder: Path, source) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, BOS/EOS) of ``tok`` into ``folder``."""
    if tok is None:
        raise ExportError(f"{source}: has no tokenizer (tokenizer.json); an artifact needs one to run")
    # written here rather than by tokenizers' save(), whose errors (a full disk) are not OSErrors
    (folder / "tokenizer.json").write_text(tok.tok.to_str(pretty=True), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "add_bos_token": tok.add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}, ensure_ascii=False, indent=2))


