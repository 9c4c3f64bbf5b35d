"""Every declared target refuses, in one line, what it does not honour or carry (runtimes/capabilities.py):
an option of another target, a KV dtype, a precision, a context length, a device without an engine
for it. Nothing is written, and nothing is silently dropped."""
import json

import pytest
from click.testing import CliRunner

from edge_export.cli import main
from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export
from edge_export.options import FLAGS, OrtOptions, QnnOptions, TensorrtOptions, check_options, option_default
from edge_export.targets import all_targets
from runtimes.capabilities import KV_BYTES, KV_CACHE_NAMES, TARGET_OPTIONS, TARGETS, capabilities_of, target_names

# A value other than the default for each option only some targets honour.
SET_VALUES = {"symmetric": False, "fp8_activations": True, "via": "optimum", "accuracy_level": 0, "soc": "SM8750",
              "prefill_chunk": 32, "opt_tokens": 64}
# The CLI arguments that set the same values.
SET_FLAGS = {"symmetric": ["--asymmetric"], "fp8_activations": ["--fp8-activations"], "via": ["--via", "optimum"],
             "accuracy_level": ["--accuracy-level", "0"], "soc": ["--soc", "SM8750"],
             "prefill_chunk": ["--prefill-chunk", "32"], "opt_tokens": ["--opt-tokens", "64"]}
# A device profile of a kind each target has no engine on (and does not run as another target there).
FOREIGN_DEVICE = {"onnx/ort": "apple-a18-pro", "onnx/portable": "apple-a18-pro", "onnx/qnn": "jetson-orin-nano-8gb",
                  "coreml": "snapdragon-8-gen3", "coreml/traced": "snapdragon-8-gen3",
                  "tensorrt": "apple-m4"}
DECLARED = sorted(TARGETS)


def options_for(name: str, **changes) -> ExportOptions:
    caps = TARGETS[name]
    return ExportOptions(**{"target": caps.target, "variant": caps.variant, "quant": caps.quants[-1], "verify": False,
                            **changes})


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def cli_target(name: str) -> list[str]:
    caps = TARGETS[name]
    return ["--target", caps.target, "--variant", caps.variant, "--quant", caps.quants[-1]]


def refused_line(result) -> str:
    """The CLI's one error line (exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_every_option_table_covers_the_declarations():
    assert set(SET_VALUES) == set(SET_FLAGS) == set(TARGET_OPTIONS)
    assert set(FOREIGN_DEVICE) == set(TARGETS)
    for name in TARGET_OPTIONS:
        assert SET_VALUES[name] != option_default(name) and name in FLAGS


def test_declarations_name_only_known_options_scorers_and_kv_dtypes():
    from runtimes.capabilities import SCORERS
    for caps in TARGETS.values():
        assert caps.honours <= set(TARGET_OPTIONS) and caps.scorer in SCORERS, caps.name
        assert set(caps.kv_caches) <= set(KV_BYTES) and caps.quants and caps.max_context[0] >= 1, caps.name
        assert sum(c.default_variant for c in TARGETS.values() if c.target == caps.target) == 1, caps.target


def test_registered_targets_implement_exactly_the_declared_ones():
    registered = {capabilities_of(t.name, v).name for t in all_targets() for v in t.variants}
    assert registered == set(TARGETS)
    assert sorted(t.name for t in all_targets()) == sorted(target_names())


@pytest.mark.parametrize("name", DECLARED)
def test_refuses_each_option_it_does_not_honour(name, tmp_path):
    caps = TARGETS[name]
    foreign = [o for o in TARGET_OPTIONS if o not in caps.honours]
    assert foreign, f"{name} honours every per-target option?"
    for option in foreign:
        with pytest.raises(ExportError, match=rf"target {name} does not honour {FLAGS[option]} \({option}="):
            export("nowhere", tmp_path / option, options_for(name, **{option: SET_VALUES[option]}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", DECLARED)
def test_honoured_options_pass_the_check(name):
    caps = TARGETS[name]
    for option in caps.honours:
        value = SET_VALUES[option]
        quant = "fp8" if option == "fp8_activations" else caps.quants[-1]
        checked = check_options(options_for(name, quant=quant, **{option: value}), caps)
        assert getattr(checked, option) == value


@pytest.mark.parametrize("name", DECLARED)
def test_refuses_each_option_through_the_cli(name, tmp_path):
    caps = TARGETS[name]
    for option in (o for o in TARGET_OPTIONS if o not in caps.honours):
        line = refused_line(cli("export", "smollm2-135m", "-o", str(tmp_path / "a"), *cli_target(name),
                                *SET_FLAGS[option]))
        assert name in line and FLAGS[option] in line and "drop it" in line
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name", DECLARED)
def test_refuses_a_kv_cache_it_does_not_hold(name, tmp_path):
    caps = TARGETS[name]
    for short in (short for short, dtype in KV_CACHE_NAMES.items() if dtype not in caps.kv_caches):
        line = refused_line(cli("export", "smollm2-135m", "-o", str(tmp_path / "a"), *cli_target(name),
                                "--kv-cache", short))
        assert f"target {name} holds its KV cache in {', '.join(caps.kv_caches)} only" in line
    others = [dtype for dtype in KV_BYTES if dtype not in caps.kv_caches]
    assert others
    for dtype in others:  # the Python API: the manifest's spelling (or the CLI's), named as both
        with pytest.raises(ExportError, match=rf"target {name} holds its KV cache in .* only, not --kv-cache "
                                              rf"\S+ \(kv_cache='{dtype}'\)"):
            export("nowhere", tmp_path / "b", options_for(name, kv_cache=dtype))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", DECLARED)
def test_holds_its_own_kv_cache_when_none_is_asked(name):
    caps = TARGETS[name]
    assert check_options(options_for(name), caps).kv_cache == caps.kv_caches[0] in KV_BYTES
    for dtype in caps.kv_caches:
        if dtype in KV_CACHE_NAMES.values():
            assert check_options(options_for(name, kv_cache=dtype), caps).kv_cache == dtype


@pytest.mark.parametrize("name", DECLARED)
def test_refuses_a_precision_it_does_not_carry(name, tmp_path):
    caps = TARGETS[name]
    for quant in ("fp32", "fp16", "int8", "int4", "fp8"):
        if quant in caps.quants:
            continue
        with pytest.raises(ExportError, match=rf"--quant {quant} cannot be carried by target {name} "
                                              rf"\(it takes: {', '.join(caps.quants)}\)"):
            export("nowhere", tmp_path / quant, options_for(name, quant=quant))


@pytest.mark.parametrize("name", DECLARED)
def test_refuses_a_device_without_an_engine_for_it(name, tmp_path):
    from devices.profiles import get_profile
    device = FOREIGN_DEVICE[name]
    line = refused_line(cli("export", "smollm2-135m", "-o", str(tmp_path / "a"), *cli_target(name),
                            "--device", device))
    runs = ", ".join(get_profile(device).targets)
    assert f"--device {device} ({get_profile(device).kind}) has no engine for target {name}" in line
    assert line.endswith(f"the targets that run there: {runs}")


@pytest.mark.parametrize("name", DECLARED)
def test_max_context_is_range_checked(name, tiny_llama, tmp_path):
    positions = json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ExportError, match=rf"--max-context 0 \(max_context\) for {name} must be at least 1"):
        export(tiny_llama, tmp_path / "a", options_for(name, max_context=0))
    with pytest.raises(ExportError, match=rf"--max-context {positions + 1} \(max_context\) for {name} must be in "
                                          rf"1..{positions} \(the model has {positions} positions\)"):
        export(tiny_llama, tmp_path / "b", options_for(name, max_context=positions + 1))
    assert list(tmp_path.iterdir()) == []


def test_onnx_on_an_iphone_names_coreml():
    """The issue's case, as a new user types it."""
    line = refused_line(cli("export", "smollm2-135m", "-o", "x", "--target", "onnx", "--device", "apple-a18-pro"))
    assert line == ("error: --device apple-a18-pro (iphone) has no engine for target onnx/ort; the targets that "
                    "run there: coreml")


def test_coreml_refuses_fp32_kv_and_tensorrt_refuses_it_too(tmp_path):
    for target in ("coreml", "tensorrt"):
        line = refused_line(cli("export", "smollm2-135m", "-o", str(tmp_path / target), "--target", target,
                                "--kv-cache", "fp32"))
        assert "float16 only" in line and "not --kv-cache fp32" in line


def test_qnn_soc_comes_from_the_device_profile():
    caps = TARGETS["onnx/qnn"]
    assert check_options(options_for("onnx/qnn"), caps).qnn.soc == "SM8650"
    assert check_options(options_for("onnx/qnn", device="snapdragon-8-elite"), caps).qnn.soc == "SM8750"
    assert check_options(options_for("onnx/qnn", device="snapdragon-x-elite"), caps).qnn.soc == "SC8380XP"
    assert check_options(options_for("onnx/qnn", soc="SM8550"), caps).qnn.soc == "SM8550"
    with pytest.raises(ExportError, match="--soc SM9999 is not a Snapdragon the qnn variant knows"):
        check_options(options_for("onnx/qnn", soc="SM9999"), caps)


def test_per_target_options_are_typed_and_flat_names_still_work():
    flat = ExportOptions(accuracy_level=0, soc="SM8750", prefill_chunk=32, opt_tokens=256, kv_cache="fp16")
    typed = ExportOptions(ort=OrtOptions(0), qnn=QnnOptions("SM8750", 32), tensorrt=TensorrtOptions(256),
                          kv_cache="float16")
    assert flat == typed
    assert (flat.accuracy_level, flat.soc, flat.prefill_chunk, flat.opt_tokens) == (0, "SM8750", 32, 256)
    assert flat.kv_cache == "float16" and ExportOptions().kv_cache is None


def test_an_unknown_kv_dtype_names_both_spellings(tmp_path):
    with pytest.raises(ExportError, match=r"--kv-cache 'fp64' \(kv_cache\) is not a KV dtype: use one of fp32 "
                                          r"\(float32\), fp16 \(float16\), int8 \(int8\)"):
        export("nowhere", tmp_path / "a", ExportOptions(kv_cache="fp64"))


def test_readme_table_is_the_declaration():
    """The README's table of what each target carries and honours is generated from the declarations."""
    from pathlib import Path

    from edge_export.targets import TABLE_BEGIN, TABLE_END, capabilities_markdown
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = readme.index(TABLE_BEGIN), readme.index(TABLE_END) + len(TABLE_END)
    assert readme[start:end] == capabilities_markdown(), (
        "regenerate: python3 -c \"from edge_export.targets import capabilities_markdown; print(capabilities_markdown())\"")


def test_cli_choices_are_the_declarations():
    """--target, --variant, --quant, --kv-cache and --group-size offer what is declared, nothing else."""
    from quantizers.schemes import SUPPORTED_GROUP_SIZES
    params = {p.name: p for p in main.commands["export"].params}
    assert list(params["target"].type.choices) == target_names()
    assert set(params["variant"].type.choices) == {t.variant for t in TARGETS.values()}
    assert set(params["quant"].type.choices) == {q for t in TARGETS.values() for q in t.quants}
    assert list(params["kv_cache"].type.choices) == list(KV_CACHE_NAMES) and params["kv_cache"].required is False
    assert [int(g) for g in params["group_size"].type.choices] == list(SUPPORTED_GROUP_SIZES)
    assert [int(g) for g in {p.name: p for p in main.commands["eval"].params}["group_size"].type.choices] == \
        list(SUPPORTED_GROUP_SIZES)
    text = cli("export", "--help").output
    for caps in TARGETS.values():
        assert caps.name in text


def test_estimate_takes_the_engine_from_the_manifests_declaration():
    """target + variant in a manifest -> its declaration -> the engine it names for the device's kind."""
    from devices.estimate import EstimateError, Roofline, artifact_target, runs_as
    from devices.profiles import get_profile
    cases = {("onnx", "qnn", "snapdragon-8-gen3"): ("onnx/qnn", "phone-npu"),
             ("onnx", "ort", "jetson-orin-nano-8gb"): ("onnx/ort", "jetson-cpu"),
             ("onnx", "portable", "jetson-orin-nano-8gb"): ("tensorrt", "jetson-gpu"),
             ("onnx", "portable", "apple-m4"): ("onnx/ort", "cpu"),
             ("tensorrt", "explicit", "jetson-agx-thor"): ("tensorrt", "jetson-gpu"),
             ("coreml", "mlprogram", "apple-a18-pro"): ("coreml", "apple-gpu")}
    for (target, variant, device), (runs, engine) in cases.items():
        profile = get_profile(device)
        name = runs_as(artifact_target({"target": target, "variant": variant}), profile)
        assert (name, Roofline(profile, name).engine) == (runs, engine)
        assert engine == TARGETS[runs].engines[profile.kind].engine
    with pytest.raises(EstimateError, match="a.json: no capabilities declared for target 'onnx' variant 'npu'"):
        artifact_target({"target": "onnx", "variant": "npu"}, "a.json")


def test_plan_offers_what_the_declarations_carry():
    from edge_export.plan import exportable, plan
    assert exportable() == {(name, q) for name, caps in TARGETS.items() for q in caps.quants}
    p = plan("preset:r1-distill-qwen-1.5b", "snapdragon-8-gen3", context=4096)
    for option in p["options"]:
        caps = TARGETS[option["target"]]
        assert option["exportable"] == (option["quant"] in caps.quants)
        assert option["kv_cache"] == caps.kv_caches[0]


def test_via_is_checked_against_the_default_variant_and_keeps_its_own(tmp_path):
    """--via optimum writes variant 'optimum'; naming it is not refused as an unknown variant, and the
    exporter's own checks still run (here: the precision it cannot make)."""
    with pytest.raises(ExportError, match="--via optimum takes --quant int4 or fp32, not int8"):
        export("nowhere", tmp_path / "a", ExportOptions(via="optimum", variant="optimum", quant="int8"))
    with pytest.raises(ExportError, match=r"target onnx/portable does not honour --via"):
        export("nowhere", tmp_path / "b", ExportOptions(via="optimum", variant="portable"))
    assert list(tmp_path.iterdir()) == []
