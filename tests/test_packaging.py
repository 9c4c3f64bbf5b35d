"""What an app embeds: `import runtimes` needs only numpy, onnxruntime, tokenizers and jinja2."""
import subprocess
import sys
import textwrap

BLOCKED = ["torch", "coremltools", "click", "transformers", "onnx", "gguf", "safetensors", "edge_export",
           "quantizers", "devices", "tensorrt", "fastapi", "uvicorn", "starlette", "pydantic"]


def test_runtimes_imports_without_export_dependencies():
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {BLOCKED!r}:
                    raise ImportError('blocked for this test: ' + name)
        sys.meta_path.insert(0, Block())
        import runtimes, runtimes.backends, runtimes.reference, runtimes.generate, runtimes.weights
        assert 'onnxruntime' in runtimes.backend_names() and 'reference' in runtimes.backend_names()
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_serving_without_its_extra_names_the_install():
    """runtimes.server imports without FastAPI; serving then says which extra to install."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {BLOCKED!r}:
                    raise ImportError('blocked for this test: ' + name, name=name.split('.')[0])
        sys.meta_path.insert(0, Block())
        import runtimes, runtimes.server
        try:
            runtimes.serve('no-such-artifact')
        except runtimes.EdgeError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "serving needs FastAPI and uvicorn (fastapi is missing): pip install 'edge-export[serve]'"


def test_layering_rules():
    """runtimes and quantizers import nothing of ours; devices only runtimes (DESIGN.md)."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    allowed = {"runtimes": {"runtimes"}, "quantizers": {"quantizers"}, "devices": {"devices", "runtimes"}}
    ours = {"runtimes", "quantizers", "devices", "edge_export"}
    for package, may in allowed.items():
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top not in ours or top in may, f"{path} imports {name}"
