"""DVC stage export: models/finetuned -> models/finetuned-hf for Hugging Face transformers.

    python stages/export.py --model models/124M --out models/124M-hf   # any folder, now

The same as `gpt2tune export`, except that with `export.hf: false` and neither --model nor
--out it writes only a note (README.txt); the body is gpt2tune.commands.export.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("export"))
