"""Prompt -> completion training (data.prompt_field): the loss counts only the targets whose
mask is 1. Masked targets change no gradient, the mean is over the whole step (micro-batches
and replicas together), a step without targets changes nothing, and on "Q x A f(x)" records
the completion-only loss learns f for held-out x better than the plain loss in the same
steps."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from helpers.processes import stage_env
from helpers.training import N_CTX, assert_weights_close, cfg

from gpt2tune.config.params import TrainParams
from gpt2tune.data.batches import eval_windows
from gpt2tune.model.gpt2 import forward, init_model
from gpt2tune.train.loop import fit
from gpt2tune.train.trainer import Trainer

ONE = tf.distribute.get_strategy()


def state(model, trainer) -> dict[str, np.ndarray]:
    return {n: v.numpy() for n, v in {**model.params, **trainer.opt.slots()}.items()}


def windows_and_masks(hp: dict, shape: tuple[int, ...], seed: int = 0):
    """Random windows [*shape, N_CTX + 1] and masks of 0 and 1 (about half 1), every window
    holding some of each."""
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, hp["n_vocab"], (*shape, N_CTX + 1)).astype(np.int32)
    masks = (rng.random(windows.shape) < 0.5).astype(np.int32)
    masks[..., 1], masks[..., 2] = 1, 0
    return windows, masks


def per_target_losses(model, hp, windows: np.ndarray) -> np.ndarray:
    """The cross-entropy of every target of windows [k, len], computed apart from the Trainer."""
    logits, _ = forward(model.params, hp, tf.constant(windows[:, :-1]))
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=windows[:, 1:], logits=logits
    ).numpy()


def test_targets_under_mask_0_change_nothing_in_the_step(hp):
    windows, masks = windows_and_masks(hp, (1, 2))
    inputs = windows[..., :-1]  # the model's view stays: only the targets differ
    other = windows.copy()
    hidden = masks[..., 1:] == 0
    other[..., 1:][hidden] = (windows[..., 1:][hidden] + 1) % hp["n_vocab"]
    seen = windows.copy()  # a changed target under mask 1 (masks[..., 1] is 1: w[1])
    seen[0, 0, 1] = (seen[0, 0, 1] + 1) % hp["n_vocab"]
    model = init_model(hp, seed=0)
    trainer = Trainer(model, cfg(batch_size=2), ONE)  # one trainer: traced once
    variables = {**model.params, **trainer.opt.slots()}
    start = {n: v.numpy() for n, v in variables.items()}
    after = []
    for w in (windows, other, seen):
        for n, v in variables.items():  # every step from the same weights and slots
            v.assign(start[n])
        loss = trainer.step(w, inputs, masks)
        after.append((loss, {n: v.numpy() for n, v in variables.items()}))
    (loss_a, a), (loss_b, b), (loss_c, c) = after
    assert loss_a == loss_b
    for name in a:  # exactly: a masked target adds 0 to the loss and to every gradient
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The target under mask 1 does change the step, so the check above can fail.
    assert loss_c != loss_a and not np.array_equal(a["model/wte"], c["model/wte"])


def test_the_loss_is_the_mean_over_the_masked_targets_of_the_whole_step(hp):
    windows, masks = windows_and_masks(hp, (2,), seed=1)
    masks[0, 3:] = 0  # window 0: 1 target; window 1: about 8, so the mean of the two
    # windows' means (or of two micro-batches' means) differs from the mean over targets.
    model = init_model(hp, seed=0)
    ce = per_target_losses(model, hp, windows)
    expected = float((ce * masks[:, 1:]).sum() / masks[:, 1:].sum())
    of_means = float(np.mean([(ce[i] * masks[i, 1:]).sum() / masks[i, 1:].sum() for i in (0, 1)]))
    assert abs(of_means - expected) > 1e-3  # so the comparison below tells them apart
    # float32 sums of ~16 terms of a few units: equal to ~1e-6 relative.
    big = Trainer(model, cfg(batch_size=2), ONE)
    assert big.eval_loss(windows, masks) == pytest.approx(expected, rel=1e-5)
    acc_model = init_model(hp, seed=0)
    acc = Trainer(acc_model, cfg(batch_size=1, accumulate_gradients=2), ONE)
    assert big.step(windows[None], masks=masks[None]) == pytest.approx(expected, rel=1e-5)
    assert acc.step(windows[:, None], masks=masks[:, None]) == pytest.approx(expected, rel=1e-5)
    assert_weights_close(state(acc_model, acc), state(model, big), atol=1e-6)
    # A step without any masked target changes nothing (no Adam step on momentum alone).
    before = state(model, big)
    assert big.step(windows[None], masks=np.zeros_like(masks)[None]) == 0.0
    assert all(np.array_equal(v, state(model, big)[n]) for n, v in before.items())
    # The validation windows of a mask start where the tokens' do.
    tokens = np.arange(200) % hp["n_vocab"]
    assert np.array_equal(eval_windows(tokens, 16, 4) % 2, eval_windows(tokens % 2, 16, 4))


MASKED_REPLICAS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from gpt2tune.config.params import TrainParams
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.train.distribute import make_strategy
    from gpt2tune.train.trainer import Trainer

    hp, cfg = json.loads(sys.argv[1]), TrainParams(**json.loads(sys.argv[2]))
    rng = np.random.default_rng(0)
    shape = (cfg.accumulate_gradients, cfg.batch_size, 9)
    windows = rng.integers(0, hp["n_vocab"], shape)
    masks = (rng.random(shape) < 0.5).astype(np.int32)
    masks[0, 0, 2:] = 0  # replicas and micro-batches with very different target counts
    out = {}
    for name in ("mirrored", "one"):
        strategy = make_strategy(name)
        with strategy.scope():
            model = init_model(hp, seed=0)
        trainer = Trainer(model, cfg, strategy)
        loss = trainer.step(windows, masks=masks)
        out[name] = loss, {n: v.numpy() for n, v in {**model.params, **trainer.opt.slots()}.items()}
    (l2, w2), (l1, w1) = out["mirrored"], out["one"]
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for n in w1:  # as test_train.py's two replicas: weights to 1e-5, slots to their size
        slot = n.endswith(("/Adam", "/Adam_1"))
        atol = 1e-4 * np.abs(w1[n]).max() if slot else 1e-5
        np.testing.assert_allclose(w2[n], w1[n], atol=atol, rtol=1e-3 if slot else 0, err_msg=n)
    print("SAME")
    """
)


@pytest.mark.slow  # two trainings on two logical CPU devices, in a subprocess
def test_two_replicas_weight_the_masked_loss_like_one(hp):
    c = cfg(learning_rate=1e-3, batch_size=2, accumulate_gradients=2)
    proc = subprocess.run(
        [sys.executable, "-c", MASKED_REPLICAS_SCRIPT, json.dumps(hp),
         json.dumps(dataclasses.asdict(c))],
        capture_output=True, text=True, env=stage_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAME" in proc.stdout


# --- learning -------------------------------------------------------------------------------

DIGITS, Q, A, EOT = list(range(10, 20)), 20, 21, 0  # token ids of a 64-token toy vocabulary


def record(x: int) -> tuple[list[int], list[int]]:
    """'Q a b A' -> 'b a <|endoftext|>' for x = 10a + b: f reverses x's two digits. The tokens
    and their mask (the completion and its end are targets)."""
    a, b = divmod(x, 10)
    return [Q, DIGITS[a], DIGITS[b], A, DIGITS[b], DIGITS[a], EOT], [0, 0, 0, 0, 1, 1, 1]


def stream(xs) -> tuple[np.ndarray, np.ndarray]:
    pairs = [record(int(x)) for x in xs]
    return (np.array([t for r, _ in pairs for t in r], np.int32),
            np.array([m for _, k in pairs for m in k], np.uint8))  # fmt: skip


@pytest.mark.slow  # two trainings of 600 steps: ~45 s on a loaded 2-core machine
def test_completion_only_loss_learns_f_for_held_out_x_better_than_the_plain_loss(tmp_path):
    xs = np.random.default_rng(0).permutation(100)
    train_x, held_x = xs[:80], xs[80:]
    tokens, mask = stream(np.tile(train_x, 3))
    hp = dict(n_ctx=N_CTX, n_embd=64, n_head=2, n_layer=2, n_vocab=64)
    c = TrainParams(steps=600, batch_size=16, learning_rate=3e-3, seed=0, n_ctx=N_CTX,
                    sample_every=0, save_every=0, val_every=0, val_batch_count=2)  # fmt: skip
    # Each held-out record alone after <|endoftext|>: the completion's 3 targets are scored.
    held = np.array([[EOT, *record(int(x))[0]] for x in held_x], np.int32)
    held_mask = np.array([[0, *record(int(x))[1]] for x in held_x], np.int32)
    results = {}
    for masked in (True, False):
        model = init_model(hp, seed=0)
        fit(model, tokens, tokens[:0], c, tmp_path / f"run{masked}", progress=False,
            train_mask=mask if masked else None)  # fmt: skip
        loss = Trainer(model, c, ONE).eval_loss(held, held_mask)
        logits, _ = forward(model.params, hp, tf.constant(held[:, :-1]))
        right = (np.argmax(logits.numpy(), -1) == held[:, 1:])[:, 4:6].all(axis=1)
        results[masked] = loss, float(right.mean())
    (loss_m, acc_m), (loss_p, acc_p) = results[True], results[False]
    # Not knowing f costs each of the two digits ln 10 (2.3) nats, 1.5 a target; the
    # completion-only run must have learned it (most of the held-out x right, loss well under
    # one digit's worth), and be clearly ahead of the plain run at the same steps.
    assert acc_m >= 0.9 and loss_m < 0.5, results
    assert acc_m > acc_p and loss_m < loss_p / 2, results
