"""What the tests (and bench/) share besides pytest fixtures, one module per kind of help:

- helpers.vocab: a reference byte-level BPE written independently of gpt2tune, and tiny
  vocabularies trained with it;
- helpers.models: TF1 checkpoints written the way OpenAI's release was, tiny GPT-2s;
- helpers.training: the tiny training several test modules share, and its tolerances;
- helpers.tracking: misbehaving MLflow servers and a training tracked against one;
- helpers.projects: test projects (the checkout's code and pipeline, a params.yaml of the
  test's own), their MLflow store and git;
- helpers.processes: the one way to run a stage or command of a test project;
- helpers.httpserver, helpers.mlflowserver: a real HTTP file server and a real `mlflow
  server` on 127.0.0.1.

This package itself says where things are. conftest.py turns some helpers into fixtures.
Test modules import from here, never from one another.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The official BPE files and kant.txt live beside the checkout in ../shared/data (CI has them too).
SHARED_DATA = Path(os.environ.get("GPT2TUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
VENV_BIN = Path(sys.executable).parent
KILLPOINT = REPO / "tests" / "killpoint"  # see killpoint/sitecustomize.py
