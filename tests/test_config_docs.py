"""The committed params.yaml and docs/parameters.md agree with the declarations in
gpt2tune.config.params.

This is deliberately the one test that reads the checkout's params.yaml and parameters page: it
checks committed documentation, not behaviour. After changing a key's default, rule or help
run ``python -m gpt2tune.config.docs`` to rewrite both (the failure message says so).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

from gpt2tune.config.docs import (
    END,
    PAGE,
    START,
    render_params_yaml,
    render_table,
    stale,
    with_table,
)
from gpt2tune.config.params import Params, load_params, reference
from gpt2tune.errors import Gpt2tuneError

FIX = "stale: run python -m gpt2tune.config.docs from the repository root"


def test_repo_params_yaml_is_the_rendered_declarations():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert text == render_params_yaml(), f"params.yaml {FIX}"
    assert load_params(REPO / "params.yaml") == Params()


def test_parameters_page_table_is_the_rendered_declarations():
    readme = (REPO / PAGE).read_text(encoding="utf-8")
    assert readme.count(START) == readme.count(END) == 1
    assert render_table() in readme, f"{PAGE}'s params table {FIX}"
    for section, (_, keys) in reference().items():
        for k in keys:
            assert f"| `{section}.{k.name}` |" in readme


def test_stale_files_are_found_and_rewritten(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / PAGE).write_text(f"# x\n\n{START}\nold\n{END}\n\nrest\n", encoding="utf-8")
    (tmp_path / "params.yaml").write_text(render_params_yaml().replace("1000", "5", 1))
    assert set(stale(tmp_path)) == {tmp_path / PAGE, tmp_path / "params.yaml"}
    cmd = [sys.executable, "-m", "gpt2tune.config.docs", "--root", str(tmp_path)]
    check = subprocess.run([*cmd, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "params.yaml: stale" in check.stderr
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert stale(tmp_path) == {}
    readme = (tmp_path / PAGE).read_text(encoding="utf-8")
    assert readme == f"# x\n\n{render_table()}\n\nrest\n"


def test_page_without_markers_is_one_line_error():
    with pytest.raises(Gpt2tuneError, match="needs one <!-- params-table:start -->"):
        with_table("# no table here\n")
