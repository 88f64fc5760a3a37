"""`python -m gpt2tune`: the `gpt2tune` command (see gpt2tune.cli)."""

import sys

from gpt2tune.cli import main

if __name__ == "__main__":  # importing the module alone (the import test) runs nothing
    sys.exit(main())
