"""Atomic publish: a failed or killed export leaves nothing that looks like an artifact and never
damages the one already at the destination."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edge_export.artifact import OLD_TAG, TMP_TAG, publish, recover, staging_folder, write_manifest
from edge_export.errors import ExportError
from runtimes.artifact import load_artifact
from runtimes.errors import ArtifactError

from ..conftest import terminal_signals


def make_artifact(folder, text="v1"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_text(text)
    write_manifest(folder, {"target": "onnx", "variant": "ort", "model": {"architecture": "x"}})
    return folder


def test_exception_leaves_nothing(tmp_path):
    dest = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with staging_folder(dest) as staging:
            (staging / "model.onnx").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_untouched_without_overwrite(tmp_path):
    dest = make_artifact(tmp_path / "art")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        with staging_folder(dest):
            pass
    assert (dest / "model.onnx").read_text() == "v1"
    load_artifact(dest)


def test_overwrite_swaps_atomically(tmp_path):
    dest = make_artifact(tmp_path / "art")
    with staging_folder(dest, overwrite=True) as staging:
        make_artifact(staging, "v2")
        publish(staging, dest, overwrite=True)
    assert (dest / "model.onnx").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_crash_between_move_aside_and_rename_is_recovered(tmp_path):
    """The fallback path (no renameat2): old moved aside, then the process dies before the new
    one is renamed in. The next export puts the old artifact back."""
    dest = make_artifact(tmp_path / "art")
    aside = tmp_path / f".art{OLD_TAG}999999"
    os.rename(dest, aside)  # step one of the move-aside, then a crash
    stale = tmp_path / f".art{TMP_TAG}999999-abc"
    make_artifact(stale, "v2")
    recover(dest)
    assert (dest / "model.onnx").read_text() == "v1" and not aside.exists() and not stale.exists()


def test_staging_folders_are_never_loaded(tmp_path):
    stale = make_artifact(tmp_path / f".art{TMP_TAG}123-abc")
    with pytest.raises(ArtifactError, match="staging folder, never loaded"):
        load_artifact(stale)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_export_leaves_no_artifact(tmp_path, sig):
    dest = make_artifact(tmp_path / "art")
    code = textwrap.dedent(f"""
        import time, pathlib
        from edge_export.artifact import staging_folder
        with staging_folder({str(dest)!r}, overwrite=True) as s:
            (s / "model.onnx").write_text("partial")
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=terminal_signals)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert (dest / "model.onnx").read_text() == "v1"
    recover(dest)  # what the next export does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    load_artifact(dest)
