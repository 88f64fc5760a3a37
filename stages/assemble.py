"""DVC stage assemble: models/finetuned = trained weights + the base model's tokenizer files.

Which weights: `assemble.checkpoint` (gpt2tune.keeping): the best checkpoint of
checkpoint/run1 (the latest when the run had no validation loss) or the latest; the step is
printed and tagged on the MLflow run as gpt2tune.assembled_step.

The result is an ordinary OpenAI-format model folder (what the notebooks built by hand),
also logged to the training's MLflow run as an MLflow Model and registered (see
gpt2tune.servable).
"""

import sys
from pathlib import Path

from gpt2tune.stage import import_tensorflow_quietly, run_stage

OUT = "models/finetuned"


def main() -> None:
    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    import_tensorflow_quietly()

    from gpt2tune import tracking
    from gpt2tune.checkpoint import assemble
    from gpt2tune.keeping import assembled_checkpoint
    from gpt2tune.runstate import load_state
    from gpt2tune.servable import log_and_register

    run_dir = Path("checkpoint/run1")
    prefix, step, words = assembled_checkpoint(run_dir, load_state(run_dir), p.assemble.checkpoint)
    assemble(f"models/{p.model.name}", run_dir, OUT, prefix)
    with tracking.reopen_run(p.mlflow):
        tracking.set_tag("gpt2tune.assembled_step", str(step))
        tracking.set_tag("gpt2tune.assembled_checkpoint", p.assemble.checkpoint)
        log_and_register(OUT, p.sample, p.mlflow.registered_model, p.mlflow.registered_alias)
    print(f"assembled {OUT} from {words}")


if __name__ == "__main__":
    sys.exit(run_stage(main))
