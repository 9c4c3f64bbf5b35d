"""Verification of a large portable (or tensorrt) graph, streamed one layer at a time.

Below onnx.FOLD_WEIGHTS_BYTES the whole graph runs with every weight's DequantizeLinear folded to
float once. Above it, the float copies would not fit, and running the graph step by step
dequantizes every weight at every token (78 ms a token at 1.5B). This scorer runs the artifact's
own graph (its ops, its stored quantized weights) cut into layers (onnx_layers.LayerGraph): each
layer's session folds that layer's weights to float and runs every prompt through it before the
next layer is loaded. Teacher-forced scoring is one such pass over all prompts and all their
positions; greedy generation is a pass per new token, each serving every prompt at once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from runtimes.errors import ArtifactError

from ..verify import log_softmax
from .onnx_layers import LayerGraph

PAST, PRESENT = "past_key_values.", "present."
FEEDS = ("input_ids", "attention_mask")


class StreamedGraphScorer:
    """Scorer (verify.compare's candidate) over a concat-cache decoder graph, layer-major.
    ``batched``: teacher_forced takes every prompt at once (one pass over the layers)."""

    batched = True
    greedy_from_forcing = True  # each teacher-forced token is the run a greedy step makes (verify.RuntimeScorer)
    verified_with = ("onnxruntime CPU, the graph run layer by layer over every prompt, each layer's "
                     "DequantizeLinear weights folded to float while it runs")

    def __init__(self, artifact, threads: int | None = None, hold: bool = False):
        graph = artifact.manifest["graph"]
        path = Path(artifact.file(graph["file"]))
        model = onnx.load(str(path), load_external_data=False)
        inputs = {v.name: v for v in model.graph.input}
        unknown = [n for n in inputs if n not in FEEDS and not n.startswith(PAST)]
        if graph.get("kv") != "concat" or unknown:
            raise ArtifactError(f"{artifact.path}: streamed verification runs a portable graph (present = [past, "
                                f"new], inputs {', '.join(FEEDS)}, past_key_values.*); this one is not")
        past = inputs[f"{PAST}0.key"].type.tensor_type
        self.empty = np.zeros((1, artifact.spec.num_kv_heads, 0, artifact.spec.head_dim),
                              onnx.helper.tensor_dtype_to_np_dtype(past.elem_type))
        config = {**graph.get("session_config", {}), "session.disable_quant_qdq": "1"}
        self.graph = LayerGraph(model, path.parent, returns=("logits",), session_config=config, threads=threads,
                                hold=hold)

    def _pass(self, runs: list[list[list[int]]], caches: list[dict]) -> list[list[np.ndarray]]:
        """``runs[j]``: token lists run in order after sequence j's cache ``caches[j]`` (past name ->
        array, updated); the last-position logits of every run."""
        feeds = []
        for seq, cache in zip(runs, caches):
            total = cache[f"{PAST}0.key"].shape[2] if cache else 0
            feeds.append([])
            for tokens in seq:
                total += len(tokens)
                feeds[-1].append({"input_ids": np.asarray(tokens, np.int64).reshape(1, -1),
                                  "attention_mask": np.ones((1, total), np.int64)})

        def past(j: int, k: int, seg) -> dict:
            return {n: caches[j].get(n, self.empty) for n in seg.inputs if n.startswith(PAST)}

        def absorb(j: int, k: int, seg, out: dict) -> None:
            caches[j].update((PAST + n[len(PRESENT):], v) for n, v in out.items() if n.startswith(PRESENT))

        done = self.graph.layer_major(feeds, past, absorb)
        return [[np.array(values["logits"][0, -1], np.float32) for values in seq] for seq in done]

    def teacher_forced(self, prompts, continuations) -> list[np.ndarray]:
        runs = [[list(p)] + [[t] for t in c[:-1]] for p, c in zip(prompts, continuations)]
        return [log_softmax(np.stack(rows)) for rows in self._pass(runs, [{} for _ in prompts])]

    def greedy(self, prompts, n_new) -> tuple[list[list[int]], None]:
        caches = [{} for _ in prompts]
        last = [rows[-1] for rows in self._pass([[list(p)] for p in prompts], caches)]
        tokens: list[list[int]] = [[] for _ in prompts]
        for step in range(n_new):
            for new, logits in zip(tokens, last):
                new.append(int(np.argmax(logits)))
            if step < n_new - 1:
                last = [rows[-1] for rows in self._pass([[[t[-1]]] for t in tokens], caches)]
        return tokens, None

    def sequence_logits(self, sequences) -> list[np.ndarray]:
        runs = [[list(s[:1])] + [[t] for t in s[1:]] for s in sequences]
        return [np.stack(rows) for rows in self._pass(runs, [{} for _ in sequences])]
