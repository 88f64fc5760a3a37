"""The one exception type gpt2tune raises for anything a user can fix.

Stages catch it (gpt2tune.stage.run_stage) and print its message as a single line with a
non-zero exit, so every message must name the file, parameter or value at fault and say what
would fix it.
"""


class Gpt2tuneError(Exception):
    """A user-facing error: bad input, missing file, unreachable server, ..."""
