"""dvc.yaml's code dependencies are complete: every gpt2tune module a stage's script imports,
directly or through other gpt2tune modules, lies under one of that stage's `deps`, so that
editing it reruns the stage. The imports are read from the source with `ast` (also those
inside functions, where the stages import TensorFlow-heavy modules), not listed by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from helpers import REPO

SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of gpt2tune module `name` (a package: its __init__.py), or None."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The gpt2tune modules `path` imports anywhere in its body, with the packages that
    importing them runs (`gpt2tune.x` runs gpt2tune/__init__.py first)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from gpt2tune import tracking` imports the module gpt2tune.tracking.run
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "gpt2tune":
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in found if module_file(n) is not None}


def import_closure(script: Path) -> set[Path]:
    """Every gpt2tune source file that running `script` can import."""
    todo, seen = list(imported_modules(script)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(module_file(name)))
    return {module_file(n).relative_to(REPO) for n in seen}


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """The files lying under none of `deps` (a dep is a file or a folder)."""
    roots = [Path(d) for d in deps]
    return sorted(str(f) for f in files if not any(f == d or d in f.parents for d in roots))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_its_script_imports(stage):
    spec = STAGES[stage]
    script = spec["cmd"].split()[1]  # "python stages/<stage>.py"
    assert script in spec["deps"], f"{stage}: its script {script} is not a dependency"
    files = import_closure(REPO / script)
    # The walk found the library, not nothing: every stage reaches the package and the
    # stage runner, and the modules its script names.
    assert {Path("src/gpt2tune/__init__.py"), Path("src/gpt2tune/stage.py")} <= files
    assert not uncovered(files, spec["deps"]), f"{stage}: {uncovered(files, spec['deps'])}"
    # Listing only the script would leave modules out, so the check above can fail.
    assert uncovered(files, [script])


def test_closure_follows_imports_through_the_library():
    # stages/train.py names gpt2tune.cli only; through it, the stage reaches the training loop,
    # its trainer and the model itself, which the stage script never names.
    files = import_closure(REPO / "stages" / "train.py")
    script = (REPO / "stages" / "train.py").read_text()
    assert "trainer" not in script
    assert {Path("src/gpt2tune/train/loop.py"), Path("src/gpt2tune/train/trainer.py")} <= files
    assert Path("src/gpt2tune/model/gpt2.py") in files
