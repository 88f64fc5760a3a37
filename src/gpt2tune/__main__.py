"""`python -m gpt2tune`: the `gpt2tune` command (see gpt2tune.cli)."""

import sys

from gpt2tune.cli import main

if __name__ == "__main__":  # importing the module alone (tests/test_imports.py) runs nothing
    sys.exit(main())
