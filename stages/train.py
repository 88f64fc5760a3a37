"""DVC stage train: fine-tune models/<name> on data/encoded, tracked in one MLflow run.

The same as `gpt2tune train`; the body is gpt2tune.commands.train.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("train"))
