"""Lazy reading: walking every tensor grows anonymous memory by about one tensor, not the model."""
import dataclasses

import numpy as np

from edge_export.checkpoint import open_checkpoint
from edge_export.fixtures import _write_weights
from edge_export.presets import preset_spec
from runtimes.models import get_architecture


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("RssAnon:"))


def test_reading_every_tensor_stays_near_one_tensor(tmp_path):
    import json
    # ~190 MB of bf16 in 8 layers: big enough that holding the model would show
    spec = dataclasses.replace(preset_spec("r1-distill-qwen-1.5b"), num_layers=6, vocab_size=8192)
    _write_weights(spec, tmp_path, np.random.default_rng(0), 0.02)
    (tmp_path / "config.json").write_text(json.dumps(get_architecture(spec.architecture).config_from_spec(spec)))
    ckpt = open_checkpoint(tmp_path)
    base = peak = rss_anon_mb()
    largest = 0
    for name in ckpt.tensor_names():
        w = ckpt.tensor(name)
        largest = max(largest, w.nbytes / 2**20)
        peak = max(peak, rss_anon_mb())
        del w
    assert ckpt.bytes_on_disk > 150 * 2**20
    assert peak - base < 1.5 * largest + 32, (peak - base, largest)
