"""Installs that keep working: the README's test command is the line .ci/run runs, both at the
versions of requirements/lock.txt; the lock pins every distribution exactly, as a constraints
file pip accepts, within pyproject.toml's ranges; and the major versions known to break what
gpt2tune relies on are bounded above (pyproject.toml says what each bound protects)."""

from __future__ import annotations

import re

import pytest
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCK = REPO / "requirements" / "lock.txt"
EXTRAS = ("dev", "hf")  # the ones the test command installs
BOUNDED = ("tensorflow", "numpy", "mlflow", "dvc")  # TF 3, NumPy 3, MLflow 4, DVC 4


def requirements() -> list[Requirement]:
    deps = PROJECT["dependencies"] + [
        d for e in EXTRAS for d in PROJECT["optional-dependencies"][e]
    ]
    return [Requirement(d) for d in deps]


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            # A constraints file takes no links, editables or extras: plain name==version.
            assert re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", line), line
            name, version = line.split("==")
            assert name == canonicalize_name(name) and name not in pins, line
            pins[name] = version
    return pins


def test_the_readme_test_command_is_the_line_ci_runs_with_the_lock():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"\n## Tests\n.*?```bash\n(.+?)\n```", readme, re.S)[1]
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    assert command.count("pip install -c requirements/lock.txt ") == 2  # torch, then gpt2tune


def test_the_lock_pins_everything_pyproject_asks_within_its_ranges():
    pins = locked()
    assert "gpt2tune" not in pins and len(pins) > 100  # the whole environment, not the project
    for req in requirements():
        version = pins.get(canonicalize_name(req.name))
        assert version and req.specifier.contains(version, prereleases=True), (str(req), version)


def test_majors_known_to_break_are_bounded_above():
    for req in requirements():
        if canonicalize_name(req.name) in BOUNDED:
            assert any(s.operator == "<" for s in req.specifier), str(req)
    named = {canonicalize_name(r.name) for r in requirements()}
    assert set(BOUNDED) <= named
