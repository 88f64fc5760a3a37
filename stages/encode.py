"""DVC stage encode: data.path (+ data.val_path) -> data/encoded/{train,val}.npy + stats.json.

The same as `gpt2tune encode`; the body is gpt2tune.commands.encode.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("encode"))
