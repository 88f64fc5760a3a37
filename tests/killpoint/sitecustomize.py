"""Fault injection for tests: SIGKILL (or hold) a stage at an exact point of its work.

With this folder on PYTHONPATH, Python imports this module at start-up. If
GPT2TUNE_KILL_AT="<script>:<function>:<text>:<n>" is set and the process runs <script>
(e.g. stages/assemble.py), the n-th call of os.<function> (rename or replace) whose
arguments contain <text> kills the process with SIGKILL just before it would have
happened -- as `kill -9` or an OOM kill at the worst moment would. With a fifth field,
"...:<n>:<path>", the process instead creates <path>.held and waits there until <path>
exists (at most 5 minutes), then goes on: a stage held in mid-work as long as a test needs.
Other processes (DVC itself, git) are left alone.
"""

import os
import signal
import sys
import time


def _install(spec: str) -> None:
    script, func, text, nth, *hold = spec.split(":", 4)
    if not sys.argv or not sys.argv[0].replace("\\", "/").endswith(script):
        return
    real = getattr(os, func)
    seen = [0]

    def wrapper(*args, **kwargs):
        if any(text in os.fspath(a) for a in args if isinstance(a, (str, os.PathLike))):
            seen[0] += 1
            if seen[0] == int(nth):
                if not hold:
                    os.kill(os.getpid(), signal.SIGKILL)
                open(hold[0] + ".held", "w").close()
                deadline = time.monotonic() + 300
                while not os.path.exists(hold[0]) and time.monotonic() < deadline:
                    time.sleep(0.05)
        return real(*args, **kwargs)

    setattr(os, func, wrapper)


if os.environ.get("GPT2TUNE_KILL_AT"):
    _install(os.environ["GPT2TUNE_KILL_AT"])
