"""The one exception type gpt2tune raises for anything a user can fix.

Stages catch it (gpt2tune.stage.run_stage) and print its message as a single line with a
non-zero exit, so every message must name the file, parameter or value at fault and say what
would fix it.
"""

from __future__ import annotations

import re


class Gpt2tuneError(Exception):
    """A user-facing error: bad input, missing file, unreachable server, ..."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception, to quote inside one of ours: TensorFlow's
    "{{function_node ...}} <message> [Op:SaveV2]" wrapping removed, at most `limit` characters;
    the exception's type where it has no text."""
    text = getattr(e, "message", None) or str(e)
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", text).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
