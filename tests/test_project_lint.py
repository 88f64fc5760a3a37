"""The code base stays ruff-clean (lint and formatting rules from pyproject.toml)."""

import subprocess
import sys

import pytest
from helpers import REPO

CHECKED = ["src", "stages", "tests", "bench"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=" ".join)
def test_ruff_is_clean(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *CHECKED],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
