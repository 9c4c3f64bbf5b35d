"""`--device adb://SERIAL`: an Android device through adb, timed by a native benchmark the user names.

The toolkit's Python runtime does not run on a phone, so the measuring is done by a native runner
pushed with the artifact (``--runner PATH``): onnxruntime-genai's ``model_benchmark``, which loads
an ONNX artifact as it is (its genai_config.json), with the shared libraries found beside it
(``lib*.so``, pushed too). Its output is parsed into the protocol's result JSON; a figure the
runner does not print is absent from the result, never derived from something else.

On the device, under /data/local/tmp/edge-export: ``artifacts/<name>/`` (a file whose sha256 the
device already has is not pushed again), ``bin/`` (the runner and its libraries), ``prompt.txt``.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtimes.artifact import MANIFEST, Artifact, load_artifact, sha256_file
from runtimes.tokenizer import ChatTokenizer

from .host import BenchError
from .protocol import RESULT_FORMAT, bench_option, prompt_ids
from .registry import Device, register_device

log = logging.getLogger(__name__)

DEVICE_ROOT = "/data/local/tmp/edge-export"
SHORT_TIMEOUT_S = 60
MIN_PUSH_RATE = 1 << 20  # bytes/s below which a push counts as hung (USB 2 does ~30 MB/s)


class AdbError(BenchError):
    """adb is missing, the device is not ready, or the benchmark on it did not complete."""


# ---- runners: how to call one and how to read what it prints -------------------------------------
@dataclass(frozen=True)
class RunnerKind:
    """A benchmark binary edge-export knows how to drive: its arguments and a parser of its output."""

    name: str
    description: str
    args: Callable[[str, str, dict], list[str]]  # (artifact folder, prompt file, options) -> argv
    parse: Callable[[str], dict]


def model_benchmark_args(artifact: str, prompt_file: str, options: dict) -> list[str]:
    """onnxruntime-genai benchmark/c/options.cpp: -i, --prompt_file, -g, -r, -w, -e."""
    args = ["-i", artifact, "--prompt_file", prompt_file, "-g", str(bench_option(options, "new_tokens")),
            "-r", str(bench_option(options, "runs")), "-w", str(bench_option(options, "warmup"))]
    return args + (["-e", options["provider"]] if options.get("provider") else [])


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"  # C++ iostream prints 1.23457e+06 too


def _section(text: str, label: str) -> dict[str, float]:
    """The tab-indented ``key: value`` lines under ``label:`` in model_benchmark's output."""
    match = re.search(re.escape(label) + r":\n((?:\t[^\n]*\n?)+)", text)
    if not match:
        return {}
    values = {}
    for line in match.group(1).splitlines():
        key, _, value = line.strip().partition(":")
        number = re.match(_NUMBER, value.strip())
        if number:
            values[key.strip()] = float(number.group(1))
    return values


# both spellings main.cpp has used: "... size (bytes): N" and "... size: N bytes (1.12 GB)"
PEAK_WORKING_SET = re.compile(r"Peak working set size(?: \(bytes\))?: (\d+)(?: bytes)?")


def parse_model_benchmark(text: str) -> dict:
    """Figures from model_benchmark's output (onnxruntime-genai benchmark/c/main.cpp, RunBenchmark).

    ``ttft_ms``: the median of "Prompt processing (time to first token)"; ``decode_tok_s``: 1 / the
    median of "Token generation" (per token); ``peak_rss_mb``: the peak working set, which older
    builds print as "Peak working set size (bytes): N" and current ones as "Peak working set size:
    N bytes (X MB)". It prints no p90, so ``ttft_ms_p90`` and ``decode_tok_s_p10`` are absent.
    """
    out: dict = {}
    header = re.search(r"prompt tokens: (\d+), tokens to generate: (\d+)", text)
    if header:
        out.update(prompt_tokens=int(header.group(1)), new_tokens=int(header.group(2)))
    prompt = _section(text, "Prompt processing (time to first token)")
    if prompt.get("p50 (us)"):
        out["ttft_ms"] = round(prompt["p50 (us)"] / 1000, 2)
        if "prompt_tokens" in out:
            out["prefill_tok_s"] = round(out["prompt_tokens"] / (prompt["p50 (us)"] / 1e6), 1)
    token = _section(text, "Token generation")
    if token.get("p50 (us)"):
        out["decode_tok_s"] = round(1e6 / token["p50 (us)"], 2)
    e2e = _section(text, "E2E generation (entire generation loop)")
    if "n" in e2e:
        out["runs"] = int(e2e["n"])
    peak = PEAK_WORKING_SET.search(text)
    if peak:
        out["peak_rss_mb"] = round(int(peak.group(1)) / 2**20, 1)
    return out


RUNNERS = {"model_benchmark": RunnerKind(
    "model_benchmark", "onnxruntime-genai's benchmark/c model_benchmark", model_benchmark_args, parse_model_benchmark)}


def runner_kind(path: Path) -> RunnerKind:
    """The kind of a runner binary, by its file name (model_benchmark, model_benchmark-arm64, ...)."""
    for name, kind in RUNNERS.items():
        if path.name.startswith(name):
            return kind
    known = ", ".join(f"{k} ({v.description})" for k, v in RUNNERS.items())
    raise AdbError(f"--runner {path}: not a runner edge-export can drive (known: {known}); onnxruntime_perf_test "
                   "times single forward passes, not prompt and tokens, so it cannot fill the protocol's figures")


# ---- adb ---------------------------------------------------------------------------------------------
class Adb:
    """The adb client for one device serial."""

    def __init__(self, serial: str):
        if not serial:
            raise AdbError("--device adb://SERIAL needs a serial (see `adb devices`)")
        self.exe = shutil.which("adb")
        if not self.exe:
            raise AdbError("adb is not installed; install Android platform-tools (apt-get install adb)")
        self.serial, self.url = serial, f"adb://{serial}"

    def _run(self, args: list[str], stage: str, timeout: float) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run([self.exe, *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AdbError(f"{self.url}: {stage} did not finish within {timeout:.0f} s; "
                           "raise --timeout, or lower --runs / --new-tokens") from e
        if proc.returncode != 0 and any(s in proc.stderr for s in ("not found", "offline", "error: closed",
                                                                    "no devices")):
            raise AdbError(f"{self.url}: the device went away while {stage} ({_last_line(proc.stderr)}); "
                           "nothing was recorded, reconnect it and rerun")
        return proc

    def check_ready(self) -> None:
        listed = self._run(["devices"], "listing devices", SHORT_TIMEOUT_S).stdout
        states = dict(line.split("\t", 1) for line in listed.splitlines()[1:] if "\t" in line)
        state = states.get(self.serial)
        if state == "device":
            return
        if state == "unauthorized":
            raise AdbError(f"{self.url}: the device has not authorized this computer; accept the USB debugging "
                           "prompt on its screen")
        raise AdbError(f"{self.url}: not connected" + (f" (state {state})" if state else "")
                       + f"; `adb devices` lists: {', '.join(states) or 'nothing'}")

    def push(self, local: Path, remote: str, stage: str) -> None:
        proc = self._run(["-s", self.serial, "push", str(local), remote], stage,
                         120 + local.stat().st_size / MIN_PUSH_RATE)
        if proc.returncode != 0:
            full = "No space left on device" in proc.stderr + proc.stdout
            raise AdbError(f"{self.url}: {stage} failed ({_last_line(proc.stderr or proc.stdout)})"
                           + ("; free space on the device" if full else ""))

    def stop(self, pattern: str) -> None:
        """Best effort: end a runner left going on the device when adb gave up on it (a timeout)."""
        try:
            self._run(["-s", self.serial, "shell", f"pkill -f {shlex.quote(pattern)}"], "stopping the runner",
                      SHORT_TIMEOUT_S)
        except AdbError as e:
            log.warning("%s: could not stop the runner (%s)", self.url, e)

    def shell(self, command: str, stage: str, timeout: float = SHORT_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run ``command`` in the device's shell; adb returns its exit status."""
        return self._run(["-s", self.serial, "shell", command], stage, timeout)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


# ---- the device ----------------------------------------------------------------------------------------
@register_device("adb")
class AdbDevice(Device):
    """An Android device: push the artifact and the runner, run it, parse what it prints."""

    def bench(self, artifact: str, options: dict) -> dict:
        if not options.get("runner"):
            raise AdbError(f"adb://{self.target} needs --runner PATH: the benchmark binary to push and run "
                           f"(known: {', '.join(RUNNERS)})")
        runner = Path(options["runner"])
        kind, adb, art = runner_kind(runner), Adb(self.target), load_artifact(artifact)
        adb.check_ready()
        folder = f"{DEVICE_ROOT}/artifacts/{art.path.name}"
        transfer = push_artifact(adb, art.path, art.manifest, folder)
        binary = push_runner(adb, runner)
        prompt = push_prompt(adb, art, int(bench_option(options, "prompt_tokens")))
        command = (f"cd {DEVICE_ROOT}/bin && LD_LIBRARY_PATH={DEVICE_ROOT}/bin "
                   + shlex.join([f"./{binary}", *kind.args(folder, prompt, options)]))
        try:
            proc = adb.shell(command, f"running {runner.name}", float(bench_option(options, "timeout")))
        except AdbError:
            adb.stop(f"{binary} -i {folder}")
            raise
        if proc.returncode != 0:
            raise AdbError(f"{adb.url}: {runner.name} failed (exit {proc.returncode}: "
                           f"{_last_line(proc.stderr or proc.stdout)}); nothing was recorded")
        figures = kind.parse(proc.stdout)
        if "decode_tok_s" not in figures and "ttft_ms" not in figures:
            raise AdbError(f"{adb.url}: {runner.name} printed no figures edge-export can read "
                           f"({_last_line(proc.stdout)}); is it {kind.description}?")
        return {"format": RESULT_FORMAT, "measured": True, **figures, "warmup": options.get("warmup"),
                "model_bytes": art.model_bytes, "artifact": art.path.name, "target": f"{art.target}/{art.variant}",
                "quant": (art.manifest.get("quantization") or {}).get("quant"), "runner": kind.name,
                "device": adb.url, "device_info": device_info(adb), "transfer": transfer}


def push_artifact(adb: Adb, path: Path, manifest: dict, folder: str) -> dict:
    """Push the files the device lacks (one sha256sum there says which); returns what was pushed."""
    names = [MANIFEST, *manifest["files"]]
    listing = adb.shell(f"mkdir -p {shlex.quote(folder)} && cd {shlex.quote(folder)} && "
                        f"sha256sum {shlex.join(names)} 2>/dev/null; true", "checking the device's copy").stdout
    on_device = {line.split()[-1]: line.split()[0] for line in listing.splitlines() if len(line.split()) == 2}
    wanted = {name: (manifest["files"][name]["sha256"] if name in manifest["files"] else sha256_file(path / name))
              for name in names}
    copied = [name for name in names if on_device.get(name) != wanted[name]]
    for name in copied:
        adb.push(path / name, f"{folder}/{name}", f"pushing {name}")
    return {"copied": sorted(copied), "skipped": sorted(set(names) - set(copied)),
            "copied_bytes": sum((path / n).stat().st_size for n in copied)}


def push_runner(adb: Adb, runner: Path) -> str:
    """Push the runner and the shared libraries beside it into bin/; returns the runner's name there."""
    adb.shell(f"mkdir -p {DEVICE_ROOT}/bin", "making the runner's folder")
    for lib in sorted(runner.parent.glob("lib*.so*")):
        adb.push(lib, f"{DEVICE_ROOT}/bin/{lib.name}", f"pushing {lib.name}")
    adb.push(runner, f"{DEVICE_ROOT}/bin/{runner.name}", f"pushing {runner.name}")
    adb.shell(f"chmod 755 {DEVICE_ROOT}/bin/{shlex.quote(runner.name)}", "making the runner executable")
    return runner.name


def push_prompt(adb: Adb, art: Artifact, prompt_tokens: int) -> str:
    """The protocol's prompt as text (its ids decoded with the artifact's tokenizer), pushed to the
    device; returns its path there. The runner re-encodes it and prints the count it got."""
    tok = art.manifest["tokenizer"]
    tokenizer = ChatTokenizer.from_files(art.file(tok["file"]), art.file(tok["config"]) if tok.get("config") else None)
    text = tokenizer.decode(prompt_ids(lambda t: tokenizer.encode(t, add_bos=False), prompt_tokens))
    with tempfile.TemporaryDirectory(prefix="edge-export-prompt-") as folder:
        local = Path(folder) / "prompt.txt"
        local.write_text(text, encoding="utf-8")
        adb.push(local, f"{DEVICE_ROOT}/prompt.txt", "pushing the prompt")
    return f"{DEVICE_ROOT}/prompt.txt"


def device_info(adb: Adb) -> dict:
    """Model, SoC and ABI from the device's properties (those it does not set are left out)."""
    props = {"model": "ro.product.model", "soc": "ro.soc.model", "abi": "ro.product.cpu.abi"}
    out = adb.shell("; ".join(f"echo {key}=$(getprop {prop})" for key, prop in props.items()),
                    "reading the device's properties").stdout
    info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {"transport": "adb", **{k: v.strip() for k, v in info.items() if k in props and v.strip()}}
