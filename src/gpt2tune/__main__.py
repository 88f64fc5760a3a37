"""`python -m gpt2tune`: the `gpt2tune` command (see gpt2tune.cli)."""

import sys

from gpt2tune.cli import main

sys.exit(main())
