"""The SmolLM2-135M artifacts the runtime benchmarks time, by label, exported once into a folder.

Each is `edge-export export smollm2-135m -o ROOT/LABEL` with the flags below and `--no-verify`
(these scripts time the runtime; each layout's accuracy is benchmarks/accuracy_table.py's). The
export runs this checkout's code (PYTHONPATH is the repository root).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = {
    "keep": ["--method", "keep"],
    "keep-kv8": ["--method", "keep", "--kv-cache", "int8"],
    "keep-acc0": ["--method", "keep", "--accuracy-level", "0"],
    "rtn-g32": ["--method", "rtn"],
}


def ensure(label: str, root: str | Path) -> Path:
    """ROOT/LABEL, exported when it is not there yet."""
    folder = Path(root) / label
    if not (folder / "edge_manifest.json").is_file():
        cmd = [sys.executable, "-m", "edge_export.cli", "export", "smollm2-135m", "-o", str(folder),
               "--quant", "int4", *ARTIFACTS[label], "--no-verify", "--overwrite"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return folder


def first_prompts(n: int, folder: str | Path) -> str | None:
    """A JSONL of the first ``n`` built-in prompts (None: all of them), for a shorter verification
    on a busy machine; its path."""
    if not n:
        return None
    from edge_export.verify import data_file
    lines = [line for line in data_file("eval_prompts.jsonl").read_text().splitlines() if line.strip()][:n]
    path = Path(folder) / f"first_{n}_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)
