"""DVC stage assemble: models/finetuned = trained weights + the base model's tokenizer files.

The same as `gpt2tune assemble`; the body is gpt2tune.commands.assemble.
"""

import sys

<<<<<<< HEAD
from gpt2tune.stage import import_tensorflow_quietly, run_stage

OUT = "models/finetuned"


def main() -> None:
    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    import_tensorflow_quietly()

    from gpt2tune import tracking
    from gpt2tune.checkpoint import assemble

    assemble(f"models/{p.model.name}", "checkpoint/run1", OUT)
    with tracking.reopen_run(p.mlflow):
        tracking.log_model(OUT, p.sample, p.mlflow.registered_model, p.mlflow.registered_alias)
    print(f"assembled {OUT}")

=======
from gpt2tune.cli import stage
>>>>>>> p2-cli

if __name__ == "__main__":
    sys.exit(stage("assemble"))
