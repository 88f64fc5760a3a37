"""The train.* options of nshepperd's train.py and gpt-2-simple: optimizers, learning-rate
schedule, clipping, noise, frozen embeddings, restore_from, max_minutes, NaN, kill -9.

Each test would fail if its option were ignored. Real TensorFlow on the tiny models of
test_train.py (2 layers, 32 wide)."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

# The tiny corpus and settings shared with test_train.py (helpers.training).
from helpers.processes import stage_env
from helpers.training import CFG, TOKENS, VAL, assert_weights_close, cfg

from gpt2tune import Gpt2tuneError, load_encoder, save_model
from gpt2tune.config.params import TrainParams
from gpt2tune.model.checkpoint import load_model
from gpt2tune.model.gpt2 import init_model
from gpt2tune.train.loop import add_noise, fit
from gpt2tune.train.optim import Optimizer, learning_rate_at
from gpt2tune.train.runstate import NOT_FINGERPRINTED, fingerprint, load_state
from gpt2tune.train.trainer import is_transformer_layer


def train(base_dir, run_dir, c: TrainParams, fp: str = "fp"):
    model = load_model(base_dir)
    metrics, history = fit(model, TOKENS, VAL, c, run_dir, run_fingerprint=fp, progress=False)
    return model, metrics, history


def losses(history: dict, key: str = "loss") -> list[float]:
    return [v for _, v in history[key]]


# --- learning-rate schedule -----------------------------------------------------------------


def reference_rate(c: TrainParams, step: int) -> float:
    """The documented schedule, written out independently."""
    rate = c.learning_rate * (min(1.0, step / c.warmup_steps) if c.warmup_steps else 1.0)
    if c.lr_schedule == "cosine":
        progress = min(1.0, max(0.0, (step - c.warmup_steps - 1) / (c.steps - c.warmup_steps)))
        rate *= 0.5 * (1 + math.cos(math.pi * progress))
    return rate


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"warmup_steps": 3},
        {"lr_schedule": "cosine"},
        {"lr_schedule": "cosine", "warmup_steps": 4},
    ],
)
def test_learning_rate_schedule(changes):
    c = cfg(steps=10, learning_rate=0.1, **changes)
    got = [float(learning_rate_at(c, s)) for s in range(1, 11)]
    np.testing.assert_allclose(got, [reference_rate(c, s) for s in range(1, 11)], rtol=1e-6)
    if changes.get("warmup_steps"):
        assert got[0] < got[1] < 0.1 and got[changes["warmup_steps"] - 1] == pytest.approx(0.1)
    if changes.get("lr_schedule") == "cosine":  # peak after warm-up, then down, never 0
        assert got[changes.get("warmup_steps", 0)] == pytest.approx(0.1)
        assert 0 < got[-1] < 0.01 and all(a >= b for a, b in zip(got[4:], got[5:], strict=False))


def _params(seed: int = 0) -> dict[str, tf.Variable]:
    rng = np.random.default_rng(seed)
    shapes = {"model/h0/mlp/c_fc/w": (1, 3, 4), "model/h0/mlp/c_fc/b": (4,), "model/wte": (5, 3)}
    return {n: tf.Variable(rng.normal(size=s).astype(np.float32)) for n, s in shapes.items()}


def _grads(params, seed: int) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(100 + seed)
    return {n: tf.constant(rng.normal(size=v.shape).astype(np.float32)) for n, v in params.items()}


def test_sgd_follows_the_schedule_and_decays_only_matrices():
    c = cfg(optimizer="sgd", learning_rate=0.1, lr_schedule="cosine", warmup_steps=2, steps=5,
            weight_decay=0.01)  # fmt: skip
    params = _params()
    ref = {n: v.numpy().astype(np.float64) for n, v in params.items()}
    opt = Optimizer(params, c)
    assert opt.slots() == {"global_step": opt.t}  # sgd keeps no slots
    for t in range(1, 6):
        grads = _grads(params, t)
        opt.apply(grads)
        lr = reference_rate(c, t)
        for n in ref:
            decay = 0.01 * ref[n] if ref[n].ndim >= 2 else 0.0
            ref[n] = ref[n] - lr * (grads[n].numpy() + decay)
            np.testing.assert_allclose(params[n].numpy(), ref[n], rtol=1e-5, atol=1e-7)


def test_adamw_adds_decoupled_decay_to_adam_for_matrices_only():
    adam_p, adamw_p = _params(), _params()
    before = {n: v.numpy() for n, v in adamw_p.items()}
    adam = Optimizer(adam_p, cfg(optimizer="adam", learning_rate=0.01))
    adamw = Optimizer(adamw_p, cfg(optimizer="adamw", learning_rate=0.01, weight_decay=0.5))
    grads = _grads(adam_p, 0)
    adam.apply(grads)
    adamw.apply(grads)  # one step: same m, v; the only difference is lr * wd * w
    for n in before:
        expected = adam_p[n].numpy() - (0.01 * 0.5 * before[n] if before[n].ndim >= 2 else 0)
        np.testing.assert_allclose(adamw_p[n].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert sorted(adamw.slots()) == sorted(adam.slots())


def test_grad_clip_limits_the_global_norm_of_the_update():
    c = cfg(optimizer="sgd", learning_rate=1.0)
    big = {n: g * 1000.0 for n, g in _grads(_params(), 0).items()}
    norm = math.sqrt(sum(float(tf.reduce_sum(g**2)) for g in big.values()))
    for clip, expected in ((0.0, norm), (2.5, 2.5)):
        params = _params()
        before = {n: v.numpy() for n, v in params.items()}
        Optimizer(params, dataclasses.replace(c, grad_clip=clip)).apply(big)
        step = math.sqrt(
            sum(float(np.sum((before[n] - v.numpy()) ** 2)) for n, v in params.items())
        )
        assert step == pytest.approx(expected, rel=1e-4)


# --- noise, frozen layers -------------------------------------------------------------------


def test_add_noise_replaces_about_the_fraction_and_is_reproducible():
    windows = np.full((8, 500), 7, np.int32)
    noisy = add_noise(windows, 0.3, 1000, np.random.default_rng([0, 1]))
    again = add_noise(windows, 0.3, 1000, np.random.default_rng([0, 1]))
    assert noisy.dtype == np.int32 and noisy.shape == windows.shape
    np.testing.assert_array_equal(noisy, again)
    assert 0.27 < np.mean(noisy != 7) < 0.33 and noisy.max() < 1000
    assert add_noise(windows, 0.0, 1000, np.random.default_rng(0)) is windows


def test_noise_changes_training_but_not_its_reproducibility(base_dir, tmp_path):
    _, _, plain = train(base_dir, tmp_path / "a", cfg(steps=3))
    _, _, noisy = train(base_dir, tmp_path / "b", cfg(steps=3, noise=0.5))
    _, _, again = train(base_dir, tmp_path / "c", cfg(steps=3, noise=0.5))
    # Step 1's loss is before any update, but its inputs are noised: it already differs.
    assert abs(losses(noisy)[0] - losses(plain)[0]) > 1e-3
    assert losses(noisy) == losses(again)
    # Validation reads clean text: at step 0 (before any update) it is the same.
    assert noisy["val_loss"][0] == plain["val_loss"][0]


def test_only_train_transformer_layers_freezes_embeddings_and_final_norm(base_dir, tmp_path):
    base = load_model(base_dir).weights_numpy()
    model, _, _ = train(
        base_dir, tmp_path / "run", cfg(steps=2, only_train_transformer_layers=True)
    )
    after = model.weights_numpy()
    frozen = [n for n in base if not is_transformer_layer(n)]
    assert sorted(frozen) == ["model/ln_f/b", "model/ln_f/g", "model/wpe", "model/wte"]
    for n in base:
        same = np.array_equal(after[n], base[n])
        assert same == (n in frozen), n
    saved = tf.train.load_checkpoint(str(tmp_path / "run" / "model-2"))
    slots = [n for n in saved.get_variable_to_shape_map() if n.endswith("/Adam")]
    assert slots and all(is_transformer_layer(n) for n in slots)


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_covers_every_option_that_changes_the_weights():
    fp = fingerprint(CFG, "124M", {"tokens": 10})
    changes = {
        "optimizer": "sgd", "weight_decay": 0.1, "lr_schedule": "cosine", "warmup_steps": 5,
        "grad_clip": 1.0, "noise": 0.1, "only_train_transformer_layers": True,
        "restore_from": "models/other", "precision": "mixed_bfloat16",
    }  # fmt: skip
    for key, value in changes.items():
        assert fingerprint(cfg(**{key: value}), "124M", {"tokens": 10}) != fp, key
    for key, value in {"xla": True, "memory_saving_gradients": True, "strategy": "mirrored",
                       "max_minutes": 5.0, "steps": 99}.items():  # fmt: skip
        assert key in NOT_FINGERPRINTED
        assert fingerprint(cfg(**{key: value}), "124M", {"tokens": 10}) == fp, key
    # A cosine schedule depends on the total: more steps is another run.
    cos = cfg(lr_schedule="cosine")
    assert fingerprint(cos, "124M", {}) != fingerprint(
        dataclasses.replace(cos, steps=99), "124M", {}
    )


# --- restore_from ---------------------------------------------------------------------------


def test_restore_from_fresh_ignores_a_resumable_run(base_dir, tmp_path, capsys):
    train(base_dir, tmp_path / "run", cfg(steps=3))
    assert load_state(tmp_path / "run")["step"] == 3
    straight, _, _ = train(base_dir, tmp_path / "straight", cfg(steps=5))
    capsys.readouterr()
    model, _, history = train(base_dir, tmp_path / "run", cfg(steps=5, restore_from="fresh"))
    assert "restore_from: fresh" in capsys.readouterr().out
    assert [s for s, _ in history["loss"]] == [1, 2, 3, 4, 5]
    assert_weights_close(model.weights_numpy(), straight.weights_numpy())


def test_restore_from_a_path_starts_from_those_weights(base_dir, hp, tiny_vocab_dir, tmp_path):
    other = tmp_path / "other"
    save_model(init_model(hp, load_encoder(tiny_vocab_dir), seed=7), other)
    # val_loss at step 0 is measured before any update: it must be the other model's.
    _, _, from_base = train(base_dir, tmp_path / "a", cfg(steps=1))
    _, _, from_other = train(base_dir, tmp_path / "b", cfg(steps=1, restore_from=str(other)))
    _, _, expected = train(other, tmp_path / "c", cfg(steps=1))

    def val0(history: dict) -> float:
        return history["val_loss"][0][1]

    assert val0(from_other) == pytest.approx(val0(expected), rel=1e-6)
    assert val0(from_other) != pytest.approx(val0(from_base), rel=1e-3)
    # A run folder or a checkpoint prefix works too.
    c_run = tmp_path / "c"
    _, _, from_run = train(base_dir, tmp_path / "d", cfg(steps=1, restore_from=str(c_run)))
    prefix = str(c_run / "model-1")
    _, _, from_prefix = train(base_dir, tmp_path / "e", cfg(steps=1, restore_from=prefix))
    assert val0(from_run) == val0(from_prefix) != val0(from_other)


def test_restore_from_a_bad_path_names_the_key(base_dir, tmp_path):
    with pytest.raises(Gpt2tuneError, match=r"train\.restore_from = '.*nowhere'.*\.index"):
        train(base_dir, tmp_path / "run", cfg(restore_from=str(tmp_path / "nowhere")))


# --- max_minutes, NaN -----------------------------------------------------------------------


def test_max_minutes_stops_cleanly_with_a_checkpoint_then_continues(base_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _, metrics, history = train(base_dir, run, cfg(steps=6, max_minutes=1e-9, val_every=0))
    assert "train.max_minutes = 1e-09 reached after step 1" in capsys.readouterr().out
    assert metrics["steps"] == 1 and [s for s, _ in history["loss"]] == [1]
    assert [s for s, _ in history["val_loss"]] == [0, 1]  # validated where it stopped
    assert load_state(run)["step"] == 1 and (run / "model-1.index").is_file()
    model, metrics, history = train(base_dir, run, cfg(steps=6))
    assert "resuming from step 1" in capsys.readouterr().out
    assert metrics["steps"] == 6 and [s for s, _ in history["loss"]] == list(range(1, 7))


def test_a_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(base_dir, tmp_path):
    # SGD at an absurd rate: step 1's loss (before the update) is fine, step 2's is not.
    run = tmp_path / "run"
    c = cfg(steps=5, optimizer="sgd", learning_rate=1e12, save_every=1)
    with pytest.raises(Gpt2tuneError, match=r"loss became (nan|inf) at step 2; the last good "
                       r"checkpoint in .*run is kept; lower train\.learning_rate"):  # fmt: skip
        train(base_dir, run, c)
    assert load_state(run)["step"] == 1
    kept = tf.train.load_checkpoint(str(run / "model-1"))
    assert all(np.isfinite(kept.get_tensor(n)).all() for n in load_model(base_dir).params)
    # Adam diverges too, at an absurd rate; the error names the key to lower just the same.
    with pytest.raises(Gpt2tuneError, match=r"loss became nan at step \d+; .*train\.learning_rate"):
        train(base_dir, tmp_path / "adam", cfg(steps=5, learning_rate=1e30))


# --- kill -9 --------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from gpt2tune import load_model
    from gpt2tune.train import loop as train
    from gpt2tune.config.params import TrainParams

    base, run_dir, cfg_json = sys.argv[1:4]
    tokens = np.tile(np.array([5, 17, 42, 99, 7, 63, 200], np.int32), 60)

    def log(metrics, step):
        if "loss" in metrics:
            print(f"STEP {step}", flush=True)
            time.sleep(0.5)  # slow enough to be killed mid-run

    train.fit(load_model(base), tokens, tokens[:100], TrainParams(**json.loads(cfg_json)),
              run_dir, run_fingerprint="fp", log_metrics=log, progress=False)
    """
)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(base_dir, tmp_path):
    """10 steps straight versus 5 steps, a kill -9 (no chance to save), and a resume: the
    same weights and loss history, noise and all (data position and RNG come from the step)."""
    c = cfg(steps=10, save_every=5, val_every=5, noise=0.2, lr_schedule="cosine", warmup_steps=2)
    straight, _, hist_a = train(base_dir, tmp_path / "a", c)

    run = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(base_dir), str(run),
         json.dumps(dataclasses.asdict(c))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stage_env(),
    )  # fmt: skip
    try:
        deadline, seen = time.monotonic() + 120, 0
        while seen < 7 and time.monotonic() < deadline:  # step 5 is saved by then
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("STEP"):
                seen = int(line.split()[1])
        assert seen == 7, proc.stderr.read()[-3000:] if proc.poll() is not None else seen
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_state(run)["step"] == 5  # steps 6 and 7 are lost, step 5 is intact

    resumed, _, hist_b = train(base_dir, run, c)
    assert [s for s, _ in hist_b["loss"]] == list(range(1, 11))
    np.testing.assert_allclose(losses(hist_b), losses(hist_a), rtol=1e-5)
    assert hist_b["val_loss"][-1][0] == 10
    np.testing.assert_allclose(losses(hist_b, "val_loss"), losses(hist_a, "val_loss"), rtol=1e-5)
    assert_weights_close(resumed.weights_numpy(), straight.weights_numpy())


def test_float16_loss_scale_is_logged_and_saved_with_the_checkpoint(base_dir, tmp_path):
    calls = []
    fit(load_model(base_dir), TOKENS, VAL, cfg(steps=2, precision="mixed_float16"),
        tmp_path / "run", log_metrics=lambda m, s: calls.append(m), progress=False)  # fmt: skip
    scales = [m["loss_scale"] for m in calls if "loss" in m]
    assert scales == [2.0**15, 2.0**15]
    saved = tf.train.load_checkpoint(str(tmp_path / "run" / "model-2"))
    assert float(saved.get_tensor("loss_scale")) == 2.0**15
    assert int(saved.get_tensor("loss_scale_good_steps")) == 2


def test_a_batch_too_big_for_memory_is_refused_before_training(base_dir, tmp_path):
    """The estimate (gpt2tune.model.memory.training_bytes) against this machine's free RAM: a
    batch of a million windows cannot fit, and nothing is trained or written."""
    from gpt2tune.model.memory import available_memory, training_bytes

    big = cfg(batch_size=1_000_000)
    model = load_model(base_dir)
    assert training_bytes(model.hparams, big) > available_memory()
    expected = (
        r"train\.batch_size = 1000000 at train\.n_ctx = 16 needs about \d+\.\d GiB .* GiB is "
        r"free; lower train\.batch_size"
    )
    with pytest.raises(Gpt2tuneError, match=expected):
        fit(model, TOKENS, VAL, big, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert training_bytes(model.hparams, cfg()) < 2**24  # the usual tiny batch: far below


def test_training_memory_estimate_matches_the_parts():
    from gpt2tune.model.memory import n_params, step_bytes, training_bytes

    hp = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    assert n_params(hp) == 124_439_808  # GPT-2 124M
    c = cfg(batch_size=1, n_ctx=1024)
    assert training_bytes(hp, c) == 16 * n_params(hp) + step_bytes(hp, 1024, 1024, False, 4)
    sgd = dataclasses.replace(c, optimizer="sgd")
    assert training_bytes(hp, sgd) == training_bytes(hp, c) - 8 * n_params(hp)
    saving = dataclasses.replace(c, memory_saving_gradients=True)
    assert training_bytes(hp, saving) < training_bytes(hp, c) * 0.75
