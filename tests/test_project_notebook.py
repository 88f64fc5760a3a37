"""notebooks/colab.ipynb, executed headless as Colab would run it, on the CPU.

It runs the way docs/colab.md says to run it headless: that page's `jupyter execute` command
(nbclient's, in the dev extra), verbatim, which runs every cell in a real Jupyter kernel of this
virtualenv except the one tagged `install` (the package is already installed here). A cell right
after the one tagged `parameters` sets a tiny configuration, as a user would edit that cell: a
tiny GPT-2 in OpenAI's release layout and 20 KB of Kant, both served over HTTP from 127.0.0.1,
three training steps. The test then reads what the cells printed and displayed (the executed
notebook the command writes), and what they left in the working folder.
"""

from __future__ import annotations

import json
import re
import zipfile

import nbformat
import pytest
from helpers import REPO, VENV_BIN
from helpers.httpserver import FolderServer
from helpers.models import write_official_style_model
from helpers.processes import run_in

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"
HP = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 2, "n_layer": 1}
STEPS = 3
SAMPLE_LENGTH = 8
COLAB_PAGE = REPO / "docs" / "colab.md"


def tagged(nb, tag: str) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]


def parameters_cell(**values) -> nbformat.NotebookNode:
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})


@pytest.fixture(scope="module")
def run(tmp_path_factory, official_vocab_dir, kant_path):
    tmp = tmp_path_factory.mktemp("notebook")
    served_dir = tmp / "served"
    write_official_style_model(served_dir / "tiny", HP, official_vocab_dir)
    text = kant_path.read_text(encoding="utf-8")[:20_000]
    (served_dir / "kant.txt").write_text(text, encoding="utf-8")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params_at,) = tagged(nb, "parameters")
    work = tmp / "work"
    with FolderServer(served_dir) as served:
        injected = parameters_cell(
            MODEL_NAME="tiny", BASE_URL=served.url, DATA_PATH="data/dset.txt",
            TEXT_URL=f"{served.url}/kant.txt", STEPS=STEPS, LEARNING_RATE=0.001, N_CTX=32,
            SAMPLE_LENGTH=SAMPLE_LENGTH, WORK_DIR=str(work),
            OVERRIDES={
                "train.batch_size": 2, "train.sample_every": 0, "train.save_every": 0,
                "train.val_every": 2, "train.val_batch_count": 2, "sample.nsamples": 2,
                "sample.prompts": [], "mlflow.registered_model": "",
            },
        )  # fmt: skip
        nb.cells.insert(params_at + 1, injected)
        # The page's command, run as written from a folder laid out like a checkout: the
        # edited notebook in notebooks/, this virtualenv as .venv.
        (tmp / "notebooks").mkdir()
        nbformat.write(nb, tmp / "notebooks" / "colab.ipynb")
        (tmp / ".venv").symlink_to(VENV_BIN.parent)
        proc = run_in(tmp, "bash", "-c", headless_command(), timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]  # names the failing cell
        requests = [r.path for r in served.requests if r.method == "GET"]
    executed = nbformat.read(tmp / "notebooks" / "colab-run.ipynb", as_version=4)
    return executed, work, requests, text


def headless_command() -> str:
    """The one command docs/colab.md gives for running the notebook headless."""
    (command,) = [line for line in COLAB_PAGE.read_text().splitlines()
                  if line.startswith(".venv/bin/jupyter execute")]  # fmt: skip
    return command


def cell(nb, marker: str) -> nbformat.NotebookNode:
    """The one executed code cell whose source contains `marker`."""
    (found,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    return found


def stdout(c) -> str:
    return "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")


def displayed(c, mime: str) -> list:
    return [o.data[mime] for o in c.outputs if mime in o.get("data", {})]


def test_install_cell_is_tagged_and_uses_repo_url():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    (install,) = tagged(nb, "install")
    assert "REPO_URL" in nb.cells[install].source and "pip install" in nb.cells[install].source
    (params_at,) = tagged(nb, "parameters")
    source = nb.cells[params_at].source
    for name in ("MODEL_NAME", "BASE_URL", "DATA_PATH", "STEPS", "LEARNING_RATE", "N_CTX",
                 "SAMPLE_LENGTH"):  # fmt: skip
        assert re.search(rf"^{name} = ", source, re.M), name


NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()


def test_documented_cell_count():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = sum(c.cell_type == "code" for c in nb.cells)
    claim = f"{NUMBERS[code - 1]} code cells"
    for page in (COLAB_PAGE, REPO / "README.md"):
        assert claim in page.read_text(), f"{page.name} does not say {claim!r}"


def test_text_and_model_came_over_http(run):
    nb, work, requests, text = run
    assert "/kant.txt" in requests
    assert (work / "data" / "dset.txt").read_text(encoding="utf-8") == text
    assert {f"/tiny/{n}" for n in ("hparams.json", "encoder.json", "vocab.bpe")} <= set(requests)
    assert "GPUs: none" in stdout(cell(nb, "list_physical_devices"))
    written = (work / "params.yaml").read_text()
    assert "name: tiny" in written and "n_ctx: 32" in written


def test_training_ran_with_the_notebook_steps(run):
    nb, work, _, _ = run
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    assert metrics["steps"] == STEPS
    out = stdout(cell(nb, 'run_gpt2tune("train"'))
    assert "assembled models/finetuned" in out and "samples/samples.md" in out


def test_loss_cell_printed_and_plotted_the_losses(run):
    nb, work, _, _ = run
    c = cell(nb, "metrics/loss.tsv")
    rows = (work / "metrics" / "loss.tsv").read_text().split("\n")[1:-1]
    first, last = (row.split("\t") for row in (rows[0], rows[-1]))
    assert len(rows) == STEPS
    # The printed numbers are the file's, rounded to 4 places.
    expected = (
        f"training loss: step {first[0]}: {float(first[1]):.4f} -> "
        f"step {last[0]}: {float(last[1]):.4f}"
    )
    assert expected in stdout(c)
    assert "validation loss at step" in stdout(c)
    (png,) = displayed(c, "image/png")
    assert len(png) > 1000  # base64 of a real figure


def test_samples_and_completions_shown(run):
    nb, work, _, _ = run
    (shown,) = displayed(cell(nb, "samples/samples.md"), "text/markdown")
    records = json.loads((work / "samples" / "samples.json").read_text())
    assert len(records) == 2
    assert all(r["text"].strip() and r["text"] in shown for r in records)
    out = stdout(cell(nb, "gpt2tune.generate("))
    assert out.count("--- completion") == 2
    assert out.count("Human reason, in one sphere of its cognition,") == 2


def test_model_folder_zipped(run):
    nb, work, _, _ = run
    archive = work / "finetuned.zip"
    assert f"{archive}:" in stdout(cell(nb, "make_archive"))
    with zipfile.ZipFile(archive) as z:
        names = {n for n in z.namelist() if not n.endswith("/")}
        folder = work / "models" / "finetuned"
        assert names == {f"finetuned/{p.name}" for p in folder.iterdir()}
        assert z.read("finetuned/hparams.json") == (folder / "hparams.json").read_bytes()


# What TensorFlow, tqdm and Grappler print that means nothing to a notebook's user.
NOISE = ("TqdmWarning", "IProgress not found", "PredictCost", "DT_INT32", "Traceback")


def test_cells_show_no_library_noise(run):
    nb, _, _, _ = run
    shown = []
    for i, c in enumerate(nb.cells):
        for out in c.get("outputs", []):
            text = out.get("text", "") + "".join(str(v) for v in out.get("data", {}).values())
            shown += [(i, line) for line in text.splitlines() if any(n in line for n in NOISE)]
    assert not shown, shown[:10]
