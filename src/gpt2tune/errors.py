"""The one exception type gpt2tune raises for anything a user can fix.

Stages catch it and print its message as a single line with a non-zero exit, so every
message must name the file, parameter or value at fault and say what would fix it.
"""


class Gpt2tuneError(Exception):
    """A user-facing error: bad input, missing file, unreachable server, ..."""


def run_stage(main, *args, **kwargs) -> int:
    """Run a stage's main(): a Gpt2tuneError becomes one line on stderr and exit status 1.

    Ctrl-C exits with 130 and no traceback; outputs are written by temp-and-rename, so an
    interrupted stage leaves the previous outputs intact.
    """
    import sys

    try:
        main(*args, **kwargs)
    except Gpt2tuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
