"""Every module of gpt2tune imports on its own, and the modules do not import each other in a
circle.

Each module is imported alone: one fresh interpreter imports them in turn, forgetting every
gpt2tune module (and only those: TensorFlow, imported once, would take most of the time)
before the next, so a module that works only because another one of ours happened to be
imported first fails here.

The cycle tests build the import graph of src/gpt2tune from the source with `ast`:
- test_no_import_cycle_at_import_time counts module-level imports only (those executed when
  the module is imported, including ones under a module-level `if` or `try` and in class
  bodies): a cycle there can fail with a partially initialised module.
- test_no_import_cycle counts every import, also those inside functions (executed when the
  function runs): a cycle there means two modules depend on each other, which the
  one-file-per-concern layout does not allow.
Imports under `if TYPE_CHECKING:` are never executed and count in neither. `from gpt2tune
import name` counts as an import of the module gpt2tune/__init__.py loads `name` from (its
lazy _API table) or, for names __init__ defines itself, of the package.
"""

from __future__ import annotations

import ast
import json
import re
import sys

import pytest
from helpers import REPO
from helpers.processes import run_in, stage_env

PACKAGE = "gpt2tune"
SRC = REPO / "src" / PACKAGE


def module_name(path) -> str:
    """gpt2tune/train/loop.py -> gpt2tune.train.loop; a package's __init__.py -> the package."""
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(module: str):
    """The source of `module`: its .py file, or a package's __init__.py."""
    base = SRC.joinpath(*module.split(".")[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


MODULES = sorted(module_name(p) for p in SRC.rglob("*.py"))


# Run by one interpreter, one module at a time: prints {module: what went wrong, or ""}.
_IMPORT_EACH = """
import contextlib, importlib, io, json, sys, traceback
report = {}
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n == "gpt2tune" or n.startswith("gpt2tune.")]:
        del sys.modules[name]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            importlib.import_module(module)
    except BaseException:
        err.write(traceback.format_exc())
    report[module] = err.getvalue() if "Traceback" in err.getvalue() else ""
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def import_report(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("imports")
    proc = run_in(tmp, sys.executable, "-c", _IMPORT_EACH, *MODULES, env=stage_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module, import_report):
    assert import_report[module] == "", import_report[module][-3000:]


def lazy_api() -> dict[str, str]:
    """gpt2tune/__init__.py's _API table: public name -> the module it is loaded from."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "_API" for t in targets):
            return ast.literal_eval(node.value)
    return {}


def is_type_checking(node: ast.If) -> bool:
    return ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports(tree: ast.Module, module: str, api: dict[str, str], module_level: bool):
    """(imported gpt2tune module, line) for each import in `tree` (the source of `module`);
    with module_level, only those executed when the module is imported."""
    is_package = module_file(module).name == "__init__.py"
    stack: list[ast.AST] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node):
            stack.extend(reversed(node.orelse))
            continue
        if module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                parent = module if is_package else module.rsplit(".", 1)[0]
                base = ".".join([parent, *([base] if base else [])])
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                for alias in node.names:
                    name = f"{base}.{alias.name}"
                    if base == PACKAGE and alias.name in api:
                        yield api[alias.name], node.lineno
                    elif name in MODULES:  # `from gpt2tune.train import loop`: the module
                        yield name, node.lineno
                    else:  # a name defined in `base` itself
                        yield base, node.lineno
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def import_graph(module_level: bool) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, within gpt2tune."""
    api = lazy_api()
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        path = module_file(module)
        edges = graph.setdefault(module, {})
        for target, line in imports(ast.parse(path.read_text(), str(path)), module, api,
                                    module_level):  # fmt: skip
            if target != module:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search, each once, as a list of modules
    starting at its smallest name."""
    found: set[tuple[str, ...]] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, {}):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:  # each cycle from its smallest member
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    return [list(c) for c in sorted(found)]


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = zip(cycle, [*cycle[1:], cycle[0]], strict=True)
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in steps) + f" -> {cycle[0]}"


def test_the_graph_sees_the_imports():
    """The graph builder itself: the package's modules do import each other."""
    graph = import_graph(module_level=False)
    assert set(graph) == set(MODULES) and len(MODULES) > 5
    assert sum(len(edges) for edges in graph.values()) > len(MODULES)
    assert "gpt2tune.errors" in graph["gpt2tune"]  # __init__'s own module-level import
    assert cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle_at_import_time():
    graph = import_graph(module_level=True)
    found = [describe(c, graph) for c in cycles(graph)]
    assert not found, "import cycles among module-level imports:\n" + "\n".join(found)


def test_no_import_cycle():
    graph = import_graph(module_level=False)
    found = [describe(c, graph) for c in cycles(graph)]
    assert not found, "import cycles (imports inside functions included):\n" + "\n".join(found)


# The layers of the library, lowest first: a module may import only from layers below its
# own (and within its own wing). A wing is a subpackage (gpt2tune.train); a top-level module
# is a unit of its own. Units sharing a layer do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("urls", "files", "paths", "stage"),  # shared utilities and the stage runner
    ("config",),  # params: every key declared once
    ("model",),  # GPT-2, its tokenizer, checkpoints, LoRA, Hugging Face, memory
    ("fetch", "data"),  # the fetch_model and encode stages
    ("generation",),  # the sampler and the sample stage
    ("train",),  # the train stage (samples during training: generation)
    ("servable",),  # the MLflow Model
    ("tracking",),  # MLflow runs (logging the model: servable)
    ("commands",),  # every command's body = its DVC stage
    ("cli", "__init__", "mlflow_model_code"),  # the ways in: command, Python API, MLflow
    ("__main__",),  # python -m gpt2tune: the command
)
# Imports that climb on purpose, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # The optimizer registry is plain data (TensorFlow only inside its update rules): the
    # params rules read its names and decay kinds, the memory estimate its slot counts, so
    # a new optimizer stays one entry in one file.
    ("gpt2tune.config.params", "gpt2tune.train.optim"): "optimizer names and decay kinds",
    ("gpt2tune.model.memory", "gpt2tune.train.optim"): "optimizer slot counts",
}


def unit(module: str) -> str:
    """The layering unit of a module: its wing, or the top-level module itself."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def climbs(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import that does not go down the layers, but for the named exceptions."""
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            a, b = unit(module), unit(target)
            if a != b and level[b] >= level[a] and (module, target) not in EXCEPTIONS:
                found.append(f"{module} (line {line}) imports {target}: {a} is not above {b}")
    return found


def test_every_unit_has_a_layer():
    units = {unit(m) for m in MODULES}
    assert units == {u for layer in LAYERS for u in layer}, units ^ {
        u for lay in LAYERS for u in lay
    }


def test_imports_go_down_the_layers():
    graph = import_graph(module_level=False)
    found = climbs(graph)
    assert not found, "imports that climb the layers:\n" + "\n".join(found)
    # Each exception is still an import the code makes (else it goes from the list).
    assert all(b in graph[a] for a, b in EXCEPTIONS), [
        e for e in EXCEPTIONS if e[1] not in graph[e[0]]
    ]
    # The rule itself: a climb and a sideways import are found, a descent is not.
    assert climbs({"gpt2tune.model.gpt2": {"gpt2tune.train.loop": 3}})
    assert climbs({"gpt2tune.fetch.download": {"gpt2tune.data.text": 5}})
    assert not climbs({"gpt2tune.train.loop": {"gpt2tune.model.gpt2": 7}})


def test_tests_follow_the_wings():
    """A wing's tests are tests/test_<wing>_*.py (or test_<wing>.py), a top-level module's
    tests/test_<module>.py; journeys through the pipeline are test_pipeline*.py, project-wide
    checks test_project_*.py. So the tests of what you change are found by its name."""
    tests = REPO / "tests"
    units = {u for layer in LAYERS for u in layer} - {"__init__", "__main__"}
    allowed = re.compile(rf"test_({'|'.join(sorted(units | {'pipeline', 'project'}))})(_\w+)?\.py")
    odd = sorted(p.name for p in tests.glob("test_*.py") if not allowed.fullmatch(p.name))
    assert not odd, f"test files named after no wing or module: {odd}"
    assert allowed.fullmatch("test_train_stage.py") and not allowed.fullmatch("test_sample.py")
