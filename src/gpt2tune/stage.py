"""What every stage script in stages/ runs through: the stage runner, which turns a
Gpt2tuneError into one line and exit status 1, and a TensorFlow import without the start-up
chatter that would bury the stage's own output."""

from __future__ import annotations

import os
import sys
import tempfile

from gpt2tune.errors import Gpt2tuneError


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (without Keras, see `_import_tensorflow`) and probe its devices with
    stderr captured.

    TensorFlow 2.21 writes start-up chatter from C++ before its logging is configured
    (oneDNN notes, "Could not find cuda drivers", a cuInit error on machines without a GPU),
    which TF_CPP_MIN_LOG_LEVEL does not silence and which buries a stage's own output. The
    chatter is shown after all if the import fails, or with GPT2TUNE_VERBOSE_TF=1.
    """
    if "tensorflow" in sys.modules:
        return
    if os.environ.get("GPT2TUNE_VERBOSE_TF") == "1":
        _import_tensorflow()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            _import_tensorflow().config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _import_tensorflow():
    """`import tensorflow`, less the Keras it loads eagerly (its optimizers, and through Keras
    scikit-learn when installed, as MLflow installs it): half of the import's 5 s on a CPU,
    for code gpt2tune never calls. TensorFlow catches the ImportError; Keras imports normally
    afterwards (`tf.keras` is a lazy loader) for whoever wants it."""
    if "keras" in sys.modules:
        import tensorflow as tf

        return tf
    sys.modules["keras"] = None  # type: ignore[assignment]  # import keras -> ImportError
    try:
        import tensorflow as tf
    finally:
        del sys.modules["keras"]
    return tf


def run_stage(main, *args, **kwargs) -> int:
    """Run a stage's main(): a Gpt2tuneError becomes one line on stderr and exit status 1.

    Ctrl-C exits with 130 and no traceback (a training stopped by SIGTERM with 143, as a
    shell reports it); outputs are written by temp-and-rename, so an interrupted stage leaves
    the previous outputs intact.
    """
    try:
        main(*args, **kwargs)
    except Gpt2tuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


def say(line: str) -> None:
    """A progress line on stderr, only on a terminal: where a step takes minutes before any
    bar starts (validating, assembling, sampling at 124M on a CPU). Pipes and logs stay quiet,
    so a failing stage's stderr is its one error line."""
    if sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)
