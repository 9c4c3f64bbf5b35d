"""Every measured figure in README.md comes from a results file under benchmarks/results/
(benchmarks/readme_figures.py states the conventions: generated blocks and source tags)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
rf = importlib.util.module_from_spec(_spec)
sys.modules["readme_figures"] = rf
_spec.loader.exec_module(rf)

README = (ROOT / "README.md").read_text()


def test_generated_tables_equal_their_results_files():
    assert rf.BLOCK.search(README), "the README has no generated table"
    assert rf.block_diff(README) == "", "run python3 benchmarks/readme_figures.py"


def test_every_tagged_figure_equals_its_results_file():
    assert rf.TAG.search(README), "the README has no source tag"
    assert rf.tag_problems(README) == []


def test_no_measured_figure_lacks_a_source():
    assert rf.measured_spans(README), "the README has no measured section"
    assert rf.untagged(README) == []


def test_every_block_names_an_existing_script_that_writes_its_file():
    for m in rf.BLOCK.finditer(README):
        md, script = m.group(1), m.group(2)
        assert (ROOT / script).is_file(), script
        assert Path(md).stem in (ROOT / script).read_text(), f"{script} does not name {md}'s results"


# --- the checker itself, on small READMEs in a temporary folder ---

def _project(tmp_path: Path, readme: str, results: dict) -> Path:
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "make.py").write_text("# writes t.md\n")
    for name, content in results.items():
        path = tmp_path / "benchmarks" / "results" / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "README.md").write_text(readme)
    return tmp_path


FILE = {"speed": {"decode_ms": 0.52, "float_ms": 0.684, "share": 0.0213},
        "rows": [{"name": "llama.cpp Q4_1", "kl": 8.4e-6}], "llama.cpp Q4_1": {"tok_s": 306.4}}


@pytest.mark.parametrize("sentence", [
    "takes 0.52 ms <!-- src: benchmarks/results/f.json#speed.decode_ms -->",
    "0.52/0.68 ms <!-- src: benchmarks/results/f.json#speed.decode_ms,speed.float_ms -->",
    "slower by 2% <!-- src: benchmarks/results/f.json#speed.share -->",
    "kl_mean 8e-6, <!-- src: benchmarks/results/f.json#rows.0.kl -->",
    "genai 306 tok/s <!-- src: benchmarks/results/f.json#llama.cpp Q4_1.tok_s -->",
])
def test_a_figure_that_matches_its_file_passes(tmp_path, sentence):
    root = _project(tmp_path, f"## Measured\n\n{sentence}\n", {"f.json": FILE})
    assert rf.check((root / "README.md").read_text(), root) == []


@pytest.mark.parametrize("sentence, complaint", [
    ("takes 0.53 ms <!-- src: benchmarks/results/f.json#speed.decode_ms -->", "README says 0.53, the file says 0.52"),
    ("0.52/0.69 ms <!-- src: benchmarks/results/f.json#speed.decode_ms,speed.float_ms -->", "README says 0.69"),
    ("slower by 3% <!-- src: benchmarks/results/f.json#speed.share -->", "README says 3%"),
    ("kl_mean 9e-6 <!-- src: benchmarks/results/f.json#rows.0.kl -->", "README says 9e-6"),
    ("takes 0.52 ms <!-- src: benchmarks/results/f.json#speed.nope -->", "no key 'nope' under 'speed'"),
    ("takes 0.52 ms <!-- src: benchmarks/results/g.json#speed.decode_ms -->", "g.json does not exist"),
    ("takes 0.52 ms <!-- src: benchmarks/results/f.json#speed -->", "not a number"),
    ("0.52 ms in a long sentence <!-- src: benchmarks/results/f.json#speed.decode_ms -->", "too far"),
    ("takes 0.52 ms, and 7 more <!-- src: benchmarks/results/f.json#speed.decode_ms -->", "README says 7"),
])
def test_a_figure_that_differs_from_its_file_fails(tmp_path, sentence, complaint):
    root = _project(tmp_path, f"## Measured\n\n{sentence}\n", {"f.json": FILE})
    problems = rf.check((root / "README.md").read_text(), root)
    assert any(complaint in p for p in problems), problems


def test_an_untagged_number_fails_only_in_a_measured_section(tmp_path):
    readme = ("## Targets\n\nopset 21, group 32.\n\n## Measured\n\nIt ran 6 rounds on `--threads 2` with int4 "
              "and Q4_1 on SmolLM2-135M (onnxruntime 1.32) in 256-position chunks.\n\n### Speed\n\ndecode 16 tok/s.\n\n## Layout\n\n40 files\n")
    root = _project(tmp_path, readme, {})
    problems = rf.untagged((root / "README.md").read_text())
    assert [p.split("'")[1] for p in problems] == ["6", "16"]


def test_a_measured_subsection_of_another_section_is_checked(tmp_path):
    readme = "## Targets\n\n64 chunks\n\n### Core ML\n\n18 files\n\n#### Measured here\n\n35 s\n\n### QNN\n\n9 s\n"
    root = _project(tmp_path, readme, {})
    assert [p.split("'")[1] for p in rf.untagged((root / "README.md").read_text())] == ["35"]


def test_blocks_are_rewritten_from_their_file_and_a_stale_one_is_reported(tmp_path):
    block = "<!-- BEGIN benchmarks/results/t.md (benchmarks/make.py) -->\n| a |\n| 1 |\n<!-- END -->"
    root = _project(tmp_path, f"## Measured\n\n{block}\n", {"t.md": "| a |\n| 2 |\n"})
    assert "-| 1 |" in rf.block_diff((root / "README.md").read_text(), root)
    assert rf.main(["--check", "--readme", str(root / "README.md")]) == 1
    assert rf.main(["--readme", str(root / "README.md")]) == 0
    assert "| 2 |" in (root / "README.md").read_text()
    assert rf.main(["--check", "--readme", str(root / "README.md")]) == 0


def test_a_block_naming_a_missing_script_fails(tmp_path):
    block = "<!-- BEGIN benchmarks/results/t.md (benchmarks/gone.py) -->\n| 2 |\n<!-- END -->"
    root = _project(tmp_path, f"{block}\n", {"t.md": "| 2 |\n"})
    with pytest.raises(FileNotFoundError, match="gone.py does not exist"):
        rf.render((root / "README.md").read_text(), root)
