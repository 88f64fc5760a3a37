"""DVC stage encode: data.path (+ data.val_path) -> data/encoded/{train,val}.npy + stats.json.

Reads params.yaml (data.*, model.name) from the working directory and the tokenizer from
models/<model.name>/ (written by the fetch_model stage); see gpt2tune.dataset for the format
and the validation split. Run from the repository root: ``python stages/encode.py``.
"""

import sys

from gpt2tune.stage import run_stage


def main() -> None:
    from pathlib import Path

    from gpt2tune.dataset import encode_corpus
    from gpt2tune.encoder import load_encoder
    from gpt2tune.errors import Gpt2tuneError
    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    folder = Path("models") / p.model.name
    if not (folder / "encoder.json").is_file():
        raise Gpt2tuneError(
            f"{folder.as_posix()}/encoder.json not found (model.name = {p.model.name}); "
            "run `dvc repro fetch_model` first"
        )
    enc = load_encoder(folder)
    s = encode_corpus(
        p.data.path,
        enc,
        "data/encoded",
        encoding=p.data.encoding,
        data_format=p.data.format,
        field=p.data.field,
        val_fraction=p.data.val_fraction,
        val_path=p.data.val_path,
    )
    print(
        f"encoded {s['documents']} document(s), {s['bytes']:,} bytes -> {s['tokens']:,} tokens "
        f"(train {s['train_tokens']:,}, val {s['val_tokens']:,}) in data/encoded"
    )


if __name__ == "__main__":
    sys.exit(run_stage(main))
