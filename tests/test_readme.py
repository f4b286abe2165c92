"""The README's layout section names every module of the package and the kernels, and nothing that is gone."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- layout: checked by tests/test_readme.py -->"
CHECKED = ("toolkit/", "kernels/")  # listed file by file; other top-level folders are listed as folders


def layout_entries(readme: str) -> set[str]:
    """Paths in the layout block: an indented tree, two spaces a level, whose lines start with one or more names
    (``vit.py maxvit.py``, ``backbones/``) followed by a description."""
    block = readme.split(MARKER, 1)[1].split("```", 2)[1]
    entries, parents = set(), []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        level = (len(line) - len(line.lstrip(" "))) // 2
        names = []
        for token in line.split():
            if not re.fullmatch(r"[\w.-]+(/|\.py)", token):
                break
            names.append(token)
        parents = parents[:level]
        for name in names:
            entries.add("".join(parents) + name)
        if len(names) == 1 and names[0].endswith("/"):
            parents.append(names[0])
    return entries


def tracked() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    out = {f.split("/")[0] + "/" for f in files if "/" in f and not f.startswith(".")}
    for f in files:
        if f.startswith(CHECKED) and f.endswith(".py") and not f.endswith("__init__.py"):
            out.add(f)
            out.update(p + "/" for p in _parents(f))
    return out


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def test_readme_layout_matches_the_tree():
    listed = layout_entries((ROOT / "README.md").read_text())
    listed_checked = {e for e in listed if e.startswith(CHECKED)}
    actual = tracked()
    assert not (actual - listed), f"in the tree but not in README's layout: {sorted(actual - listed)}"
    gone = {e for e in listed if not (ROOT / e).exists()}
    assert not gone, f"in README's layout but not in the tree: {sorted(gone)}"
    assert listed_checked <= actual, sorted(listed_checked - actual)
