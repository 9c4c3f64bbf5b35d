"""The `onnxruntime` backend: the decoder graph with IOBinding over one preallocated KV buffer.

Past and present KV are bound to the same OrtValues (GroupQueryAttention writes in place), so a
token costs no cache reallocation or copy. Any execution provider can be named. A portable graph
(``graph.kv == "concat"``: standard ops, present = [past, new]) is run by feeding each present
back as the next past instead; so is optimum-onnx's graph (variant ``optimum``), which also takes
``position_ids`` and whose past dtype and head dims are read from its declared inputs.
"""
from __future__ import annotations

import numpy as np

from .. import rope
from ..errors import ArtifactError, BackendUnavailableError, ContextOverflowError
from .base import Backend, register_backend

PROVIDERS = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "qnn": "QNNExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider", "dml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider",
}
KV_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# GroupQueryAttention over a long prompt in one call is slower than in chunks, much more so with
# an int8 cache (onnxruntime 1.32 CPU, this 2-core EPYC, 1792-token prompt, SmolLM2 int4: fp32
# cache 1315 ms whole / 1278 ms in 256s; int8 cache 3857 / 2647 ms); the logits are identical.
PREFILL_CHUNK = 256
# The shared KV buffer is sized to what a generation needs (prompt + new tokens, rounded up to
# KV_ROUND positions), not to max_context: GroupQueryAttention's cost grows with the buffer, not
# only with the positions in use (SmolLM2 int4, 128+128 tokens, 2 threads: decode 6.7% faster with
# a 256-position float cache than a 2048 one, 2% with an int8 cache; onnxruntime-genai sizes its
# buffer the same way). It grows (keeping its contents) when a generation runs past it.
KV_ROUND = 64
# Inputs a concat graph may take: what this backend knows how to feed.
CONCAT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def provider_name(provider: str | None) -> str:
    if provider is None:
        return "CPUExecutionProvider"
    return PROVIDERS.get(provider.lower(), provider)


def session_options(threads: int | None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    targets = ("onnx", "tensorrt")  # a tensorrt artifact's graph runs here until its engine is built
    supports_providers = True

    @classmethod
    def available(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime)"
        return True, ""

    def __init__(self, artifact, provider=None, threads=None, session_config: dict | None = None):
        super().__init__(artifact, provider, threads)
        import onnxruntime as ort
        graph = artifact.manifest["graph"]
        ep = provider_name(provider)
        if ep not in ort.get_available_providers():
            raise BackendUnavailableError(f"execution provider '{ep}' is not in this onnxruntime build "
                                          f"(available: {', '.join(ort.get_available_providers())})")
        options = session_options(threads)
        for key, value in {**graph.get("session_config", {}), **(session_config or {})}.items():
            options.add_session_config_entry(key, str(value))
        self.session = ort.InferenceSession(str(artifact.file(graph["file"])), options, providers=[ep])
        self.spec = artifact.spec
        self.kv_dtype = KV_DTYPES[graph.get("kv_dtype", "float32")]
        self.layers = self.spec.num_layers
        self.position = 0
        self.mask = np.ones((1, self.max_context), np.int64)
        self.concat = graph.get("kv") == "concat"
        if self.concat:
            self.past: list[np.ndarray] = []
            self._concat_inputs()
            return
        self.binding = self.session.io_binding()
        # In host memory the buffers are numpy arrays (the OrtValues share their memory), sized to
        # each generation's need; on a CUDA device they are allocated there once, at max_context.
        self.resizable = ep != "CUDAExecutionProvider"
        self.capacity = 0
        if self.resizable:
            self._allocate(min(self.max_context, PREFILL_CHUNK))
        else:
            self._allocate(self.max_context, device="cuda")
        self.logits = self._fixed_logits(graph, ort)
        if self.logits is not None:  # bound once: reading it back costs no per-token wrapping of every output
            self.binding.bind_ortvalue_output("logits", self.logits)
        else:
            self.binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]

    def _allocate(self, capacity: int, device: str = "cpu") -> None:
        """(Re)allocate every layer's K and V buffer for ``capacity`` positions, keeping the
        positions already written, and bind them as both past and present."""
        import onnxruntime as ort
        shape = (1, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        if device != "cpu":
            self.kv = [tuple(ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, device) for _ in "kv")
                       for _ in range(self.layers)]
        else:
            kept = min(self.position, self.capacity, capacity)
            arrays = []
            for layer in range(self.layers):
                pair = (np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype))
                if kept:
                    for new, old in zip(pair, self.kv_arrays[layer]):
                        new[:, :, :kept] = old[:, :, :kept]
                arrays.append(pair)
            self.kv_arrays = arrays
            self.kv = [tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in pair) for pair in arrays]
        self.capacity = capacity
        for i, (k, v) in enumerate(self.kv):
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            self.binding.bind_ortvalue_output(f"present.{i}.key", k)
            self.binding.bind_ortvalue_output(f"present.{i}.value", v)

    def reserve(self, positions: int) -> None:
        """Size the KV buffer to ``positions`` (rounded up to KV_ROUND, at most max_context):
        reallocated when smaller, or more than twice as large. The next prefill starts it over."""
        if self.concat or not self.resizable:
            return
        self.position = 0
        need = min(self.max_context, -(-max(1, positions) // KV_ROUND) * KV_ROUND)
        if self.capacity < need or self.capacity > 2 * need:
            self._allocate(need)

    def _fixed_logits(self, graph: dict, ort):
        """A preallocated [1, 1, vocab] logits buffer when the graph emits the last position only
        (its shape never changes); None otherwise."""
        out = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if graph.get("logits") != "last" or out is None or out.type not in ORT_TYPES:
            return None
        vocab = out.shape[-1] if isinstance(out.shape[-1], int) else self.spec.vocab_size
        return ort.OrtValue.ortvalue_from_shape_and_type((1, 1, vocab), ORT_TYPES[out.type], "cpu")

    def _concat_inputs(self) -> None:
        """The empty past (dtype and head dims as the graph declares them) and the extra inputs to feed."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = inputs.get("past_key_values.0.key")
        if past is None or past.type not in ORT_TYPES:
            raise ArtifactError(f"{self.artifact.path}: the graph's past_key_values.0.key is "
                                f"{past.type if past else 'missing'}; this backend feeds a float32 or float16 cache")
        unknown = [n for n in inputs if n not in CONCAT_INPUTS and not n.startswith("past_key_values.")]
        if unknown:
            raise ArtifactError(f"{self.artifact.path}: graph input(s) {', '.join(unknown)} are not ones the "
                                f"onnxruntime backend feeds ({', '.join(CONCAT_INPUTS)}, past_key_values.*)")
        dims = [d if isinstance(d, int) else None for d in past.shape]  # [batch, kv heads, past, head_dim]
        heads, head_dim = (dims[1], dims[3]) if len(dims) == 4 else (None, None)
        self.empty_past = np.zeros((1, heads or self.spec.num_kv_heads, 0, head_dim or self.spec.head_dim),
                                   ORT_TYPES[past.type])
        self.position_ids = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, ids: np.ndarray) -> np.ndarray:
        total = self.position + ids.shape[1]
        if total > self.max_context:
            raise ContextOverflowError(f"{total} positions exceed the artifact's max_context {self.max_context} "
                                       "(re-export with a larger --max-context)")
        if self.concat:
            return self._run_concat(ids, total)
        if total > self.capacity:  # past what was reserved: grow, keeping the cache
            self._allocate(min(self.max_context, max(total, 2 * self.capacity)))
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", self.mask[:, :total])
        self.session.run_with_iobinding(self.binding)
        self.position = total
        logits = (self.logits if self.logits is not None else self.binding.get_outputs()[0]).numpy()
        return np.array(logits[0, -1], dtype=np.float32)  # a copy: the output buffer is reused

    def _run_concat(self, ids: np.ndarray, total: int) -> np.ndarray:
        if self.position == 0:
            self.past = [self.empty_past] * (2 * self.layers)
        feeds = {"input_ids": ids, "attention_mask": self.mask[:, :total]}
        if self.position_ids:
            feeds["position_ids"] = np.arange(self.position, total, dtype=np.int64).reshape(1, -1)
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = self.past[2 * i:2 * i + 2]
        by_name = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        self.past = [by_name[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        self.position = total
        return np.array(by_name["logits"][0, -1], dtype=np.float32)

    def prefill(self, ids) -> np.ndarray:
        """Run the prompt: on the shared KV buffer in chunks of PREFILL_CHUNK positions (same
        logits; attention's scratch stays [chunk, context] instead of [prompt, context]);
        a concat graph in one call. A LongRoPE prompt longer than the original context also runs
        in one call: the graph picks the factor set from the sequence a call ends at, and one
        forward over the prompt (transformers' rule) rotates all of it with the long factors."""
        self.position = 0
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        switch = rope.Rope.for_spec(self.spec).switch
        step = n if self.concat or (switch is not None and n > switch) else PREFILL_CHUNK
        for start in range(0, n, step) if n else [0]:  # an empty prompt fails in _run, as it always did
            logits = self._run(ids[:, start:start + step])
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], dtype=np.int64))
