"""The `tensorrt` backend: a built engine of a `--target tensorrt` artifact, on an NVIDIA GPU.

The engine was built for one GPU and one TensorRT version (``manifest.engine``); anything else is
refused with the reason and the fix before a byte is deserialized. The graph is the portable
one (present = [past, new]), so each step's present buffers become the next step's past. Device
buffers are torch CUDA tensors (torch ships on JetPack and GPU hosts); nothing here is imported
unless this backend is asked for.
"""
from __future__ import annotations

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError
from .base import Backend, register_backend


def current_gpu() -> dict:
    """{name, compute_capability} of CUDA device 0. build-engine records it and this backend checks
    it, both through this one function, so the two compare like with like."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}{props.minor}"}
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}{minor}"}
    except ImportError:
        pass
    raise BackendUnavailableError("no CUDA GPU found (or neither cuda-python nor torch is installed to ask): a "
                                  "TensorRT engine is built on, and runs on, the GPU it is for")


def engine_mismatch(engine: dict, gpu: dict, tensorrt_version: str) -> str | None:
    """Why the artifact's engine cannot run here (none built, another GPU, another TensorRT), or None."""
    if not engine.get("built"):
        return ("no engine has been built for this artifact yet: run `edge-export build-engine ARTIFACT` on the "
                "device (or use --backend onnxruntime, which runs the same graph)")
    built = engine.get("gpu") or {}
    if (built.get("name"), built.get("compute_capability")) != (gpu.get("name"), gpu.get("compute_capability")):
        return (f"the engine was built for {built.get('name')} (sm_{built.get('compute_capability')}) and this GPU "
                f"is {gpu.get('name')} (sm_{gpu.get('compute_capability')}): rebuild it here with "
                "`edge-export build-engine ARTIFACT`")
    if engine.get("tensorrt") != tensorrt_version:
        return (f"the engine was built with TensorRT {engine.get('tensorrt')} and this is TensorRT "
                f"{tensorrt_version}: rebuild it here with `edge-export build-engine ARTIFACT`")
    return None


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    targets = ("tensorrt",)
    needs = "TensorRT and torch with CUDA (JetPack, or pip install tensorrt on an NVIDIA GPU host)"

    @classmethod
    def available(cls):
        try:
            import tensorrt  # noqa: F401
            import torch
        except ImportError:
            return False, f"TensorRT is not installed here; it needs {cls.needs}"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch; a TensorRT engine runs on the GPU it was built for"
        return True, ""

    def __init__(self, artifact, provider=None, threads=None):
        super().__init__(artifact, provider, threads)
        import tensorrt as trt
        import torch
        engine_info = artifact.manifest.get("engine") or {}
        why = engine_mismatch(engine_info, current_gpu(), trt.__version__)
        if why:
            raise BackendUnavailableError(f"{artifact.path}: {why}")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(artifact.file(engine_info["file"]).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{artifact.path}/{engine_info['file']}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.torch, self.stream = torch, torch.cuda.Stream()
        self.spec, self.layers = artifact.spec, artifact.spec.num_layers
        self.position, self.past = 0, []
        self.mask = torch.ones((1, self.max_context), dtype=torch.int64, device="cuda")

    def _run(self, ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        total = self.position + ids.shape[1]
        if total > self.max_context:
            raise ArtifactError(f"{total} positions exceed the engine's max_context {self.max_context}")
        if self.position == 0:
            empty = torch.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=torch.float16, device="cuda")
            self.past = [empty] * (2 * self.layers)
        inputs = {"input_ids": torch.as_tensor(ids, device="cuda"), "attention_mask": self.mask[:, :total]}
        for i in range(self.layers):
            inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"] = self.past[2 * i:2 * i + 2]
        inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}  # held until the run ends
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if name in inputs:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.float32 if name == "logits" else torch.float16
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError(f"{self.artifact.path}: the TensorRT engine failed to run")
        self.stream.synchronize()
        self.past = [outputs[f"present.{i}.{kind}"] for i in range(self.layers) for kind in ("key", "value")]
        self.position = total
        return outputs["logits"][0, -1].float().cpu().numpy()

    def prefill(self, ids) -> np.ndarray:
        self.position = 0
        return self._run(np.asarray(ids, dtype=np.int64).reshape(1, -1))

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], dtype=np.int64))
