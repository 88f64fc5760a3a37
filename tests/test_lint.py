"""The code base stays ruff-clean (lint and formatting rules from pyproject.toml)."""

import subprocess
import sys

from conftest import REPO


def test_ruff_check_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "stages", "tests", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
