"""Hugging Face interchange (gpt2tune.model.hf): an exported folder loads in transformers with no
conversion script and computes the same logits, its tokenizer gives gpt2tune's ids, and
export then import gives back the very same weights. Bad HF folders are refused in one line.

Needs the optional extra `pip install -e '.[hf]'` (transformers + CPU torch); skipped without.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from gpt2tune.errors import Gpt2tuneError  # noqa: E402
from gpt2tune.model import hf  # noqa: E402

TINY = {"n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
TEXT = "Human reason, in one sphere of its cognition, is called upon to consider questions."


def random_model(hp: dict, vocab_dir: Path, seed: int = 0):
    """A GPT2 whose every tensor, gains and biases included, is random and distinct, so a
    swapped or transposed tensor cannot go unnoticed."""
    from gpt2tune.model.encoder import load_encoder
    from gpt2tune.model.gpt2 import GPT2, variable_shapes

    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in variable_shapes(hp).items():
        base = 1.0 if name.endswith("/g") else 0.0
        scale = 0.1 if name.endswith(("/g", "/b")) else 0.02
        weights[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return GPT2(hp, weights, load_encoder(vocab_dir))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vocab_dir) -> tuple[Path, Path]:
    """(OpenAI-layout folder, its HF export) of a tiny random GPT-2 on the tiny vocabulary."""
    from gpt2tune.model.checkpoint import save_model
    from gpt2tune.model.encoder import load_encoder

    root = tmp_path_factory.mktemp("hf_tiny")
    hp = dict(TINY, n_vocab=load_encoder(tiny_vocab_dir).n_vocab)
    save_model(random_model(hp, tiny_vocab_dir), root / "openai")
    return root / "openai", hf.export_hf(root / "openai", root / "hf")


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def assert_same_logits(openai_dir: Path, hf_dir: Path, ids: list[int]) -> None:
    from gpt2tune import load_model

    ours = load_model(openai_dir)(np.array([ids], np.int32)).numpy()
    theirs = hf_logits(hf_dir, ids)
    assert theirs.shape == ours.shape == (1, len(ids), ours.shape[-1])
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


def test_tiny_export_loads_in_transformers_with_the_same_logits(tiny):
    from gpt2tune.model.encoder import load_encoder

    openai_dir, hf_dir = tiny
    assert sorted(p.name for p in hf_dir.iterdir()) == sorted(
        ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
        + ["tokenizer_config.json", "generation_config.json", hf.EXPORT_MARKER]
    )
    ids = load_encoder(openai_dir).encode(TEXT)
    assert 10 < len(ids) <= TINY["n_ctx"]
    assert_same_logits(openai_dir, hf_dir, ids)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok(TEXT)["input_ids"] == ids
    assert tok.eos_token_id == tok.bos_token_id == load_encoder(openai_dir).eot_token


def test_124m_shapes_give_the_same_logits(tmp_path, official_vocab_dir):
    """OpenAI's smallest release's shapes (random weights: no download), 8 tokens, batch 1."""
    from gpt2tune.model.checkpoint import save_model

    save_model(random_model(GPT2_124M, official_vocab_dir, seed=1), tmp_path / "openai")
    hf_dir = hf.export_hf(tmp_path / "openai", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["eos_token_id"]) == (
        50257,
        1024,
        50256,
    )
    assert_same_logits(tmp_path / "openai", hf_dir, [50256, 464, 2068, 7586, 21831, 18045, 625, 13])


def test_tokenizer_gives_gpt2tunes_ids_on_kant(tmp_path, official_vocab_dir, kant_path):
    from gpt2tune.model.checkpoint import save_model
    from gpt2tune.model.encoder import load_encoder

    hp = {"n_vocab": 50257, "n_ctx": 8, "n_embd": 4, "n_head": 1, "n_layer": 1}
    save_model(random_model(hp, official_vocab_dir), tmp_path / "openai")
    hf_dir = hf.export_hf(tmp_path / "openai", tmp_path / "hf")
    text = kant_path.read_text(encoding="utf-8")
    ours = load_encoder(official_vocab_dir).encode(text)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    theirs = tok(text, verbose=False)["input_ids"]  # verbose: no "longer than n_ctx" warning
    assert len(ours) > 250_000
    assert theirs == ours
    assert tok.decode(theirs[:2000]) == load_encoder(official_vocab_dir).decode(ours[:2000])


def test_export_then_import_gives_back_the_same_bytes(tiny, tmp_path):
    from gpt2tune import load_model

    openai_dir, hf_dir = tiny
    back = hf.import_hf(hf_dir, tmp_path / "back")
    a, b = load_model(openai_dir), load_model(back)
    assert a.hparams == b.hparams
    assert a.params.keys() == b.params.keys()
    for name, value in a.weights_numpy().items():
        other = b.params[name].numpy()
        assert other.dtype == value.dtype and other.tobytes() == value.tobytes(), name
    for f in ("encoder.json", "vocab.bpe", "hparams.json"):
        assert (back / f).read_bytes() == (openai_dir / f).read_bytes(), f


def test_model_name_hf_folder_converts_into_models(tiny, tmp_path, monkeypatch):
    """`model.name: hf:<folder>` lands as models/<model.name>, where every stage looks."""
    from gpt2tune import load_model

    _, hf_dir = tiny
    shutil.copytree(hf_dir, tmp_path / "distil")
    monkeypatch.chdir(tmp_path)
    out = hf.fetch_hf("hf:distil", "models")
    assert out == Path("models/hf:distil")
    assert load_model(out).hparams == load_model(tiny[0]).hparams


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_folder_saved_by_transformers_imports(tiny, tmp_path, dtype):
    """What save_pretrained writes (its own key order and metadata, only tokenizer.json in
    newer versions, bfloat16 if asked) imports to the weights transformers itself holds."""
    from gpt2tune import load_model

    openai_dir, hf_dir = tiny
    saved = tmp_path / "saved"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    model.save_pretrained(saved)
    transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(saved)
    for f in ("vocab.json", "merges.txt"):  # force the tokenizer.json path
        (saved / f).unlink(missing_ok=True)
    back = load_model(hf.import_hf(saved, tmp_path / "back"))
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for name, value in back.weights_numpy().items():
        expected = state[f"transformer.{hf.hf_name(name)}"].reshape(value.shape)
        np.testing.assert_array_equal(value, expected, err_msg=name)
    if dtype == "float32":  # bf16 rounds; float32 is exact
        for name, value in load_model(openai_dir).weights_numpy().items():
            np.testing.assert_array_equal(back.params[name].numpy(), value, err_msg=name)
    assert back.encoder.encode(TEXT) == load_model(openai_dir).encoder.encode(TEXT)


def test_a_sharded_checkpoint_imports(tiny, tmp_path):
    """Big models come as model-0000x-of-0000n.safetensors and an index naming them."""
    from gpt2tune import load_model

    openai_dir, hf_dir = tiny
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(hf_dir / f, tmp_path / "sharded" / f)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    back = load_model(hf.import_hf(tmp_path / "sharded", tmp_path / "back"))
    for name, value in load_model(openai_dir).weights_numpy().items():
        np.testing.assert_array_equal(back.params[name].numpy(), value, err_msg=name)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generation_config_carries_the_sample_settings(tiny, tmp_path, temperature):
    from gpt2tune.config.params import Sampling

    s = Sampling(length=17, temperature=temperature, top_k=0, top_p=0.9, repetition_penalty=1.3)
    out = hf.export_hf(tiny[0], tmp_path / "hf", sampling=s)
    g = transformers.GenerationConfig.from_pretrained(out)
    assert g.max_new_tokens == 17
    assert g.do_sample is (temperature > 0)
    assert g.repetition_penalty == 1.3
    if temperature:
        assert (g.temperature, g.top_k, g.top_p) == (0.7, 0, 0.9)


def test_export_greedy_continuation_matches_gpt2tune(tiny):
    from gpt2tune import load_model
    from gpt2tune.generation.sampler import generate_tokens

    openai_dir, hf_dir = tiny
    model = load_model(openai_dir)
    ids = model.encoder.encode("Human reason")
    ours = generate_tokens(model, ids, length=8, temperature=0.0, seed=0)[0].tolist()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    theirs = hf_model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=8, min_new_tokens=8
    )[0, len(ids) :].tolist()
    assert theirs == ours


# --- bad input: one line naming the file, nothing written --------------------------------


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(folder: Path, change) -> None:
    """Rewrite model.safetensors after `change` edits its dict of tensors in place."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def untied_head(tensors: dict) -> np.ndarray:
    return tensors["transformer.wte.weight"] + 1


def replace_with_bin(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def as_int8(tensors: dict) -> None:
    """What a quantizer without its scales leaves: every tensor int8 (here all 0)."""
    tensors.update({k: np.zeros(v.shape, np.int8) for k, v in tensors.items()})


def one_nan(tensors: dict) -> None:
    tensors["transformer.h.0.attn.c_attn.weight"][3, 5] = np.nan


def swap_last_merges(path: Path) -> None:
    """The last two lines of merges.txt swapped: each still a valid merge of the vocabulary."""
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    lines[-2], lines[-1] = lines[-1], lines[-2]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


BAD = {
    "no config": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "bad json": (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    "not gpt2": (
        lambda d: edit_json(d / "config.json", model_type="llama"),
        "config.json: model_type is 'llama', not 'gpt2'",
    ),
    "relu": (
        lambda d: edit_json(d / "config.json", activation_function="relu"),
        "config.json: activation_function = 'relu'",
    ),
    "shape": (
        lambda d: edit_json(d / "config.json", n_positions=64),
        "tensor wpe.weight has shape [32, 32] but config.json implies [64, 32]",
    ),
    "missing tensor": (
        lambda d: edit_tensors(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
        "tensor h.1.mlp.c_fc.bias is missing",
    ),
    "short tensor": (
        lambda d: edit_tensors(d, lambda t: t.update({"transformer.ln_f.bias": np.zeros(3)})),
        "tensor ln_f.bias has shape [3] but config.json implies [32]",
    ),
    "other head": (
        lambda d: edit_tensors(d, lambda t: t.update({"score.weight": np.zeros((2, 32))})),
        "tensor score.weight is not part of a GPT-2 language model",
    ),
    "untied": (
        lambda d: edit_tensors(d, lambda t: t.update({"lm_head.weight": untied_head(t)})),
        "lm_head.weight differs from transformer.wte.weight",
    ),
    "bin only": (
        replace_with_bin,
        "it has only pytorch_model.bin, which needs torch: save the model with save_pretrained",
    ),
    "truncated": (
        lambda d: truncate(d / "model.safetensors"),
        "model.safetensors is not a readable safetensors file",
    ),
    "no tokenizer": (lambda d: (d / "merges.txt").unlink(), "has no tokenizer"),
    "huge n_layer": (  # sized by config.json, this used to grow memory by gigabytes
        lambda d: edit_json(d / "config.json", n_layer=1_000_000_000),
        "config.json says n_layer = 1000000000 but the weights hold 2 layers (h.0 to h.1); "
        "set n_layer to 2",
    ),
    "n_head not dividing": (
        lambda d: edit_json(d / "config.json", n_head=3),
        "config.json: n_embd = 32 is not divisible by n_head = 3",
    ),
    "int8": (
        lambda d: edit_tensors(d, as_int8),
        "is I8, not a float type (quantized?); save the model in float32, float16 or bfloat16",
    ),
    "nan": (
        lambda d: edit_tensors(d, one_nan),
        "tensor h.0.attn.c_attn.weight holds 1 NaN or infinite value(s)",
    ),
    "reordered merges": (
        lambda d: swap_last_merges(d / "merges.txt"),
        "the merges are out of the vocabulary's order",
    ),
    "bad vocab": (
        lambda d: (d / "vocab.json").write_text('{"a": 0}'),
        "vocab.json lacks 255 of the 256 single-byte tokens",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_hf_folder_is_one_line_and_writes_nothing(tiny, tmp_path, case):
    break_it, expected = BAD[case]
    folder = tmp_path / "hf"
    shutil.copytree(tiny[1], folder)
    break_it(folder)
    with pytest.raises(Gpt2tuneError) as e:
        hf.import_hf(folder, tmp_path / "out")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert str(folder) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_bad_names_and_missing_folders_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is tried, and fails, without network
    cases = {
        "hf:../elsewhere": "expected hf:<folder or hub id>, without '..'",
        "hf:./missing": "Hugging Face folder ./missing does not exist",
        "hf:someone/gpt2-not-here": "could not download someone/gpt2-not-here",
    }
    for name, expected in cases.items():
        with pytest.raises(Gpt2tuneError) as e:
            hf.fetch_hf(name, "models")
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(Gpt2tuneError, match="model folder nothing does not exist"):
        hf.export_hf("nothing", "out")
    with pytest.raises(Gpt2tuneError, match="would replace the model itself"):
        hf.export_hf("nothing", "./nothing")
    assert not any(tmp_path.iterdir())


def test_export_replaces_an_earlier_export_whole_and_nothing_else(tiny, tmp_path):
    out = tmp_path / "hf"
    hf.export_hf(tiny[0], out)
    hf.export_hf(tiny[0], out)  # over its own: replaced
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp or old folder left
    assert os.path.getsize(out / "model.safetensors") > 0
    (out / "stale.bin").write_bytes(b"the user's")
    with pytest.raises(Gpt2tuneError, match="stale.bin in it was not written by gpt2tune"):
        hf.export_hf(tiny[0], out)
    assert (out / "stale.bin").read_bytes() == b"the user's"
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "link").symlink_to(out)
    for target, kind in (("file", "a file"), ("link", "a symbolic link")):
        with pytest.raises(Gpt2tuneError, match=f"it is {kind}; choose a new or empty folder"):
            hf.export_hf(tiny[0], tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "link"]
