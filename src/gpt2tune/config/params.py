"""Hyperparameters: every key declared once, params.yaml checked against them, frozen dataclasses.

Every DVC stage calls ``load_params("params.yaml")`` before doing any work, so a typo costs a
one-line error instead of an hour of training with the wrong setting. Each key is declared
once below, as a dataclass field carrying its type, default, rule and one line of help
(``keys.key``); validation reads those fields, and so do params.yaml's comments and the
docs/parameters.md table (``python -m gpt2tune.config.docs`` rewrites both; a test checks that
they agree).
Any problem raises Gpt2tuneError with one line such as
``params.yaml: train.steps = -5: must be an integer >= 1``.

Why not pydantic (installed with MLflow)? Its errors are multi-line and worded its own way;
keeping ours (``must be ... (got text)``, ``did you mean train.steps?``, unknown keys before
missing ones) meant translating each of its error types back, which was longer than the
~60-line validator in schema.py, and it would turn these plain frozen dataclasses into models.

Why this module is longer than the others (~480 lines): it is the list of every key, one
declaration each (default, rule, one line of help), and grows with the keys, not with logic;
the machinery that reads and checks the declarations is schema.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpt2tune.config.schema import (
    SWITCH,
    Key,
    Rule,
    apply_overrides,
    at_least,
    check_sections,
    describe,
    int_in,
    key,
    number_at_least,
    one_of,
    read_yaml,
    section,
    types_of,
)
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.train.optim import OPTIMIZERS
from gpt2tune.urls import OPENAI_MODELS, USERINFO


def _text_codec(name: str) -> bool:
    # str.encode/bytes.decode refuse bytes-to-bytes codecs such as base64 that codecs.lookup knows.
    try:
        "".encode(name)
        b"".decode(name)
    except LookupError:
        return False
    return True


def _nonempty(v: str) -> bool:
    return bool(v.strip())


def _names(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


_RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SEED = int_in(0, 2**32 - 1)  # numpy's legacy seeding refuses anything outside uint32

# Upper bounds of the counts that size an allocation, so a slip of the keyboard is one line
# from the params check instead of a traceback or a 100 GiB allocation minutes later.
_INT32 = 2**31 - 1  # the sampler takes top_k, steps and the batch as int32 tensors
# Tokens per sample: the sampler's steps argument is int32, but already 1e6 tokens is ~1000
# times GPT-2's context, hours of generation per sample and GiBs of output per prompt.
_MAX_LENGTH = 10**6
# Windows of n_ctx tokens drawn for one step (batch_size x accumulate_gradients) or one
# validation loss: 1e5 windows of 1024 tokens are 0.8 GB of int64 indices before the model
# sees any (1e8 asked for 96.9 GiB at once).
_MAX_WINDOWS = 10**5
# A rank beyond min(in, out) of the layer (768 for 124M's attention) adds nothing.
_MAX_LORA_RANK = 1024
# The dense layers of a block LoRA may adapt (lora.TARGETS; lora.py imports TensorFlow).
LORA_TARGETS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
_DECAYING = _names([n for n, spec in OPTIMIZERS.items() if spec.weight_decay != "none"])

KANT = (
    "Human reason, in one sphere of its cognition, is called upon to consider questions, "
    "which it cannot decline, as they are presented by its own nature, but which it cannot "
    "answer, as they transcend every faculty of the mind."
)


def _model_name_ok(v: str) -> bool:
    if v.startswith("hf:"):  # a Hugging Face folder (or hub id), converted by gpt2tune.model.hf
        return _nonempty(v[3:]) and ".." not in v
    return bool(_RELEASE_NAME.fullmatch(v)) and ".." not in v and v != "finetuned"


@dataclass(frozen=True)
class ModelParams:
    name: str = key(
        "124M",
        Rule(
            "a release folder name such as 124M, 355M, 774M or 1558M (letters, digits, '.', '_', "
            "'-'; no '/' or '..'; not 'finetuned', the assemble output), or hf:<folder> for a "
            "Hugging Face GPT-2 folder",
            _model_name_ok,
        ),
        "GPT-2 release (124M, 355M, 774M, 1558M) under base_url, or hf:<Hugging Face folder>",
    )
    base_url: str = key(
        OPENAI_MODELS,
        Rule(
            "an http://, https:// or file:// URL or a local folder, without user:password@ "
            "(put credentials in ~/.netrc)",
            lambda v: (
                _nonempty(v)
                and (
                    not _URL_SCHEME.match(v)
                    or v.lower().startswith(("http://", "https://", "file://"))
                )
                and not USERINFO.search(v)
            ),
        ),
        "where releases are downloaded from: an http(s) URL, or a local folder holding <name>/",
    )


# data.format's choices; a new format is one entry here and its reader in gpt2tune.data.formats.
DATA_FORMATS = {
    "text": "each file is one document",
    "lines": "each line is one document",
    "csv": "each row is one document: its data.field column",
    "jsonl": "each line is a JSON object, one document: its data.field key",
    "npz": "tokens already encoded by gpt-2-simple / nshepperd's encode.py, used as is",
}


# The longest line (csv: cell) of data.format lines, csv or jsonl, in millions of characters:
# a line is held whole while it is parsed (two or three copies at once), so a 1 GB line took
# 4 GB of memory; text files stream and have no limit.
MAX_LINE_MB = 16


@dataclass(frozen=True)
class DataParams:
    path: str = key(
        "data/dset.txt",
        Rule("a non-empty path, folder or glob", _nonempty),
        "text to train on: a file, a folder of text files, or a glob",
    )
    encoding: str = key(
        "utf-8",
        Rule("a text codec Python knows, such as utf-8 or latin-1", _text_codec),
        "codec of the text",
    )
    format: str = key(
        "text", one_of(DATA_FORMATS), "how data.path and data.val_path hold documents"
    )
    field: str = key(
        "text",
        Rule("a non-empty string", _nonempty),
        "the CSV column or JSON key holding the text (data.format csv or jsonl)",
    )
    # Prompt -> completion training (data/records.py): data.field is then the completion.
    prompt_field: str = key(
        "",
        Rule('a CSV column or JSON key other than data.field ("" = off)'),
        "prompt's column or key: the loss counts only the completion (data.field)",
    )
    val_fraction: float = key(
        0.05,
        Rule("a number in [0, 0.5)", lambda v: 0 <= v < 0.5),
        "share of tokens held out for validation (0 = none)",
    )
    val_path: str = key(
        "",
        Rule('a path to a separate validation text ("" = hold out val_fraction)'),
        'separate validation text, file or folder ("" = hold out val_fraction)',
    )
    max_line_mb: int = key(
        MAX_LINE_MB,
        int_in(1, 4096),
        "longest line or CSV cell, in millions of characters",
    )
    follow_symlinks_outside: bool = key(
        False,
        SWITCH,
        "read files that symlinks lead to outside the project",
    )


@dataclass(frozen=True)
class TrainParams:
    """The train section. Code and tests can write ``TrainParams(steps=10, n_ctx=64)``."""

    steps: int = key(1000, at_least(1), "optimizer steps")
    batch_size: int = key(
        1, int_in(1, _MAX_WINDOWS), "windows per micro-batch (all replicas together)"
    )
    learning_rate: float = key(2e-5, Rule("a number > 0", lambda v: v > 0), "peak learning rate")
    seed: int = key(0, _SEED, "same seed + same data = same run")
    n_ctx: int = key(
        1024,
        at_least(1, " (and at most the model's n_ctx, 1024 for GPT-2)"),
        "tokens per window (smaller = faster)",
    )
    sample_every: int = key(
        100, at_least(0, " (0 = never)"), "steps between text samples logged to MLflow"
    )
    sample_length: int = key(100, int_in(1, _MAX_LENGTH), "tokens per training sample")
    save_every: int = key(1000, at_least(0, " (0 = only at the end)"), "steps between checkpoints")
    val_every: int = key(
        100, at_least(0, " (0 = only at the end)"), "steps between validation losses"
    )
    val_batch_count: int = key(
        8, int_in(1, _MAX_WINDOWS), "windows of n_ctx tokens averaged for each validation loss"
    )
    accumulate_gradients: int = key(
        1,
        int_in(1, _MAX_WINDOWS),
        "micro-batches per optimizer step (bigger effective batch, same memory)",
    )
    optimizer: str = key(
        "adam", one_of({n: spec.help for n, spec in OPTIMIZERS.items()}), "the update rule"
    )
    weight_decay: float = key(
        0.0, number_at_least(0, f" (used by {_DECAYING})"), "decay of weight matrices"
    )
    lr_schedule: str = key(
        "constant",
        one_of({"constant": "the peak rate throughout", "cosine": "cosine decay to 0 at steps"}),
        "learning rate after warm-up",
    )
    warmup_steps: int = key(0, at_least(0), "linear warm-up from 0 over this many steps")
    grad_clip: float = key(
        0.0, number_at_least(0, " (global-norm clipping; 0 = off)"), "gradient clipping"
    )
    noise: float = key(
        0.0,
        Rule("a number in [0, 1) (share of input tokens replaced)", lambda v: 0 <= v < 1),
        "regularizer",
    )
    lora_rank: int = key(
        0,
        Rule(
            f"an integer in 0..{_MAX_LORA_RANK} (0 = full fine-tuning)",
            lambda v: 0 <= v <= _MAX_LORA_RANK,
        ),
        "LoRA: rank of the adapters trained instead of the frozen model (0 = off)",
    )
    lora_alpha: float = key(
        16.0, Rule("a number > 0", lambda v: v > 0), "LoRA: the adapters' update is alpha/rank A B"
    )
    lora_targets: tuple[str, ...] = key(
        LORA_TARGETS,
        Rule(
            f"a non-empty list of distinct layers among {', '.join(LORA_TARGETS)}",
            lambda v: bool(v) and len(set(v)) == len(v) and set(v) <= set(LORA_TARGETS),
        ),
        "LoRA: the layers of each block given adapters",
    )
    only_train_transformer_layers: bool = key(
        False, SWITCH, "freeze embeddings and final layer norm (less memory)"
    )
    memory_saving_gradients: bool = key(
        False, SWITCH, "recompute blocks in the backward pass (less memory, slower)"
    )
    restore_from: str = key(
        "latest",
        Rule("latest, fresh, or the path of a checkpoint or model folder", _nonempty),
        "latest: continue checkpoint/run1 if same run; fresh: from the base model",
    )
    max_minutes: float = key(
        0.0, number_at_least(0, " (0 = no limit)"), "wall-clock budget, stops with a checkpoint"
    )
    # Stopping and keeping (keeping.py).
    early_stopping_patience: int = key(
        0,
        at_least(0, " (0 = off; needs a validation loss and train.val_every > 0)"),
        "validations without an improvement of early_stopping_min_delta before training stops",
    )
    early_stopping_min_delta: float = key(
        0.0, number_at_least(0), "smallest drop of val_loss that counts as an improvement"
    )
    keep_checkpoints: int = key(
        1, at_least(1), "newest checkpoints kept in checkpoint/run1 (the best is kept apart)"
    )
    precision: str = key(
        "float32",
        one_of({
            "float32": "safe everywhere",
            "mixed_bfloat16": "A100/H100, TPU, CPUs with AVX-512 BF16",
            "mixed_float16": "older GPUs (V100, T4), with loss scaling",
        }),
        "compute dtype",
    )  # fmt: skip
    xla: bool = key(False, SWITCH, "jit-compile the train step with XLA (faster on GPU)")
    strategy: str = key(
        "auto",
        one_of({
            "auto": "mirrored with several GPUs, else one",
            "one": "one device",
            "mirrored": "all local GPUs",
            "multi_worker": "several machines, configured by TF_CONFIG",
        }),
        "devices to train on",
    )  # fmt: skip


@dataclass(frozen=True)
class AssembleParams:
    checkpoint: str = key(
        "best",
        one_of({
            "best": "the lowest validation loss (the latest when the run had no validation)",
            "latest": "the last step trained",
        }),
        "which checkpoint of checkpoint/run1 becomes models/finetuned",
    )  # fmt: skip


# Generation's weight precisions (gpt2tune.model.precision prepares them).
PRECISIONS = {
    "float32": "the weights as trained",
    "bfloat16": "8-bit mantissa: half the bytes read per token",
    "int8": "weight-only, a float32 scale per output row: a quarter of the bytes",
}


@dataclass(frozen=True)
class Sampling:
    """How text is generated: one value passed through the API, the sample stage, the
    interactive loop and the sampler, so a new setting is one field here plus its use."""

    # Samples are generated together, as one batch: the memory check names the GiB for large
    # ones; beyond int32 the batch dimension itself would overflow.
    nsamples: int = key(2, int_in(1, _INT32), "samples per prompt, and unconditional samples")
    length: int = key(200, int_in(1, _MAX_LENGTH), "new tokens per sample")
    temperature: float = key(0.8, number_at_least(0, " (0 = greedy)"), "softmax temperature")
    # k is clamped to the vocabulary in the sampler; the bound is that of its int32 argument.
    top_k: int = key(
        40,
        Rule(f"an integer in 0..{_INT32} (0 = off)", lambda v: 0 <= v <= _INT32),
        "keep only the k likeliest tokens",
    )
    top_p: float = key(
        0.0,
        Rule("a number in [0, 1] (0 = off)", lambda v: 0 <= v <= 1),
        "nucleus sampling threshold",
    )
    seed: int = key(0, _SEED, "same seed = same text")
    # CTRL's rule on tokens already in the prompt or the output: positive logits divided by
    # it, negative ones multiplied. Below 1 favours repeats (allowed, as in transformers);
    # the bounds keep logits / penalty finite in float32 and are far past any useful value.
    repetition_penalty: float = key(
        1.0,
        Rule("a number in [0.01, 100] (1 = off)", lambda v: 0.01 <= v <= 100),
        "penalise tokens already seen (CTRL uses 1.2)",
    )
    # Whitespace is a fine stop ("\n\n"), so only "" (which would end every sample) is refused.
    stop: tuple[str, ...] = key(
        (),
        Rule("a list (may be empty) of non-empty strings", lambda v: all(map(len, v))),
        "a sample ends before the first of these strings",
    )
    # Applied once when a model is loaded for generation (gpt2tune.model.precision): the
    # files and training stay float32; the SavedModel export saves the prepared weights.
    # Quality and speed per precision: docs/generation.md.
    precision: str = key(
        "float32", one_of(PRECISIONS), "weights generation reads (batches on a CPU: float32)"
    )


@dataclass(frozen=True)
class SampleParams(Sampling):
    # Rows in one batch are prompts x nsamples: the memory check names the GiB for large ones.
    batch_size: int = key(8, int_in(1, _MAX_WINDOWS), "prompts generated together in one batch")
    prompts_from: str = key(
        "params",
        one_of({
            "params": "sample.prompts",
            "val": "the first validation records' prompts (data.prompt_field), with their "
            "reference completions",
        }),
        "where the prompts come from",
    )  # fmt: skip
    # An empty prompt would give the model no tokens to condition on.
    prompts: tuple[str, ...] = key(
        (KANT,),
        Rule("a list (may be empty) of non-empty strings", lambda v: all(map(_nonempty, v))),
        "each prompt is continued nsamples times",
    )
    # The memorization report (gpt2tune.data.index): GPT-2 small's own samples share runs of a
    # few tokens with any large text by chance; 32 verbatim tokens are copied, not chance.
    copied_min_tokens: int = key(
        32,
        int_in(1, _MAX_LENGTH),
        "copied_fraction counts runs of at least this many tokens found verbatim in train.npy",
    )


@dataclass(frozen=True)
class ServeParams:
    """What one request to the served MLflow Model may ask (gpt2tune.servable): the assemble
    stage stores these caps in the logged model, which refuses a request over one with a 400
    before any work. A model logged before the caps existed gets these defaults."""

    # GPT-2's context: beyond it the window slides, and every further token costs as much.
    max_length: int = key(
        1024, int_in(1, _MAX_LENGTH), "new tokens per sample one request may ask (length)"
    )
    # Rows are generated together: 64 rows of 124M after a full context are ~1 GiB of caches.
    max_samples: int = key(64, int_in(1, _INT32), "samples one request may ask: nsamples x prompts")
    max_prompt_tokens: int = key(
        1024, int_in(1, _MAX_LENGTH), "tokens a prompt may have (the model's context caps it too)"
    )


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = key(
        "sqlite:///mlflow.db",
        Rule(
            'a string ("" = MLFLOW_TRACKING_URI or the default) without user:password@ '
            "(set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead)",
            lambda v: not USERINFO.search(v),
        ),
        'sqlite:///file or http://host:port; "" = $MLFLOW_TRACKING_URI or MLflow\'s default',
    )
    experiment: str = key(
        "gpt2tune", Rule("a non-empty string", _nonempty), "MLflow experiment name"
    )
    registered_model: str = key(
        "gpt2tune",
        Rule(
            'a model name without "/" or ":" ("" = do not register)',
            lambda v: not v or (_nonempty(v) and not set(v) & set("/:")),
        ),
        'assemble registers each fine-tuned model as a new version of this name ("" = not)',
    )
    registered_alias: str = key(
        "candidate",
        Rule(
            'letters, digits, "_" or "-", not "latest" or v<number> ("" = no alias)',
            lambda v: bool(re.fullmatch(r"[\w-]*", v)) and not re.fullmatch(r"(?i)latest|v\d+", v),
        ),
        "alias on the version a workspace run registers (an experiment's: gpt2tune promote)",
    )


@dataclass(frozen=True)
class ExportParams:
    hf: bool = key(
        False,
        SWITCH,
        "export stage: write models/finetuned-hf for HF transformers "
        "(`gpt2tune export` always does)",
    )
    savedmodel: bool = key(
        False,
        SWITCH,
        "export stage: write models/finetuned-savedmodel for TF Serving "
        "(`--format savedmodel` always does)",
    )


@dataclass(frozen=True)
class Params:
    """All of params.yaml; ``Params()`` is the declared defaults (the repo's params.yaml)."""

    model: ModelParams = section(ModelParams, "pretrained GPT-2 to start from (stage: fetch_model)")
    data: DataParams = section(DataParams, "training text (stage: encode)")
    train: TrainParams = section(TrainParams, "fine-tuning loop (stage: train)")
    assemble: AssembleParams = section(
        AssembleParams, "the fine-tuned model folder (stage: assemble)"
    )
    sample: SampleParams = section(
        SampleParams, "text generation from the fine-tuned model (stage: sample)"
    )
    serve: ServeParams = section(
        ServeParams, "caps on one request to the served model (stored by stage: assemble)"
    )
    mlflow: MlflowParams = section(MlflowParams, "run tracking (every stage)")
    export: ExportParams = section(
        ExportParams, "Hugging Face and SavedModel exports (stage: export)"
    )

    def flat(self) -> dict[str, object]:
        """``{"train.steps": 1000, ...}`` for mlflow.log_params; prompts as a JSON list string."""
        out: dict[str, object] = {}
        for part in dataclasses.fields(self):
            for name, value in dataclasses.asdict(getattr(self, part.name)).items():
                out[f"{part.name}.{name}"] = (
                    json.dumps(list(value), ensure_ascii=False)
                    if isinstance(value, tuple)
                    else value
                )
        return out


# section -> dataclass, and section -> {key: type}: the dataclasses are the one list of names.
SECTIONS: dict[str, type] = types_of(Params)
_FIELDS: dict[str, dict[str, Any]] = {s: types_of(c) for s, c in SECTIONS.items()}


def reference() -> dict[str, tuple[str, list[Key]]]:
    """Per section, its help and its keys (name, type, default, allowed, help): for the docs
    and a command's --help."""
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(Params)}
    return {s: (helps[s], describe(cls)) for s, cls in SECTIONS.items()}


def default_raw() -> dict[str, dict[str, Any]]:
    """The declared defaults as params.yaml's parsed data would hold them (lists, not tuples)."""
    return {
        s: {k.name: list(k.default) if isinstance(k.default, tuple) else k.default for k in keys}
        for s, (_, keys) in reference().items()
    }


def validate_params(raw: object, source: str = "params.yaml") -> Params:
    """Check an already-parsed params.yaml and build Params; raise Gpt2tuneError on the first
    problem (unknown keys before missing ones: "did you mean" is the more useful message)."""
    params = Params(**check_sections(raw, Params, source))
    _check_combinations(params, source)
    return params


def _check_combinations(params: Params, source: str) -> None:
    """Keys that are fine alone but contradict each other."""
    t = params.train
    if t.batch_size * t.accumulate_gradients > _MAX_WINDOWS:
        raise Gpt2tuneError(
            f"{source}: train.batch_size x train.accumulate_gradients = "
            f"{t.batch_size} x {t.accumulate_gradients}: at most {_MAX_WINDOWS} windows per "
            "step (they are drawn at once); lower one of them"
        )
    if t.lora_rank and t.only_train_transformer_layers:
        raise Gpt2tuneError(
            f"{source}: train.only_train_transformer_layers = true: has no effect with "
            f"train.lora_rank = {t.lora_rank} (only the adapters train); set it to false"
        )
    if t.early_stopping_patience and not t.val_every:
        raise Gpt2tuneError(
            f"{source}: train.early_stopping_patience = {t.early_stopping_patience}: needs "
            "train.val_every > 0 (validation only at the end never stops early); set both"
        )
    for setting, cap in (("length", "max_length"), ("nsamples", "max_samples")):
        value, most = getattr(params.sample, setting), getattr(params.serve, cap)
        if value > most:  # the sample section's values are the served model's defaults
            raise Gpt2tuneError(
                f"{source}: sample.{setting} = {value}: over serve.{cap} = {most}, so the "
                "served model would refuse every request that keeps its defaults; raise "
                f"serve.{cap} or lower sample.{setting}"
            )
    d = params.data
    if d.prompt_field and d.format not in ("jsonl", "csv"):
        raise Gpt2tuneError(
            f"{source}: data.prompt_field = {d.prompt_field!r}: needs data.format jsonl or csv "
            f'(records with a prompt and a completion), not {d.format}; set it to "" or '
            "change data.format"
        )
    if d.prompt_field and d.prompt_field == d.field:
        raise Gpt2tuneError(
            f"{source}: data.prompt_field = {d.prompt_field!r}: the same as data.field (the "
            "completion); name the prompt's own column or key"
        )
    if params.sample.prompts_from == "val" and not d.prompt_field:
        raise Gpt2tuneError(
            f"{source}: sample.prompts_from = val: needs data.prompt_field (validation "
            "records with a prompt and a completion); set it, or sample.prompts_from: params"
        )
    if OPTIMIZERS[t.optimizer].weight_decay == "none" and t.weight_decay:
        # Only TF1's Adam takes no decay today; a second such optimizer would need its own why.
        raise Gpt2tuneError(
            f"{source}: train.weight_decay = {t.weight_decay}: has no effect with "
            f"train.optimizer = {t.optimizer} (TF1's Adam has no decay); use adamw, or set it to 0"
        )


def load_params(path: str | os.PathLike = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read, parse and validate the params file; every problem is one-line Gpt2tuneError.
    `overrides`: the command line's ``--set section.key=value``, checked after the file (so an
    error in the file names the file, one in an override names --set)."""
    raw = read_yaml(path)
    params = validate_params(raw, str(path))
    if overrides:
        params = validate_params(apply_overrides(raw, list(overrides), Params), "--set")
    return params
