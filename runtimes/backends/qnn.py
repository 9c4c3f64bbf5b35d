"""The `qnn` backend: an onnx/qnn artifact on onnxruntime's QNN execution provider (the Hexagon
NPU's HTP backend; on Linux x86_64 the HTP simulator that the onnxruntime-qnn wheel ships).

The artifact holds two static graphs over one weights file: ``prefill`` runs a chunk of
``seq_len`` tokens, ``decode`` one. Their inputs are the tokens, their positions, an additive
attention mask over [cache slots | the chunk's own rows] and, per layer, the whole fixed-size KV
cache [1, kv_heads, max_context, head_dim]; they return the last row's logits and only the
chunk's NEW keys and values, which :class:`StaticDecoder` writes into the cache it owns. A
prompt is cut into chunks from its end, so only the first chunk is padded (on the left) and the
last row of the last chunk is always the prompt's last token.

In a quantized artifact every graph input and output except ids and positions is uint16 codes
with the per-tensor scale and zero point the manifest lists, so the cache is kept as codes and
never re-quantized. onnxruntime-qnn is a plugin: its library is registered here, and sessions
are created with CPU fallback disabled, so a node the NPU cannot run fails the load instead of
running silently on the CPU.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .. import rope
from ..errors import ArtifactError, BackendUnavailableError, ContextOverflowError
from ..weights import UNPACKERS, ArtifactWeights
from .base import Backend, register_backend

EP_NAME = "QNNExecutionProvider"
INSTALL = ("pip install onnxruntime-qnn, a plugin beside onnxruntime >= 1.24 (Linux x86_64 runs the HTP "
           "simulator, Windows on Snapdragon the NPU), or run the same weights with --backend reference")
MASK_HIDDEN = -1000.0  # additive mask of hidden slots: finite (uint16 codes, fp16 on the HTP), exp() of it is 0


def qnn_available() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False, f"onnxruntime-qnn is not installed: {INSTALL}"
    if not hasattr(ort, "register_execution_provider_library"):
        return False, (f"onnxruntime {ort.__version__} cannot load plugin execution providers; "
                       "pip install -U onnxruntime")
    return True, ""


def qnn_devices() -> list:
    """The QNN plugin's OrtEpDevices, registering its library with onnxruntime on first use."""
    import onnxruntime as ort
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        import onnxruntime_qnn
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise BackendUnavailableError(f"onnxruntime-qnn registered no {EP_NAME} device; reinstall it: {INSTALL}")
    return devices


def qnn_session(path, soc: dict, threads: int | None = None, provider_options: dict | None = None,
                session_config: dict | None = None):
    """An InferenceSession of ``path`` on QNN's HTP backend for ``soc`` ({soc_model, htp_arch}),
    CPU fallback disabled and each node's execution provider recorded (see :func:`ep_assignment`).
    The QNN backend is shared by a process: its first session's SoC is the one simulated."""
    import onnxruntime as ort
    import onnxruntime_qnn
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, str(value))
    ep_options = {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": str(soc["soc_model"]),
                  "htp_arch": str(soc["htp_arch"]), "htp_performance_mode": "burst",
                  **{k: str(v) for k, v in (provider_options or {}).items()}}
    options.add_provider_for_devices(qnn_devices(), ep_options)
    try:
        return ort.InferenceSession(str(path), sess_options=options)
    except Exception as e:  # onnxruntime raises its own Fail/EPFail types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendUnavailableError(f"{path}: the QNN HTP backend cannot compile this graph ({first}); "
                                      "re-export it with this version of edge-export") from e


def ep_assignment(session) -> dict[str, int]:
    """Execution provider -> number of the graph's nodes it runs (needs a session made by
    :func:`qnn_session`). All of them on QNNExecutionProvider means nothing ran on the CPU."""
    counts: dict[str, int] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return counts


def prefill_chunks(ids: list[int], chunk: int) -> list[tuple[list[int], int]]:
    """A prompt cut into chunks of ``chunk`` tokens from its end: (tokens, how many of them are
    padding at the start); only the first chunk is padded, with token 0."""
    pad = -len(ids) % chunk
    padded = [0] * pad + list(ids)
    return [(padded[start:start + chunk], pad if start == 0 else 0) for start in range(0, len(padded), chunk)]


def step_inputs(spec, max_context: int, tokens: list[int], skip: int, start: int, sequence: int | None,
                encode: Callable[[str, np.ndarray], np.ndarray]) -> dict:
    """The non-cache inputs of one static run: ``tokens`` (the first ``skip`` of them padding)
    after ``start`` cached tokens, as part of a forward over ``sequence`` tokens (default: up to
    these). input_ids, the additive attention_mask over [cache slots | the run's rows] (padding
    rows see only themselves), and position_cos / position_sin [1, 1, S, head_dim]: cos twice, and
    sin with its first half negated (1 and 0 past the rotary channels), so the graph computes
    rope(x) = x * cos + swap_halves(x) * sin. The forward's sequence length decides LongRoPE's
    factor set. ``encode(name, float array)`` gives each input its dtype (uint16 codes or float32)."""
    s, n, ctx = len(tokens), len(tokens) - skip, max_context
    positions = np.concatenate([np.zeros(skip, np.int64), np.arange(start, start + n)])
    visible, hidden = (encode("attention_mask", np.array(v)) for v in (0.0, MASK_HIDDEN))
    mask = np.full((1, 1, s, ctx + s), hidden, visible.dtype)
    mask[0, 0, :, :start] = visible
    rows = np.arange(s)
    causal = (rows[None, :] <= rows[:, None]) & ((rows[None, :] >= skip) | (rows[None, :] == rows[:, None]))
    mask[0, 0, :, ctx:][causal] = visible
    cos, sin = rope.Rope.for_spec(spec).tables(positions, total=sequence or start + n)
    full_cos, signed_sin = rope.full_width(cos, sin, spec.head_dim)
    return {"input_ids": np.asarray(tokens, np.int32).reshape(1, s), "attention_mask": mask,
            "position_cos": encode("position_cos", full_cos[None, None]),
            "position_sin": encode("position_sin", signed_sin[None, None])}


class StaticDecoder:
    """Chunked prefill and one-token decode over a static prefill graph and a decode graph.

    ``run(graph, feeds) -> {name: array}`` runs ``"prefill"`` or ``"decode"``. ``io`` maps each
    uint16 graph input/output to its {"scale", "zero_point"}; any other is float32 (all of them in
    the float graph calibration runs). ``observe(outputs)`` sees every run's outputs.
    """

    def __init__(self, spec, graph: dict, max_context: int, run: Callable, io: dict | None,
                 observe: Callable[[dict], None] | None = None):
        self.spec, self.run, self.io, self.observe = spec, run, io or {}, observe
        self.max_context, self.chunk = max_context, int(graph["prefill"]["seq_len"])
        shape = (1, spec.num_kv_heads, max_context, spec.head_dim)
        # unused slots hold 0.0 (the zero point's code): masked, they must not score high either
        self.k = [np.full(shape, self._encode(f"past.{i}.key", np.zeros(()))) for i in range(spec.num_layers)]
        self.v = [np.full(shape, self._encode(f"past.{i}.value", np.zeros(()))) for i in range(spec.num_layers)]
        self.length = 0

    def _encode(self, name: str, x: np.ndarray) -> np.ndarray:
        if name not in self.io:
            return x.astype(np.float32)
        p = self.io[name]
        return np.clip(np.round(x / p["scale"]) + p["zero_point"], 0, 65535).astype(np.uint16)

    def prefill(self, ids) -> np.ndarray:
        ids = [int(t) for t in ids]
        if not ids:
            raise ContextOverflowError("an empty prompt: prefill needs at least one token")
        self._check_fits(len(ids))
        self.length = 0
        for tokens, skip in prefill_chunks(ids, self.chunk):
            # the whole prompt's length picks LongRoPE's factor set for every chunk, as one forward would
            logits = self._step("prefill", tokens, skip, len(ids))
        return logits

    def decode(self, token: int) -> np.ndarray:
        self._check_fits(self.length + 1)
        return self._step("decode", [int(token)], 0)

    def _check_fits(self, total: int) -> None:
        if total > self.max_context:
            raise ContextOverflowError(f"{total} tokens do not fit the artifact's context of {self.max_context}; "
                                       "shorten the prompt or export with a larger --max-context")

    def _step(self, graph: str, tokens: list[int], skip: int, sequence: int | None = None) -> np.ndarray:
        """Run ``tokens`` (the first ``skip`` of them padding) after the cache, as part of a forward
        over ``sequence`` tokens (default: up to these); returns the last row's logits."""
        start, n = self.length, len(tokens) - skip
        feeds = step_inputs(self.spec, self.max_context, tokens, skip, start, sequence, self._encode)
        for i in range(self.spec.num_layers):
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = self.k[i], self.v[i]
        out = self.run(graph, feeds)
        for i in range(self.spec.num_layers):
            self.k[i][:, :, start:start + n] = out[f"present.{i}.key"][:, :, skip:]
            self.v[i][:, :, start:start + n] = out[f"present.{i}.value"][:, :, skip:]
        self.length = start + n
        if self.observe:
            self.observe(out)
        logits = out["logits"].reshape(-1)
        if "logits" not in self.io:
            return np.array(logits, np.float32)
        p = self.io["logits"]
        return (logits.astype(np.float32) - p["zero_point"]) * np.float32(p["scale"])


@register_backend
class QnnBackend(Backend):
    """Runs an onnx/qnn artifact's prefill and decode graphs on the HTP (CPU fallback disabled)."""

    name = "qnn"
    targets = ("onnx",)
    needs = INSTALL

    @classmethod
    def available(cls):
        return qnn_available()

    def __init__(self, artifact, provider=None, threads=None, provider_options: dict | None = None):
        super().__init__(artifact, provider, threads)
        if provider not in (None, "qnn", EP_NAME, "cpu"):
            raise BackendUnavailableError(f"the qnn backend runs on QNN's HTP (or, with --provider cpu, the same "
                                          f"QDQ graphs on onnxruntime's CPU provider), not --provider {provider}; "
                                          "--backend reference runs the float weights on the CPU")
        graph = artifact.manifest.get("graph", {})
        if artifact.variant != "qnn" or "prefill" not in graph:
            raise ArtifactError(f"{artifact.path}: the qnn backend runs artifacts of --target onnx --variant qnn; "
                                f"this one is {artifact.target}/{artifact.variant} (use its own backend)")
        # precompiled context binaries (edge_export.targets.onnx_qnn.compile_context) load without compiling
        files = graph.get("context") or {name: graph[name]["file"] for name in ("prefill", "decode")}
        if provider == "cpu":  # the QDQ arithmetic emulated on the CPU: what a host without the NPU verifies with
            import onnxruntime as ort
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            self.sessions = {name: ort.InferenceSession(str(artifact.file(graph[name]["file"])), options,
                                                        providers=["CPUExecutionProvider"])
                             for name in ("prefill", "decode")}
        else:
            self.sessions = {name: qnn_session(artifact.file(files[name]), graph["soc"], threads, provider_options)
                             for name in ("prefill", "decode")}
        self.names = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self.decoder = StaticDecoder(artifact.spec, graph, self.max_context, self._run, graph["io"])

    def _run(self, graph: str, feeds: dict) -> dict:
        return dict(zip(self.names[graph], self.sessions[graph].run(None, feeds)))

    def ep_assignment(self) -> dict[str, dict[str, int]]:
        """Per graph: execution provider -> nodes it runs."""
        return {name: ep_assignment(s) for name, s in self.sessions.items()}

    def prefill(self, ids) -> np.ndarray:
        return self.decoder.prefill(ids)

    def decode(self, token: int) -> np.ndarray:
        return self.decoder.decode(token)


def _qdq(weights: ArtifactWeights, e: dict) -> np.ndarray:
    """A DequantizeLinear weight: ``codes`` int8, uint16 or int4 (two a byte, low nibble first)
    of ``shape``, times a per-tensor or per-axis scale, or a low-power block scale (the per-channel
    float scale times a 4-bit integer per block of ``block_size`` along axis 0); minus the zero
    point; times ``multiplier`` (a constant folded into the stored scales)."""
    raw, shape = weights.raw(e["q"]).reshape(-1), e["shape"]
    if e["codes"] == "int4":
        nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:int(np.prod(shape))].astype(np.int8)
        q = np.where(nibbles > 7, nibbles - 16, nibbles)
    else:
        q = raw.view(np.dtype(e["codes"]))
    q = q.reshape(shape).astype(np.float32)
    scale = weights.raw(e["scale"]).astype(np.float32) if isinstance(e["scale"], dict) else np.float32(e["scale"])
    if "block_scale" in e:  # [K/B, N] integers times the per-channel [N] float scale
        scale = np.repeat(weights.raw(e["block_scale"]).astype(np.float32) * scale, e["block_size"], axis=0)
    elif np.ndim(scale) == 1:
        scale = np.expand_dims(scale, [a for a in range(len(shape)) if a != e.get("axis", 1)])
    w = (q - np.float32(e.get("zero_point", 0))) * scale * np.float32(e.get("multiplier", 1.0))
    return w.T if e.get("transpose") else w


UNPACKERS.setdefault("qdq", _qdq)
