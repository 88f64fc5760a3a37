"""DVC stage fetch_model: download GPT-2 `model.name` from `model.base_url` into models/<name>/.

Resumes interrupted files and skips finished ones, so rerunning it is cheap.
"""

import sys

from gpt2tune.stage import import_tensorflow_quietly, run_stage


def main() -> None:
    from gpt2tune.download import fetch_model
    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    if p.model.name.startswith("hf:"):  # a Hugging Face GPT-2 folder, converted to OpenAI's layout
        import_tensorflow_quietly()
        from gpt2tune.hf import fetch_hf

        folder = fetch_hf(p.model.name, "models")
    else:
        folder = fetch_model(p.model.name, p.model.base_url, "models")
    print(f"model {p.model.name} is in {folder}")


if __name__ == "__main__":
    sys.exit(run_stage(main))
