"""DVC stage sample: unconditional samples and prompt completions from models/finetuned.

    python stages/sample.py                  # writes samples/samples.json and samples.md
    python stages/sample.py --interactive    # the same as `gpt2tune chat`

The same as `gpt2tune sample`; the body is gpt2tune.commands.sample.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("sample"))
