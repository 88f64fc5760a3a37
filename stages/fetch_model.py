"""DVC stage fetch_model: download GPT-2 `model.name` from `model.base_url` into models/<name>/.

The same as `gpt2tune fetch`; the body is gpt2tune.commands.fetch.
"""

import sys

from gpt2tune.cli import stage

if __name__ == "__main__":
    sys.exit(stage("fetch"))
