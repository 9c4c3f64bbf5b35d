"""Keep every measured figure in README.md equal to the results file it comes from.

    python3 benchmarks/readme_figures.py            # rewrite every generated table from its file
    python3 benchmarks/readme_figures.py --check    # exit 1 with a diff / the problems if the README is stale

Two conventions, checked here and by tests/test_readme_figures.py:

* A generated table sits between ``<!-- BEGIN benchmarks/results/NAME.md (benchmarks/SCRIPT.py) -->``
  and ``<!-- END -->``; between them is exactly the content of NAME.md, which SCRIPT writes.
* A figure in prose is followed by ``<!-- src: benchmarks/results/FILE.json#dotted.key -->`` (a dotted
  path into the JSON, list indices as numbers; a key that itself holds a dot, such as
  ``llama.cpp Q4_1``, is found by joining segments; a key cannot hold a comma). With n
  comma-separated keys the tag covers the last n numbers before it
  (``306–324 tok/s <!-- src: f.json#genai.min,genai.max -->``). Each
  number must equal its value rounded to the precision it is written with (``0.52`` to 0.005,
  ``8e-6`` to 0.5e-6, ``978`` to 0.5); a number written with ``%`` is compared with 100 × the value.

Measured sections: a heading whose text starts with "Measured" (any level) opens one, and it runs
to the next heading of the same or a higher level. There, every number that stands on its own
(not part of a word such as ``int4``, ``Q4_1``, ``135M``, ``opset-23``, ``256-position``, and not in a
code span or a fenced block) must sit in a generated block or be covered by a tag, unless it is in
ALLOWED below.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

BLOCK = re.compile(r"<!-- BEGIN (benchmarks/results/[^\s()]+\.md) \((benchmarks/[^\s()]+\.py)\) -->\n(.*?)<!-- END -->",
                   re.S)
TAG = re.compile(r"<!-- src: (benchmarks/results/[^#\s]+\.json)#([^>]+?) -->")
COMMENT = re.compile(r"<!--.*?-->", re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6}) +(.*)$", re.M)
# a number standing on its own: not glued to a word before (int4, opset-23) or after (135M, 1.9k, 256-position)
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)(\d+(?:\.\d+)?)(?:e([-+]?\d+))?(?![\w]|\.\d|-[A-Za-z])")
# at most this many characters (no digits) between a number and the next number or the tag it belongs to
GAP = 16
# Numbers in measured sections that are not measurements: versions and spec facts. Keep it short.
ALLOWED = (
    "onnxruntime 1.32",          # the version whose kernels were measured
    "onnxruntime-qnn 2.7",       # the simulator's version
    "2.7 simulator",
    "(2.7 refuses it)",
    "the 1.2× the project aims for",  # a goal, not a measurement
    "layers 0, 15 and 29",           # which layers a check sampled
    "at most 6 GB without verification, 8 GB with it, Core ML 6 GB with its verification",  # the goals
)


@dataclass
class Figure:
    """A number in the README: its text, its value, where it starts and ends, and its unit suffix."""
    text: str
    value: float
    half_ulp: float
    start: int
    end: int
    percent: bool


def numbers(text: str) -> list[Figure]:
    """Every standalone number in ``text`` (offsets into ``text``)."""
    out = []
    for m in NUMBER.finditer(text):
        mantissa, exponent = m.group(1), int(m.group(2) or 0)
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        out.append(Figure(m.group(0), float(mantissa) * 10.0 ** exponent, 0.5 * 10.0 ** (exponent - decimals),
                          m.start(), m.end(), text[m.end():m.end() + 1] == "%"))
    return out


def lookup(data, key: str, where: str):
    """The value at dotted ``key`` in ``data``; a segment may itself contain dots."""
    parts = key.split(".")
    node = data
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            segment = ".".join(parts[i:j])
            if isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
                node, i = node[int(segment)], j
                break
            if isinstance(node, dict) and segment in node:
                node, i = node[segment], j
                break
        else:
            raise KeyError(f"{where}: no key '{'.'.join(parts[i:])}' under '{'.'.join(parts[:i]) or '(top)'}'")
    return node


def render(text: str, root: Path = ROOT, missing: list | None = None) -> str:
    """``text`` with every generated block replaced by the current content of its .md file. A block
    whose script or file does not exist is left as it is and named in ``missing`` (or raised)."""
    def fill(m: re.Match) -> str:
        md, script = m.group(1), m.group(2)
        absent = [p for p in (script, md) if not (root / p).is_file()]
        if absent:
            problem = f"README block {md} ({script}): {absent[0]} does not exist"
            if missing is None:
                raise FileNotFoundError(problem)
            missing.append(problem)
            return m.group(0)
        body = (root / md).read_text().strip("\n")
        return f"<!-- BEGIN {md} ({script}) -->\n{body}\n<!-- END -->"
    return BLOCK.sub(fill, text)


def block_diff(text: str, root: Path = ROOT) -> str:
    """A unified diff from the README's blocks to what render() writes ('' when they agree)."""
    missing: list[str] = []
    new = render(text, root, missing)
    if missing:
        return "\n".join(missing) + "\n"
    return "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "rendered"))


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def tagged(text: str) -> list[tuple[re.Match, list[Figure]]]:
    """Each tag with the numbers it covers: the last n numbers before it, n = its number of keys,
    each within GAP characters of the next (no tag or other number in between)."""
    out = []
    previous_end = 0
    for tag in TAG.finditer(text):
        keys = tag.group(2).split(",")
        before = blank(CODE_SPAN, blank(COMMENT, text[previous_end:tag.start()]))
        figures = numbers(before)[-len(keys):]
        for f in figures:
            f.start += previous_end
            f.end += previous_end
        out.append((tag, figures))
        previous_end = tag.end()
    return out


def blank(pattern: re.Pattern, text: str) -> str:
    """``text`` with every match of ``pattern`` replaced by spaces (offsets kept)."""
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def tag_problems(text: str, root: Path = ROOT) -> list[str]:
    """Every tag whose numbers do not equal its results file's values."""
    problems = []
    cache: dict[str, object] = {}
    for tag, figures in tagged(text):
        where = f"README.md:{line_of(text, tag.start())} ({tag.group(1)}#{tag.group(2)})"
        keys = tag.group(2).split(",")
        problems += match_figures(text, tag, figures, keys, where)
        if len(figures) != len(keys) or any(p.startswith(where) for p in problems):
            continue
        path = root / tag.group(1)
        if tag.group(1) not in cache:
            if not path.is_file():
                problems.append(f"{where}: {tag.group(1)} does not exist")
                continue
            cache[tag.group(1)] = json.loads(path.read_text())
        for figure, key in zip(figures, keys):
            problems += compare(figure, cache[tag.group(1)], key.strip(), where)
    return problems


def match_figures(text: str, tag: re.Match, figures: list[Figure], keys: list[str], where: str) -> list[str]:
    """A tag must cover as many numbers as it has keys, each close to the next and to the tag."""
    if len(figures) != len(keys):
        return [f"{where}: {len(keys)} key(s) but {len(figures)} number(s) before the tag"]
    ends = [f.start for f in figures[1:]] + [tag.start()]
    for figure, nxt in zip(figures, ends):
        gap = text[figure.end:nxt]
        if len(gap) > GAP or re.search(r"\d", gap):
            return [f"{where}: '{figure.text}' is too far from what follows it ({gap!r})"]
    return []


def compare(figure: Figure, data, key: str, where: str) -> list[str]:
    try:
        value = lookup(data, key, where)
    except KeyError as e:
        return [str(e.args[0])]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return [f"{where}: '{key}' is {value!r}, not a number"]
    value = value * 100.0 if figure.percent else value
    if not math.isclose(figure.value, value, abs_tol=figure.half_ulp * (1 + 1e-9), rel_tol=0):
        return [f"{where}: README says {figure.text}{'%' if figure.percent else ''}, the file says {value!r} ({key})"]
    return []


def measured_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of every measured section (see the module docstring)."""
    heads = [(m.start(), len(m.group(1)), m.group(2)) for m in HEADING.finditer(strip_fences(text))]
    spans = []
    for i, (start, level, title) in enumerate(heads):
        if COMMENT.sub("", title).strip().lower().startswith("measured"):
            end = next((s for s, lv, _ in heads[i + 1:] if lv <= level), len(text))
            spans.append((start, end))
    return spans


def strip_fences(text: str) -> str:
    """``text`` with fenced code blocks blanked (same length): their lines are not headings."""
    return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S | re.M)


def exempt_mask(text: str) -> list[bool]:
    """Per character: True where a number needs no tag (a block, a tag, a code span, ALLOWED)."""
    mask = [False] * len(text)
    spans = [m.span() for m in BLOCK.finditer(text)] + [m.span() for m in COMMENT.finditer(text)]
    spans += [m.span() for m in CODE_SPAN.finditer(text)]
    spans += [m.span() for m in re.finditer(r"^```.*?^```", text, re.S | re.M)]
    spans += [m.span() for phrase in ALLOWED for m in re.finditer(re.escape(phrase), text)]
    spans += [(f.start, f.end) for _, figures in tagged(text) for f in figures]
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return mask


def untagged(text: str) -> list[str]:
    """Numbers in measured sections that carry neither a block nor a tag."""
    mask = exempt_mask(text)
    problems = []
    for start, end in measured_spans(text):
        for figure in numbers(text[start:end]):
            if not mask[start + figure.start]:
                line = line_of(text, start + figure.start)
                context = text[max(start, start + figure.start - 30):start + figure.end + 10].replace("\n", " ")
                problems.append(f"README.md:{line}: '{figure.text}' has no source tag (…{context}…)")
    return problems


def check(text: str, root: Path = ROOT) -> list[str]:
    """Everything that is stale or unsourced: block diffs first, then tags, then untagged numbers."""
    problems = []
    diff = block_diff(text, root)
    if diff:
        problems.append("generated tables differ from their results files (run benchmarks/readme_figures.py):\n" + diff)
    return problems + tag_problems(text, root) + untagged(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 and say what differs")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    text = args.readme.read_text()
    if args.check:
        problems = check(text, args.readme.parent)
        print("\n".join(problems) or "README figures match their results files")
        return 1 if problems else 0
    missing: list[str] = []
    new = render(text, args.readme.parent, missing)
    if new != text:
        args.readme.write_text(new)
    problems = missing + tag_problems(new, args.readme.parent) + untagged(new)
    print("\n".join(problems) or "README tables rewritten; every figure matches its results file")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
