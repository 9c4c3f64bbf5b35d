"""A disk that fills up during an export, on a real small file system (a tmpfs mounted by the test).

The tiny Llama's int4 artifact is about 640 KiB (model.onnx.data about 610 KiB); its weights'
lower bound (export.least_artifact_bytes) is about 320 KiB. Leaving free space between the two lets
the up-front check pass and the data file hit ENOSPC mid-write; leaving less than the lower bound
is refused before anything is written. Each case: exit code 2, one error line naming the folder and
the fix, no staging folder left, and an artifact already there byte-identical and loadable.
"""
from __future__ import annotations

import hashlib
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import runtimes
from edge_export.artifact import TMP_TAG
from edge_export.checkpoint import open_checkpoint
from edge_export.cli import main
from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export, least_artifact_bytes, quant_rules

DISK_BYTES = 3 << 20


@pytest.fixture
def disk(tmp_path):
    """A 3 MiB tmpfs (mounting needs root); unmounted afterwards."""
    point = tmp_path / "disk"
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="module")
def small_artifact(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama exported to int4 on the ordinary disk: what a full disk must not damage."""
    out = tmp_path_factory.mktemp("disk-full") / "art"
    export(str(tiny_llama), str(out), ExportOptions(quant="int4", verify=False))
    return out


def leave_free(disk: Path, free: int) -> int:
    """Fill ``disk`` with a dummy file until about ``free`` bytes are left; returns the free bytes."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - free))
    return shutil.disk_usage(disk).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def export_cli(checkpoint: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out), "--no-verify", *extra])


def assert_one_error_line(result, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line on stderr holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def staging_left(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if TMP_TAG in p.name)


def test_disk_filling_during_the_export_leaves_nothing(tiny_llama, small_artifact, disk):
    free = leave_free(disk, folder_bytes(small_artifact) - (200 << 10))  # above the lower bound, below the artifact
    out = export_cli(tiny_llama, disk / "art", "--json")  # --json: no progress lines, so the output is the error
    line = assert_one_error_line(out, f"writing art in {disk} failed (No space left on device)",
                                 f"the artifact needs more than the {free / 1024:.0f} KiB that were free",
                                 "free space there or export to a folder on another disk",
                                 "(the partial export was removed)")
    assert out.output.strip() == line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_the_python_api_raises_export_error(tiny_llama, small_artifact, disk):
    leave_free(disk, folder_bytes(small_artifact) - (200 << 10))
    with pytest.raises(ExportError, match=r"failed \(No space left on device\): the artifact needs more than"):
        export(str(tiny_llama), str(disk / "art"), ExportOptions(quant="int4", verify=False))
    assert staging_left(disk) == [] and not (disk / "art").exists()


@pytest.mark.parametrize("dest_name, extra", [("art", ["--overwrite"]), ("other", [])],
                         ids=["overwrite-same-folder", "new-folder-beside-it"])
def test_an_artifact_already_there_is_untouched(tiny_llama, small_artifact, disk, dest_name, extra):
    existing = disk / "art"
    shutil.copytree(small_artifact, existing)
    before = digests(existing)
    leave_free(disk, folder_bytes(small_artifact) - (200 << 10))  # room for the weights' bound, not for a second copy
    out = export_cli(tiny_llama, disk / dest_name, *extra)
    fragments = ["No space left on device", "(the partial export was removed"]
    if extra:
        fragments += ["--overwrite keeps the old artifact until the new one is complete: room for both",
                      "the artifact already at art is untouched"]
    assert_one_error_line(out, *fragments)
    assert staging_left(disk) == [] and not (disk / "other").exists()
    assert digests(existing) == before
    assert runtimes.load(str(existing)).generate("hi", max_new_tokens=2, temperature=0).tokens
    refused = export_cli(tiny_llama, existing)  # no --overwrite: refused before writing, full disk or not
    assert_one_error_line(refused, "already exists; pass --overwrite")
    assert digests(existing) == before


def test_an_export_that_cannot_fit_is_refused_before_writing(tiny_llama, disk):
    free = leave_free(disk, 100 << 10)
    need = least_artifact_bytes(open_checkpoint(str(tiny_llama)).spec, quant_rules(ExportOptions(method="rtn")))
    assert need > free
    out = export_cli(tiny_llama, disk / "art", "--json")
    assert_one_error_line(out, f"not enough space in {disk} for art: the artifact needs at least "
                               f"{need / 1024:.0f} KiB, {free / 1024:.0f} KiB is free; free space there or export to "
                               "a folder on another disk (nothing was written)")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def _limit_file_size():
    limit = 256 << 10
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_file_size_limit_is_efbig_with_its_own_fix(tiny_llama, tmp_path):
    """A process file-size limit (ulimit -f) gives EFBIG, as FAT32's 4 GiB does for a large model's
    weights; Python ignores SIGXFSZ, so the write fails instead of killing the process."""
    proc = subprocess.run([sys.executable, "-m", "edge_export.cli", "export", str(tiny_llama), "-o",
                           str(tmp_path / "art"), "--no-verify", "--json"], capture_output=True, text=True,
                          preexec_fn=_limit_file_size, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert f"writing art in {tmp_path} failed (File too large)" in proc.stderr
    assert "file-size limit (ulimit -f)" in proc.stderr and "raise the limit" in proc.stderr
    assert "the artifact needs at least" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
