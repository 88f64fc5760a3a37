"""What `mlflow ui` shows of gpt2tune's runs, rendered by headless Chromium: a run page's
Datasets name its token sets, and the Evaluation view of the samples table opens comparing
the text. Chromium renders MLflow's own JavaScript against a real `mlflow server`; the test
reads the page's text after it has run (`--dump-dom`).

Skipped where Chromium is not installed (CI has none; `apt-get install chromium`).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from helpers.mlflowserver import MlflowServer
from helpers.tracking import encoded_dir

from gpt2tune.config.params import MlflowParams, Sampling
from gpt2tune.tracking import run as tracking
from gpt2tune.tracking import sampletable
from gpt2tune.tracking.datasets import token_sets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # an mlflow server, and Chromium running MLflow's UI: ~1 min
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)"),
]


def page_text(url: str, tmp_path) -> str:
    """The text of `url` once MLflow's UI has rendered it (15 s of virtual time)."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=2000,900",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return " ".join(re.sub(r"<[^>]+>", " ", proc.stdout).split())


def test_mlflow_ui_shows_the_datasets_and_compares_the_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    folder, stats = encoded_dir(tmp_path, list(range(40)), [1, 2])
    sets = token_sets(folder, stats, "data/kant.txt")
    with MlflowServer(tmp_path / "mlflow") as server:
        server.wait_ready()
        cfg = MlflowParams(tracking_uri=server.url, experiment="ui")
        for lr in ("1e-5", "5e-5"):
            with tracking.training_run(cfg, {"train.learning_rate": lr}, record=False) as run:
                tracking.log_datasets(sets)
                records = [{"prompt": None, "index": 0, "text": f"the text at lr {lr}"}]
                tracking.log_table(sampletable.rows(8, records, Sampling()), sampletable.TABLE)
        exp, run_id = run.experiment_id, run.info.run_id
        ml = "workflowType=machine_learning"  # MLflow 3.17's sidebar switch: Model training
        page = page_text(f"{server.url}/#/experiments/{exp}/runs/{run_id}?{ml}", tmp_path)
        digest = next(r["digest"] for r in sets if r["name"] == "kant.txt-train")
        assert f"Datasets kant.txt-train ({digest}) training" in page, page[:3000]
        url = f"{server.url}/#/experiments/{exp}/runs?compareRunsMode=ARTIFACT&{ml}"
        page = page_text(url, tmp_path)
        assert "Table: samples/table.json Group by: step Compare: text" in page, page[:3000]
        assert "the text at lr 1e-5" in page and "the text at lr 5e-5" in page, page[:3000]
