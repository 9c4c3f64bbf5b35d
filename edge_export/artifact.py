"""Writing artifacts atomically: a staging folder beside the destination, renamed into place when done.

An interrupted export leaves only a staging folder (``.NAME.edge-tmp-PID-XXXX``) that nothing loads
and the next export removes. ``--overwrite`` swaps the new folder in with Linux's
renameat2(RENAME_EXCHANGE), one atomic step; where that is unavailable it moves the old folder
aside (``.NAME.edge-old-PID``), renames the new one in, then deletes the old, and the next run
restores or removes a leftover aside folder.

A disk that fills up (ENOSPC, EFBIG, EDQUOT) is an ExportError naming the folder, the bytes the
artifact needs and the free space: refused before writing when the expected size is known not to
fit, else when a write fails, after the staging folder is removed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from runtimes.artifact import FORMAT, FORMAT_VERSION, MANIFEST, file_entry

from . import __version__
from .errors import EdgeError, ExportError

log = logging.getLogger(__name__)
TMP_TAG, OLD_TAG = ".edge-tmp-", ".edge-old-"
RENAME_EXCHANGE = 2
AT_FDCWD = -100
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# Libraries that wrap an errno in their own exception (tokenizers' Rust io::Error, protobuf, coremltools)
# keep strerror's text but not the OSError type.
DISK_FULL_TEXTS = (os.strerror(errno.ENOSPC), os.strerror(errno.EFBIG), os.strerror(errno.EDQUOT))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(dest: Path) -> None:
    """Clean what a killed export left beside ``dest``: stale staging folders are removed; an
    aside copy of the old artifact is put back if the swap never finished, else removed."""
    parent = dest.parent
    if not parent.is_dir():
        return
    for leftover in parent.glob(f".{dest.name}{TMP_TAG}*"):
        pid = leftover.name[len(f".{dest.name}{TMP_TAG}"):].split("-")[0]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            log.info("removing stale staging folder %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    for aside in parent.glob(f".{dest.name}{OLD_TAG}*"):
        pid = aside.name[len(f".{dest.name}{OLD_TAG}"):]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not dest.exists():
            log.warning("restoring %s from an interrupted overwrite", dest)
            os.rename(aside, dest)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    return False


def publish(staging: Path, dest: Path, overwrite: bool) -> None:
    """Move a complete staging folder to ``dest`` in one atomic step."""
    if not dest.exists():
        os.rename(staging, dest)
        return
    if not overwrite:
        raise ExportError(f"{dest} already exists; pass --overwrite to replace it (it is left untouched)")
    if _exchange(staging, dest):
        shutil.rmtree(staging)  # now holds the old artifact
        return
    aside = dest.parent / f".{dest.name}{OLD_TAG}{os.getpid()}"
    os.rename(dest, aside)
    os.rename(staging, dest)  # a crash between these two renames is undone by recover()
    shutil.rmtree(aside)


@contextmanager
def staging_folder(dest: str | Path, overwrite: bool = False, expected_bytes: int | None = None):
    """Yield an empty folder beside ``dest``; on success the caller publishes it, on any failure
    (exception, KeyboardInterrupt) it is removed and ``dest`` is untouched.

    ``expected_bytes``: at least what the artifact will take; an export that cannot fit is refused
    before anything is written. A full disk during the export becomes an ExportError."""
    dest = Path(dest).absolute()
    recover(dest)
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; pass --overwrite to replace it (it is left untouched)")
    if dest.exists() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise ExportError(f"{dest} exists and is not an edge-export artifact; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dest, expected_bytes)
    free_before = shutil.disk_usage(dest.parent).free
    staging = dest.parent / f".{dest.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(3)}"
    try:
        staging.mkdir()
        yield staging
    except Exception as e:
        full = disk_full_cause(e)
        inodes_out = full is not None and os.statvfs(dest.parent).f_favail == 0  # before removing frees some
        shutil.rmtree(staging, ignore_errors=True)
        if full is not None:
            raise ExportError(disk_full_message(dest, full, expected_bytes, free_before, inodes_out)) from e
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def disk_full_cause(error: BaseException) -> BaseException | None:
    """The error in ``error``'s ``raise ... from`` chain that says the disk (or a file-size limit) is full."""
    for _ in range(8):
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        if not isinstance(error, (OSError, EdgeError)) and any(text in str(error) for text in DISK_FULL_TEXTS):
            return error
        error = error.__cause__
    return None


def check_free_space(dest: Path, expected_bytes: int | None) -> None:
    """Refuse an export whose artifact (at least ``expected_bytes``) cannot fit beside ``dest``."""
    if not expected_bytes:
        return
    free = shutil.disk_usage(dest.parent).free
    if expected_bytes > free:
        raise ExportError(
            f"not enough space in {dest.parent} for {dest.name}: the artifact needs at least {_size(expected_bytes)}, "
            f"{_size(free)} is free; free space there or export to a folder on another disk (nothing was written"
            f"{_untouched(dest)})")


def disk_full_message(dest: Path, error: BaseException, expected_bytes: int | None, free_before: int,
                      inodes_out: bool = False) -> str:
    """One line: which folder filled up, what the artifact needs, what is free, and the fix.

    A disk that filled up during the export proves the artifact needs more than was free when it
    started (``free_before``), a better lower bound than the weights' size when nothing else wrote."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    folder = dest.parent
    filename = getattr(error, "filename", None)
    if isinstance(filename, (str, bytes, os.PathLike)) and folder not in Path(os.fsdecode(filename)).absolute().parents:
        folder = Path(os.fsdecode(filename)).absolute().parent  # a file elsewhere (a temporary folder) filled up
    code = getattr(error, "errno", None)
    both = " (--overwrite keeps the old artifact until the new one is complete: room for both)" \
        if dest.exists() else ""
    done = f"(the partial export was removed{_untouched(dest)})"
    if code == errno.EFBIG:
        least = f"; the artifact needs at least {_size(expected_bytes)} in all" if expected_bytes else ""
        return (f"writing {dest.name} in {folder} failed ({reason}): a file outgrew what that file system (FAT32: "
                f"4 GiB) or the process's file-size limit (ulimit -f) allows{least}; export to a folder on another "
                f"file system or raise the limit {done}")
    no_space = code == errno.ENOSPC or (code is None and os.strerror(errno.ENOSPC) in str(error))
    if no_space and inodes_out and folder == dest.parent:
        need = "needs more files than that file system had inodes left"
    elif no_space and folder == dest.parent and free_before >= (expected_bytes or 0):
        need = f"needs more than the {_size(free_before)} that were free"
    else:
        free = shutil.disk_usage(folder).free if folder.is_dir() else 0
        need = f"needs at least {_size(expected_bytes)}, {_size(free)} is free" if expected_bytes else \
            f"needs more room than the {_size(free)} free"
    return (f"writing {dest.name} in {folder} failed ({reason}): the artifact {need}{both}; free space there or "
            f"export to a folder on another disk {done}")


def _untouched(dest: Path) -> str:
    return f"; the artifact already at {dest.name} is untouched" if dest.exists() else ""


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Hash every file in ``folder`` into ``manifest['files']`` and write edge_manifest.json last."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            _fsync(path)
            files[path.relative_to(folder).as_posix()] = file_entry(path)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files,
                "tool": {"name": "edge-export", "version": __version__},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    _fsync(path)
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
