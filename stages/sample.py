"""DVC stage sample: unconditional samples and prompt completions from models/finetuned.

    python stages/sample.py                  # writes samples/samples.json and samples.md
    python stages/sample.py --interactive    # type a context, get a completion, again
    python stages/sample.py --interactive --model models/124M

Settings come from the `sample` section of params.yaml.
"""

import argparse
import json
import sys
from pathlib import Path

from gpt2tune.stage import import_tensorflow_quietly, run_stage


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="Generate text with a GPT-2 model folder.")
    ap.add_argument("--interactive", action="store_true", help="prompt for contexts in a loop")
    ap.add_argument("--model", default="models/finetuned", help="model folder to sample from")
    args = ap.parse_args(argv)

    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    import_tensorflow_quietly()

    from gpt2tune import load_model, sample
    from gpt2tune.files import write_text_atomic

    model = load_model(args.model)
    if args.interactive:
        sample.interactive(model, p.sample)
        return

    records = sample.sample_records(model, p.sample)
    out = Path("samples")
    out.mkdir(exist_ok=True)
    write_text_atomic(
        out / "samples.json", json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    )
    write_text_atomic(out / "samples.md", sample.records_markdown(records, p.sample))

    from gpt2tune import sampletable, tracking

    with tracking.reopen_run(p.mlflow):
        tracking.log_folder(out, "samples")
        rows = sampletable.sample_stage_rows(records, p.sample, p.train.steps)
        tracking.log_table(rows, sampletable.TABLE)
    print(f"wrote {len(records)} samples to {out}/samples.json and {out}/samples.md")


if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:]))
