"""HF checkpoint folders: config.json, (sharded) safetensors, tokenizer files, generation_config.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from runtimes.models import get_architecture, spec_from_config
from runtimes.tokenizer import ChatTokenizer

from ..errors import CheckpointError
from .base import Checkpoint, inside
from .safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


class HFCheckpoint(Checkpoint):
    format = "hf"

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder}: no config.json; point at an HF model folder "
                                  "(config.json + *.safetensors) or a .gguf file")
        config = read_json(config_path, "config.json")
        spec = spec_from_config(config, str(config_path))
        self.files = self._open_weights(folder)
        self.where = {name: f for f in self.files for name in f.keys()}
        # tensors the family stores fused (Phi-3's qkv_proj, gate_up_proj): name -> (fused, rows)
        self.views = get_architecture(spec.architecture).sanitize(spec, self.where)
        spec = dataclasses.replace(spec, generation=generation_defaults(folder),
                                   torch_dtype=self._main_dtype(spec))
        super().__init__(folder, spec, read_tokenizer(folder))
        found = {n: f.info(n)[1] for n, f in self.where.items()}
        for name, (fused, start, stop) in self.views.items():
            if fused in found and stop <= found[fused][0]:
                found[name] = (stop - start, *found[fused][1:])
        self.check_shapes(found, str(folder))

    def _open_weights(self, folder: Path) -> list[SafetensorsFile]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "model.safetensors.index.json").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no 'weight_map' object")
            shards = []
            for name in dict.fromkeys(weight_map.values()):
                path = inside(folder, name, "shard")
                if not path.is_file():
                    raise CheckpointError(f"{index}: names shard '{name}', which is missing; download it again")
                shards.append(SafetensorsFile(path))
            return shards
        single = folder / "model.safetensors"
        if single.is_file():
            inside(folder, "model.safetensors", "weights file")
            return [SafetensorsFile(single)]
        others = sorted(folder.glob("*.safetensors"))
        if others:
            return [SafetensorsFile(inside(folder, p.name, "weights file")) for p in others]
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{folder}: only pickle weights ({pickles[0]}); they are never unpickled here "
                                  "because loading a pickle can run code. Convert to safetensors first "
                                  "(transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    def _main_dtype(self, spec) -> str:
        name = spec.tensor_name("q_proj", 0)
        name = self.views[name][0] if name in self.views else name
        dtype = self.where[name].info(name)[0] if name in self.where else "F32"
        return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, dtype.lower())

    def _read(self, name: str) -> np.ndarray:
        return self._read_rows(name, None)

    def _read_rows(self, name: str, rows: slice | None) -> np.ndarray:
        if name in self.views:
            fused, start, stop = self.views[name]
            rows = slice(start, stop) if rows is None else np.arange(start, stop)[rows]
            return self.where[fused].tensor(fused, rows)
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        return self.where[name].tensor(name, rows)

    def stored_dtype(self, name: str) -> str:
        if name == self.spec.tensor_name("lm_head") and self.spec.tied_embeddings:
            name = self.spec.tensor_name("embed")
        name = self.views[name][0] if name in self.views else name
        return self.where[name].info(name)[0]

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)


def read_tokenizer(folder: Path) -> ChatTokenizer | None:
    """The folder's tokenizer.json (with tokenizer_config.json and chat_template.jinja if present); None without one."""
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        return None
    config = folder / "tokenizer_config.json"
    tok = ChatTokenizer.from_files(tokenizer_json, config if config.is_file() else None)
    template = folder / "chat_template.jinja"
    if tok.chat_template is None and template.is_file():
        tok.chat_template = template.read_text(encoding="utf-8")
    return tok


def generation_defaults(folder: Path) -> dict:
    """Sampling defaults and extra eos ids from an HF folder's generation_config.json ({} without one)."""
    path = folder / "generation_config.json"
    gen = read_json(path, "generation_config.json") if path.is_file() else {}
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "do_sample") if k in gen}
    eos = gen.get("eos_token_id")
    if eos is not None:
        defaults["eos_token_ids"] = eos if isinstance(eos, list) else [eos]
    return defaults
