"""Fault injection for tests: SIGKILL a stage at an exact point of its work.

With this folder on PYTHONPATH, Python imports this module at start-up. If
GPT2TUNE_KILL_AT="<script>:<function>:<text>:<n>" is set and the process runs <script>
(e.g. stages/assemble.py), the n-th call of os.<function> (rename or replace) whose
arguments contain <text> kills the process with SIGKILL just before it would have
happened -- as `kill -9` or an OOM kill at the worst moment would. Other processes (DVC
itself, git) are left alone.
"""

import os
import signal
import sys


def _install(spec: str) -> None:
    script, func, text, nth = spec.split(":")
    if not sys.argv or not sys.argv[0].replace("\\", "/").endswith(script):
        return
    real = getattr(os, func)
    seen = [0]

    def wrapper(*args, **kwargs):
        if any(text in os.fspath(a) for a in args if isinstance(a, (str, os.PathLike))):
            seen[0] += 1
            if seen[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, func, wrapper)


if os.environ.get("GPT2TUNE_KILL_AT"):
    _install(os.environ["GPT2TUNE_KILL_AT"])
