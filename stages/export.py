"""DVC stage export: models/finetuned -> models/finetuned-hf, a Hugging Face `transformers`
folder (config.json, model.safetensors, tokenizer and generation_config.json from `sample`).

    python stages/export.py                        # the stage: runs when export.hf is true
    python stages/export.py --model models/124M --out models/124M-hf   # any folder, now

With `export.hf: false` (the default) the stage only leaves a note in models/finetuned-hf,
since DVC needs its output to exist. See gpt2tune.hf for the format.
"""

import argparse
import sys
from pathlib import Path

from gpt2tune.stage import import_tensorflow_quietly, run_stage

OFF_NOTE = (
    "export.hf is false in params.yaml, so no Hugging Face export was written here.\n"
    "Set it to true and run `dvc repro export`, or export by hand:\n"
    "    python stages/export.py --model models/finetuned\n"
)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="Export a GPT-2 model folder for transformers.")
    ap.add_argument("--model", help="OpenAI-layout model folder (default models/finetuned)")
    ap.add_argument("--out", help="folder to write (default models/finetuned-hf)")
    args = ap.parse_args(argv)

    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    enabled = p.export.hf
    out = Path(args.out or "models/finetuned-hf")
    if not (enabled or args.model or args.out):
        from gpt2tune.files import write_text_atomic

        if out.is_dir() and (out / "model.safetensors").exists():
            import shutil

            shutil.rmtree(out)  # an export from earlier settings must not pass for current
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "README.txt", OFF_NOTE)
        print(f"export.hf is false: nothing exported (note in {out}/README.txt)")
        return
    import_tensorflow_quietly()

    from gpt2tune.hf import export_hf

    export_hf(args.model or "models/finetuned", out, sampling=p.sample)
    print(f"exported {args.model or 'models/finetuned'} to {out} (Hugging Face transformers)")


if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:]))
