"""Reading an artifact folder: its manifest, and a check of every file it lists.

The manifest (``edge_manifest.json``) says everything a runtime needs; nothing is guessed from
file names. Loading refuses a folder whose files are missing, modified, or not listed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .models import ModelSpec

MANIFEST = "edge_manifest.json"
FORMAT = "edge-export-artifact"
FORMAT_VERSION = 1
STAGING_TAGS = (".edge-tmp-", ".edge-old-")  # folders edge_export.artifact writes before publishing
# Files a runtime or tool may add beside the listed ones without making the artifact suspect.
IGNORED = {MANIFEST}

# (path, size, mtime_ns, ctime_ns, inode) -> sha256; ctime cannot be set back by a user, so a
# rewritten file always misses the cache.
_VERIFIED: dict[tuple, str] = {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """The manifest entry for one file: size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


@dataclass
class Artifact:
    """An artifact folder with its parsed manifest."""

    path: Path
    manifest: dict

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.manifest["model"])

    @property
    def target(self) -> str:
        return self.manifest.get("target", "")

    @property
    def variant(self) -> str:
        return self.manifest.get("variant", "")

    def file(self, name: str) -> Path:
        """A file the manifest lists, as a path inside the artifact (never outside it)."""
        if name not in self.manifest.get("files", {}):
            raise ArtifactError(f"{self.path}: the manifest does not list '{name}'")
        return self.path / name

    @property
    def model_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.manifest["files"].values())


def read_manifest(folder: str | Path, staging_ok: bool = False) -> Artifact:
    """Parse and sanity-check an artifact's manifest (no file hashing). ``staging_ok`` is for the
    exporter verifying its own staging folder before publishing it."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not staging_ok and (STAGING_TAGS[0] in folder.name or STAGING_TAGS[1] in folder.name):
        raise ArtifactError(f"{folder}: an unfinished export's staging folder, never loaded; the next export "
                            "beside it removes it")
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; this is not an edge-export artifact "
                            "(export one with `edge-export export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e}); re-export the artifact") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an edge-export manifest (format is {manifest.get('format')!r})"
                            if isinstance(manifest, dict) else f"{path}: manifest is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: manifest format version {version!r} is not supported by this runtime "
                            f"(supports {FORMAT_VERSION}); upgrade edge-export or re-export the artifact")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: manifest lists no files")
    for name, entry in files.items():
        _check_name(folder, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise ArtifactError(f"{path}: entry for '{name}' needs integer 'bytes' and string 'sha256'")
    if not isinstance(manifest.get("model"), dict):
        raise ArtifactError(f"{path}: manifest has no 'model' section")
    return Artifact(folder, manifest)


def _check_name(folder: Path, name: str) -> None:
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ArtifactError(f"{folder}: manifest entry '{name}' points outside the artifact; refusing it")
    resolved = (folder / name).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ArtifactError(f"{folder}: '{name}' is a link that leaves the artifact; refusing it")


def verify_files(artifact: Artifact) -> None:
    """Every listed file present with its size and sha256; no unlisted file. Raises ArtifactError."""
    folder, files = artifact.path, artifact.manifest["files"]
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing; the artifact is incomplete, re-export it")
        st = path.stat()
        if st.st_size != entry["bytes"]:
            raise ArtifactError(f"{path}: {st.st_size} bytes, the manifest says {entry['bytes']}; "
                                "the file was modified or truncated, re-export the artifact")
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        digest = _VERIFIED.get(key) or sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match the manifest; the file was modified, re-export the artifact")
        _VERIFIED[key] = digest
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in files and name not in IGNORED:
            raise ArtifactError(f"{path}: not listed in the manifest; remove it or re-export the artifact")


def load_artifact(folder: str | Path, verify: bool = True) -> Artifact:
    artifact = read_manifest(folder)
    if verify:
        verify_files(artifact)
    return artifact
