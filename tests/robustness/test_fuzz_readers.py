"""Fuzzing the readers: whatever bytes arrive, only the toolkit's own error types escape."""
import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_export.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from edge_export.errors import CheckpointError
from runtimes.artifact import read_manifest
from runtimes.errors import EdgeError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def valid_file(path):
    write_safetensors(path, [("a", (4, 8), "F32", np.ones((4, 8), np.float32)),
                             ("b", (3,), "BF16", np.zeros(3, np.uint16))])
    return path.read_bytes()


@SETTINGS
@given(data=st.data())
def test_safetensors_mutations(tmp_path, data):
    blob = bytearray(valid_file(tmp_path / "ok.safetensors"))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(blob[:cut]))
    try:
        f = SafetensorsFile(path)
        for name in f.keys():
            f.tensor(name)
        f.close()
    except CheckpointError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
                           max_leaves=10)


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_safetensors_headers(tmp_path, header):
    blob = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
    try:
        SafetensorsFile(path)
    except CheckpointError:
        pass


@SETTINGS
@given(manifest=st.dictionaries(st.sampled_from(["format", "format_version", "files", "model", "x"]), json_values,
                                max_size=5))
def test_manifest_reader(tmp_path, manifest):
    folder = tmp_path / "art"
    folder.mkdir(exist_ok=True)
    manifest.setdefault("format", "edge-export-artifact")
    (folder / "edge_manifest.json").write_text(json.dumps(manifest))
    try:
        read_manifest(folder)
    except EdgeError:
        pass
