"""Reading every tensor of a checkpoint in turn must not grow anonymous memory by much more than
the largest tensor (mapped file pages are not anonymous). Usage:

    python benchmarks/checkpoint_memory.py /tmp/r1-1.5b-full     # written by `edge-export fixture`
"""
import json
import sys
import time

from edge_export.checkpoint import open_checkpoint


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main(path: str) -> dict:
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    base = peak = rss_anon_mb()
    largest = 0
    for name in ckpt.tensor_names():
        w = ckpt.tensor(name)
        largest = max(largest, w.nbytes)
        peak = max(peak, rss_anon_mb())
        del w
    return {"checkpoint": path, "bytes_on_disk": ckpt.bytes_on_disk, "tensors": len(ckpt.tensor_names()),
            "largest_tensor_f32_mb": round(largest / 2**20, 1), "rss_anon_start_mb": round(base, 1),
            "rss_anon_growth_mb": round(peak - base, 1), "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
