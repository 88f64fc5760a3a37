"""The assembled model as an MLflow Model: logged to the run, registered, loaded and served
with MLflow's own tools, giving exactly the text gpt2tune.generate gives.

A tiny random GPT-2 is logged through gpt2tune.servable into a sqlite store in a temporary
folder; loading and serving happen in fresh processes whose working directory is elsewhere,
finding the model only through the registry (`models:/<name>/<version>`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import REPO
from helpers.mlflowserver import MlflowServer, free_ports
from helpers.models import tiny_model
from helpers.processes import stage_env
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import gpt2tune
from gpt2tune import servable
from gpt2tune.config.params import MlflowParams, Sampling, ServeParams
from gpt2tune.tracking import run as tracking

HP = {"n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
DEFAULTS = Sampling(nsamples=2, length=5, temperature=0.9, top_k=20, top_p=0.0, seed=7)
NAME = "tiny-gpt2"
PROMPTS = ["Human reason", ""]  # "" = unconditional
TUNED = {"length": 30, "seed": 3, "repetition_penalty": 1.5, "stop": ["e"]}
CAPS = ServeParams(max_length=40, max_samples=6, max_prompt_tokens=12)
# Version 2: no practical cap on length, for a request that would run for an hour.
UNCAPPED = ServeParams(max_length=10**6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vocab_dir):
    folder = tmp_path_factory.mktemp("servable") / "finetuned"
    gpt2tune.save_model(tiny_model(tiny_vocab_dir, 0, **HP), folder)
    return folder


@pytest.fixture(scope="module")
def logged(tmp_path_factory, model_dir):
    """The model logged and registered through a gpt2tune run, as the assemble stage does."""
    project = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(project)  # the run's metrics/ files go to the project, not the checkout
    try:
        cfg = MlflowParams(uri, "servable")
        with tracking.training_run(cfg, {"model.name": "tiny"}) as run:
            pass  # the training's run, recorded in metrics/mlflow_run.json
        with tracking.reopen_run(cfg):  # assemble reopens it and logs the model directly
            tracking.log_model(model_dir, DEFAULTS, NAME, "candidate", CAPS)
        with tracking.reopen_run(cfg):
            tracking.log_model(model_dir, DEFAULTS, NAME, "", UNCAPPED)
    finally:
        os.chdir(cwd)
    return {"uri": uri, "run_id": run.info.run_id, "project": project}


def expected(model_dir, prompts, **settings) -> list[str]:
    """What the Python API gives for these prompts, with the logged defaults under `settings`."""
    model = gpt2tune.load_model(model_dir)
    kw = {**servable.defaults_of(DEFAULTS), **settings}
    return [text for p in prompts for text in gpt2tune.generate(model, p, **kw)]


def fresh_env(uri: str, python: str = sys.executable) -> dict[str, str]:
    """The registry's address, and the virtualenv's bin on PATH, as once it is activated
    (`mlflow models serve` runs `uvicorn` from there). The python of another virtualenv gets
    nothing of this one: no PYTHONPATH (the checkout's src/), no VIRTUAL_ENV."""
    path = os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")])
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2", PATH=path)
    if python != sys.executable:
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(name, None)
        env["PYTHONNOUSERSITE"] = "1"
    return env


def test_run_holds_one_registered_mlflow_model(logged, model_dir):
    client = MlflowClient(logged["uri"])
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED"
    # The models show on the run and Logged Models page (version 2 is the uncapped one).
    output = run.outputs.model_outputs[0]
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == logged["run_id"]
    folder = f"artifacts/{model_dir.name}"  # MLflow keeps the folder's name
    files = [a.path for a in client.list_logged_model_artifacts(model.model_id, folder)]
    assert sorted(files) == sorted(f"{folder}/{p.name}" for p in model_dir.iterdir())
    assert client.list_artifacts(logged["run_id"]) == []  # the weights are not uploaded twice
    version = client.get_model_version_by_alias(NAME, "candidate")
    assert str(version.version) == "1" and version.run_id == logged["run_id"]


LOAD = """
import json, sys
import mlflow.pyfunc, pandas as pd
m = mlflow.pyfunc.load_model(sys.argv[1])
params = m.metadata.signature.params.to_dict()
print(json.dumps({
    "params": {p["name"]: p["default"] for p in params},
    "list": m.predict(json.loads(sys.argv[2]), params={"length": 6, "seed": 3}),
    "frame": m.predict(pd.DataFrame({"prompt": json.loads(sys.argv[2])})),
    "tuned": m.predict(json.loads(sys.argv[2]), params=json.loads(sys.argv[3])),
    "keras": "keras" in sys.modules,
    "gpt2tune": sys.modules["gpt2tune"].__file__,
}))
"""


def test_loads_elsewhere_and_gives_generates_text(logged, model_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, f"models:/{NAME}/1", json.dumps(PROMPTS), json.dumps(TUNED)],
        cwd=elsewhere, env=fresh_env(logged["uri"]), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # sample's values are the defaults; task generates unless asked
    assert got["params"] == {**servable.defaults_of(DEFAULTS), "task": "generate"}
    assert got["list"] == expected(model_dir, PROMPTS, length=6, seed=3)
    assert len(got["list"]) == len(PROMPTS) * DEFAULTS.nsamples
    assert got["frame"] == expected(model_dir, PROMPTS)  # no params: the logged defaults
    assert not list(elsewhere.iterdir())  # it needed nothing from here and wrote nothing
    assert not got["keras"]  # TensorFlow came without Keras: ~3 s less for a model server
    # repetition_penalty and stop reach the sampler: the texts are the API's with them, which
    # differ from those without (the stop string is in those, cut from these).
    assert got["tuned"] == expected(model_dir, PROMPTS, **TUNED)
    untuned = expected(model_dir, PROMPTS, length=TUNED["length"], seed=TUNED["seed"])
    assert any("e" in t for t in untuned) and not any("e" in t for t in got["tuned"])
    no_stop = expected(model_dir, PROMPTS, **{**TUNED, "stop": []})
    assert no_stop != untuned  # the penalty alone changes the text


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


@contextmanager
def serving(
    uri: str, version: int, tmp_path, python: str = sys.executable, env_root: Path | None = None
):
    """`mlflow models serve` of version `version` by `python`'s MLflow, in its own process
    group, once /ping answers: yields (url, the `mlflow` process, its log file). With
    `env_root`, `--env-manager virtualenv`: MLflow first builds the model's own virtualenv
    there (MLFLOW_ENV_ROOT) from its python_env.yaml and requirements.txt, which takes minutes."""
    port = free_ports(1)[0]
    manager = "virtualenv" if env_root else "local"
    cmd = [
        python, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{version}",
        "--env-manager", manager, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = fresh_env(uri, python)
    if env_root:  # the model's virtualenv gets nothing of the checkout
        env["MLFLOW_ENV_ROOT"] = str(env_root)
        env.pop("PYTHONPATH", None)
    log = tmp_path / f"serve-{version}-{manager}.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn worker is in the same process group
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + (1800 if env_root else 180)
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no answer on /ping:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        yield url, server, log
    finally:
        if group_alive(server.pid):
            os.killpg(server.pid, 9)
        server.wait(30)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def invoke(url: str, body: dict) -> tuple[int, dict]:
    """POST /invocations: the status and the JSON answer, a 4xx as much as a 200."""
    try:
        return 200, post(url + "/invocations", body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def invoke_until_dropped(url: str, body: dict) -> None:
    with contextlib.suppress(OSError):  # the server ends before it answers
        invoke(url, body)


@pytest.fixture(scope="module")
def served(logged, tmp_path_factory):
    with serving(logged["uri"], 1, tmp_path_factory.mktemp("serve")) as (url, _, log):
        yield url, log


def test_mlflow_models_serve_answers_invocations(served, model_dir):
    url, _ = served
    body = {"inputs": PROMPTS, "params": {"length": 7, "seed": 11, "nsamples": 1}}
    status, answer = invoke(url, body)
    assert status == 200, answer
    got = answer["predictions"]
    assert got == expected(model_dir, PROMPTS, length=7, seed=11, nsamples=1)
    # Each completion is 7 tokens: the sampler's own ids decode to exactly the served text.
    # (Re-encoding the text is no count: a random model splits UTF-8 characters, which decode
    # to U+FFFD, and re-merges tokens.)
    model = gpt2tune.load_model(model_dir)
    for prompt, text in zip(PROMPTS, got, strict=True):
        context = model.encoder.encode(prompt) if prompt else None
        kw = {**servable.defaults_of(DEFAULTS), "length": 7, "seed": 11, "nsamples": 1}
        [ids] = gpt2tune.generate_tokens(model, context, **kw)
        assert len(ids) == 7 and model.encoder.decode(ids.tolist()) == text
    # task "score": a row per text, gpt2tune.score's values (the payload docs/serving.md shows)
    texts = ["Human reason", "has this fate"]
    status, rows = invoke(url, {"inputs": texts, "params": {"task": "score"}})
    assert status == 200, rows
    want = gpt2tune.score(model, texts, tokens=True)
    for row, w in zip(rows["predictions"], want, strict=True):
        assert row["text"] == w["text"] and row["tokens"] == w["tokens"]
        assert row["logprob"] == pytest.approx(w["logprob"], abs=1e-5)
        assert row["perplexity"] == pytest.approx(w["perplexity"], rel=1e-5)
        assert [t for t, _ in row["token_logprobs"]] == [t for t, _ in w["token_logprobs"]]


# Requests refused with a 400, and a word of the one-line reason each must give.
REFUSED = [
    ({"inputs": ["a"], "params": {"temprature": 0}}, "unknown param(s) temprature"),
    ({"inputs": ["a"], "params": {"lenght": 5}}, "unknown param(s) lenght"),
    ({"inputs": [None]}, "prompt 0 is null"),
    ({"inputs": [42]}, "prompt 0 is 42"),
    ({"inputs": ["a", None]}, "prompt 1 is null"),
    ({"inputs": [["a", "b"]]}, "prompt 0 is ['a', 'b']"),
    ({"dataframe_records": [{"prompt": "a"}, {"prompt": 5}]}, "prompt 1 is 5"),
    ({"inputs": ["a"], "params": {"length": 41}}, "serve.max_length"),
    ({"inputs": ["a", "b", "c", "d"], "params": {"nsamples": 2}}, "serve.max_samples"),
    ({"inputs": ["Human reason " * 10]}, "serve.max_prompt_tokens"),
    ({"inputs": ["a"], "params": {"top_p": 2.0}}, "top_p = 2.0"),
    ({"inputs": ["a"], "params": {"precision": "float16"}}, "precision = 'float16'"),
    ({"inputs": ["a"], "params": {"task": "scores"}}, "task = 'scores'"),
    ({"inputs": ["a"] * 7, "params": {"task": "score"}}, "7 texts"),
    ({"inputs": ["Human reason " * 10], "params": {"task": "score"}}, "text 0 is"),
    ({"inputs": [""], "params": {"task": "score"}}, "text 0 is empty"),
]


def test_a_bad_request_is_a_400_with_its_one_line_reason(served):
    """Misspelled params, non-string prompts and requests over the model's caps (serve.* at
    assemble time) are refused before any work: MLflow alone would answer the first ones
    with the defaults or the text "None", "42", and the others would run for hours."""
    url, log = served
    for body, reason in REFUSED:
        status, answer = invoke(url, body)
        message = answer.get("message", "")
        assert status == 400 and reason in message, (body, status, answer)
        assert "\n" not in message and "Traceback" not in message and "/" not in message, answer
        assert set(answer) <= {"error_code", "message", "sqlstate", "error_class"}, answer
    assert "Traceback" not in log.read_text()  # refused, not failed


def test_pyfunc_predict_refuses_what_the_server_does(logged, model_dir):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    finally:
        mlflow.set_tracking_uri(previous)
    for body, reason in REFUSED:
        data = body.get("inputs", body.get("dataframe_records"))
        if "dataframe_records" in body:
            data = pd.DataFrame(data)
        with pytest.raises(MlflowException, match=re.escape(reason)) as e:
            model.predict(data, params=body.get("params"))
        assert e.value.get_http_status_code() == 400 and "\n" not in e.value.message
    assert model.predict(["Human reason"], params={"length": 4, "seed": 1}) == expected(
        model_dir, ["Human reason"], length=4, seed=1
    )
    # sample.precision as a param: one row decodes at it, and gets the API's text at it.
    at_int8 = {"length": 12, "seed": 1, "nsamples": 1, "precision": "int8"}
    assert model.predict(["Human reason"], params=at_int8) == expected(
        model_dir, ["Human reason"], **at_int8
    )


def test_sigterm_ends_the_server_during_a_long_generation(logged, tmp_path):
    """`kill <pid of mlflow models serve>` while a request of 10^6 tokens (over an hour)
    runs: the scoring server is gone within seconds; uvicorn alone would wait for it."""
    with serving(logged["uri"], 2, tmp_path) as (url, server, log):
        body = {"inputs": ["a"], "params": {"length": 10**6, "nsamples": 1}}
        client = threading.Thread(target=invoke_until_dropped, args=(url, body), daemon=True)
        client.start()
        time.sleep(3)  # the request is generating
        assert client.is_alive() and group_alive(server.pid)
        os.kill(server.pid, 15)
        start = time.monotonic()
        while group_alive(server.pid) and time.monotonic() - start < 20:
            time.sleep(0.2)
            server.poll()  # reap the mlflow process, so that only the worker counts
        took = time.monotonic() - start
        assert not group_alive(server.pid), log.read_text()[-3000:]
    assert took < 8, f"{took:.1f} s"


def test_runs_ended_through_tracking_have_an_end_time(logged, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = MlflowParams(logged["uri"], "end-time")
    with tracking.training_run(cfg, {}) as run:
        tracking.end_run("KILLED")
    client = MlflowClient(logged["uri"])
    killed = client.get_run(run.info.run_id).info
    finished = client.get_run(logged["run_id"]).info
    assert killed.status == "KILLED" and killed.end_time >= killed.start_time
    assert finished.status == "FINISHED" and finished.end_time >= finished.start_time


def test_model_logged_while_the_server_was_down_is_sent_on_replay(model_dir, tmp_path, monkeypatch):
    """Offline: the request waits in the run's offline file; the replay logs and registers it,
    and the run it ends (via the REST API, what the UI reads) has an end time."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2TUNE_MLFLOW_RETRY_S", "3600")
    server = MlflowServer(tmp_path / "mlflow-later")  # its port is free: nothing answers yet
    try:
        cfg = MlflowParams(server.url, "offline-model")
        with tracking.training_run(cfg, {"model.name": "tiny"}) as run:
            tracking.log_model(model_dir, DEFAULTS, NAME + "-offline", "")
        kept = tmp_path / "metrics" / "mlflow_offline" / f"{run.info.run_id}.jsonl"
        assert [json.loads(line)["op"] for line in kept.read_text().splitlines()] == [
            "start", "model", "status",
        ]  # fmt: skip
        server.start()
        server.wait_ready()
        assert tracking.replay_pending(cfg) == 0
        run_id = json.loads((tmp_path / "metrics" / "mlflow_run.json").read_text())["run_id"]
        run_id = tracking.Session(cfg, run_id).run_id  # the real id the replay created
        client = MlflowClient(server.url)
        [version] = client.search_model_versions(f"name='{NAME}-offline'")
        assert version.run_id == run_id and not version.aliases
        with urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/runs/get?run_id={run_id}") as r:
            info = json.loads(r.read())["run"]["info"]
        assert info["status"] == "FINISHED" and int(info["end_time"]) >= int(info["start_time"])
    finally:
        server.__exit__()


def test_a_store_without_registry_warns_in_one_line(model_dir, tmp_path, monkeypatch, capsys):
    """MLflow 3 refuses a file-based registry unless MLFLOW_ALLOW_FILE_STORE=true: the model
    stays logged on the run, and one warning line says how to register it later."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", (tmp_path / "registry").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = MlflowParams(uri, "no-registry")
    with tracking.training_run(cfg, {}) as run:
        pass
    with tracking.reopen_run(cfg):  # as assemble does: the call made in this thread
        tracking.log_model(model_dir, DEFAULTS, NAME, "candidate")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "not registered" in line]
    assert len(warnings) == 1 and "mlflow.register_model('models:/m-" in warnings[0], warnings
    assert MlflowClient(uri).get_run(run.info.run_id).outputs.model_outputs


def test_a_model_logged_by_an_earlier_layout_loads(tmp_path):
    """A model logged before the library moved into subpackages (tests/data/...: MLflow keeps
    only `import gpt2tune.servable` of our code) loads in a fresh process and answers as the
    Python API does on its own weights."""
    logged = REPO / "tests" / "data" / "model_logged_before_layout"
    settings = {"length": 6, "seed": 3, "nsamples": 1}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(logged), json.dumps(PROMPTS), json.dumps(settings)],
        cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    model = gpt2tune.load_model(logged / "artifacts" / "finetuned")
    kw = {**got["params"], **settings}  # the logged defaults (sample.*), then the request's
    want = [t for p in PROMPTS for t in gpt2tune.generate(model, p, **kw)]
    assert got["tuned"] == want and len(want) == 2


def downloaded(logged, tmp_path) -> Path:
    """Version 1's folder, as MLflow keeps it in the registry."""
    return Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{NAME}/1", dst_path=str(tmp_path / "model"), tracking_uri=logged["uri"]
        )
    )


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def test_the_logged_model_carries_its_code_and_pins_what_it_needs(logged, tmp_path):
    """Self-contained: the gpt2tune package as code/gpt2tune (no bytecode), requirements.txt
    pinning what that code imports to the versions in use here, and constraints.txt pinning
    everything those need in turn; neither names gpt2tune itself or torch."""
    model = downloaded(logged, tmp_path)
    package, code = Path(gpt2tune.__file__).parent, model / "code" / "gpt2tune"

    def files(root: Path) -> list[str]:
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )

    assert files(code) == files(package) and not list(code.rglob("__pycache__"))
    reqs = requirement_lines(model / "requirements.txt")
    assert reqs[-1] == "-c constraints.txt", reqs
    pins = dict(line.split("==") for line in reqs[:-1])
    assert set(pins) == set(servable._REQUIREMENTS)
    assert all(metadata.version(name) == version for name, version in pins.items()), pins
    constraints = dict(line.split("==") for line in requirement_lines(model / "constraints.txt"))
    assert all(metadata.version(name) == version for name, version in constraints.items())
    # What mlflow's server and tensorflow need are pinned too, and nothing of the project's.
    assert {*pins, "uvicorn", "fastapi", "keras", "protobuf"} <= set(constraints)
    assert not {"gpt2tune", "torch", "dvc"} & set(constraints)


def venv_of_requirements(model: Path, venv: Path) -> str:
    """A fresh virtualenv with only what the model's requirements.txt (and so constraints.txt)
    name, as `python -m venv` and pip make it: its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(model / "requirements.txt")],
        env=fresh_env("", python), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return python


@pytest.mark.slow
def test_a_venv_of_the_models_requirements_alone_loads_and_serves_it(logged, model_dir, tmp_path):
    """Serving anywhere: a fresh virtualenv built from the logged model's own environment
    files alone (requirements.txt and its constraints.txt), without gpt2tune or torch and
    without the checkout on its path, loads the model with mlflow.pyfunc.load_model and
    serves it with `mlflow models serve --env-manager local`, answering as gpt2tune.generate
    does here at the same seed.

    Where pyenv is installed, the virtualenv is the one `mlflow models serve --env-manager
    virtualenv` builds (python_env.yaml's Python, from pyenv), whose answer is checked too;
    elsewhere `python -m venv` and `pip install -r requirements.txt` build it. Either way
    the install fetches TensorFlow (~570 MB) and ~110 other wheels: minutes
    (docs/serving.md)."""
    body = {"inputs": PROMPTS, "params": {"length": 7, "seed": 11, "nsamples": 1}}
    want = expected(model_dir, PROMPTS, length=7, seed=11, nsamples=1)
    if shutil.which("pyenv"):
        envs = tmp_path / "envs"
        with serving(logged["uri"], 1, tmp_path, env_root=envs) as (url, _, _):
            assert post(url + "/invocations", body)["predictions"] == want
        [python] = [str(p) for p in envs.glob("*/bin/python")]  # the one MLflow built
    else:
        python = venv_of_requirements(downloaded(logged, tmp_path), tmp_path / "venv")
    env = fresh_env(logged["uri"], python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import importlib.util as u; print([bool(u.find_spec(n)) for n in sys.argv[1:]])"
    found = subprocess.run(
        [python, "-c", f"import sys; {probe}", "gpt2tune", "torch", "mlflow"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert found.stdout.strip() == "[False, False, True]", found.stderr[-3000:]

    proc = subprocess.run(
        [python, "-c", LOAD, f"models:/{NAME}/1", json.dumps(PROMPTS), json.dumps(TUNED)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"{os.sep}code{os.sep}gpt2tune{os.sep}" in got["gpt2tune"]  # the model's own copy
    assert got["list"] == expected(model_dir, PROMPTS, length=6, seed=3)
    assert got["tuned"] == expected(model_dir, PROMPTS, **TUNED)

    with serving(logged["uri"], 1, tmp_path, python) as (url, _, _):
        assert post(url + "/invocations", body)["predictions"] == want
        refused, reason = REFUSED[0]
        status, answer = invoke(url, refused)
        assert status == 400 and reason in answer["message"], answer
