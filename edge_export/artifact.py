"""Writing artifacts atomically: a staging folder beside the destination, renamed into place when done.

An interrupted export leaves only a staging folder (``.NAME.edge-tmp-PID-XXXX``) that nothing loads
and the next export removes. ``--overwrite`` swaps the new folder in with Linux's
renameat2(RENAME_EXCHANGE), one atomic step; where that is unavailable it moves the old folder
aside (``.NAME.edge-old-PID``), renames the new one in, then deletes the old, and the next run
restores or removes a leftover aside folder.
"""
from __future__ import annotations

import ctypes
import ctypes.util
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
from .errors import ExportError

log = logging.getLogger(__name__)
TMP_TAG, OLD_TAG = ".edge-tmp-", ".edge-old-"
RENAME_EXCHANGE = 2
AT_FDCWD = -100


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
def staging_folder(dest: str | Path, overwrite: bool = False):
    """Yield an empty folder beside ``dest``; on success the caller publishes it, on any failure
    (exception, KeyboardInterrupt) it is removed and ``dest`` is untouched."""
    dest = Path(dest).absolute()
    recover(dest)
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; pass --overwrite to replace it (it is left untouched)")
    if dest.exists() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise ExportError(f"{dest} exists and is not an edge-export artifact; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(3)}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
