"""LoRA (train.lora_rank, lora_alpha, lora_targets): only the adapters train, the base model
stays bit-identical, the run folder holds the adapters alone, assemble merges them into an
ordinary model folder, and resume, accumulation, mixed precision, XLA and two replicas work
with them. Real TensorFlow on the tiny models of test_train.py (2 layers, 32 wide)."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from helpers.models import tiny_model
from helpers.processes import run_stage, stage_env
from helpers.projects import make_project
from helpers.training import N_CTX, TOKENS, VAL, assert_weights_close, cfg
from helpers.vocab import TINY_CORPUS

from gpt2tune import Gpt2tuneError
from gpt2tune.config.params import default_raw, load_params, validate_params
from gpt2tune.data import encoded
from gpt2tune.data.batches import eval_windows, random_windows
from gpt2tune.model.checkpoint import assemble, load_model, save_model
from gpt2tune.model.encoder import load_encoder
from gpt2tune.model.gpt2 import init_model
from gpt2tune.model.lora import TARGETS, adapter_shapes, merge
from gpt2tune.model.memory import lora_params, n_params, step_bytes, training_bytes
from gpt2tune.train.loop import fit
from gpt2tune.train.runstate import fingerprint, load_state
from gpt2tune.train.trainer import Trainer

# Rank 4 on every dense layer; a learning rate that moves the tiny model within a few steps.
LORA = {"lora_rank": 4, "lora_alpha": 8.0, "learning_rate": 1e-2}


def run(base_dir, run_dir, **changes):
    model = load_model(base_dir)
    _, history = fit(model, TOKENS, VAL, cfg(**changes), run_dir, run_fingerprint="fp",
                     progress=False)  # fmt: skip
    return model, history


def losses(history: dict) -> list[float]:
    return [v for _, v in history["loss"]]


def adapters_of(model) -> dict[str, np.ndarray]:
    """The adapter tensors attached to a model, as its forward pass reads them (each B
    already multiplied by alpha / rank)."""
    extra = {n: v for n, v in model.forward_params().items() if "/lora_" in n}
    return {n: tf.convert_to_tensor(v).numpy() for n, v in extra.items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir):
    run_dir = tmp_path_factory.mktemp("lora") / "run1"
    model, history = run(base_dir, run_dir, steps=12, **LORA)
    return model, run_dir, history


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, base_dir):
    run_dir = tmp_path_factory.mktemp("full") / "run1"
    model, history = run(base_dir, run_dir, steps=2)
    return model, run_dir, history


def test_lora_training_lowers_the_loss_and_leaves_the_base_bit_identical(lora_run, base_dir):
    model, _, history = lora_run
    first, last = np.mean(losses(history)[:3]), np.mean(losses(history)[-3:])
    # Less than full fine-tuning's fall (test_train.py): the tiny model's random embeddings
    # (rows of norm ~0.1) stay frozen, and they bound how far the logits can move from
    # uniform (ln 377 = 5.93). Measured: 5.77 -> 5.40.
    assert last < first - 0.25, (first, last)
    assert history["val_loss"][-1][1] < history["val_loss"][0][1] - 0.25
    base = load_model(base_dir).weights_numpy()
    after = model.weights_numpy()
    for name in base:  # every base variable, unchanged to the bit
        np.testing.assert_array_equal(after[name], base[name], err_msg=name)


def test_only_adapters_have_optimizer_slots_and_are_saved(lora_run, hp):
    _, run_dir, _ = lora_run
    names = set(tf.train.load_checkpoint(str(run_dir / "model-12")).get_variable_to_shape_map())
    adapters = adapter_shapes(hp, 4, TARGETS)
    assert len(adapters) == 2 * 4 * 2  # 2 layers x 4 targets x (A, B)
    assert "model/h1/mlp/c_proj/lora_a" in adapters
    slots = {n for n in names if n.endswith(("/Adam", "/Adam_1"))}
    assert len(slots) == 2 * len(adapters)
    assert slots == {f"{n}/{s}" for n in adapters for s in ("Adam", "Adam_1")}
    assert names == set(adapters) | slots | {"global_step", "lora_scale"}  # no base weight

    trainer = Trainer(init_model(hp), cfg(**LORA), tf.distribute.get_strategy())
    assert len(trainer.opt.slots()) == 2 * len(adapters) + 1  # + global_step


def test_lora_checkpoint_is_much_smaller_than_a_full_one(lora_run, full_run):
    def size(run_dir):
        return sum(f.stat().st_size for f in run_dir.glob("model-*"))

    lora_bytes, full_bytes = size(lora_run[1]), size(full_run[1])
    # Adapters of rank 4: 4 x (in + out) per layer, ~4 % of the tiny model (and its slots).
    assert lora_bytes * 5 < full_bytes, (lora_bytes, full_bytes)


def test_assembled_model_is_the_merged_base_and_gives_the_adapters_logits(
    lora_run, base_dir, tmp_path
):
    model, run_dir, _ = lora_run
    out = tmp_path / "finetuned"
    assemble(base_dir, run_dir, out)
    merged = load_model(out)
    saved = set(tf.train.load_checkpoint(str(out / "model.ckpt")).get_variable_to_shape_map())
    assert saved == set(model.params)  # OpenAI's names only: no adapter, slot or scale
    base = load_model(base_dir).weights_numpy()
    trained = tf.train.load_checkpoint(str(run_dir / "model-12"))  # A and B as trained
    for name, value in merged.weights_numpy().items():
        layer = name.rsplit("/", 1)[0]
        if name.endswith("/w"):
            # The merge written out independently: w + alpha / rank * A B.
            a, b = (trained.get_tensor(f"{layer}/lora_{x}") for x in "ab")
            delta = 8.0 / 4 * a.astype(np.float64) @ b
            np.testing.assert_allclose(value[0], base[name][0] + delta, atol=1e-6, err_msg=name)
            assert not np.array_equal(value, base[name]), name  # the adapter did train
        else:
            np.testing.assert_array_equal(value, base[name], err_msg=name)
    tokens = TOKENS[None, :N_CTX]
    # x (W + s A B) and x W + (x A)(s B) are the same sum rounded differently in float32:
    # each of the ~32 products per dot product carries ~6e-8 relative error on logits of
    # size ~1-10, so differences of ~1e-6; 1e-5 leaves room without hiding a wrong scale
    # (alpha / rank = 2 here: a missing or doubled scale moves logits by ~1e-2 or more).
    np.testing.assert_allclose(merged(tokens).numpy(), model(tokens).numpy(), atol=1e-5, rtol=0)
    unadapted = load_model(base_dir)(tokens).numpy()
    assert np.abs(model(tokens).numpy() - unadapted).max() > 1e-2


def test_rank_0_is_full_fine_tuning_bit_for_bit(full_run, base_dir, tmp_path):
    model, run_dir, history = full_run
    other, other_history = run(
        base_dir, tmp_path / "run", steps=2, lora_rank=0, lora_alpha=3.0,
        lora_targets=("mlp/c_fc",),
    )  # fmt: skip
    assert losses(other_history) == losses(history)
    for name, value in model.weights_numpy().items():
        np.testing.assert_array_equal(other.weights_numpy()[name], value, err_msg=name)
    assert adapters_of(other) == {}
    names = set(
        tf.train.load_checkpoint(str(tmp_path / "run" / "model-2")).get_variable_to_shape_map()
    )
    assert "lora_scale" not in names and set(model.params) <= names
    # The other LoRA keys change nothing at rank 0, so neither do they change the fingerprint
    # (a run saved before LoRA existed is continued).
    c = cfg()
    assert fingerprint(dataclasses.replace(c, lora_alpha=3.0, lora_targets=("mlp/c_fc",)),
                       "124M", {}) == fingerprint(c, "124M", {})  # fmt: skip


def test_fingerprint_covers_the_lora_keys():
    c = cfg(**LORA)
    fp = fingerprint(c, "124M", {})
    assert fingerprint(cfg(), "124M", {}) != fp
    for change in ({"lora_rank": 8}, {"lora_alpha": 16.0}, {"lora_targets": ("attn/c_attn",)}):
        assert fingerprint(dataclasses.replace(c, **change), "124M", {}) != fp, change
    reordered = dataclasses.replace(c, lora_targets=tuple(reversed(TARGETS)))
    assert fingerprint(reordered, "124M", {}) == fp


def test_resumed_lora_run_equals_an_uninterrupted_one(base_dir, tmp_path, capsys):
    straight, hist_a = run(base_dir, tmp_path / "a", steps=6, **LORA)
    run(base_dir, tmp_path / "b", steps=3, **LORA)
    capsys.readouterr()
    resumed, hist_b = run(base_dir, tmp_path / "b", steps=6, **LORA)  # base weights reloaded
    assert "resuming from step 3" in capsys.readouterr().out
    np.testing.assert_allclose(losses(hist_b), losses(hist_a), rtol=1e-5)
    assert_weights_close(adapters_of(resumed), adapters_of(straight))
    assert_weights_close(resumed.weights_numpy(), straight.weights_numpy(), atol=0)


# --- train.restore_from: <a model folder>: the adapters belong to that folder's weights ------


@pytest.fixture
def other_dir(tmp_path, hp, tiny_vocab_dir):
    """A second model folder of the same shape (other random weights): restore_from's."""
    folder = tmp_path / "other"
    save_model(init_model(hp, load_encoder(tiny_vocab_dir), seed=1), folder)
    return folder


def val_loss_of(model) -> float:
    """The validation loss as `fit` measures it (its windows of VAL, its eval step)."""
    trainer = Trainer(model, cfg(), tf.distribute.get_strategy())
    return trainer.eval_loss(eval_windows(VAL, N_CTX, cfg().val_batch_count))


def test_lora_from_another_folder_is_assembled_onto_that_folder(base_dir, other_dir, tmp_path):
    restore = {**LORA, "restore_from": str(other_dir)}
    model, history = run(base_dir, tmp_path / "run", steps=4, **restore)
    state = load_state(tmp_path / "run")
    assert state["base"]["path"] == str(other_dir)
    merged = assemble(base_dir, tmp_path / "run", tmp_path / "out", trained_on=state["base"])
    final = history["val_loss"][-1][1]
    assert val_loss_of(load_model(tmp_path / "out")) == pytest.approx(final, rel=1e-5)
    assert merged.weights_numpy()["model/wte"].tobytes() == (
        load_model(other_dir).weights_numpy()["model/wte"].tobytes()
    )  # not models/<name>'s, which is what the adapters used to be merged into
    wrong = assemble(base_dir, tmp_path / "run", tmp_path / "wrong")
    assert abs(val_loss_of(wrong) - final) > 1e-2

    # restore_from's weights changed after training: assemble refuses, in one line.
    save_model(load_model(base_dir), other_dir)
    with pytest.raises(Gpt2tuneError) as e:
        assemble(base_dir, tmp_path / "run", tmp_path / "out2", trained_on=state["base"])
    assert f"trained on the weights in {other_dir}, which have changed since" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out2").exists()


def test_a_run_whose_starting_weights_changed_is_not_resumed(base_dir, other_dir, tmp_path, capsys):
    """Same settings, but restore_from's folder now holds other weights: the saved run is not
    continued (nor reported as complete): it is kept aside, and training starts again from
    the new weights."""
    restore = {**LORA, "restore_from": str(other_dir)}
    run(base_dir, tmp_path / "run", steps=3, **restore)
    save_model(init_model(load_model(other_dir).hparams, load_encoder(other_dir), seed=2),
               other_dir)  # fmt: skip
    capsys.readouterr()
    _, history = run(base_dir, tmp_path / "run", steps=3, **restore)
    out = capsys.readouterr().out
    # Kept aside (checkpoint/kept/...), not continued: it started from other weights.
    assert "kept the run" in out and "(3 steps, started from other weights" in out, out
    assert (tmp_path / "kept").is_dir()
    assert [s for s, _ in history["loss"]] == [1, 2, 3]  # trained again, from step 1
    assert history["val_loss"][0][1] == pytest.approx(val_loss_of(load_model(other_dir)), 1e-5)


LORA_STAGE = dict(
    steps=6, batch_size=2, learning_rate=1e-2, n_ctx=N_CTX, save_every=2, val_every=2,
    lora_rank=4, lora_alpha=8.0, restore_from="models/other",
)  # fmt: skip


@pytest.mark.slow  # four stage runs (train twice): ~200 s on the shared 2-core machine
def test_kill_9_then_resume_and_assemble_keep_restore_froms_weights(tmp_path, tiny_vocab_dir):
    """The stages as a user runs them: LoRA from models/other (model.name is tiny), killed
    (-9) right before step 4's train_state.json is renamed in, run again (resumes at step 2),
    assembled: training ends where an uninterrupted run ends, and the assembled model's loss
    is training's final validation loss, not the one of adapters on models/tiny."""
    mlflow = dict(tracking_uri="sqlite:///mlflow.db", experiment="lora")
    root = make_project(tmp_path / "project", TINY_CORPUS * 20, train=LORA_STAGE, mlflow=mlflow)
    save_model(tiny_model(tiny_vocab_dir, 0, n_embd=32, n_layer=2), root / "models" / "tiny")
    save_model(tiny_model(tiny_vocab_dir, 1, n_embd=32, n_layer=2), root / "models" / "other")
    out = {}
    for stage, kill in (("encode", ""), ("train", "stages/train.py:replace:train_state.json:2"),
                        ("train", ""), ("assemble", "")):  # fmt: skip
        proc = run_stage(root, stage, kill_at=kill)
        assert proc.returncode == (-9 if kill else 0), proc.stdout[-2000:] + proc.stderr[-3000:]
        out[stage] = proc.stdout
    assert "resuming from step 2" in out["train"], out["train"]
    final = json.loads((root / "metrics/train.json").read_text())["val_loss"]

    p = load_params(root / "params.yaml")
    straight_cfg = dataclasses.replace(p.train, restore_from=str(root / "models/other"))
    train, val = (encoded.load_tokens(root / "data/encoded", s) for s in ("train", "val"))
    _, history = fit(load_model(root / "models/tiny"), train, val, straight_cfg, tmp_path / "s",
                     run_fingerprint="fp", progress=False)  # fmt: skip
    assert final == pytest.approx(history["val_loss"][-1][1], rel=1e-5)  # the same base resumed

    model = load_model(root / "models/finetuned")
    trainer = Trainer(model, p.train, tf.distribute.get_strategy())
    assembled = trainer.eval_loss(eval_windows(val, p.train.n_ctx, p.train.val_batch_count))
    assert assembled == pytest.approx(final, rel=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch_with_lora(hp):
    rng = np.random.default_rng(1)
    batches = [random_windows(TOKENS, N_CTX, 2, rng) for _ in range(2)]
    default = tf.distribute.get_strategy()
    big_model, acc_model = init_model(hp, seed=0), init_model(hp, seed=0)
    big = Trainer(big_model, cfg(batch_size=2, **LORA), default)
    acc = Trainer(acc_model, cfg(batch_size=1, accumulate_gradients=2, **LORA), default)
    for w in batches:
        assert acc.step(w[:, None]) == pytest.approx(big.step(w[None]), rel=1e-5)
    assert_weights_close(adapters_of(acc_model), adapters_of(big_model))
    for name, slot in big.opt.slots().items():
        np.testing.assert_allclose(acc.opt.slots()[name].numpy(), slot.numpy(),
                                   rtol=1e-4, atol=1e-9, err_msg=name)  # fmt: skip


@pytest.mark.parametrize(
    "changes, rtol",
    [
        # bfloat16 keeps 8 bits of mantissa: the loss of a ~6-nat model moves by ~1e-2.
        ({"precision": "mixed_bfloat16"}, 2e-2),
        # XLA fuses and reorders float32 sums: rounding only.
        ({"xla": True}, 1e-4),
        ({"memory_saving_gradients": True}, 1e-5),
    ],
)
def test_lora_with_mixed_precision_xla_or_recompute_trains_like_float32(
    base_dir, tmp_path, changes, rtol
):
    plain_model, plain = run(base_dir, tmp_path / "plain", steps=3, **LORA)
    model, history = run(base_dir, tmp_path / "other", steps=3, **LORA, **changes)
    np.testing.assert_allclose(losses(history), losses(plain), rtol=rtol)
    assert losses(history)[-1] < losses(history)[0]
    base = load_model(base_dir).weights_numpy()
    for name, value in model.weights_numpy().items():
        np.testing.assert_array_equal(value, base[name], err_msg=name)
    moved = adapters_of(model)
    assert any(np.abs(v).max() > 0 for n, v in moved.items() if n.endswith("/lora_b"))


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from gpt2tune.train.distribute import make_strategy
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.config.params import TrainParams
    from gpt2tune.train.trainer import Trainer

    hp, cfg = json.loads(sys.argv[1]), TrainParams(**json.loads(sys.argv[2]))
    results = []
    for strategy in (make_strategy("mirrored"), make_strategy("one")):
        with strategy.scope():
            model = init_model(hp, seed=0)
        trainer = Trainer(model, cfg, strategy)
        rng = np.random.default_rng(0)
        losses = [trainer.step(rng.integers(0, hp["n_vocab"], (1, 2, 9))) for _ in range(2)]
        adapters = {n: v.numpy() for n, v in trainer.trained.items()}
        base = {n: v.numpy() for n, v in model.params.items()}
        results.append((strategy.num_replicas_in_sync, losses, adapters, base))
    (r2, l2, a2, b2), (r1, l1, a1, b1) = results
    assert (r2, r1) == (2, 1)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for n in a1:
        np.testing.assert_allclose(a2[n], a1[n], atol=1e-5, err_msg=n)
    assert all(np.array_equal(b2[n], b1[n]) for n in b1)  # the base untouched by both
    print("SAME")
    """
)


def test_two_replicas_train_lora_like_one(hp):
    c = cfg(**LORA)
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(hp), json.dumps(dataclasses.asdict(c))],
        capture_output=True, text=True, env=stage_env(), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "SAME"


def test_merge_adds_the_scaled_low_rank_product():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(1, 5, 6)).astype(np.float32)
    a, b = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    out = merge({"l/w": w, "l/b": np.zeros(6, np.float32)}, {"l/lora_a": a, "l/lora_b": b}, 0.5)
    np.testing.assert_allclose(out["l/w"][0], w[0] + 0.5 * a @ b, rtol=1e-6)
    assert out["l/w"].dtype == np.float32 and set(out) == {"l/w", "l/b"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora_rank": -1}, "train.lora_rank = -1: must be an integer in 0..1024"),
        ({"lora_rank": 2.5}, "train.lora_rank = 2.5: must be an integer in 0..1024"),
        ({"lora_alpha": 0}, "train.lora_alpha = 0: must be a number > 0"),
        ({"lora_targets": ["attn/c_q"]}, 'train.lora_targets = ["attn/c_q"]: must be a non-empty'),
        ({"lora_targets": []}, "train.lora_targets = []: must be a non-empty list"),
        ({"lora_targets": ["mlp/c_fc", "mlp/c_fc"]}, "must be a non-empty list of distinct"),
        ({"lora_rank": 4, "only_train_transformer_layers": True},
         "train.only_train_transformer_layers = true: has no effect with train.lora_rank = 4"),
    ],
)  # fmt: skip
def test_a_bad_lora_value_is_one_line_naming_the_key(changes, message):
    raw = copy.deepcopy(default_raw())
    raw["train"].update(changes)
    with pytest.raises(Gpt2tuneError) as e:
        validate_params(raw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("params.yaml: train.")


def test_memory_of_lora_is_frozen_weights_plus_trained_adapters():
    hp = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1600, "n_head": 25, "n_layer": 48}
    c = cfg(batch_size=1, n_ctx=1024)
    lc = dataclasses.replace(c, lora_rank=8)
    adapters = lora_params(hp, 8, TARGETS)
    assert adapters == sum(np.prod(s) for s in adapter_shapes(hp, 8, TARGETS).values())
    acts = step_bytes(hp, 1024, 1024, False, 4)
    x_a = 1024 * 48 * 8 * 4 * 4  # tokens x layers x rank x targets x float32
    assert training_bytes(hp, lc) == 4 * n_params(hp) + 16 * adapters + acts + x_a
    assert training_bytes(hp, lc) < training_bytes(hp, c) - 11 * n_params(hp)
