"""DVC stage assemble: models/finetuned = trained weights + the base model's tokenizer files.

The result is an ordinary OpenAI-format model folder (what the notebooks built by hand),
also logged to the training's MLflow run as an MLflow Model and registered (see
gpt2tune.servable).
"""

import sys

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


if __name__ == "__main__":
    sys.exit(run_stage(main))
