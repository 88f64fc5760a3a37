"""DVC stage assemble: models/finetuned = trained weights + the base model's tokenizer files.

The same as `gpt2tune assemble`; the body is gpt2tune.commands.assemble.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("assemble"))
