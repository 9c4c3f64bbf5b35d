"""Every registered architecture, scheme, target and backend has a test that exercises it
(optimum's test_all_models_tested idea): registering a new one without a test fails here."""
import pathlib

import quantizers
import runtimes
from edge_export.targets import all_targets
from runtimes.models import supported_architectures

from .conftest import ARCH_PRESETS

TESTS = pathlib.Path(__file__).parent
# where each registered name is exercised end to end
TARGET_TESTS = {"onnx": "test_export.py", "tensorrt": "test_tensorrt.py", "coreml": "test_coreml.py"}
BACKEND_TESTS = {"onnxruntime": "test_export.py", "reference": "test_export.py", "tensorrt": "test_tensorrt.py",
                 "coreml": "test_coreml.py", "qnn": "test_onnx_qnn.py"}


def test_every_architecture_has_a_tiny_checkpoint():
    assert set(supported_architectures()) == set(ARCH_PRESETS)


def test_every_scheme_is_tested():
    text = "".join(p.read_text() for p in TESTS.glob("test_quantizers*.py"))
    for scheme in quantizers.SCHEMES:
        assert f'"{scheme}"' in text or f"{quantizers.SCHEMES[scheme].__name__}" in text, scheme


def test_every_target_is_tested():
    assert {t.name for t in all_targets()} == set(TARGET_TESTS)
    for name, file in TARGET_TESTS.items():
        assert "export(" in (TESTS / file).read_text()


def test_every_backend_is_tested():
    assert set(runtimes.backend_names()) == set(BACKEND_TESTS)
    for name, file in BACKEND_TESTS.items():
        text = (TESTS / file).read_text()
        assert f'backend="{name}"' in text or name == "onnxruntime" and "runtimes.load(folder)" in text
