"""`--device adb://SERIAL` against a STAND-IN adb: no Android phone exists on this machine.

The stand-in is a small Python script named `adb`, written into a temporary folder put first on
PATH. It implements the three commands edge-export uses (``devices``, ``-s SERIAL push``,
``-s SERIAL shell``) over a temporary folder that plays the phone's file system: ``shell`` runs the
command with ``sh`` on this host, with /data/local/tmp mapped into that folder. The runner pushed
is a stand-in too: a Python port of onnxruntime-genai's ``model_benchmark`` loop (benchmark/c/main.cpp)
that times the artifact with the onnxruntime-genai Python package and prints its report in the
binary's format. What is real: the artifact, the pushes and the sha256 skip, the parsing, and the
figures (measured on this host by onnxruntime-genai).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import devices
from devices.adb import AdbError, parse_model_benchmark
from edge_export.cli import main
from edge_export.export import ExportOptions, export

SERIAL = "standin-0001"
QUICK = dict(prompt_tokens=16, new_tokens=8, runs=2, warmup=0)

STANDIN_ADB = textwrap.dedent('''\
    #!{python}
    """STAND-IN adb for tests (no phone here): devices, -s SERIAL push, -s SERIAL shell over a folder."""
    import os, shutil, subprocess, sys
    ROOT, SERIAL = os.environ["STANDIN_ADB_ROOT"], os.environ["STANDIN_ADB_SERIAL"]
    args = sys.argv[1:]
    if args == ["devices"]:
        print("List of devices attached\\n%s\\tdevice\\n" % SERIAL)
        sys.exit(0)
    if args[:1] != ["-s"] or len(args) < 3:
        sys.exit("stand-in adb: unsupported arguments %r" % args)
    if args[1] != SERIAL:
        sys.exit("adb: device '%s' not found" % args[1])
    command, rest = args[2], args[3:]
    on_device = lambda path: ROOT + path
    if command == "push":
        local, remote = rest
        dest = on_device(remote)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(local, dest)
        shutil.copymode(local, dest)
        print("%s: 1 file pushed" % local)
        sys.exit(0)
    if command == "shell":
        line = " ".join(rest).replace("/data/local/tmp", on_device("/data/local/tmp"))
        env = dict(os.environ, PATH=on_device("/system/bin") + ":" + os.environ["PATH"])
        sys.exit(subprocess.run(["sh", "-c", line], env=env).returncode)
    sys.exit("stand-in adb: unsupported command %r" % command)
''')

STANDIN_GETPROP = textwrap.dedent('''\
    #!/bin/sh
    # STAND-IN getprop: the phone's properties
    case "$1" in
      ro.product.model) echo "stand-in (this host)";;
      ro.product.cpu.abi) echo "x86_64";;
    esac
''')

# A Python port of onnxruntime-genai benchmark/c/main.cpp (RunBenchmark, WritePerTokenStats,
# WriteE2EStats) and options.cpp (its flags); the report's labels and layout are the binary's.
STANDIN_MODEL_BENCHMARK = textwrap.dedent('''\
    #!{python}
    """STAND-IN model_benchmark: onnxruntime-genai's benchmark loop, in Python, printing its report."""
    import argparse, math, resource, time
    import onnxruntime_genai as og
    ap = argparse.ArgumentParser()
    ap.add_argument("-i", "--input_folder", required=True)
    ap.add_argument("-e", "--execution_provider", default="cpu")
    ap.add_argument("-l", "--prompt_length", type=int, default=16)
    ap.add_argument("--prompt_file")
    ap.add_argument("-g", "--generation_length", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=10)
    ap.add_argument("-w", "--warmup", type=int, default=1)
    opts = ap.parse_args()
    model = og.Model(opts.input_folder)
    tokenizer = og.Tokenizer(model)
    prompt = open(opts.prompt_file).read() if opts.prompt_file else "A" * opts.prompt_length
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    total = len(ids) + opts.generation_length
    params.set_search_options(max_length=total, min_length=total)
    prompt_times, token_times, sampling_times, e2e_times = [], [], [], []
    def once(record):
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        prefilled = time.perf_counter()
        generator.generate_next_token()
        sampled = time.perf_counter()
        steps = []
        while not generator.is_done():
            t = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - t)
        if record:
            prompt_times.append(prefilled - start); sampling_times.append(sampled - prefilled)
            token_times.extend(steps); e2e_times.append(time.perf_counter() - start)
    for _ in range(opts.warmup):
        once(False)
    for _ in range(opts.repetitions):
        once(True)
    def stats(values):
        n = len(values); avg = sum(values) / n; ordered = sorted(values)
        sd = math.sqrt(sum((v - avg) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return avg, ordered[int(n * 0.5)], sd, n
    def per_token(label, values, tokens):
        avg, p50, sd, n = stats(values)
        print("%s:\\n\\tavg (us):       %g\\n\\tavg (tokens/s): %g\\n\\tp50 (us):       %g\\n\\tstddev (us):    %g"
              "\\n\\tn:              %d * %d token(s)"
              % (label, avg * 1e6, tokens / avg, p50 * 1e6, sd * 1e6, n, tokens))
    print("Batch size: 1, prompt tokens: %d, tokens to generate: %d" % (len(ids), opts.generation_length))
    per_token("Prompt processing (time to first token)", prompt_times, len(ids))
    per_token("Token generation", token_times, 1)
    per_token("Token sampling", sampling_times, 1)
    avg, p50, sd, n = stats(e2e_times)
    print("E2E generation (entire generation loop):\\n\\tavg (ms):       %g\\n\\tp50 (ms):       %g\\n"
          "\\tstddev (ms):    %g\\n\\tn:              %d" % (avg * 1e3, p50 * 1e3, sd * 1e3, n))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("Peak working set size: %d bytes (%.2f MB)" % (peak, peak / 2**20))  # main.cpp's current spelling
''')

# model_benchmark's report as main.cpp printed it (C++ iostream's 6 significant digits) until the peak
# working set line became "Peak working set size: N bytes (1.12 GB)" (REPORT_CURRENT below).
REPORT = """\
Batch size: 1, prompt tokens: 128, tokens to generate: 128
Prompt processing (time to first token):
\tavg (us):       152113
\tavg (tokens/s): 841.46
\tp50 (us):       150000
\tstddev (us):    3210.55
\tn:              5 * 128 token(s)
Token generation:
\tavg (us):       25210.1
\tavg (tokens/s): 39.6666
\tp50 (us):       25000
\tstddev (us):    812.3
\tn:              635 * 1 token(s)
Token sampling:
\tavg (us):       41.2
\tavg (tokens/s): 24271.8
\tp50 (us):       40.1
\tstddev (us):    3.2
\tn:              5 * 1 token(s)
E2E generation (entire generation loop):
\tavg (ms):       3357.8
\tp50 (ms):       3350.2
\tstddev (ms):    20.1
\tn:              5
Peak working set size (bytes): 1200000000
"""
REPORT_CURRENT = REPORT.replace("Peak working set size (bytes): 1200000000",
                                "Peak working set size: 1200000000 bytes (1.12 GB)")


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def standin_adb(tmp_path, monkeypatch):
    """A stand-in `adb` first on PATH and the folder that plays the phone; returns that folder."""
    tools, phone = tmp_path / "standin-tools", tmp_path / "standin-phone"
    tools.mkdir()
    (phone / "system" / "bin").mkdir(parents=True)
    _executable(tools / "adb", STANDIN_ADB.replace("{python}", sys.executable))
    _executable(phone / "system" / "bin" / "getprop", STANDIN_GETPROP)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_ADB_ROOT", str(phone))
    monkeypatch.setenv("STANDIN_ADB_SERIAL", SERIAL)
    return phone


@pytest.fixture
def standin_runner(tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="the stand-in model_benchmark runs onnxruntime-genai's loop")
    folder = tmp_path / "runner"
    folder.mkdir()
    return _executable(folder / "model_benchmark", STANDIN_MODEL_BENCHMARK.replace("{python}", sys.executable))


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("adb-art") / "tiny-int4"
    export(str(tiny_llama), str(out), ExportOptions(quant="int4", verify=False))
    return out


@pytest.mark.parametrize("report", [REPORT, REPORT_CURRENT], ids=["older", "current"])
def test_parse_model_benchmark_report_takes_only_what_it_prints(report):
    figures = parse_model_benchmark(report)
    assert figures == {"prompt_tokens": 128, "new_tokens": 128, "ttft_ms": 150.0, "prefill_tok_s": 853.3,
                       "decode_tok_s": 40.0, "runs": 5, "peak_rss_mb": pytest.approx(1144.4, abs=0.1)}
    assert "ttft_ms_p90" not in figures and "decode_tok_s_p10" not in figures  # it prints no p90
    cut = parse_model_benchmark(report.split("Token generation")[0])  # output that stopped early
    assert set(cut) == {"prompt_tokens", "new_tokens", "ttft_ms", "prefill_tok_s"}
    assert parse_model_benchmark("Exception: could not load model\n") == {}


def test_bench_on_a_standin_adb_device_measures_and_skips_pushed_files(standin_adb, standin_runner, artifact):
    """Stand-in adb (no phone here): push, run the stand-in model_benchmark, parse its report."""
    first = devices.bench(str(artifact), f"adb://{SERIAL}", runner=str(standin_runner), **QUICK)
    assert first["measured"] is True and first["device"] == f"adb://{SERIAL}" and first["runner"] == "model_benchmark"
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
        assert first[key] > 0, key
    assert first["runs"] == 2 and first["new_tokens"] == 8 and 8 <= first["prompt_tokens"] <= 24
    assert "ttft_ms_p90" not in first and "decode_tok_s_p10" not in first  # not printed, so not reported
    assert first["device_info"] == {"transport": "adb", "model": "stand-in (this host)", "abi": "x86_64"}
    listed = sorted(["edge_manifest.json", *json.loads((artifact / "edge_manifest.json").read_text())["files"]])
    assert first["transfer"]["copied"] == listed
    on_phone = standin_adb / "data/local/tmp/edge-export"
    assert (on_phone / "artifacts/tiny-int4/model.onnx").is_file() and (on_phone / "bin/model_benchmark").is_file()
    again = devices.bench(str(artifact), f"adb://{SERIAL}", runner=str(standin_runner), **QUICK)
    assert again["transfer"]["copied"] == [] and again["transfer"]["skipped"] == listed


def test_cli_bench_adb_with_runner_on_a_standin(standin_adb, standin_runner, artifact):
    """Stand-in adb (no phone here), through the CLI's --runner."""
    out = CliRunner().invoke(main, ["bench", str(artifact), "--device", f"adb://{SERIAL}", "--runner",
                                    str(standin_runner), "--prompt-tokens", "16", "--new-tokens", "8", "--runs", "2",
                                    "--warmup", "0"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"adb://{SERIAL}: TTFT") and "decode" in out.output
    assert "(2 runs, medians)" in out.output


@pytest.mark.parametrize("device, runner, message", [
    (f"adb://{SERIAL}", None, f"adb://{SERIAL} needs --runner PATH"),
    ("adb://nope-42", "model_benchmark", r"adb://nope-42: not connected; `adb devices` lists: standin-0001"),
    (f"adb://{SERIAL}", "onnxruntime_perf_test", "not a runner edge-export can drive"),
])
def test_adb_errors_on_a_standin(standin_adb, artifact, tmp_path, device, runner, message):
    """Stand-in adb (no phone here): each mistake is one clear error."""
    path = _executable(tmp_path / runner, "#!/bin/sh\nexit 1\n") if runner else None
    with pytest.raises(AdbError, match=message):
        devices.bench(str(artifact), device, runner=str(path) if path else None, **QUICK)


def test_a_failing_runner_reports_nothing_on_a_standin(standin_adb, artifact, tmp_path):
    """Stand-in adb (no phone here): a runner that dies part-way gives an error, not a partial result."""
    runner = _executable(tmp_path / "model_benchmark", "#!/bin/sh\n"
                         "echo 'Batch size: 1, prompt tokens: 16, tokens to generate: 8'\n"
                         "echo 'Exception: out of memory' >&2\nexit 1\n")
    with pytest.raises(AdbError, match=r"model_benchmark failed \(exit 1: Exception: out of memory\); "
                                       "nothing was recorded"):
        devices.bench(str(artifact), f"adb://{SERIAL}", runner=str(runner), **QUICK)


def test_adb_missing_is_a_clear_error(artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AdbError, match=r"adb is not installed; install Android platform-tools"):
        devices.bench(str(artifact), f"adb://{SERIAL}", runner=str(_executable(tmp_path / "model_benchmark", "")))


def test_a_runner_past_the_timeout_is_stopped_on_a_standin(standin_adb, artifact, tmp_path):
    """Stand-in adb (no phone here): a runner that hangs is an error after --timeout, and is stopped."""
    runner = _executable(tmp_path / "model_benchmark", "#!/bin/sh\nsleep 300\n")
    start = time.monotonic()
    with pytest.raises(AdbError, match=r"running model_benchmark did not finish within 2 s; raise --timeout"):
        devices.bench(str(artifact), f"adb://{SERIAL}", runner=str(runner), timeout=2, **QUICK)
    assert time.monotonic() - start < 30
    left = subprocess.run(["pgrep", "-f", f"model_benchmark -i {standin_adb}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""
