"""Bad input that used to crash or pass silently: each is one line on stderr naming the option and
its range, exit code 2, no traceback, and nothing generated or written."""
import re
import sys

import pytest
from click.testing import CliRunner

import runtimes
from edge_export.cli import main
from edge_export.export import ExportOptions, export
from runtimes import Sampling
from runtimes.errors import SamplingError


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input") / "art"
    export(str(tiny_llama), str(out), ExportOptions(quant="fp32", verify=False, max_context=64))
    return out


def one_error_line(result) -> str:
    """Exit code 2, no traceback, stderr exactly one `error:` line, nothing on stdout; returns it."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "", result.stdout
    return lines[0]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("option,value,says", [
    ("--top-p", "0", "Invalid value for '--top-p': 0.0 is not in the range 0<x<=1."),
    ("--top-p", "1.5", "Invalid value for '--top-p': 1.5 is not in the range 0<x<=1."),
    ("--temperature", "-1", "Invalid value for '--temperature': -1.0 is not in the range x>=0."),
    ("--max-new-tokens", "0", "Invalid value for '--max-new-tokens': 0 is not in the range x>=1."),
    ("--max-new-tokens", "-3", "Invalid value for '--max-new-tokens': -3 is not in the range x>=1."),
    ("--thinking-budget", "-1", "Invalid value for '--thinking-budget': -1 is not in the range x>=0."),
    ("--seed", "-5", "Invalid value for '--seed': -5 is not in the range x>=0."),
    ("--threads", "0", "Invalid value for '--threads': 0 is not in the range x>=1."),
])
def test_sampling_options_out_of_range_are_one_line(artifact, command, option, value, says):
    args = [command, artifact] + (["hi"] if command == "run" else []) + ["--temperature", "0.7", option, value]
    assert one_error_line(invoke(*args)) == f"error: {says}"


def test_top_p_zero_with_a_temperature_no_longer_reaches_sampling(artifact):
    """The reported crash: `run ART hi --temperature 0.7 --top-p 0` was a NaN traceback."""
    line = one_error_line(invoke("run", artifact, "hi", "--temperature", "0.7", "--top-p", "0"))
    assert "--top-p" in line and "0<x<=1" in line


def test_nan_passes_click_but_not_sampling(artifact):
    """click's FloatRange lets NaN through (every comparison with it is false); Sampling refuses it."""
    line = one_error_line(invoke("run", artifact, "hi", "--temperature", "nan"))
    assert line == "error: sampling option temperature=nan is out of range: it must be >= 0 (0 is greedy)"


@pytest.mark.parametrize("option,value,says", [
    ("--runs", "0", "Invalid value for '--runs': 0 is not in the range x>=1."),
    ("--new-tokens", "0", "Invalid value for '--new-tokens': 0 is not in the range x>=1."),
    ("--prompt-tokens", "-1", "Invalid value for '--prompt-tokens': -1 is not in the range x>=1."),
    ("--warmup", "-1", "Invalid value for '--warmup': -1 is not in the range x>=0."),
    ("--threads", "0", "Invalid value for '--threads': 0 is not in the range x>=1."),
    ("--timeout", "0", "Invalid value for '--timeout': 0 is not in the range x>=1."),
])
def test_bench_options_out_of_range_are_one_line(artifact, option, value, says):
    """`bench --runs 0` said `statistics.StatisticsError: no median for empty data` from inside the run."""
    assert one_error_line(invoke("bench", artifact, option, value)) == f"error: {says}"


def test_bench_library_names_the_option(artifact):
    import devices
    with pytest.raises(devices.host.BenchError, match=r"^--runs 0: must be at least 1 \(the figures are medians"):
        devices.bench(str(artifact), "host", runs=0)
    with pytest.raises(devices.host.BenchError, match=r"^--new-tokens -2: must be at least 1 token$"):
        devices.bench_devices(str(artifact), ["host"], new_tokens=-2)


@pytest.mark.parametrize("options,says", [
    (dict(temperature=-1), "temperature=-1 is out of range: it must be >= 0 (0 is greedy)"),
    (dict(temperature=0.7, top_p=0), "top_p=0 is out of range: it must be > 0 and <= 1"),
    (dict(top_p=1.01), "top_p=1.01 is out of range"),
    (dict(top_k=-1), "top_k=-1 is out of range: it must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0 is out of range: it must be >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3 is out of range"),
    (dict(thinking_budget=-1), "thinking_budget=-1 is out of range: it must be >= 0 tokens"),
    (dict(seed=-1), "seed=-1 is out of range"),
    (dict(temperature="hot"), "temperature='hot' is out of range"),
])
def test_sampling_refuses_out_of_range_values(options, says):
    with pytest.raises(SamplingError, match="^sampling option " + says.replace("(", r"\(").replace(")", r"\)")):
        Sampling(**options)


def test_edges_of_the_ranges_are_accepted():
    Sampling(temperature=0, top_p=1.0, top_k=0, max_new_tokens=1, thinking_budget=0, seed=0)
    Sampling(temperature=2.0, top_p=1e-6, top_k=1)


def test_runtime_refuses_before_generating(artifact):
    rt = runtimes.load(artifact)
    with pytest.raises(SamplingError, match="top_p=0"):
        rt.generate("hi", temperature=0.7, top_p=0)
    with pytest.raises(SamplingError, match="max_new_tokens=0"):
        next(rt.stream("hi", max_new_tokens=0))
    one = rt.generate("hi", temperature=0, max_new_tokens=1)  # the smallest valid request still runs
    assert one.new_tokens == 1 or one.finish_reason == "eos"


def test_manifest_defaults_out_of_range_are_refused(artifact, tmp_path):
    """A manifest's generation defaults go through the same check."""
    rt = runtimes.load(artifact)
    rt.defaults["top_p"] = 0.0
    with pytest.raises(SamplingError, match="top_p=0.0"):
        rt.sampling()


def _hide_package(monkeypatch, package: str) -> None:
    """Make `import package` fail as it does where it is not installed (the base install), and drop
    the modules that imported it so they import again."""
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.setitem(sys.modules, name, None)
        elif name.startswith("edge_export.checkpoint.gguf"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    import edge_export.fixtures
    edge_export.fixtures._r1_header.cache_clear()


EXTRA = "pip install 'edge-export[export]'"


def test_base_install_inspect_names_the_extra(monkeypatch):
    _hide_package(monkeypatch, "gguf")
    line = one_error_line(invoke("inspect", "smollm2-135m"))
    assert line.endswith(f"needs the package gguf, which the base install of edge-export leaves out: {EXTRA}")
    assert "ModuleNotFoundError" not in line


def test_base_install_fixture_names_the_extra_and_writes_nothing(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "gguf")
    out = tmp_path / "fx"
    line = one_error_line(invoke("fixture", "--preset", "r1-distill-qwen-1.5b", "-o", out))
    assert line.endswith(EXTRA) and "gguf" in line
    assert not out.exists()


def test_base_install_gguf_file_names_the_extra(monkeypatch, tmp_path):
    from edge_export.checkpoint import open_checkpoint
    from edge_export.errors import MissingExtraError
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    _hide_package(monkeypatch, "gguf")
    with pytest.raises(MissingExtraError, match=r"m\.gguf: reading a GGUF file needs the package gguf.*" + re.escape(EXTRA)):
        open_checkpoint(model)


def test_a_missing_module_outside_the_extras_still_raises():
    """Only packages that an extra installs are turned into the install hint; anything else is a bug."""
    from edge_export.errors import missing_extra
    assert missing_extra(ModuleNotFoundError("no", name="not_a_dependency")) is None


def test_every_extra_module_is_in_setup_py():
    """The hint names the extra that really installs the package."""
    import ast
    import pathlib
    from edge_export.errors import EXTRA_MODULES
    tree = ast.parse((pathlib.Path(__file__).parents[1] / "setup.py").read_text())
    lists: dict = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            lists[node.targets[0].id] = node.value
    namespace: dict = {}
    for name, value in lists.items():
        if name in ("RUNTIME", "EXPORT", "ALL", "SERVE", "DEV", "OPTIMUM"):
            namespace[name] = eval(compile(ast.Expression(value), "setup.py", "eval"), {}, dict(namespace))
    extras = {"export": namespace["EXPORT"], "all": namespace["ALL"], "optimum": namespace["OPTIMUM"],
              "serve": namespace["SERVE"]}
    def names(requirements):
        return {re.split(r"[<>=;\s]", req)[0] for req in requirements}
    for module, (pip_name, extra) in EXTRA_MODULES.items():
        assert pip_name in names(extras[extra]), (module, pip_name, extra)
        assert pip_name not in names(namespace["RUNTIME"]), pip_name  # the base install lacks it
