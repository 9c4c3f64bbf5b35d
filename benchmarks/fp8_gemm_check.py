"""Does a real FP8 GEMM compute what an FP8 artifact's Q/DQ graph says? (TensorRT's FP8 path.)

TensorRT cannot be installed on these machines, and onnxruntime's CPU provider only emulates an
FP8 Q/DQ MatMul in float32. This check takes real GEMMs of an fp8 artifact with activation
scales (`--quant fp8 --fp8-activations`: E4M3 weights, per-tensor scales, activations quantized
with the calibrated scale) and real inputs (the float model's activations on a prompt), and
compares onnxruntime's result with an FP8 tensor-core GEMM (``torch._scaled_mm``) on an
FP8-capable NVIDIA GPU (Hopper/Ada), which is the kind of kernel TensorRT runs.

    python benchmarks/fp8_gemm_check.py prepare ARTIFACT CHECKPOINT OUT.npz   # here (CPU)
    python benchmarks/fp8_gemm_check.py gpu OUT.npz RESULT.json               # on the GPU machine

Figures per GEMM: ``gpu_vs_graph`` = max|y_gpu - y_graph| / max|y_graph| (only accumulation
order and precision differ), ``act_quant_effect`` = the same for the graph against the float
product of the same weights without activation quantization (what FP8 activations cost).
"""
from __future__ import annotations

import json
import sys

import numpy as np

LAYERS = (0, 15, 29)
PROMPT = "A train travels 180 km in 2 hours and then 120 km in 1.5 hours. What is its average speed? Think it through."
POINTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
          "up_proj": "gate_up", "down_proj": "down"}


def prepare(artifact_dir: str, checkpoint: str, out: str) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_export.checkpoint import open_checkpoint
    from runtimes import rope
    from runtimes.artifact import read_manifest
    from runtimes.reference import LayerWeights, layer_forward
    from runtimes.weights import ArtifactWeights

    artifact = read_manifest(artifact_dir, staging_ok=True)  # a staging folder too: its weights are final
    table, raw = artifact.manifest["weights"], ArtifactWeights(artifact).raw
    ckpt = open_checkpoint(checkpoint)
    spec = ckpt.spec
    ids = ckpt.tokenizer.encode_chat(PROMPT)[:64]
    ids += [ids[-1]] * (64 - len(ids))
    h = ckpt.tensor(spec.tensor_name("embed"), rows=np.asarray(ids))
    cos, sin = rope.Rope.for_spec(spec).tables(np.arange(len(ids)))
    seen: dict[tuple[int, str], np.ndarray] = {}
    for i in range(max(LAYERS) + 1):
        h = layer_forward(spec, LayerWeights.load(spec, i, ckpt.tensor), h, cos, sin, layer=i,
                          observer=lambda layer, point, x: seen.__setitem__((layer, point), np.array(x, np.float32)))
    arrays, names = {}, []
    for i in LAYERS:
        for key, point in POINTS.items():
            name = spec.tensor_name(key, i)
            e = table[name]
            assert e["format"] == "dequantizelinear" and e["data_type"] == "FLOAT8E4M3FN" and "activation_scale" in e, \
                f"{name}: not an fp8 weight with an activation scale; export with --quant fp8 --fp8-activations"
            k, n = e["shape"]
            codes = np.asarray(raw(e["data"])).reshape(k, n)
            w_scale = np.asarray(raw(e["scale"]), np.float32)
            assert w_scale.size == 1, "per-tensor weight scales expected (the tensorrt target's)"
            a_scale = np.float32(e["activation_scale"])
            x = seen[(i, point)]
            w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [k, n], codes.tobytes(), raw=True)
            zero = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True)
            nodes = [helper.make_node("QuantizeLinear", ["x", "a", "z"], ["xq"], saturate=1),
                     helper.make_node("DequantizeLinear", ["xq", "a", "z"], ["xd"]),
                     helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=1),
                     helper.make_node("MatMul", ["xd", "wd"], ["y"])]
            graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, k])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, n])],
                                      [w, zero, numpy_helper.from_array(a_scale.reshape(()), "a"),
                                       numpy_helper.from_array(w_scale.reshape(()), "s")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
            y_graph = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {"x": x})[0]
            from runtimes.weights import fp8_e4m3fn_to_float
            y_float = x @ (fp8_e4m3fn_to_float(codes) * w_scale)
            tag = f"l{i}_{key}"
            names.append(tag)
            arrays.update({f"{tag}_x": x, f"{tag}_codes": codes, f"{tag}_wscale": w_scale.reshape(()),
                           f"{tag}_ascale": np.asarray(a_scale), f"{tag}_ygraph": y_graph, f"{tag}_yfloat": y_float})
    np.savez_compressed(out, names=np.array(names), **arrays)
    print(f"wrote {out}: {len(names)} GEMMs of layers {LAYERS}")


def gpu(npz: str, out: str) -> None:
    import torch

    data = np.load(npz)
    device = torch.device("cuda")
    rows = []
    for tag in data["names"]:
        x = torch.from_numpy(data[f"{tag}_x"]).to(device)
        a_scale = torch.tensor(float(data[f"{tag}_ascale"]), device=device)
        w_scale = torch.tensor(float(data[f"{tag}_wscale"]), device=device)
        a = (x / a_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        codes = torch.from_numpy(np.ascontiguousarray(data[f"{tag}_codes"].T)).to(device)  # [N, K]
        b = codes.view(torch.float8_e4m3fn).t()  # [K, N], column-major as _scaled_mm wants
        y = torch._scaled_mm(a, b, scale_a=a_scale, scale_b=w_scale, out_dtype=torch.float32).cpu().numpy()
        y_graph, y_float = data[f"{tag}_ygraph"], data[f"{tag}_yfloat"]
        top = float(np.abs(y_graph).max())
        rows.append({"gemm": str(tag), "shape": list(data[f"{tag}_codes"].shape),
                     "gpu_vs_graph": float(np.abs(y - y_graph).max()) / top,
                     "act_quant_effect": float(np.abs(y_graph - y_float).max()) / top})
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "gemms": rows,
              "max_gpu_vs_graph": max(r["gpu_vs_graph"] for r in rows),
              "median_act_quant_effect": float(np.median([r["act_quant_effect"] for r in rows]))}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "gemms"}))


if __name__ == "__main__":
    {"prepare": prepare, "gpu": gpu}[sys.argv[1]](*sys.argv[2:])
