"""DVC stage export: models/finetuned -> models/finetuned-hf for Hugging Face transformers and
models/finetuned-savedmodel, a TensorFlow SavedModel (TF Serving, Vertex AI).

    python stages/export.py --model models/124M --out models/124M-hf   # any folder, now

The same as `gpt2tune export`, except that with none of --model, --out and --format it writes
each export its switch (`export.hf`, `export.savedmodel`) turns on, and only a note
(README.txt) in the other's folder; the body is gpt2tune.commands.export.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("export"))
