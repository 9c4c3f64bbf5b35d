"""Every registered architecture, scheme, target and backend has a test that exercises it
(optimum's test_all_models_tested idea): registering a new one without a test fails here."""
import importlib.util
import pathlib

import pytest

import quantizers
import runtimes
from edge_export.targets import all_targets
from runtimes.capabilities import TARGETS, capabilities_of
from runtimes.models import supported_architectures

from .conftest import ARCH_PRESETS, GENERATED_TOKENS
from .skip_policy import NO_TENSORRT

TESTS = pathlib.Path(__file__).parent
# where each declared target/variant is exercised end to end (test_target_options.py checks, for every
# declaration, that what it does not honour is refused)
TARGET_TESTS = {"onnx/ort": "test_export.py", "onnx/portable": "test_gguf_kquants.py", "onnx/qnn": "test_onnx_qnn.py",
                "tensorrt": "test_tensorrt.py", "coreml": "test_coreml.py",
                "coreml/traced": "test_coreml_mil.py"}
# backends that generate only on a platform that may be absent: (is it absent here, the reason)
PLATFORM_ONLY = {"tensorrt": (lambda: importlib.util.find_spec("tensorrt") is None, NO_TENSORRT)}


def test_every_architecture_has_a_tiny_checkpoint():
    assert set(supported_architectures()) == set(ARCH_PRESETS)


def test_every_scheme_is_tested():
    text = "".join(p.read_text() for p in TESTS.glob("test_quantizers*.py"))
    for scheme in quantizers.SCHEMES:
        assert f'"{scheme}"' in text or f"{quantizers.SCHEMES[scheme].__name__}" in text, scheme


def test_every_target_is_declared_and_tested():
    """The registered lowerings implement exactly the declared targets/variants, and each has an
    export test; the refusal tests walk the declarations themselves."""
    assert {capabilities_of(t.name, v).name for t in all_targets() for v in t.variants} == set(TARGETS)
    assert set(TARGET_TESTS) == set(TARGETS)
    for name, file in TARGET_TESTS.items():
        text = (TESTS / file).read_text()
        caps = TARGETS[name]
        assert "export(" in text and (caps.default_variant or f'"{caps.variant}"' in text), name
    refusals = (TESTS / "test_target_options.py").read_text()
    assert "DECLARED = sorted(TARGETS)" in refusals and "test_refuses_each_option_it_does_not_honour" in refusals


@pytest.mark.session_end
def test_every_backend_generated_tokens(request):
    """Every registered backend produced tokens through the shared Generator in some test of this
    session (conftest's record), not merely that its name appears in a test file. A backend whose
    platform is absent here is excused with the same reason CI accepts for its skips."""
    collected = {pathlib.Path(str(item.path)) for item in request.session.items}
    every = set(TESTS.rglob("test_*.py"))
    if not every <= collected:
        pytest.skip(f"run with the whole suite: the record is complete only then ({len(every - collected)} of "
                    f"{len(every)} test files were not collected)")
    excused = {name: why for name, (absent, why) in PLATFORM_ONLY.items() if absent()}
    missing = [name for name in runtimes.backend_names() if not GENERATED_TOKENS.get(name) and name not in excused]
    assert not missing, f"no test generated tokens with backend(s) {missing}; recorded: {GENERATED_TOKENS}"
