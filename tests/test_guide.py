"""docs/how-it-works.md cannot go stale: every function, class or constant it links to exists in the linked file.

The files are parsed with ast, not imported, so the test is fast and needs no torch."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "how-it-works.md"
# [`name`](../path/file.py): name is a function, class or constant of the file, or Class.method
CODE_LINK = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\((\.\./[\w/.-]+\.py)\)")


@cache
def defined_names(path: Path) -> frozenset[str]:
    """Top-level functions, classes and assigned names of a Python file, and Class.method for each method."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def code_links(text: str) -> list[tuple[str, str]]:
    return CODE_LINK.findall(text)


def test_every_linked_function_exists():
    links = code_links(GUIDE.read_text(encoding="utf-8"))
    assert len(links) >= 40, f"only {len(links)} code links parsed: has the link format changed?"
    missing = []
    for name, rel in links:
        path = (GUIDE.parent / rel).resolve()
        if not path.is_file():
            missing.append(f"{rel} (no such file)")
        elif name not in defined_names(path):
            missing.append(f"{name} in {rel}")
    assert not missing, "docs/how-it-works.md links to what does not exist: " + ", ".join(missing)


def test_every_concept_links_to_its_code():
    """Each numbered section of the guide names at least one function."""
    sections = re.split(r"^## ", GUIDE.read_text(encoding="utf-8"), flags=re.M)[1:]
    assert len(sections) >= 15
    bare = [s.splitlines()[0] for s in sections if not code_links(s)]
    assert not bare, f"sections without a code link: {bare}"


def test_a_stale_link_is_caught(tmp_path):
    """The parser finds a link to a missing function (the check above is not vacuous)."""
    links = code_links("see [`no_such_function`](../model/numpy_gpt.py) and [`gelu`](../model/numpy_gpt.py)")
    names = defined_names(ROOT / "model" / "numpy_gpt.py")
    assert [name in names for name, _ in links] == [False, True]


def test_readme_links_the_guide():
    assert "(docs/how-it-works.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
