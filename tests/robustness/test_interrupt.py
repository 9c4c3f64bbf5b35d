"""Ctrl-C during `run` or `chat`: one line, a clean exit (130), no traceback."""
import os
import signal
import subprocess
import sys

from edge_export.export import ExportOptions, export

from ..conftest import terminal_signals


def test_ctrl_c_during_run(tiny_llama, tmp_path):
    art = tmp_path / "art"
    export(tiny_llama, art, ExportOptions(quant="fp32", verify=False, max_context=4096))
    proc = subprocess.Popen([sys.executable, "-m", "edge_export.cli", "run", str(art), "hello", "--temperature", "0",
                             "--max-new-tokens", "4000", "--backend", "reference"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=terminal_signals)
    assert proc.stdout.read(1)  # generation has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_chat_ends_on_eof_and_exit(tiny_llama, tmp_path):
    art = tmp_path / "art"
    export(tiny_llama, art, ExportOptions(quant="fp32", verify=False))
    proc = subprocess.run([sys.executable, "-m", "edge_export.cli", "chat", str(art), "--max-new-tokens", "4",
                           "--temperature", "0"], input="hello\nsecond turn\n/exit\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") == 3
