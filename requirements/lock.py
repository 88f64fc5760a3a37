"""Print the lock of the environment that runs it: every installed distribution as
`name==version`, for requirements/lock.txt (see docs/tests.md#installs-that-keep-working).

Run by `.ci/run --latest` after the whole suite passed in a venv of the newest releases
pyproject.toml allows, so the lock is always a set the tests passed with. pip-tools and uv
are not installed on the project's machines, so this is a freeze; unlike `pip freeze` it
writes a local file's wheel (`x @ file:///...`) as its version, so pip can use the file as a
constraints file (`-c`), which refuses links. Left out: gpt2tune itself, and pip, setuptools
and wheel (the venv's own tools, as `pip freeze` leaves them out). A local version label is
dropped: `torch==2.13.0` allows the `2.13.0+cpu` wheel and PyPI's `2.13.0` alike.
"""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata

SKIP = {"gpt2tune", "pip", "setuptools", "wheel"}


def lock_lines() -> list[str]:
    """`name==version` of every distribution installed here but SKIP, sorted by name."""
    pins = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()  # PEP 503's form
        if name not in SKIP:
            pins[name] = dist.version.split("+")[0]
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def main() -> None:
    python = ".".join(platform.python_version_tuple()[:2])
    print(f"# The versions the whole test suite passed with, on Python {python} "
          f"({platform.system()} {platform.machine()}).")  # fmt: skip
    print("# Made by `.ci/run --latest` (requirements/lock.py); use it with")
    print("#   pip install -c requirements/lock.txt -e '.[dev,hf]'")
    print("\n".join(lock_lines()))


if __name__ == "__main__":
    sys.exit(main())
