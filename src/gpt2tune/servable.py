"""The fine-tuned model as an MLflow Model: logged to the training's run, registered, served.

The assemble stage calls :func:`gpt2tune.tracking.run.log_model`, which logs ``models/finetuned``
to the run as an MLflow Model (MLflow 3 ``log_model(name="model")``, so it shows on the run
and on the Logged Models page) with the ``python_function`` flavor, registers it as a new version of
``mlflow.registered_model`` (tagged ``dvc.exp_name`` with its DVC experiment) and points
``mlflow.registered_alias`` at that version when it was assembled in the workspace; a
``dvc exp run --temp/--queue`` experiment's version leaves the alias where it is (see
``gpt2tune promote``), so the alias names the model in the workspace's models/finetuned. The
OpenAI-format folder is the model's one artifact (``artifacts/finetuned/``, the folder's
name), so its weights are uploaded once, and anything that reads OpenAI's layout can use that
folder as it is.

What ``predict`` takes and gives (:class:`GPT2Completer`):

* input: prompts, as a list of strings, a string, a 1-D array, or a DataFrame with a
  ``prompt`` column (else its first column); ``""`` = an unconditional sample. Anything else
  (``None``, a number, a nested list) is refused: the signature declares no input schema, so
  that MLflow hands the values over as they came instead of casting them to text;
* params: ``length``, ``nsamples``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
  ``repetition_penalty`` and ``stop`` (a list of strings), declared in the signature with the
  ``sample`` section's values as defaults;
* caps: ``length``, ``nsamples`` x prompts and each prompt's tokens are capped by the
  ``serve`` section's values at assemble time, kept as the model's ``model_config`` (a model
  logged before them gets ServeParams' defaults);
* refusals: a bad request (an unknown param, a non-string prompt, a setting out of range or
  over a cap, a batch over free memory) is a :class:`RequestRefused`, which MLflow's server
  answers with a 400 whose message is the one-line reason, before any token is generated;
* ``task`` param: ``"generate"`` (the default) as below; ``"score"`` takes the strings as
  texts and answers a table, a row per text (:func:`score_frame`: tokens, logprob,
  mean_logprob, perplexity, token_logprobs), bounded by the same caps;
* output: a list of completions (without the prompt, each cut before the first ``stop``
  string), ``nsamples`` per prompt, prompt by prompt. Each prompt is sampled as
  ``gpt2tune.generate(model, prompt, **params)`` would, so a fixed seed gives the same text
  as the Python API.

The model is "models from code" (MLflow's own recommendation): MLflow keeps a three-line
script, :mod:`gpt2tune.mlflow_model_code`, that builds the :class:`GPT2Completer` when the model
loads, so nothing is unpickled. The model is self-contained: it carries the gpt2tune package
as it was when logged (``code/gpt2tune``, MLflow's ``code_paths``, first on ``sys.path`` when
it loads; a process that imported gpt2tune before keeps its own), its ``requirements.txt``
pins what that code imports to the versions it was logged with, and its ``constraints.txt``
pins everything those need in turn, so any environment MLflow builds from them
(``--env-manager local``, ``virtualenv``, ``uv``, ``build-docker``) loads it without gpt2tune
installed. The project folder is not needed: the weights and tokenizer come from the model's
own artifact. A model logged before it carried its code imports the installed gpt2tune.

Served by ``mlflow models serve``, the model also ends its process within seconds of SIGTERM
or SIGINT (see :func:`_end_on_signals`); uvicorn alone would wait for a running generation to
finish, which a long request makes hours.

While the tracking server is away, the request is kept in the run's offline file like every
other record and carried out when it is replayed (see gpt2tune.tracking.run), from the model
folder as it is then.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from gpt2tune.config.params import Sampling, ServeParams
from gpt2tune.errors import Gpt2tuneError

ARTIFACT = "gpt2"  # the folder's key in `artifacts`; it keeps its own name inside the model
MODEL_NAME = "model"  # log_model(name=...): the model's name on the run and Logged Models page
# Set by MLflow's `mlflow models serve` for the scoring server process it starts (uvicorn).
_SERVER_MODEL_PATH = "__pyfunc_model_path__"


def _param_types() -> dict[str, type]:
    """Every Sampling setting and the Python type of its pyfunc param, from Sampling's own
    declarations (a new setting is one field there): a tuple of strings is a list param."""
    hints = typing.get_type_hints(Sampling)
    kinds = {f.name: typing.get_origin(hints[f.name]) or hints[f.name] for f in fields(Sampling)}
    return {name: list if kind is tuple else kind for name, kind in kinds.items()}


# The generation settings; their types fix the params schema. A lone string for `stop` is
# left for check_sampling to refuse.
PARAM_TYPES: dict[str, type] = _param_types()
_CODE = Path(__file__).with_name("mlflow_model_code.py")
# gpt2tune itself, carried inside every logged model as code/gpt2tune (MLflow's code_paths,
# without __pycache__), so that the model loads where gpt2tune is not installed.
_PACKAGE = Path(__file__).parent
# The distributions the carried code imports when the model loads and predicts: servable,
# model/, generation/ and config/ (pyyaml: config.schema). tests/test_servable.py loads and
# serves a logged model in a fresh venv of its requirements.txt alone, which a missing one fails.
_REQUIREMENTS = ("mlflow", "tensorflow", "numpy", "pandas", "regex", "tiktoken", "pyyaml")


class RequestRefused(MlflowException):
    """A request refused before any work: MLflow's server answers it with a 400 whose message
    is this one line.

    The server rewrites the message of an MlflowException raised during predict into "Failed
    to predict data '<the whole input>'. Error: ...", which echoes the request back over
    several lines: this one keeps its own reason (the rewrite is ignored)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):  # MlflowException.__init__'s; later ones are the rewrite
            self._reason = value


class GPT2Completer(mlflow.pyfunc.PythonModel):
    """Prompts in, completions out; see the module docstring."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from gpt2tune.stage import import_tensorflow_quietly

        import_tensorflow_quietly()  # without Keras: a model server starts ~3 s sooner
        from gpt2tune.model.checkpoint import load_model

        self.model = load_model(context.artifacts[ARTIFACT])
        self.caps = caps_of(context.model_config or {})
        _refuse_unknown_params()
        if os.environ.get(_SERVER_MODEL_PATH):  # this process is MLflow's scoring server
            _end_on_signals()

    # The annotation is what MLflow's schema enforcement hands over for a DataFrame; lists,
    # arrays and strings arrive as they are (the signature has no input schema). A pandas
    # hint also keeps MLflow 3 from deriving a second signature from the type hints.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        from gpt2tune.generation.checks import resolve_sampling
        from gpt2tune.generation.sampler import generate

        try:
            params = dict(params or {})
            task = params.pop("task", "generate")
            if task not in TASKS:
                raise Gpt2tuneError(f"task = {task!r}: must be one of {', '.join(TASKS)}")
            prompts = prompts_of(model_input)
            if task == "score":
                return score_frame(self.model, self.caps, prompts)
            s = resolve_sampling(None, None, sampling_settings(params))
            check_caps(self.caps, prompts, s, self.model.encoder.encode)
            return [text for p in prompts for text in generate(self.model, p, sampling=s)]
        except Gpt2tuneError as e:  # every check comes before the first token
            raise RequestRefused(str(e)) from None


# `task`: what predict does with the input strings. "score": each is a text to score, the
# answer a table (score_frame); the generation params are then ignored.
TASKS = ("generate", "score")


def score_frame(model: Any, caps: ServeParams, texts: list[str]) -> pd.DataFrame:
    """task "score": a row per text, columns text, tokens, logprob, mean_logprob, perplexity,
    token_logprobs ([[token, log-probability], ...]); gpt2tune.score's values. The caps bound
    it as they bound prompts: serve.max_samples texts of serve.max_prompt_tokens tokens."""
    from gpt2tune.generation.score import score

    if len(texts) > caps.max_samples:
        raise Gpt2tuneError(
            f"{len(texts)} texts: this model scores at most {caps.max_samples} per request "
            "(serve.max_samples); send fewer"
        )
    for i, t in enumerate(texts):
        n = len(model.encoder.encode(t)) if len(t.encode()) > caps.max_prompt_tokens else 0
        if n > caps.max_prompt_tokens:
            raise Gpt2tuneError(
                f"text {i} is {n} tokens: this model scores texts of at most "
                f"{caps.max_prompt_tokens} tokens (serve.max_prompt_tokens); shorten it"
            )
    return pd.DataFrame(score(model, texts, tokens=True))


def caps_of(model_config: dict[str, Any]) -> ServeParams:
    """The request caps kept in a logged model's model_config; ServeParams' defaults for
    what it lacks (a model logged before the caps)."""
    names = [f.name for f in fields(ServeParams)]
    return ServeParams(**{k: int(v) for k, v in model_config.items() if k in names})


def check_caps(caps: ServeParams, prompts: list[str], s: Sampling, encode) -> None:
    """Refuse a request over the model's caps (serve.* when it was assembled), before any
    work: long generations, many rows and long prompts each cost time or memory."""
    if s.length > caps.max_length:
        raise Gpt2tuneError(
            f"length = {s.length}: this model serves at most {caps.max_length} new tokens per "
            "sample (serve.max_length); ask for fewer"
        )
    rows = s.nsamples * len(prompts)
    if rows > caps.max_samples:
        raise Gpt2tuneError(
            f"nsamples x prompts = {s.nsamples} x {len(prompts)} = {rows}: this model serves "
            f"at most {caps.max_samples} samples per request (serve.max_samples); send fewer "
            "prompts or a lower nsamples"
        )
    for i, prompt in enumerate(prompts):
        # Every token is at least one byte: a prompt of few bytes needs no encoding.
        if len(prompt.encode()) > caps.max_prompt_tokens:
            tokens = len(encode(prompt))
            if tokens > caps.max_prompt_tokens:
                raise Gpt2tuneError(
                    f"prompt {i} is {tokens} tokens: this model serves prompts of at most "
                    f"{caps.max_prompt_tokens} tokens (serve.max_prompt_tokens); shorten it"
                )


def _refuse_unknown_params() -> None:
    """Make a param the signature does not declare a refusal instead of a silent default.

    MLflow drops undeclared params before predict sees them (only its log says "Unrecognized
    params ... are ignored"), so `temprature: 0` would answer with the default temperature.
    Its check, `_enforce_params_schema`, is looked up in mlflow.pyfunc on every predict: it
    is wrapped once per process, for schemas whose params are all gpt2tune's (other models in
    the process keep MLflow's behaviour). Without that name (another MLflow) nothing changes.
    """
    import mlflow.pyfunc as pyfunc

    enforce = getattr(pyfunc, "_enforce_params_schema", None)
    if enforce is None or getattr(enforce, "gpt2tune_strict", False):
        return

    def strict(params: Any, schema: Any) -> Any:
        declared = {p.name for p in schema.params} if schema is not None else set()
        if isinstance(params, dict) and declared and declared <= {*PARAM_TYPES, "task"}:
            unknown = sorted(set(map(str, params)) - declared)
            if unknown:
                raise RequestRefused(
                    f"unknown param(s) {', '.join(unknown)}; known: {', '.join(sorted(declared))}"
                )
        return enforce(params, schema)

    strict.gpt2tune_strict = True
    pyfunc._enforce_params_schema = strict


GRACE_S = 3.0  # after SIGTERM or SIGINT, how long the server may take to end on its own


def _end_on_signals() -> None:
    """SIGTERM or SIGINT: the scoring server ends within GRACE_S, whatever it is running.

    MLflow's scoring server is uvicorn, whose graceful shutdown waits for the running
    requests; the interpreter then waits for the threads generating them, which no signal can
    interrupt (a `length` of 10^6 took over an hour; only kill -9 ended it). uvicorn imports
    the app, and so loads this model, before it installs its signal handlers, so a handler
    set here would be replaced: its own handler, `Server.handle_exit`, is wrapped instead
    (once per process). The wrapper starts a daemon timer that ends the process after GRACE_S
    if it is still there, then shuts down as uvicorn does. Nothing is lost: a request still
    generating then could not be answered in time, and quick ones are answered by then.
    """
    try:
        from uvicorn.server import Server
    except ImportError:  # not uvicorn: nothing to wrap
        return
    handle_exit = Server.handle_exit
    if getattr(handle_exit, "gpt2tune_deadline", False):
        return

    def with_deadline(server: Any, sig: int, frame: Any) -> None:
        timer = threading.Timer(GRACE_S, os._exit, (128 + sig,))
        timer.daemon = True  # an exit sooner than GRACE_S does not wait for it
        timer.start()
        handle_exit(server, sig, frame)

    with_deadline.gpt2tune_deadline = True
    Server.handle_exit = with_deadline


def prompts_of(model_input: Any) -> list[str]:
    """The prompts in a pyfunc input, each a string: a missing value (None, NaN), a number or
    a nested list is refused rather than turned into text ("None", "42")."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            raise Gpt2tuneError("predict input has no columns: give a `prompt` column")
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, np.ndarray) and model_input.ndim == 0:  # a JSON string
        values = [model_input.item()]
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        values = list(model_input)
    else:
        raise Gpt2tuneError(
            f"predict input of type {type(model_input).__name__}: give a list of prompt "
            "strings or a DataFrame with a `prompt` column"
        )
    for i, v in enumerate(values):
        if not isinstance(v, str):
            if isinstance(v, np.ndarray | np.generic):  # a nested JSON list's row, a number
                v = v.tolist()
            shown = "null" if v is None or (isinstance(v, float) and np.isnan(v)) else repr(v)
            raise Gpt2tuneError(
                f"prompt {i} is {shown[:60]}, not a string: prompts must be strings "
                '("" for an unconditional sample)'
            )
    return [str(v) for v in values]  # numpy's str_ as plain str


def sampling_settings(params: dict[str, Any]) -> dict[str, Any]:
    """generate()'s keyword arguments from pyfunc params (MLflow has added the defaults)."""
    unknown = sorted(set(params) - set(PARAM_TYPES))
    if unknown:
        raise Gpt2tuneError(
            f"unknown param(s) {', '.join(unknown)}; known: {', '.join(PARAM_TYPES)}"
        )
    return {k: _as(PARAM_TYPES[k], params[k]) for k in PARAM_TYPES if k in params}


def _as(kind: type, value: Any) -> Any:
    # list("abc") would split a string into letters: keep it whole, for the check to name.
    return value if kind is list and isinstance(value, str) else kind(value)


def defaults_of(sampling: Any) -> dict[str, Any]:
    """The generation settings of a Sampling / SampleParams value (or a dict), as JSON types.

    A dict from before a setting existed (an offline record written by an older gpt2tune)
    gets that setting's declared default."""
    if isinstance(sampling, dict):
        sampling = Sampling(**{k: v for k, v in sampling.items() if k in PARAM_TYPES})
    return {k: _as(t, getattr(sampling, k)) for k, t in PARAM_TYPES.items()}


def caps_dict(caps: ServeParams) -> dict[str, int]:
    """A ServeParams value as the model_config kept in the logged model."""
    return {f.name: getattr(caps, f.name) for f in fields(ServeParams)}


def signature(defaults: dict[str, Any]) -> mlflow.models.ModelSignature:
    """No input schema (MLflow would cast every prompt to a string: `[null]` would complete
    "None"; prompts_of checks them), one string column out, the settings as params with
    defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double", str: "string", list: "string"}
    specs = [
        ParamSpec(k, kinds[t], defaults[k], shape=(-1,) if t is list else None)
        for k, t in PARAM_TYPES.items()
    ]
    specs.append(ParamSpec("task", "string", TASKS[0]))  # "score": see score_frame
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(specs),
    )


def pip_requirements() -> list[str]:
    """What gpt2tune's model code imports, pinned to the versions it was logged with.

    Given explicitly so that MLflow does not load the model in a subprocess to guess them.
    gpt2tune itself is not among them: the model carries its code (code_paths).
    """
    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def pinned_closure(names: Iterable[str]) -> list[str]:
    """Every installed distribution that `names` need, theirs in turn and so on, as
    `name==version`: the model's constraints.txt, so that an environment built from its
    requirements gets the very versions it was logged with, not whatever is newest then.

    A requirement's extras count only where asked for (`uvicorn[standard]`); one whose
    marker does not hold here (another platform or Python) and one not installed are left out.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pins[key] = dist.version
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((req.name, frozenset(req.extras)))
    return [f"{key}=={version}" for key, version in sorted(pins.items())]


@contextmanager
def _requirements() -> Iterator[list[str]]:
    """log_model's pip_requirements: the pins of pip_requirements() and `-c` a constraints
    file of their pinned_closure(), which MLflow copies into the model (constraints.txt,
    named in its requirements.txt as `-c constraints.txt`)."""
    with tempfile.TemporaryDirectory(prefix="gpt2tune-reqs-") as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text("\n".join(pinned_closure(_REQUIREMENTS)) + "\n")
        yield [*pip_requirements(), f"-c {constraints}"]


def send_model(uri: str, run_id: str, op: dict) -> None:
    """Carry out a "model" record of gpt2tune.tracking.run: log, register, set the alias."""
    folder = Path(op["path"])
    if not folder.is_dir():  # replayed after the folder went: say so instead of failing
        print(f"warning: {folder} is gone; MLflow run {run_id} gets no model", file=sys.stderr)
        return
    defaults = op["defaults"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        # The fluent API logs to the active run: reopen the training's; leaving it marks the
        # run FINISHED, and the gpt2tune session then sets its own final status.
        with mlflow.start_run(run_id=run_id), _quiet_mlflow(), _requirements() as reqs:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(_CODE),
                code_paths=[str(_PACKAGE)],  # the model loads without gpt2tune installed
                artifacts={ARTIFACT: str(folder)},
                signature=signature(defaults),
                # The caps; an offline record from before them: ServeParams' defaults.
                model_config=op.get("serve") or caps_dict(ServeParams()),
                # A short request, so that MLflow's check that the example loads is quick.
                input_example=(["Human reason", ""], {"length": 4, "nsamples": 1}),
                pip_requirements=reqs,
            )
        print(f"logged the model to MLflow run {run_id} as {info.model_uri}")
        if op["registered_model"]:
            # Records kept offline by an older gpt2tune have no "move_alias": they moved it.
            alias = op["alias"] if op.get("move_alias", True) else ""
            version = _register(info.model_uri, op["registered_model"], alias, op.get("tags"))
            if version and op["alias"] and not alias:
                _say_alias_stays(op["registered_model"], op["alias"], version, op.get("tags"))
    except MlflowException as e:
        if uri.lower().startswith(("http://", "https://")):
            raise  # gpt2tune.tracking.run keeps the request for when the server answers again
        reason = " ".join(str(e).split())[:200]
        raise Gpt2tuneError(f"could not log {folder} to MLflow run {run_id}: {reason}") from None
    finally:
        mlflow.set_tracking_uri(previous)


def _register(model_uri: str, name: str, alias: str, tags: dict | None = None) -> str | None:
    """A new version of `name` with `tags`, `alias` on it; returns the version, or None when
    the store has no registry (then it only warns)."""
    from mlflow.exceptions import MlflowException

    try:
        with _quiet_mlflow():
            version = mlflow.register_model(model_uri, name, tags=tags or None).version
            if alias:
                mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    except MlflowException as e:
        reason = " ".join(str(e).split()).split(". ")[0][:200]  # MLflow's first sentence
        print(
            f"warning: the model is logged but not registered as {name!r} ({reason}); "
            f"register it later with mlflow.register_model({model_uri!r}, {name!r})",
            file=sys.stderr,
        )
        return None
    print(f"registered {name} version {version}" + (f" as @{alias}" if alias else ""))
    return str(version)


def _say_alias_stays(name: str, alias: str, version: str, tags: dict | None) -> None:
    """The one line of an experiment run outside the workspace: why `alias` did not move."""
    exp = next(iter((tags or {}).values()), "") or version
    print(f"@{alias} stays where it was: {name} version {version} comes from a DVC experiment "
          f"run outside the workspace (--temp/--queue); `gpt2tune promote {exp}` moves "
          f"@{alias} to it")  # fmt: skip


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO/WARNING chatter while logging (registration notes, advice) off; errors
    still raise."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
