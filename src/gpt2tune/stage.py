"""What every stage script in stages/ runs through: the stage runner, which turns a
Gpt2tuneError into one line and exit status 1, and a TensorFlow import without the start-up
chatter that would bury the stage's own output."""

from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings

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


# TensorFlow's C++ log lines, printed while running (not at import), that are known to say
# nothing a user can act on: oneDNN's "supports DT_INT32 only on platforms with AVX-512",
# logged when the first compiled function runs, on AVX-512 machines too (the shared EPYC has
# AVX-512), and the op falls back to Eigen's kernel; Grappler's "Error in PredictCost()" is
# its cost model lacking an op, after which it optimizes anyway. Matched whole, from the log prefix
# (E1231 12:00:00.000000 pid file.cc:line]), so every other line, errors included, passes.
NATIVE_NOISE = (
    r"[EW]\d{4} [\d:.]+ +\d+ (util\.cc:\d+\] oneDNN supports DT_\w+ only on platforms with "
    r"AVX-512|op_level_cost_estimator\.cc:\d+\] Error in PredictCost\(\))"
)
# The filter process: stderr lines in, the same lines out less the noise, until EOF (when the
# stage has exited: so a dying stage's last lines, a C++ CHECK failure's too, still come out).
# Ctrl-C and SIGTERM are the stage's to handle; the filter outlives them to pass on its words.
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
noise, out = re.compile(sys.argv[1].encode()), sys.stdout.buffer
for line in sys.stdin.buffer:
    if not noise.match(line):
        out.write(line)
        out.flush()
"""
_filter: int | None = None  # the filter's pid


def filter_native_noise() -> None:
    """Route file descriptor 2, where TensorFlow's C++ logs, through a small process that drops
    the NATIVE_NOISE lines (once per process; not with GPT2TUNE_VERBOSE_TF=1). Python's own
    sys.stderr keeps writing to the real stderr directly, so progress bars stay live and a
    terminal is still seen as one."""
    global _filter
    if _filter is not None or os.name != "posix" or os.environ.get("GPT2TUNE_VERBOSE_TF") == "1":
        return
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    try:  # spawned, not a Popen: nothing here waits for it, it ends after the stage does
        _filter = os.posix_spawn(
            sys.executable, [sys.executable, "-I", "-S", "-c", _FILTER, NATIVE_NOISE], os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, read, 0), (os.POSIX_SPAWN_DUP2, real, 1),
                          (os.POSIX_SPAWN_DUP2, real, 2)],
        )  # fmt: skip
    except OSError:  # no process to spare: the noise is shown, nothing else changes
        for fd in (real, read, write):
            os.close(fd)
        return
    os.close(read)
    if _is_fd2(sys.stderr):
        sys.stderr = io.TextIOWrapper(
            open(real, "wb", buffering=0, closefd=False), encoding=sys.stderr.encoding,
            errors="backslashreplace", line_buffering=True, write_through=True,
        )  # fmt: skip
    os.dup2(write, 2)
    os.close(write)


def _is_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a notebook's or a test's capture
        return False


def run_stage(main, *args, **kwargs) -> int:
    """Run a stage's main(): a Gpt2tuneError becomes one line on stderr and exit status 1.

    Ctrl-C exits with 130 and no traceback (a training stopped by SIGTERM with 143, as a
    shell reports it); outputs are written by temp-and-rename, so an interrupted stage leaves
    the previous outputs intact. Off a terminal (a pipe, a log, `dvc queue logs`) MLflow's
    own artifact progress bars are turned off, as gpt2tune's are (see `quiet_progress`), and
    TensorFlow's harmless C++ log lines are left out (see `filter_native_noise`).
    """
    quiet_progress()
    filter_native_noise()
    try:
        main(*args, **kwargs)
    except Gpt2tuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


# MLflow draws a tqdm bar for every artifact upload and download (log_model, log_artifacts):
# on a terminal it is progress, in a log a line of "Downloading artifacts: 100%|█████|".
MLFLOW_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def quiet_progress() -> None:
    """Turn MLflow's artifact progress bars off unless stderr is a terminal (tqdm's rule for
    gpt2tune's own bars); a value the user set in the environment is kept. In a notebook
    kernel without ipywidgets, importing `tqdm.auto` (MLflow does) warns "IProgress not
    found": gpt2tune's bars are plain text there, so the warning is dropped."""
    if not sys.stderr.isatty():
        os.environ.setdefault(MLFLOW_PROGRESS_BAR, "false")
    warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")


def say(line: str) -> None:
    """A progress line on stderr, only on a terminal: where a step takes minutes before any
    bar starts (validating, assembling, sampling at 124M on a CPU). Pipes and logs stay quiet,
    so a failing stage's stderr is its one error line."""
    if sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)
