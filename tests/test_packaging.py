"""environment.yml and pyproject.toml must pin the same versions (conda users get what pip users get)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(reqs):
    out = {}
    for r in reqs:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(==|>=)\s*([^\s;]+)", r)
        if m:
            out[m.group(1).lower()] = m.group(2) + m.group(3)
    return out


def test_environment_yml_agrees_with_pyproject():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(proj["dependencies"])
    for extra in ("app", "notebooks", "dev"):
        wanted.update(_pins(proj["optional-dependencies"][extra]))
    env_lines = [ln.strip()[2:] for ln in (ROOT / "environment.yml").read_text().splitlines()
                 if ln.strip().startswith("- ") and ("==" in ln or ">=" in ln)]
    have = _pins(env_lines)
    assert wanted == have, {k: (wanted.get(k), have.get(k)) for k in set(wanted) | set(have) if wanted.get(k) != have.get(k)}
