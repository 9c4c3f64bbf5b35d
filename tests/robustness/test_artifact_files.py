"""Loading checks every listed file (size, sha256) and refuses unlisted or missing ones."""
import json

import pytest

from edge_export.artifact import write_manifest
from runtimes.artifact import load_artifact
from runtimes.errors import ArtifactError


@pytest.fixture
def artifact(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "tokenizer.json").write_text("{}")
    write_manifest(folder, {"target": "onnx", "variant": "ort", "model": {"architecture": "x"}})
    return folder


def test_intact(artifact):
    assert load_artifact(artifact).manifest["files"]["model.onnx"]["bytes"] == 5


def test_modified_file(artifact):
    (artifact / "model.onnx").write_bytes(b"GRAPH")
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 does not match the manifest"):
        load_artifact(artifact)


def test_truncated_file(artifact):
    (artifact / "model.onnx").write_bytes(b"gr")
    with pytest.raises(ArtifactError, match=r"model.onnx: 2 bytes, the manifest says 5"):
        load_artifact(artifact)


def test_missing_file(artifact):
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer.json: listed in the manifest but missing"):
        load_artifact(artifact)


def test_unlisted_file(artifact):
    (artifact / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"extra.onnx: not listed in the manifest"):
        load_artifact(artifact)


def test_unknown_format_version(artifact):
    m = json.loads((artifact / "edge_manifest.json").read_text())
    m["format_version"] = 99
    (artifact / "edge_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        load_artifact(artifact)


def test_entry_pointing_outside(artifact):
    m = json.loads((artifact / "edge_manifest.json").read_text())
    m["files"]["../secret"] = {"bytes": 1, "sha256": "0"}
    (artifact / "edge_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="points outside the artifact"):
        load_artifact(artifact)


def test_symlink_out_of_folder(artifact, tmp_path):
    (tmp_path / "outside").write_bytes(b"graph")
    (artifact / "model.onnx").unlink()
    (artifact / "model.onnx").symlink_to(tmp_path / "outside")
    with pytest.raises(ArtifactError, match="link that leaves the artifact"):
        load_artifact(artifact)
