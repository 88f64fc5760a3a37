"""The `gpt2tune` command (also `python -m gpt2tune`): one subcommand per pipeline step.

    gpt2tune fetch | encode | train | assemble | sample | export   # the DVC stages, by hand
    gpt2tune chat [--model DIR]                                     # type a context, get text
    gpt2tune evaluate --model DIR --data PATH|val [--mlflow]        # loss and perplexity
    gpt2tune score --model DIR TEXT... | --file PATH [--tokens]      # log-probability per text
    gpt2tune promote EXPERIMENT|VERSION                             # move @candidate to it
    gpt2tune replay                                                 # send offline MLflow records

Each subcommand is the very code of its DVC stage: ``stages/<stage>.py`` is a thin call of
:func:`stage` (so ``dvc repro`` and the command cannot drift apart), and its bodies live in
:mod:`gpt2tune.commands`. ``--set section.key=value`` overrides params.yaml for one run
(checked like the file), ``--params PATH`` reads another file; ``--help`` lists every key the
command reads, with its default and meaning, rendered from the declarations in config/params.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from gpt2tune.paths import (
    ENCODED,
    FINETUNED,
    FINETUNED_HF,
    FINETUNED_SAVEDMODEL,
    RUN_DIR,
    SAMPLES,
    VALIDATION_DATA,
)
from gpt2tune.stage import run_stage


@dataclass(frozen=True)
class Command:
    summary: str  # one line, for `gpt2tune --help`
    sections: tuple[str, ...]  # the params.yaml sections it reads (a test checks dvc.yaml's)
    stage: str = ""  # its DVC stage (stages/<stage>.py), if it is one
    options: Callable[[argparse.ArgumentParser], None] = lambda ap: None


def _model_option(default: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--model", default=default, help=f"model folder (default {default})")

    return add


def _sample_options(ap: argparse.ArgumentParser) -> None:
    _model_option(str(FINETUNED))(ap)
    ap.add_argument("--interactive", action="store_true", help="the same as `gpt2tune chat`")


def _export_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help=f"OpenAI-layout model folder (default {FINETUNED})")
    ap.add_argument(
        "--format",
        choices=("hf", "savedmodel"),
        help="hf: a Hugging Face transformers folder (the default); savedmodel: a TensorFlow "
        "SavedModel with generate and score signatures",
    )
    ap.add_argument(
        "--out",
        help=f"folder to write (default {FINETUNED_HF}, or {FINETUNED_SAVEDMODEL} for savedmodel)",
    )


def _evaluate_options(ap: argparse.ArgumentParser) -> None:
    from gpt2tune.config.params import PRECISIONS

    ap.add_argument("--model", required=True, help="model folder (OpenAI layout)")
    ap.add_argument(
        "--data",
        required=True,
        help=f"text file, folder or glob (in data.format); `{VALIDATION_DATA}`: {ENCODED}/val.npy, "
        "the tokens training validates on",
    )
    ap.add_argument("--mlflow", action="store_true", help="log the result as a new MLflow run")
    ap.add_argument("--precision", default="float32", choices=tuple(PRECISIONS),
                    help="weights as generation reads them at this sample.precision")  # fmt: skip


def _score_options(ap: argparse.ArgumentParser) -> None:
    _model_option(str(FINETUNED))(ap)
    ap.add_argument("texts", nargs="*", metavar="TEXT", help="texts to score")
    ap.add_argument(
        "--file",
        help="texts to score, one per line; a .jsonl file: one JSON object per line, its --field",
    )
    ap.add_argument("--field", default="text", help="the .jsonl field holding the text (text)")
    ap.add_argument("--tokens", action="store_true", help="also each token's log-probability")
    ap.add_argument(
        "--batch-size", type=int, default=8, help="context windows per forward pass (8)"
    )


def _promote_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("target", help="a DVC experiment's name (`dvc exp show`) or a version number")


# The one list of commands, and which params.yaml sections each reads.
COMMANDS: dict[str, Command] = {
    "fetch": Command("download GPT-2 model.name into models/<name>", ("model",), "fetch_model"),
    "encode": Command(
        f"tokenize data.path into {ENCODED} (train.npy, val.npy)",
        ("model", "data", "train"),  # train.n_ctx: the window records are cut to
        "encode",
    ),
    "train": Command(
        f"fine-tune models/<name> on {ENCODED} into {RUN_DIR}, tracked in MLflow",
        ("model", "train", "mlflow"),
        "train",
    ),
    "assemble": Command(
        f"{RUN_DIR} -> {FINETUNED}, logged and registered in MLflow",
        ("model", "assemble", "sample", "serve", "mlflow"),
        "assemble",
    ),
    "sample": Command(
        f"{SAMPLES}/samples.json and samples.md from {FINETUNED}",
        ("sample", "mlflow"),
        "sample",
        _sample_options,
    ),
    "chat": Command(
        "type a context, get completions, again (Ctrl-D to quit)",
        ("sample",),
        options=_model_option(str(FINETUNED)),
    ),
    "evaluate": Command(
        "loss and perplexity of a model folder on a text, with training's validation windows",
        ("data", "train", "mlflow"),
        options=_evaluate_options,
    ),
    "score": Command(
        "log-probability and perplexity of texts under a model folder, as JSON lines",
        (),
        options=_score_options,
    ),
    "export": Command(
        f"{FINETUNED} -> {FINETUNED_HF} for Hugging Face transformers (or a SavedModel)",
        ("export", "sample"),
        "export",
        _export_options,
    ),
    "promote": Command(
        "move mlflow.registered_alias to a DVC experiment's registered version (or a number)",
        ("mlflow",),
        options=_promote_options,
    ),
    "replay": Command("send the MLflow records kept offline to the server", ("mlflow",)),
}


class _Parser(argparse.ArgumentParser):
    sections: tuple[str, ...] = ()  # the params.yaml sections its command reads, for --help
    params_path = "params.yaml"  # the file --help shows the values of (--params before --help)

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def format_help(self) -> str:
        if self.sections:  # rendered when asked for: reading params.yaml costs nothing otherwise
            self.epilog = _params_help(self.sections, self.params_path)
        return super().format_help()


class _ParamsPath(argparse.Action):
    """--params PATH, also noted on the parser, so that a --help after it shows PATH's values."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        parser.params_path = values


def _params_help(sections: tuple[str, ...], path: str) -> str:
    """The keys of `sections` with their defaults and, where they differ, `path`'s values. A
    params file that is missing or broken still gets help, with a note saying why its values
    are not shown."""
    from pathlib import Path

    from gpt2tune.config.docs import render_help
    from gpt2tune.config.params import load_params
    from gpt2tune.errors import first_line

    if not Path(path).exists():
        return render_help(sections, note=f"no {path} here: the defaults are shown")
    try:
        current, note = load_params(path), f"values in {path} are shown where they differ"
    except Exception as e:  # noqa: BLE001  # whatever is wrong with the file, --help works
        current, note = None, f"{path} not read ({first_line(e)}): only the defaults are shown"
    return render_help(sections, current, path, note)


def _add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--params",
        default="params.yaml",
        metavar="PATH",
        action=_ParamsPath,
        help="params file (default params.yaml)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key for this run only, e.g. --set train.steps=10 (repeatable; "
        "not tracked by DVC: use `dvc exp run -S` for experiments)",
    )


def _configure(ap: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Command `name`'s options, its --help ending with every key its sections declare."""
    cmd = COMMANDS[name]
    ap.description, ap.sections = cmd.summary, cmd.sections
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_common(ap)
    cmd.options(ap)
    return ap


def main_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="gpt2tune",
        description="Fine-tune GPT-2 on your own text: the steps of the DVC pipeline as commands.",
        epilog="`gpt2tune <command> --help` lists every parameter the command reads.",
    )
    sub = ap.add_subparsers(
        dest="command", required=True, metavar="<command>", parser_class=_Parser
    )
    for name, cmd in COMMANDS.items():
        _configure(sub.add_parser(name, help=cmd.summary), name)
    return ap


def dispatch(name: str, args: argparse.Namespace) -> None:
    """Load the params (file, then --set) and run command `name`'s body."""
    from pathlib import Path

    from gpt2tune import commands
    from gpt2tune.config.params import Params, load_params

    # A command that reads no section (score) also runs outside a project, on the defaults.
    bare = not COMMANDS[name].sections and not Path(args.params).exists() and not args.overrides
    p = Params() if bare else load_params(args.params, args.overrides)
    getattr(commands, name)(p, args)


def main(argv: list[str] | None = None) -> int:
    """The console script `gpt2tune`."""
    args = main_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.stage_script = False
    return run_stage(dispatch, args.command, args)


def stage(name: str, argv: list[str] | None = None) -> int:
    """What stages/<stage>.py runs: command `name`, its arguments from the command line."""
    ap = _configure(_Parser(prog=f"stages/{COMMANDS[name].stage}.py"), name)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    args.stage_script = True  # run by `dvc repro` or by hand: switches such as export.hf apply
    return run_stage(dispatch, name, args)
