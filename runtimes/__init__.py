"""edge-export's runtime: what apps embed. Needs only numpy, onnxruntime, tokenizers and jinja2.

    import runtimes
    rt = runtimes.load("smollm2-int4")            # backend chosen by the artifact's manifest
    result = rt.generate("What is 2+3?")           # Result: thinking, answer, tokens, timings
    for event in rt.stream("Why is the sky blue?", temperature=0.6, thinking_budget=256):
        print(event.kind, event.text)              # thinking | answer | tag
    runtimes.serve("smollm2-int4", port=8000)      # OpenAI-compatible HTTP (pip install 'edge-export[serve]')
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .artifact import Artifact, load_artifact
from .backends import Backend, backend_names, get_backend, register_backend
from .errors import ArtifactError, EdgeError
from .generate import Event, Generator, Result, Sampling
from .tokenizer import ChatTokenizer

DEFAULT_BACKENDS = {"onnx": "onnxruntime", "coreml": "coreml", "tensorrt": "tensorrt"}


class Runtime:
    """A loaded artifact: tokenizer, chat template, generation defaults, and one backend."""

    def __init__(self, artifact: Artifact, backend: Backend):
        self.artifact, self.backend = artifact, backend
        self.spec = artifact.spec
        tok = artifact.manifest["tokenizer"]
        self.tokenizer = ChatTokenizer.from_files(artifact.file(tok["file"]),
                                                  artifact.file(tok["config"]) if tok.get("config") else None)
        self.defaults = dict(artifact.manifest.get("generation", {}))
        eos = self.defaults.get("eos_token_ids") or list(self.spec.eos_token_ids)
        self.generator = Generator(backend, self.tokenizer, eos)

    @property
    def max_context(self) -> int:
        return self.backend.max_context

    def sampling(self, **overrides) -> Sampling:
        """Sampling settings: the artifact's defaults (R1: temperature 0.6, top-p 0.95) then overrides."""
        values = {k: self.defaults[k] for k in ("temperature", "top_p", "top_k") if k in self.defaults}
        if self.defaults.get("do_sample") is False:
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Sampling(**values)

    def prompt_ids(self, prompt) -> list[int]:
        """A string (one user message), a list of messages, or token ids -> prompt ids."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        ids = self.tokenizer.encode_chat(prompt)
        prefix = self.defaults.get("think_prefix")
        # R1: "force the response to start with <think>\n" where the template does not already
        if prefix and not self.tokenizer.decode(ids[-4:]).endswith(prefix):
            ids += self.tokenizer.encode(prefix, add_bos=False)
        return ids

    def stream(self, prompt, result: Result | None = None, **sampling) -> Iterator[Event]:
        return self.generator.stream(self.prompt_ids(prompt), self.sampling(**sampling), result)

    def generate(self, prompt, **sampling) -> Result:
        return self.generator.generate(self.prompt_ids(prompt), self.sampling(**sampling))


def load(path: str | Path, backend: str | None = None, provider: str | None = None,
         threads: int | None = None, verify: bool = True) -> Runtime:
    """Open an artifact folder; check its files; pick its backend (or ``backend``) and return a Runtime."""
    artifact = load_artifact(path, verify=verify)
    name = backend or artifact.manifest.get("backend") or DEFAULT_BACKENDS.get(artifact.target)
    if name is None:
        raise ArtifactError(f"{path}: the manifest names no backend for target '{artifact.target}'")
    only = artifact.manifest.get("backends")  # an artifact that only some backends can run says which
    if only and name not in only:
        note = artifact.manifest.get("backends_note")
        raise ArtifactError(f"{path}: backend '{name}' cannot run this {artifact.target}/{artifact.variant} artifact "
                            f"of {artifact.spec.architecture}" + (f" ({note})" if note else "")
                            + f"; it runs on: {', '.join(only)}")
    return Runtime(artifact, get_backend(name)(artifact, provider=provider, threads=threads))


def serve(artifact_or_runtime, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve an artifact (or a loaded Runtime) by OpenAI's chat-completions protocol until interrupted.

    Needs ``pip install 'edge-export[serve]'``; see runtimes.server for the app factory and the
    settings (``config=ServeConfig(...)``; backend, provider, threads go to load)."""
    from .server import serve as run_server
    run_server(artifact_or_runtime, host=host, port=port, **options)


__all__ = ["Artifact", "Backend", "EdgeError", "Event", "Result", "Runtime", "Sampling", "backend_names",
           "get_backend", "load", "register_backend", "serve"]
