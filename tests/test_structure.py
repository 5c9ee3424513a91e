"""The tree's structure rules (docs/ops.md, "Adding an op or a loss"): no import cycle inside
``mmfast``, no source file over 600 lines, both build systems compile the same sources, no diary
wording in code or tests. Static checks: no extension or GPU needed."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 600


def tracked(*patterns: str) -> list[pathlib.Path]:
    """Files git tracks under the given pathspecs (untracked scratch files do not count)."""
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.stdout.splitlines() if line and (ROOT / line).is_file()]


def module_graph() -> dict[str, set[str]]:
    """{module: modules of mmfast it imports}, every import statement counted (lazy ones too: a
    function-level import that closes a cycle still ties the two modules together)."""
    mods: dict[str, pathlib.Path | None] = {}
    for p in (ROOT / "mmfast").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    mods["mmfast._C"] = None  # the extension: a leaf (it imports no Python module of mmfast)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        if p is None:
            continue
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:  # a name inside a module: the module itself
                    n = n.rsplit(".", 1)[0] if "." in n else ""
                if n and n != m:
                    graph[m].add(n)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root, children0 in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(children0)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a planted two- and three-module cycle is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_mmfast():
    graph = module_graph()
    assert "mmfast.ops.cross_attention" in graph and graph["mmfast.ops.cross_attention"], "the graph is empty"
    assert cycles(graph) == []


def test_no_source_file_over_600_lines():
    files = tracked("mmfast", "csrc", "benchmarks", "tools", "setup.py")
    sources = [p for p in files if p.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".sh")]
    assert len(sources) > 20
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_compiled_unit_is_in_the_one_source_list():
    """setup.py and CMakeLists.txt both read csrc/sources.txt; every .cpp / .cu under csrc (but the
    test-only emulation units in csrc/emu) is in it, and everything in it exists."""
    listed = [line.split("#")[0].strip() for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()]
    listed = sorted(line for line in listed if line)
    compiled = sorted(str(p.relative_to(ROOT)) for p in tracked("csrc/*.cpp", "csrc/*.cu") if "emu" not in p.parts)
    assert compiled and listed == compiled
    assert "sources.txt" in (ROOT / "setup.py").read_text() and "sources.txt" in (ROOT / "CMakeLists.txt").read_text()


# The old log's words, and the old name of cross-attention in C++ (namespace, macros, env prefix).
DIARY = re.compile(r"\bpass [0-9]\b|\bthe lead\b|NOTES\.md|xattn", re.IGNORECASE)


def test_no_diary_wording_in_code_or_tests():
    """Code comments state the why, not a history: no "pass N" of the old log, no "the lead", and
    one name per op at every level (``cross_attention``, never the old ``xattn``). (GradCache's two passes are
    named "pass 1" / "pass 2" by the algorithm itself: mmfast/train and the GradCache tests may say
    "pass N".)"""
    bad = []
    for p in tracked("mmfast", "csrc", "tests", "benchmarks/*.py", "tools"):
        if p.suffix not in (".py", ".cpp", ".h", ".cu", ".cuh", ".sh") or p.name == "test_structure.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for m in DIARY.finditer(line):
                gradcache = m.group(0).lower().startswith("pass") and ("train" in p.parts or "gradcache" in p.stem)
                if not gradcache:
                    bad.append(f"{p.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert bad == []


def test_contrastive_codes_agree_between_python_and_cpp():
    """The schemas' int codes: the position of a name in LOSSES / DIRECTIONS / REDUCTIONS
    (mmfast/ops/contrastive.py) equals the value csrc/contrastive/codes.h gives its C++ name, and
    no other file defines them again."""
    from mmfast.ops import contrastive as ops

    header = (ROOT / "csrc" / "contrastive" / "codes.h").read_text()
    enums = {
        name: {k: int(v) for k, v in re.findall(r"(k\w+) = (\d+)", body)}
        for name, body in re.findall(r"enum (\w+) \{([^}]*)\}", header)
    }
    cpp_names = {
        "Loss": {"info_nce": "kInfoNCE", "siglip": "kSigLIP"},
        "Direction": {"both": "kBoth", "image": "kImage", "text": "kText"},
        "Reduction": {"mean": "kMean", "sum": "kSum", "none": "kNone"},
    }
    choices = {"Loss": ops.LOSSES, "Direction": ops.DIRECTIONS, "Reduction": ops.REDUCTIONS}
    for enum, names in cpp_names.items():
        assert set(names) == set(choices[enum])
        assert {names[n]: i for i, n in enumerate(choices[enum])} == enums[enum], enum
        assert all(ops.CODES[n] == i for i, n in enumerate(choices[enum]))
    again = [
        str(p.relative_to(ROOT))
        for p in tracked("csrc", "mmfast")
        if p.suffix in (".py", ".cpp", ".h", ".cu", ".cuh") and p.name != "codes.h"
        for line in p.read_text().splitlines()
        if re.search(r"enum \w+ ?(: ?\w+ ?)?\{ ?k(InfoNCE|Both|Mean)\b", line)
        or re.search(r"\{\s*\"both\": 0|\{\s*\"info_nce\": 0|\{\s*\"mean\": 0", line)
    ]
    assert again == []
