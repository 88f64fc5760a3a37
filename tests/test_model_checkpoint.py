"""OpenAI-format model folders: read what a TF1 Saver wrote, write what a TF1 Saver restores."""

import json
import shutil

import numpy as np
import pytest
from helpers.models import run_tf1

import gpt2tune
from gpt2tune import Gpt2tuneError
from gpt2tune.model.gpt2 import variable_shapes

HP = {"n_vocab": 0, "n_ctx": 16, "n_embd": 32, "n_head": 2, "n_layer": 2}


@pytest.fixture(scope="module")
def hp(tiny_vocab_dir):
    return dict(HP, n_vocab=gpt2tune.load_encoder(tiny_vocab_dir).n_vocab)


@pytest.fixture(scope="module")
def saver_written(tmp_path_factory, tiny_vocab_dir, hp):
    """A folder laid out like the official release, its checkpoint written by a TF1 Saver."""
    folder = tmp_path_factory.mktemp("official_like")
    rng = np.random.default_rng(0)
    values = {n: rng.normal(size=s).astype(np.float32) for n, s in variable_shapes(hp).items()}
    np.savez(folder.parent / "values.npz", **values)
    run_tf1("save", folder, folder.parent / "values.npz", hp)
    (folder / "hparams.json").write_text(json.dumps(hp))
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copy(tiny_vocab_dir / f, folder / f)
    return folder, values


def test_loads_a_tf1_saver_checkpoint(saver_written, hp):
    folder, values = saver_written
    assert (folder / "model.ckpt.meta").exists()  # a real Saver wrote it
    m = gpt2tune.load_model(folder)
    assert m.hparams == hp
    for name, value in values.items():
        np.testing.assert_array_equal(m.params[name].numpy(), value)


def test_save_then_load_is_exact(saver_written, tmp_path):
    folder, _ = saver_written
    m = gpt2tune.load_model(folder)
    out = tmp_path / "copy"
    gpt2tune.save_model(m, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
        "model.ckpt.index", "vocab.bpe",
    ]  # fmt: skip
    assert 'model_checkpoint_path: "model.ckpt"' in (out / "checkpoint").read_text()
    for f in ("encoder.json", "vocab.bpe"):
        assert (out / f).read_bytes() == (folder / f).read_bytes()
    m2 = gpt2tune.load_model(out)
    assert m2.hparams == m.hparams
    for name in m.params:
        np.testing.assert_array_equal(m2.params[name].numpy(), m.params[name].numpy())
    tokens = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_array_equal(m(tokens).numpy(), m2(tokens).numpy())


def test_saved_folder_restores_in_tf1_graph(saver_written, tmp_path, hp):
    folder, _ = saver_written
    m = gpt2tune.load_model(folder)
    m.params["model/h1/mlp/c_fc/b"].assign_add(np.full(4 * hp["n_embd"], 0.5, np.float32))
    out = tmp_path / "saved"
    gpt2tune.save_model(m, out)
    shutil.move(out, tmp_path / "moved")  # relative paths in `checkpoint` survive a move
    run_tf1("restore", tmp_path / "moved", tmp_path / "restored.npz", hp)
    restored = np.load(tmp_path / "restored.npz")
    for name, var in m.params.items():
        np.testing.assert_array_equal(restored[name], var.numpy())


def test_save_over_the_folder_it_was_loaded_from(saver_written, tmp_path):
    folder, _ = saver_written
    work = tmp_path / "model"
    shutil.copytree(folder, work)
    m = gpt2tune.load_model(work)
    m.params["model/ln_f/b"].assign(np.ones(HP["n_embd"], np.float32))
    gpt2tune.save_model(m, work)
    np.testing.assert_array_equal(gpt2tune.load_model(work).params["model/ln_f/b"].numpy(), 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folders left behind


def test_failed_save_keeps_the_old_folder(saver_written, tmp_path):
    folder, _ = saver_written
    work = tmp_path / "model"
    shutil.copytree(folder, work)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    m = gpt2tune.load_model(work)
    m.encoder.files = dict(m.encoder.files, **{"vocab.bpe": None})  # fails after the weights
    with pytest.raises(TypeError):
        gpt2tune.save_model(m, work)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.fixture
def broken(saver_written, tmp_path):
    folder, _ = saver_written
    work = tmp_path / "model"
    shutil.copytree(folder, work)
    return work


def test_missing_folder(tmp_path):
    with pytest.raises(Gpt2tuneError, match="does not exist"):
        gpt2tune.load_model(tmp_path / "nope")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(Gpt2tuneError, match="not a GPT-2 model folder"):
        gpt2tune.load_model(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "hparams.json",
        "encoder.json",
        "vocab.bpe",
        "model.ckpt.index",
        "model.ckpt.data-00000-of-00001",
    ],
)
def test_missing_file_is_named(broken, name):
    (broken / name).unlink()
    with pytest.raises(Gpt2tuneError, match=name.replace(".", r"\.")):
        gpt2tune.load_model(broken)


def test_hparams_disagreeing_with_a_tensor(broken, hp):
    (broken / "hparams.json").write_text(json.dumps(dict(hp, n_ctx=20)))
    with pytest.raises(
        Gpt2tuneError, match=r"model/wpe has shape \[16, 32\] but hparams.json implies \[20, 32\]"
    ):
        gpt2tune.load_model(broken)


def test_hparams_with_more_layers(broken, hp):
    (broken / "hparams.json").write_text(json.dumps(dict(hp, n_layer=3)))
    with pytest.raises(Gpt2tuneError, match="model/h2/ln_1/g is missing"):
        gpt2tune.load_model(broken)


def test_invalid_hparams_json(broken):
    (broken / "hparams.json").write_text("{n_vocab: 1")
    with pytest.raises(Gpt2tuneError, match="hparams.json is not valid JSON"):
        gpt2tune.load_model(broken)


def test_truncated_data_file(broken):
    data = broken / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(Gpt2tuneError, match="truncated or corrupt"):
        gpt2tune.load_model(broken)


def test_corrupt_data_file(broken):
    data = broken / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100:200] = bytes(100)
    data.write_bytes(bytes(raw))
    with pytest.raises(Gpt2tuneError, match="truncated or corrupt"):
        gpt2tune.load_model(broken)


def test_corrupt_index_file(broken):
    (broken / "model.ckpt.index").write_bytes(b"garbage" * 10)
    with pytest.raises(Gpt2tuneError, match="model.ckpt.index"):
        gpt2tune.load_model(broken)


def test_converters_reading_by_folder_see_openai_names(saver_written, tmp_path, hp):
    """Conversion tools call tf.train.list_variables/load_variable on the model folder."""
    import tensorflow as tf

    folder, _ = saver_written
    m = gpt2tune.load_model(folder)
    gpt2tune.save_model(m, tmp_path / "out")
    listed = dict(tf.train.list_variables(str(tmp_path / "out")))
    assert listed == {k: list(v) for k, v in variable_shapes(hp).items()}
    np.testing.assert_array_equal(
        tf.train.load_variable(str(tmp_path / "out"), "model/wte"), m.params["model/wte"].numpy()
    )


def test_assemble_without_a_training_run(saver_written, tmp_path):
    from gpt2tune.model.checkpoint import assemble

    folder, _ = saver_written
    (tmp_path / "run").mkdir()
    with pytest.raises(Gpt2tuneError, match="holds no training checkpoint: run `dvc repro train`"):
        assemble(folder, tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
