"""Convert between OpenAI's GPT-2 folder layout and the Hugging Face `transformers` one.

    export_hf("models/finetuned", "models/finetuned-hf")   # -> from_pretrained() loads it
    import_hf("distilgpt2", "models/hf:distilgpt2")         # an HF GPT-2 folder -> OpenAI's layout
    gpt2tune export                                           # the first, from the command line

Both are renamings, not computations: HF's GPT-2 keeps OpenAI's Conv1D weights ([in, out],
minus OpenAI's leading 1), ties `lm_head` to `wte`, and its tokenizer files are OpenAI's
encoder.json and vocab.bpe under the names vocab.json and merges.txt. So export then import
gives back the same bytes, and gpt2tune itself needs neither torch nor transformers: tensors
go through `safetensors.numpy`. The key names and config fields follow transformers'
`models/gpt2/modeling_gpt2.py` and `configuration_gpt2.py`.

An export replaces its folder whole (a temporary sibling renamed in), so it goes only into a
new or empty folder or over an earlier export, whose .gpt2tune-export.json lists the files it
wrote: never over a folder holding anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (TensorFlow's dependency; lets numpy, so safetensors, read bf16)
import numpy as np

from gpt2tune.errors import Gpt2tuneError, first_line
from gpt2tune.files import display_path
from gpt2tune.model.encoder import EOT
from gpt2tune.paths import HF_SOURCES, MODELS

HF_PREFIX = "hf:"  # model.name: hf:<folder or hub id>
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
EXPORT_MARKER = ".gpt2tune-export.json"
# HF buffers that are not weights (the causal mask of older checkpoints) and the tied head.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|lm_head\.weight)$")
# The floating-point types a GPT-2 checkpoint is saved in (safetensors' names); converted to
# float32. Integer or 8-bit types are quantized weights: their scales are elsewhere.
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")
# Config fields whose value must be the one GPT-2 (and gpt2tune's forward pass) uses; a
# missing field means transformers' default, which is that value.
_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # the same tanh approximation
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}


def hf_name(name: str) -> str:
    """OpenAI's tensor name -> HF's: `model/h0/attn/c_attn/w` -> `h.0.attn.c_attn.weight`."""
    parts = name.split("/")[1:]  # drop "model"
    if parts[0] in ("wte", "wpe"):
        return f"{parts[0]}.weight"
    if parts[0].startswith("h"):
        parts[0:1] = ["h", parts[0][1:]]
    parts[-1] = "bias" if parts[-1] == "b" else "weight"
    return ".".join(parts)


def to_hf_tensors(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's state dict (what save_pretrained writes: no lm_head, it is tied)."""
    out = {}
    for name, value in weights.items():
        value = np.asarray(value, np.float32)
        if value.ndim == 3:  # OpenAI's Conv1D weight [1, in, out]; HF's is [in, out]
            value = value[0]
        out[f"transformer.{hf_name(name)}"] = np.ascontiguousarray(value)
    return out


def from_hf_tensors(
    tensors: Mapping[str, np.ndarray], hparams: Mapping[str, int], source: str
) -> dict[str, np.ndarray]:
    """OpenAI-named float32 weights from an HF GPT-2 state dict (with or without the
    `transformer.` prefix), checked against `hparams`."""
    from gpt2tune.model.gpt2 import variable_shapes

    check_layers({k: v.shape for k, v in tensors.items()}, hparams, source)
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    shapes = variable_shapes(hparams)
    wanted = {hf_name(n): n for n in shapes}
    extra = sorted(k for k in plain if k not in wanted and not _IGNORED.search(k))
    if extra:
        raise Gpt2tuneError(
            f"{source}: tensor {extra[0]} is not part of a GPT-2 language model "
            f"({len(extra)} such); export the GPT2LMHeadModel itself"
        )
    weights = {}
    for key, name in wanted.items():
        if key not in plain:
            raise Gpt2tuneError(f"{source}: tensor {key} is missing; is it a GPT-2 checkpoint?")
        value = plain[key]
        shape = shapes[name][1:] if len(shapes[name]) == 3 else shapes[name]
        if tuple(value.shape) != shape:
            raise Gpt2tuneError(
                f"{source}: tensor {key} has shape {list(value.shape)} but config.json "
                f"implies {list(shape)}; the config and the weights do not belong together"
            )
        weights[name] = np.asarray(value, np.float32).reshape(shapes[name])
        if not np.isfinite(weights[name]).all():
            bad = int(np.size(weights[name]) - np.isfinite(weights[name]).sum())
            raise Gpt2tuneError(
                f"{source}: tensor {key} holds {bad} NaN or infinite value(s); the checkpoint "
                "is damaged (or diverged in training): use one saved before that"
            )
    head = plain.get("lm_head.weight")
    if head is not None and not np.array_equal(np.asarray(head, np.float32), weights["model/wte"]):
        raise Gpt2tuneError(
            f"{source}: lm_head.weight differs from transformer.wte.weight; GPT-2 ties them, "
            "so an untied head cannot be converted"
        )
    return weights


def check_layers(shapes: Mapping[str, Any], hparams: Mapping[str, int], source: str) -> None:
    """Refuse a config.json whose n_layer is not the number of blocks the weights hold (h.0 to
    h.<n-1>), before anything is sized by it: a wrong one would allocate n_layer blocks."""
    layers = {int(m[1]) for k in shapes if (m := _LAYER.match(k))}
    n = max(layers) + 1 if layers else 0
    if n != hparams["n_layer"]:
        held = f"{n} layers (h.0 to h.{n - 1})" if n else "no layers"
        raise Gpt2tuneError(
            f"{source}: config.json says n_layer = {hparams['n_layer']} but the weights hold "
            f"{held}; set n_layer to {n} in config.json, or use the weights it belongs to"
        )


def check_dtypes(dtypes: Mapping[str, str], source: str) -> None:
    """Refuse tensors that are not floating point (safetensors' dtype names), before reading
    them: integer tensors are quantized weights, whose scales gpt2tune does not read."""
    for key, dtype in dtypes.items():
        if dtype not in _FLOAT_DTYPES and not _IGNORED.search(key):
            raise Gpt2tuneError(
                f"{source}: tensor {key} is {dtype}, not a float type (quantized?); save the "
                "model in float32, float16 or bfloat16 (e.g. dequantize it, then "
                "save_pretrained)"
            )


def hf_config(hparams: Mapping[str, int], eot: int) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel with these hyperparameters (fields left out, such as
    the dropout rates, take transformers' defaults, which are GPT-2's)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": hparams["n_vocab"],
        "n_positions": hparams["n_ctx"],
        "n_embd": hparams["n_embd"],
        "n_layer": hparams["n_layer"],
        "n_head": hparams["n_head"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
    }


def hparams_from_config(config: Mapping[str, Any], path: Path) -> dict[str, int]:
    """gpt2tune's five hyperparameters from an HF config.json, refusing what GPT-2 is not."""
    from gpt2tune.model.gpt2 import check_hparams

    if config.get("model_type") != "gpt2":
        raise Gpt2tuneError(
            f"{path}: model_type is {config.get('model_type')!r}, not 'gpt2'; only GPT-2 "
            "architectures convert"
        )
    for key, allowed in _REQUIRED.items():
        if key in config and config[key] not in allowed:
            raise Gpt2tuneError(
                f"{path}: {key} = {config[key]!r}, but GPT-2 has {allowed[0]!r}; this variant "
                "cannot run as OpenAI's GPT-2"
            )
    n_embd = config.get("n_embd", 768)
    if config.get("n_inner") not in (None, 4 * n_embd):
        raise Gpt2tuneError(f"{path}: n_inner = {config['n_inner']} but GPT-2 has 4 * n_embd")
    hp = {
        "n_vocab": config.get("vocab_size", 50257),
        "n_ctx": config.get("n_positions", 1024),
        "n_embd": n_embd,
        "n_head": config.get("n_head", 12),
        "n_layer": config.get("n_layer", 12),
    }
    return check_hparams(hp, source=str(path))


def generation_config(sampling: Any, eot: int) -> dict[str, Any]:
    """generation_config.json from gpt2tune's `sample` settings (a Sampling)."""
    out: dict[str, Any] = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    out["max_new_tokens"] = sampling.length
    out["do_sample"] = sampling.temperature > 0  # gpt2tune's temperature 0 is greedy
    if out["do_sample"]:
        out["temperature"] = sampling.temperature
        out["top_k"] = sampling.top_k  # 0 is off in both; unset would be HF's default of 50
        out["top_p"] = sampling.top_p or 1.0  # off: gpt2tune says 0, HF says 1
    # The same CTRL rule over prompt + output, greedy or not. `stop` has no equivalent that
    # works alone: HF's stop_strings needs the tokenizer passed to every generate() call.
    out["repetition_penalty"] = sampling.repetition_penalty
    return out


def export_hf(
    model_folder: str | os.PathLike, out_folder: str | os.PathLike, sampling: Any = None
) -> Path:
    """Write `model_folder` (OpenAI's layout) as a transformers GPT-2 folder, atomically.

    `out_folder` must be new, empty, or an earlier export (see check_export_folder).
    `sampling` (a gpt2tune Sampling, e.g. params' `sample` section) becomes
    generation_config.json; None takes Sampling's defaults.
    """
    from gpt2tune.config.params import Sampling
    from gpt2tune.model.checkpoint import load_model

    out = Path(out_folder)
    if out.resolve() == Path(model_folder).resolve():
        raise Gpt2tuneError(f"export to {out_folder} would replace the model itself; pick --out")
    check_export_folder(out)
    model = load_model(model_folder)
    eot = model.encoder.eot_token
    tensors = to_hf_tensors(model.weights_numpy())
    tokenizer = {  # the rest (no added <|endoftext|> in front, errors="replace") is the default
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model.hparams["n_ctx"],
        **{k: EOT for k in ("bos_token", "eos_token", "unk_token")},
        "add_prefix_space": False,
    }
    jsons = {
        "config.json": hf_config(model.hparams, eot),
        "generation_config.json": generation_config(sampling or Sampling(), eot),
        "tokenizer_config.json": tokenizer,
    }
    with export_folder(out) as tmp:
        _save_safetensors(tensors, tmp / WEIGHTS)
        for name, content in jsons.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        (tmp / "vocab.json").write_bytes(model.encoder.files["encoder.json"])
        (tmp / "merges.txt").write_bytes(model.encoder.files["vocab.bpe"])
    return out


def write_export_note(out_folder: str | os.PathLike, text: str) -> Path:
    """`out_folder` as a folder holding only README.txt with `text` (and the marker): what the
    export stage leaves when it is switched off. The same rules as export_hf's."""
    out = Path(out_folder)
    check_export_folder(out)
    with export_folder(out) as tmp:
        (tmp / "README.txt").write_text(text, encoding="utf-8")
    return out


def check_export_folder(out_folder: str | os.PathLike) -> None:
    """Refuse, in one line, to export over anything but a new or empty folder, or an earlier
    export of gpt2tune's: a folder whose EXPORT_MARKER lists every file in it.

    An export replaces the whole folder, so anything else there (a user's files, `models`,
    the project root, a model card added to an export) would be deleted.
    """
    out = Path(out_folder)
    if not out.exists() and not out.is_symlink():
        return
    shown = display_path(out)
    shown = str(Path.cwd()) if shown == "." else shown  # "." says little in a message
    fix = "choose a new or empty folder (--out)"
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise Gpt2tuneError(f"cannot export to {shown}: it is {kind}; {fix}")
    entries = sorted(p.name for p in out.iterdir())
    written = _export_files(out)
    if written is None:
        if entries:
            held = ", ".join(entries[:3]) + (f" ({len(entries)} in all)" if entries[3:] else "")
            raise Gpt2tuneError(
                f"cannot export to {shown}: it holds {held} and is not an earlier gpt2tune "
                f"export (it has no {EXPORT_MARKER}); {fix}"
            )
        return
    foreign = _not_written(out, written)
    if foreign:
        raise Gpt2tuneError(
            f"cannot export to {shown}: it is an earlier export, but {foreign[0]} in it was not "
            f"written by gpt2tune and would be deleted; move it out, or {fix}"
        )


def _export_files(folder: Path) -> set[str] | None:
    """The names an earlier export wrote into `folder` (its marker included), as its marker
    lists them; None when `folder` has no readable marker, i.e. is not recognisably one."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_bytes())
        files = marker["files"] if marker.get("written_by") == "gpt2tune export" else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {*files, EXPORT_MARKER}


def _not_written(out: Path, written: set[str]) -> list[str]:
    """What in `out` an export did not write: files and folders (a SavedModel's variables/
    and assets/) not in `written`, where the marker lists them by path relative to `out`,
    folders with a trailing "/"; links and anything else."""
    foreign = []
    for top, dirs, files in os.walk(out):
        for name in sorted(dirs + files):
            path = Path(top) / name
            rel = path.relative_to(out).as_posix()
            listed = rel in written if path.is_file() else path.is_dir() and rel + "/" in written
            if path.is_symlink() or not listed:
                foreign.append(rel)
    return foreign


@contextlib.contextmanager
def export_folder(out: Path) -> Iterator[Path]:
    """_atomic_folder, the marker listing what was written added last; the folder is checked
    once more just before the swap (an export of a big model takes a while)."""
    with _atomic_folder(out) as tmp:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() + ("/" if p.is_dir() else "")
                       for p in tmp.rglob("*"))  # fmt: skip
        marker = {"written_by": "gpt2tune export", "files": files}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        check_export_folder(out)


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors.numpy.save_file, its I/O errors (a full disk) raised as the OSError they
    are: the Rust library reports them as SafetensorError("... (os error 28)")."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})  # pt: what HF reads
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def import_hf(hf_folder: str | os.PathLike, out_folder: str | os.PathLike) -> Path:
    """Convert a transformers GPT-2 folder (config.json, model.safetensors, vocab.json,
    merges.txt) into an OpenAI-layout model folder that every gpt2tune stage reads."""
    from gpt2tune.model.checkpoint import save_model
    from gpt2tune.model.gpt2 import GPT2

    folder = Path(hf_folder)
    if not folder.is_dir():
        raise Gpt2tuneError(f"Hugging Face model folder {folder} does not exist")
    config_path = folder / "config.json"
    hparams = hparams_from_config(_read_json(config_path), config_path)
    encoder = _load_tokenizer(folder)
    weights = from_hf_tensors(_read_safetensors(folder, hparams), hparams, f"{folder}")
    return save_model(GPT2(hparams, weights, encoder), out_folder)


def fetch_hf(name: str, models_dir: str | os.PathLike = MODELS) -> Path:
    """`model.name: hf:<folder>` -> `<models_dir>/<name>` in OpenAI's layout.

    <folder> is a local HF GPT-2 folder, or a hub id such as `distilgpt2` when no such folder
    exists and `huggingface_hub` is installed (and the hub reachable). The result keeps the
    name verbatim (`models/hf:distilgpt2`), so every stage finds it as models/<model.name>.
    """
    spec = name.removeprefix(HF_PREFIX)
    if not name.startswith(HF_PREFIX) or not spec or ".." in Path(spec).parts:
        raise Gpt2tuneError(f"model.name {name!r}: expected hf:<folder or hub id>, without '..'")
    source = Path(spec)
    if not source.is_dir():
        source = _download(spec)
    elif not source.resolve().is_relative_to(HF_SOURCES.resolve()):
        print(f"note: DVC does not watch {spec}: after changing it, run `dvc repro -f "
              f"fetch_model` (a folder under {HF_SOURCES}/ is converted again by itself)",
              file=sys.stderr)  # fmt: skip
    return import_hf(source, Path(models_dir) / name)


def _download(repo_id: str) -> Path:
    if not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", repo_id):  # user/name, or a legacy name
        raise Gpt2tuneError(
            f"Hugging Face folder {repo_id} does not exist (relative to the project root)"
        )
    hint = f"download it (hf download {repo_id} --local-dir {repo_id})"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Gpt2tuneError(
            f"no folder {repo_id} here, and huggingface_hub is not installed to fetch it as a "
            f"hub id; {hint}"
        ) from None
    files = ["*.json", "*.safetensors", "merges.txt"]  # config, weights, index, tokenizer
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except Exception as e:  # any of the hub client's many errors: network, 404, auth
        raise Gpt2tuneError(f"could not download {repo_id} ({first_line(e)}); {hint}") from None


def _load_tokenizer(folder: Path) -> Any:
    """The Encoder of vocab.json + merges.txt (OpenAI's two files renamed), or of the BPE
    inside tokenizer.json, which is all that newer transformers versions save."""
    from gpt2tune.model.encoder import Encoder

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        raw, names = (vocab.read_bytes(), merges.read_bytes()), (vocab.name, merges.name)
    elif (folder / "tokenizer.json").is_file():
        raw, names = _bpe_files(folder / "tokenizer.json"), ("tokenizer.json",) * 2
    else:
        raise Gpt2tuneError(
            f"{folder} has no tokenizer: it needs vocab.json and merges.txt, or tokenizer.json; "
            "save them with tokenizer.save_pretrained(folder)"
        )
    try:
        encoder = Encoder.from_files(*raw, source=str(folder))
    except Gpt2tuneError as e:  # the Encoder names OpenAI's files; name the ones here
        msg = str(e).replace("encoder.json", names[0]).replace("vocab.bpe", names[1])
        raise Gpt2tuneError(msg) from None
    if wrong := encoder.merge_out_of_order():
        n, token, token_id, before = wrong
        raise Gpt2tuneError(
            f"{folder / names[1]}: merge {n} makes {token!r}, id {token_id} in {names[0]}, "
            f"after a merge that made id {before}: the merges are out of the vocabulary's "
            f"order (it would tokenize unlike the model's training); use the model's own "
            f"{names[1]}"
        )
    return encoder


def _bpe_files(path: Path) -> tuple[bytes, bytes]:
    """encoder.json and vocab.bpe rebuilt from a tokenizers-library tokenizer.json."""
    data = _read_json(path)
    bpe = data.get("model")
    vocab = bpe.get("vocab") if isinstance(bpe, dict) and bpe.get("type") == "BPE" else None
    if not isinstance(vocab, dict):
        raise Gpt2tuneError(f"{path}: its model is not a byte-level BPE like GPT-2's")
    ids = dict(vocab)
    for added in data.get("added_tokens") or []:  # some savers keep <|endoftext|> only here
        if isinstance(added, dict) and added.get("content") == EOT:
            ids.setdefault(EOT, added.get("id"))
    lines = [m if isinstance(m, str) else " ".join(map(str, m)) for m in bpe.get("merges") or []]
    vocab_bpe = "\n".join(["#version: 0.2", *lines, ""])
    return json.dumps(ids, ensure_ascii=False).encode(), vocab_bpe.encode()


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a one-line error saying what is wrong with the file."""
    try:
        data = json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except FileNotFoundError:
        msg = "is missing: save the model with save_pretrained(folder)"
    except (ValueError, OSError) as e:  # a UnicodeDecodeError is a ValueError
        msg = f"is not valid JSON ({first_line(e)})"
    else:
        if isinstance(data, dict):
            return data
        msg = f"must hold a JSON object, not {type(data).__name__}"
    raise Gpt2tuneError(f"{path} {msg}")


def _read_safetensors(folder: Path, hparams: Mapping[str, int]) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json names;
    their dtypes and number of layers checked from the files' headers before any is read."""
    index = folder / SHARD_INDEX
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise Gpt2tuneError(f"{index} has no weight_map; save the model again")
        files = [folder / str(f) for f in sorted(set(weight_map.values()))]
    else:
        others = sorted(f.name for f in folder.glob("*") if f.suffix in (".bin", ".h5", ".msgpack"))
        fix = "save the model with save_pretrained(folder)"
        if others:  # PyTorch pickles (and TF/Flax files) need their framework to read
            fix = f"it has only {', '.join(others)}, which needs torch: {fix} in transformers"
        raise Gpt2tuneError(f"{folder / WEIGHTS} is missing; {fix}")
    headers: dict[str, tuple[str, list[int]]] = {}
    for f in files:
        with _opened(f) as st:
            for key in st.keys():
                piece = st.get_slice(key)
                headers[key] = (piece.get_dtype(), piece.get_shape())
    check_dtypes({k: dtype for k, (dtype, _) in headers.items()}, str(folder))
    check_layers({k: shape for k, (_, shape) in headers.items()}, hparams, str(folder))
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        with _opened(f) as st:
            tensors.update({key: st.get_tensor(key) for key in st.keys()})
    return tensors


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """safetensors' reader of `path`; a damaged file, on opening or reading, is one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as st:
            yield st
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise Gpt2tuneError(
            f"{path} is not a readable safetensors file ({first_line(e)}); save it again"
        ) from None


@contextlib.contextmanager
def _atomic_folder(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out`; on success it replaces `out` by renames, on any
    failure it is deleted and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    except OSError as e:
        raise Gpt2tuneError(
            f"could not write {out}: {e.strerror or e}; check free disk space and permissions "
            f"(what was at {out} is unchanged)"
        ) from None
    finally:
        if old.exists() and not out.exists():  # the second rename failed: put the old one back
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
