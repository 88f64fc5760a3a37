"""The bodies of the `gpt2tune` subcommands, which are also the DVC stages (stages/*.py).

Each takes the validated params (params.yaml, or --params, with --set applied) and the parsed
command line (gpt2tune.cli), and runs from the repository root. TensorFlow is imported only
once the params are known to be good, so a typo costs a second, not TF's start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from gpt2tune.config.params import Params
from gpt2tune.paths import (
    ENCODED,
    FINETUNED,
    FINETUNED_HF,
    FINETUNED_SAVEDMODEL,
    MEMORIZATION,
    MODELS,
    RUN_DIR,
    SAMPLES,
    VAL_RECORDS,
    base_model,
)
from gpt2tune.stage import import_tensorflow_quietly, say

# Each export format: (its default folder, what it is for).
EXPORTS = {
    "hf": (FINETUNED_HF, "Hugging Face transformers"),
    "savedmodel": (FINETUNED_SAVEDMODEL, "TensorFlow SavedModel"),
}


def off_note(fmt: str) -> str:
    """The README.txt the export stage leaves in format `fmt`'s folder when export.<fmt> is
    false."""
    flag = "" if fmt == "hf" else f" --format {fmt}"
    return (
        f"export.{fmt} is false in params.yaml, so the export stage wrote no "
        f"{EXPORTS[fmt][1]} export here.\n"
        "Set it to true and run `dvc repro export`, or export by hand (always exports):\n"
        f"    gpt2tune export{flag}                      # {FINETUNED} into this folder\n"
        f"    gpt2tune export{flag} --out <new folder>   # kept by the next `dvc repro`\n"
    )


def fetch(p: Params, args: argparse.Namespace) -> None:
    """DVC stage fetch_model: download GPT-2 `model.name` from `model.base_url` into
    models/<name>/; resumes interrupted files and skips finished ones."""
    from gpt2tune.fetch.download import fetch_model

    if p.model.name.startswith("hf:"):  # a Hugging Face GPT-2 folder, converted to OpenAI's layout
        import_tensorflow_quietly()
        from gpt2tune.model.hf import fetch_hf

        folder = fetch_hf(p.model.name, MODELS)
    else:
        folder = fetch_model(p.model.name, p.model.base_url, MODELS)
    print(f"model {p.model.name} is in {folder}")


def encode(p: Params, args: argparse.Namespace) -> None:
    """DVC stage encode: data.path (+ data.val_path) -> data/encoded/{train,val}.npy +
    stats.json, with the tokenizer of models/<model.name>/ (see gpt2tune.data.encode)."""
    from gpt2tune.data.encode import encode_corpus
    from gpt2tune.errors import Gpt2tuneError
    from gpt2tune.model.encoder import load_encoder

    folder = base_model(p.model.name)
    if not (folder / "encoder.json").is_file():
        raise Gpt2tuneError(
            f"{folder.as_posix()}/encoder.json not found (model.name = {p.model.name}); "
            "run `dvc repro fetch_model` first"
        )
    enc = load_encoder(folder)
    s = encode_corpus(
        p.data.path,
        enc,
        ENCODED,
        encoding=p.data.encoding,
        data_format=p.data.format,
        field=p.data.field,
        val_fraction=p.data.val_fraction,
        val_path=p.data.val_path,
        max_line_mb=p.data.max_line_mb,
        follow_symlinks_outside=p.data.follow_symlinks_outside,
        prompt_field=p.data.prompt_field,
        window=p.train.n_ctx,
    )
    print(
        f"encoded {s['documents']} document(s), {s['bytes']:,} bytes -> {s['tokens']:,} tokens "
        f"(train {s['train_tokens']:,}, val {s['val_tokens']:,}) in {ENCODED}"
    )
    if s.get("truncated_prompts") or s.get("truncated_completions"):
        print(
            f"warning: {s['truncated_prompts']} record(s) longer than a window "
            f"(train.n_ctx = {s['window']} tokens) lost the start of their prompt, and "
            f"{s['truncated_completions']} the end of their completion (counted in "
            f"{ENCODED}/stats.json)",
            file=sys.stderr,
        )


# Over 60 lines: the stage in the order of its side effects (checks, lock, run, outputs);
# split further, that order would be spread over several functions.
def train(p: Params, args: argparse.Namespace) -> None:
    """DVC stage train: fine-tune models/<name> on data/encoded, tracked in one MLflow run.

    Writes checkpoint/run1/ (resumable), metrics/train.json (what two identical runs agree
    on), metrics/timing.json, loss.tsv, val_loss.tsv and loss.png, and the MLflow run id in
    metrics/mlflow_run.json for assemble and sample. Everything checkable is checked before
    the first change on disk. With `train.strategy: multi_worker` only the chief (worker 0)
    writes any of these.
    """
    import_tensorflow_quietly()

    from gpt2tune.data import encoded
    from gpt2tune.tracking import run as tracking
    from gpt2tune.tracking import sampletable
    from gpt2tune.tracking.datasets import token_sets
    from gpt2tune.train import distribute, loop, report, runstate
    from gpt2tune.train.signals import Stopped

    model, strategy, train_tokens, val_tokens, stats, base = _training_inputs(p)
    masks = {f"{split}_mask": encoded.load_mask(ENCODED, split) for split in encoded.SPLITS}
    fp = runstate.fingerprint(p.train, p.model.name, stats)
    if not distribute.is_chief(strategy):
        # A non-chief worker of a multi-worker run computes and all-reduces like the chief
        # but keeps nothing: checkpoints go to a temporary copy of the run folder (TF's
        # pattern), metrics and MLflow are the chief's alone.
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = distribute.worker_run_dir(RUN_DIR, tmp)
            loop.fit(model, train_tokens, val_tokens, p.train, run_dir,
                         strategy=strategy, run_fingerprint=fp, base=base, **masks)  # fmt: skip
        return
    with runstate.hold(RUN_DIR):  # one training per run folder; the first change on disk
        runstate.clean_leftovers(RUN_DIR)
        resumed = runstate.settle(RUN_DIR, fp, p.train, base)  # another run is kept aside
        run_id = resumed.get("mlflow_run_id") if resumed else None

        index = []  # the memorization index, built at the first sample

        def log_sample(text: str, step: int) -> None:
            from gpt2tune.data.index import corpus_index
            from gpt2tune.generation.samples import memorization

            tracking.log_text(text, f"samples/train/step_{step:06d}.txt")
            index[:] = index or [corpus_index(ENCODED, model.encoder.eot_token)]
            memo = memorization(index[0], model.encoder, text)
            rows = sampletable.training_rows(text, step, p.train, memo)
            tracking.log_table(rows, sampletable.TABLE)

        with tracking.training_run(p.mlflow, p.flat(), run_id, name=report.run_name(p),
                                   tags=report.run_description(p, stats),
                                   run_folder=RUN_DIR) as run:  # fmt: skip
            tracking.log_datasets(token_sets(ENCODED, stats, p.data.path, p.data.val_path))
            try:  # a complete run (killed after its last checkpoint) is reported, not retrained
                metrics, history = loop.fit(
                    model, train_tokens, val_tokens, p.train, RUN_DIR,
                    strategy=strategy,
                    run_fingerprint=fp,
                    log_metrics=tracking.log_metrics,
                    log_sample=log_sample,
                    log_tag=tracking.set_tag,
                    state_extra={"mlflow_run_id": run.info.run_id},
                    base=base,
                    **masks,
                )  # fmt: skip
            except Stopped:  # saved and resumable: killed, not failed (a NaN fails it)
                tracking.end_run("KILLED")
                raise
            tracking.log_history(history)  # steps a kill -9 kept from the run, if any
            metrics, timing = report.split_timing(metrics)
            chart = report.write_outputs(metrics, timing, history)
            report.log_final(metrics, timing, chart, tracking.log_metrics, tracking.log_file)
    print(json.dumps(metrics))


def _training_inputs(p: Params):
    """The model, strategy, token arrays, data stats and starting weights
    (runstate.starting_weights) of a training, every check that needs no change on disk done
    (fit repeats the cheap ones)."""
    from gpt2tune.data import encoded
    from gpt2tune.model import checkpoint
    from gpt2tune.train import distribute, loop, runstate

    stats = encoded.read_stats(ENCODED)
    # Ids are checked against the vocabulary they were encoded with, then the model's.
    train_tokens = encoded.load_tokens(ENCODED, "train")
    val_tokens = encoded.load_tokens(ENCODED, "val")
    strategy = distribute.make_strategy(p.train.strategy)
    with strategy.scope():  # variables live on every GPU when there are several
        model = checkpoint.load_model(base_model(p.model.name))
    n_vocab = model.hparams["n_vocab"]
    if n_vocab < stats["n_vocab"]:
        train_tokens = encoded.load_tokens(ENCODED, "train", n_vocab)
        val_tokens = encoded.load_tokens(ENCODED, "val", n_vocab)
    loop.check_fits(model, train_tokens, p.train, strategy.num_replicas_in_sync)
    base = runstate.starting_weights(p.train, model)  # reads and checks restore_from's weights
    return model, strategy, train_tokens, val_tokens, stats, base


def assemble(p: Params, args: argparse.Namespace) -> None:
    """DVC stage assemble: models/finetuned = trained weights + the base model's tokenizer
    files, an OpenAI-format folder, also logged to the training's MLflow run as an MLflow
    Model and registered (see gpt2tune.servable)."""
    say(f"assembling {FINETUNED} from {RUN_DIR} and {base_model(p.model.name)}...")
    import_tensorflow_quietly()

    from gpt2tune.model.checkpoint import assemble as assemble_folder
    from gpt2tune.tracking import run as tracking
    from gpt2tune.train.keeping import assembled_checkpoint
    from gpt2tune.train.runstate import load_state

    # Which weights: assemble.checkpoint, the best (the latest without validation) or latest.
    state = load_state(RUN_DIR)
    prefix, step, words = assembled_checkpoint(RUN_DIR, state, p.assemble.checkpoint)
    # LoRA adapters go back onto the weights they were trained on (train.restore_from's)
    trained_on = (state or {}).get("base")
    assemble_folder(base_model(p.model.name), RUN_DIR, FINETUNED, prefix, trained_on)
    with tracking.reopen_run(p.mlflow, params=p.flat()):
        tracking.set_tag("gpt2tune.assembled_step", str(step))
        tracking.set_tag("gpt2tune.assembled_checkpoint", p.assemble.checkpoint)
        tracking.log_model(
            FINETUNED, p.sample, p.mlflow.registered_model, p.mlflow.registered_alias, p.serve
        )
    print(f"assembled {FINETUNED} from {words}")


def sample(p: Params, args: argparse.Namespace) -> None:
    """DVC stage sample: unconditional samples and prompt completions from models/finetuned
    into samples/samples.json and samples.md (`--interactive`: the chat loop instead)."""
    import_tensorflow_quietly()

    from gpt2tune import load_model
    from gpt2tune.files import write_text_atomic
    from gpt2tune.generation import samples

    model = load_model(args.model)
    if args.interactive:
        samples.interactive(model, p.sample)
        return

    cfg, references = p.sample, None
    if p.sample.prompts_from == "val":  # the validation records' prompts, and their answers
        from gpt2tune.data.records import read_val_records

        cfg, references = samples.val_prompts(p.sample, read_val_records(VAL_RECORDS),
                                              VAL_RECORDS.as_posix())  # fmt: skip
    records = samples.sample_records(model, cfg, references)
    copied = _memorization_report(records, model, p.sample.copied_min_tokens)
    out = SAMPLES
    out.mkdir(exist_ok=True)
    write_text_atomic(
        out / "samples.json", json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    )
    write_text_atomic(out / "samples.md", samples.records_markdown(records, cfg))
    if copied:
        MEMORIZATION.parent.mkdir(exist_ok=True)
        metric = {"copied_fraction": copied["copied_fraction"]}  # the one DVC compares by
        write_text_atomic(MEMORIZATION, json.dumps(metric, indent=2) + "\n")

    from gpt2tune.tracking import run as tracking
    from gpt2tune.tracking import sampletable

    with tracking.reopen_run(p.mlflow, params=p.flat()):
        tracking.log_folder(out, "samples")
        rows = sampletable.sample_stage_rows(records, cfg, p.train.steps)
        tracking.log_table(rows, sampletable.TABLE)
        if copied:
            tracking.log_metrics(copied, rows["step"][0] if rows["step"] else 0)
    print(f"wrote {len(records)} samples to {out}/samples.json and {out}/samples.md")


def _memorization_report(records: list[dict], model, min_tokens: int) -> dict:
    """Add the memorization columns to the sample records (gpt2tune.data.index) and return
    metrics/memorization.json's values; {} when there is no data/encoded/train.npy to compare
    with (a model sampled outside the pipeline: said on stderr)."""
    from gpt2tune.data.index import corpus_index
    from gpt2tune.generation.samples import add_memorization

    if not (ENCODED / "train.npy").is_file():
        say(f"no {ENCODED}/train.npy here: the samples get no memorization report")
        return {}
    index = corpus_index(ENCODED, model.encoder.eot_token)
    return add_memorization(records, index, model.encoder, min_tokens)


def chat(p: Params, args: argparse.Namespace) -> None:
    """Type a context, get completions from --model, again (`stages/sample.py --interactive`)."""
    sample(p, argparse.Namespace(**vars(args), interactive=True))


def export(p: Params, args: argparse.Namespace) -> None:
    """DVC stage export: models/finetuned -> models/finetuned-hf, a Hugging Face
    `transformers` folder, and models/finetuned-savedmodel, a TensorFlow SavedModel
    (gpt2tune.generation.savedmodel). `export.hf` and `export.savedmodel` switch the stage
    script's two (with no --model/--out/--format, a switched-off one leaves only a note);
    `gpt2tune export [--format F]`, typed, always exports its one format (default hf).

    Either way the folder written must be new, empty or an earlier export of gpt2tune's
    (gpt2tune.model.hf.check_export_folder): nothing else in it is ever deleted. Under
    `dvc repro` it is always new: DVC removes the stage's outputs before running it.
    """
    from gpt2tune.model import hf

    if args.stage_script and not (args.model or args.out or args.format):
        todo = {fmt: getattr(p.export, fmt) for fmt in EXPORTS}  # the DVC stage
    else:
        todo = {args.format or "hf": True}
    outs = {fmt: Path(args.out or EXPORTS[fmt][0]) for fmt in todo}
    for out in outs.values():
        hf.check_export_folder(out)  # all of them before writing any, and before TensorFlow
    for fmt in (f for f, on in todo.items() if not on):
        hf.write_export_note(outs[fmt], off_note(fmt))
        print(f"export.{fmt} is false: nothing exported (note in {outs[fmt]}/README.txt)")
    if not any(todo.values()):
        return
    import_tensorflow_quietly()
    model = args.model or FINETUNED
    for fmt in (f for f, on in todo.items() if on):
        if fmt == "hf":
            hf.export_hf(model, outs[fmt], sampling=p.sample)
        else:
            from gpt2tune.generation.savedmodel import export_savedmodel

            export_savedmodel(model, outs[fmt], sampling=p.sample)
        print(f"exported {model} to {outs[fmt]} ({EXPORTS[fmt][1]})")


def evaluate(p: Params, args: argparse.Namespace) -> None:
    """Print (and with --mlflow, record as a new MLflow run) the loss and perplexity of
    --model on --data, as training's validation measures it (see gpt2tune.train.evaluate);
    `--data val` is the encode stage's validation tokens. Errors name --model and --data."""
    from gpt2tune.files import check_model_folder
    from gpt2tune.train.evaluate import evaluate_loss, text_tokens

    check_model_folder(args.model, "--model")
    tokens = text_tokens(args.data, args.model, p)  # a bad path or format fails before TF
    import_tensorflow_quietly()
    from gpt2tune import load_model

    model = load_model(args.model)
    print(f"evaluating {args.model} on {args.data} ({len(tokens):,} tokens)...", file=sys.stderr)
    from gpt2tune.data.encoded import load_mask
    from gpt2tune.paths import VALIDATION_DATA

    mask = load_mask(ENCODED, "val") if args.data == VALIDATION_DATA else None  # records'
    precision = getattr(args, "precision", "float32")
    result = evaluate_loss(model, tokens, p, mask=mask, precision=precision)
    print(f"loss {result['loss']:.6f}  perplexity {result['perplexity']:.4f}  "
          f"({result['windows']} windows, {result['tokens']:,} tokens predicted)")  # fmt: skip
    if args.mlflow:
        from gpt2tune.tracking import run as tracking

        params = {"model": args.model, "data": args.data, "precision": precision,
                  **p.flat()}  # fmt: skip
        name = f"evaluate {args.model} on {args.data}"
        with tracking.training_run(p.mlflow, params, record=False, name=name,
                                   kind="evaluate") as run:  # fmt: skip
            tracking.log_metrics({"eval_loss": result["loss"],
                                  "eval_perplexity": result["perplexity"]}, 0)  # fmt: skip
            print(f"logged to MLflow run {run.info.run_id}")


def score(p: Params, args: argparse.Namespace) -> None:
    """Print one JSON line per text: its tokens, total and mean log-probability and perplexity
    under --model (and with --tokens each token's), see gpt2tune.generation.score. The texts
    are the arguments, or --file's lines (a .jsonl file's --field)."""
    from gpt2tune.files import check_model_folder

    check_model_folder(args.model, "--model")
    texts = _score_texts(args)  # a bad file fails before TensorFlow's start-up
    import_tensorflow_quietly()
    from gpt2tune import load_model
    from gpt2tune.generation.score import score as score_texts

    results = score_texts(load_model(args.model), texts, tokens=args.tokens,
                          batch_size=args.batch_size)  # fmt: skip
    for r in results:
        print(json.dumps(r, ensure_ascii=False))


def _score_texts(args: argparse.Namespace) -> list[str]:
    """The texts of `gpt2tune score`: its arguments, or --file's non-empty lines (.jsonl:
    each line's --field), checked with one line naming the file, line and fix."""
    from gpt2tune.errors import Gpt2tuneError

    if bool(args.texts) == bool(args.file):
        raise Gpt2tuneError("gpt2tune score: give texts as arguments or --file PATH (one of them)")
    if args.batch_size < 1:
        raise Gpt2tuneError(f"--batch-size = {args.batch_size}: must be at least 1")
    if args.texts:
        return list(args.texts)
    try:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Gpt2tuneError(f"--file {args.file}: cannot read it as UTF-8 text ({e})") from None
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not args.file.endswith(".jsonl"):
            texts.append(line)
            continue
        try:
            value = json.loads(line)[args.field]
        except (ValueError, KeyError, TypeError, IndexError):
            value = None
        if not isinstance(value, str):
            raise Gpt2tuneError(
                f"--file {args.file} line {n}: not a JSON object with a string field "
                f"{args.field!r}; fix the line or give --field"
            )
        texts.append(value)
    if not texts:
        raise Gpt2tuneError(f"--file {args.file}: no text in it (empty lines are skipped)")
    return texts


def promote(p: Params, args: argparse.Namespace) -> None:
    """Move mlflow.registered_alias (@candidate) to the version of a DVC experiment, or to a
    version number: how an experiment run with `dvc exp run --temp/--queue`, which registers
    its model without moving the alias, becomes the served one."""
    from gpt2tune.tracking.client import promote as move_alias
    from gpt2tune.tracking.client import resolve_tracking_uri

    uri = resolve_tracking_uri(p.mlflow.tracking_uri)
    print(move_alias(uri, p.mlflow.registered_model, p.mlflow.registered_alias, args.target))


def replay(p: Params, args: argparse.Namespace) -> None:
    """Send what was kept offline (metrics/mlflow_offline) to the MLflow server."""
    from gpt2tune.tracking.run import replay_pending

    left = replay_pending(p.mlflow)
    print("all kept MLflow records are sent" if not left else f"{left} file(s) left")
