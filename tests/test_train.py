"""Training: TF1's Adam, the loop's logging and metrics, resumable run folders, gradient
accumulation, several replicas, Ctrl-C and the errors a user can fix. Real TensorFlow on
tiny models (2 layers, 32 wide), so the whole file runs in well under a minute on a CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from helpers.processes import stage_env
from helpers.training import CFG, N_CTX, TOKENS, VAL, assert_weights_close, cfg, rounding_atol

from gpt2tune import Gpt2tuneError
from gpt2tune.config.params import TrainParams
from gpt2tune.data.batches import random_windows
from gpt2tune.model.checkpoint import assemble, load_model
from gpt2tune.model.gpt2 import init_model, variable_shapes
from gpt2tune.train.loop import fit
from gpt2tune.train.optim import Optimizer
from gpt2tune.train.runstate import fingerprint, resumable_state, write_plots
from gpt2tune.train.trainer import Trainer, lm_loss


def weights(model) -> dict[str, np.ndarray]:
    return model.weights_numpy()


def losses(entries: list) -> list[float]:
    return [v for _, v in entries]


# --- Adam -----------------------------------------------------------------------------------


def test_adam_matches_tf1_adam_optimizer_update_rule():
    rng = np.random.default_rng(0)
    shapes = {"model/a/w": (3, 4), "model/b": (5,)}
    init = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    params = {n: tf.Variable(v) for n, v in init.items()}
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = Optimizer(params, TrainParams(learning_rate=lr))
    ref = {n: v.astype(np.float64) for n, v in init.items()}
    m = {n: np.zeros(s) for n, s in shapes.items()}
    v = {n: np.zeros(s) for n, s in shapes.items()}
    for t in range(1, 7):
        # Gradients whose scale changes from step to step, so the update is not just
        # lr * sign(g) (Adam's first step) and m, v and the bias correction all matter.
        grads = {
            n: rng.normal(scale=10.0 ** (t % 3 - 1), size=s).astype(np.float32)
            for n, s in shapes.items()
        }
        opt.apply({n: tf.constant(g) for n, g in grads.items()})
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)  # TF1 AdamOptimizer, eps "hat"
        for n, g in grads.items():
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g.astype(np.float64) ** 2
            ref[n] = ref[n] - lr_t * m[n] / (np.sqrt(v[n]) + eps)
            np.testing.assert_allclose(params[n].numpy(), ref[n], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(opt.m[n].numpy(), m[n], rtol=1e-5, atol=1e-8)
            # TF1's kernel updates v as v + (g^2 - v)(1 - beta2): float32 rounding of ~1e-5
            np.testing.assert_allclose(opt.v[n].numpy(), v[n], rtol=1e-4, atol=1e-10)
    assert int(opt.t.numpy()) == 6
    assert sorted(opt.slots()) == sorted(
        [f"{n}/Adam" for n in shapes] + [f"{n}/Adam_1" for n in shapes] + ["global_step"]
    )


# --- fit: logging, metrics, run folder ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir):
    """12 steps with validation every 5, samples every 4 and checkpoints every 5."""
    run_dir = tmp_path_factory.mktemp("trained") / "run1"
    model = load_model(base_dir)
    metric_calls, sample_calls = [], []
    c = cfg(steps=12, val_every=5, sample_every=4, save_every=5)
    metrics, history = fit(
        model, TOKENS, VAL, c, run_dir,
        run_fingerprint="fp-trained",
        log_metrics=lambda metrics, step: metric_calls.append((step, dict(metrics))),
        log_sample=lambda text, step: sample_calls.append((step, text)),
        state_extra={"mlflow_run_id": "abc"},
        progress=False,
    )  # fmt: skip
    return model, run_dir, metrics, history, metric_calls, sample_calls


def test_fit_lowers_the_loss_and_logs_every_step(trained):
    _, _, metrics, history, metric_calls, sample_calls = trained
    losses = [(s, m["loss"]) for s, m in metric_calls if "loss" in m]
    assert [s for s, _ in losses] == list(range(1, 13))
    assert all(m["tokens_per_s"] > 0 for _, m in metric_calls if "loss" in m)
    first = np.mean([loss for _, loss in losses[:3]])
    last = np.mean([loss for _, loss in losses[-3:]])
    assert last < first - 0.5, (first, last)

    val = [(s, m["val_loss"]) for s, m in metric_calls if "val_loss" in m]
    assert [s for s, _ in val] == [0, 5, 10, 12]
    assert val[-1][1] < val[0][1]
    assert [s for s, _ in sample_calls] == [4, 8, 12]
    assert all(isinstance(t, str) for _, t in sample_calls)

    assert history["loss"] == [list(e) for e in losses]
    assert history["val_loss"] == [list(e) for e in val]
    assert metrics["steps"] == 12
    assert metrics["loss_last10"] == pytest.approx(np.mean([loss for _, loss in losses[-10:]]))
    assert metrics["base_val_loss"] == val[0][1]
    assert metrics["tokens_seen"] == 12 * 2 * N_CTX
    base = [m for s, m in metric_calls if "base_val_loss" in m]
    assert base == [{"val_loss": val[0][1], "base_val_loss": val[0][1]}]  # at step 0 only
    assert metrics["val_loss"] == val[-1][1]
    assert metrics["val_perplexity"] == pytest.approx(math.exp(val[-1][1]))
    assert metrics["tokens_per_s"] > 0


def test_run_folder_holds_the_newest_checkpoint_and_state(trained, hp):
    model, run_dir, _, history, _, _ = trained
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best",  # the lowest val_loss's weights (test_train_stopping.py)
        "checkpoint",
        "model-12.data-00000-of-00001",
        "model-12.history.json",
        "model-12.index",
        "train_state.json",
    ]  # model-5 and model-10 were removed, no temporary files are left
    assert 'model_checkpoint_path: "model-12"' in (run_dir / "checkpoint").read_text()
    state = json.loads((run_dir / "train_state.json").read_text())
    assert {k: state.pop(k) for k in ("best", "early_stopping")}  # test_train_stopping.py
    assert set(state.pop("base")) == {"digest"}  # the weights it started from (models/<name>)
    assert state == {
        "step": 12, "mlflow_run_id": "abc", "fingerprint": "fp-trained", "checkpoints": [12],
    }  # fmt: skip
    assert json.loads((run_dir / "model-12.history.json").read_text()) == history

    reader = tf.train.load_checkpoint(str(run_dir / "model-12"))
    names = set(reader.get_variable_to_shape_map())
    params = set(variable_shapes(hp))
    slots = {f"{n}/Adam" for n in params} | {f"{n}/Adam_1" for n in params} | {"global_step"}
    assert names == params | slots  # OpenAI's names plus TF1's slot names
    assert int(reader.get_tensor("global_step")) == 12
    for name, value in weights(model).items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)


def test_assemble_makes_a_model_folder_with_the_trained_weights(trained, base_dir, tmp_path):
    model, run_dir, *_ = trained
    out = tmp_path / "finetuned"
    assemble(base_dir, run_dir, out)
    loaded = load_model(out)
    assert loaded.hparams == model.hparams
    assert loaded.encoder.files == model.encoder.files
    for name, value in weights(model).items():
        np.testing.assert_array_equal(loaded.params[name].numpy(), value)
    names = set(tf.train.load_checkpoint(str(out / "model.ckpt")).get_variable_to_shape_map())
    assert names == set(model.params)  # Adam's slots stay behind


# --- resuming -------------------------------------------------------------------------------


def test_fingerprint_ignores_step_counts_and_logging_only():
    fp = fingerprint(CFG, "124M", {"tokens": 10})
    same = cfg(steps=99, save_every=3, val_every=2, sample_every=1, sample_length=9)
    assert fingerprint(same, "124M", {"tokens": 10}) == fp
    for changed in (cfg(learning_rate=1e-4), cfg(seed=1), cfg(batch_size=4), cfg(n_ctx=8),
                    cfg(accumulate_gradients=2)):  # fmt: skip
        assert fingerprint(changed, "124M", {"tokens": 10}) != fp, changed
    assert fingerprint(CFG, "355M", {"tokens": 10}) != fp
    assert fingerprint(CFG, "124M", {"tokens": 11}) != fp


def test_resumed_run_equals_uninterrupted_one(base_dir, tmp_path, capsys):
    c = cfg(steps=6, val_every=3, save_every=2)
    straight = load_model(base_dir)
    _, hist_a = fit(straight, TOKENS, VAL, c, tmp_path / "a", run_fingerprint="fp", progress=False)

    first = load_model(base_dir)
    fit(first, TOKENS, VAL, cfg(steps=3, val_every=3, save_every=2), tmp_path / "b",
        run_fingerprint="fp", progress=False)  # fmt: skip
    assert resumable_state(tmp_path / "b", "fp", 6)["step"] == 3
    assert resumable_state(tmp_path / "b", "other", 6) is None
    assert resumable_state(tmp_path / "b", "fp", 3) is None  # finished: nothing to continue
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    capsys.readouterr()

    resumed = load_model(base_dir)  # the base weights again: fit must restore step 3
    _, hist_b = fit(resumed, TOKENS, VAL, c, tmp_path / "b", run_fingerprint="fp", progress=False)
    assert "resuming from step 3" in capsys.readouterr().out
    assert_weights_close(weights(resumed), weights(straight))
    assert [s for s, _ in hist_b["loss"]] == list(range(1, 7))
    np.testing.assert_allclose(
        [v for _, v in hist_b["loss"]], [v for _, v in hist_a["loss"]], rtol=1e-5
    )
    assert [s for s, _ in hist_b["val_loss"]] == [s for s, _ in hist_a["val_loss"]] == [0, 3, 6]
    np.testing.assert_allclose(
        [v for _, v in hist_b["val_loss"]], [v for _, v in hist_a["val_loss"]], rtol=1e-5
    )

    # Other settings: the saved run is kept aside (test_train_kept_runs.py); training starts
    # from the base weights.
    other = load_model(base_dir)
    _, hist_c = fit(other, TOKENS, VAL, c, tmp_path / "c", run_fingerprint="fp2", progress=False)
    assert "(3 steps, of other settings or data)" in capsys.readouterr().out
    assert [s for s, _ in hist_c["loss"]] == list(range(1, 7))
    assert hist_c["val_loss"][0][0] == 0
    assert_weights_close(weights(other), weights(straight))
    assert json.loads((tmp_path / "c" / "train_state.json").read_text())["fingerprint"] == "fp2"


def test_resume_after_a_crash_half_way_through_saving(base_dir, tmp_path):
    """save_state writes model-N, `checkpoint`, model-N.history.json, then train_state.json.
    A crash (or a second Ctrl-C) before the last leaves the state at the previous step M while
    the other files already speak of N; the resume must continue from M's checkpoint and
    history."""
    c = cfg(steps=4, val_every=3)
    straight = load_model(base_dir)
    _, hist_a = fit(straight, TOKENS, VAL, c, tmp_path / "a", run_fingerprint="fp", progress=False)

    b = tmp_path / "b"
    fit(load_model(base_dir), TOKENS, VAL, cfg(steps=2, val_every=3), b, run_fingerprint="fp",
        progress=False)  # fmt: skip
    for f in (tmp_path / "a").glob("model-4.*"):  # step 4's files, as if just written
        shutil.copy(f, b / f.name)
    shutil.copy(tmp_path / "a" / "model-4.history.json", b / "model-4.history.json")
    (b / "checkpoint").write_text('model_checkpoint_path: "model-4"\n')
    assert json.loads((b / "train_state.json").read_text())["step"] == 2

    resumed = load_model(base_dir)
    _, hist_b = fit(resumed, TOKENS, VAL, c, b, run_fingerprint="fp", progress=False)
    assert [s for s, _ in hist_b["loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose(losses(hist_b["loss"]), losses(hist_a["loss"]), rtol=1e-5)
    # b's own history of step 2 (model-2.history.json), not a's: it has the validation that
    # ended b's 2-step run, then those of steps 3 and 4, as a has them.
    assert [s for s, _ in hist_b["val_loss"]] == [0, 2, 3, 4]
    assert [s for s, _ in hist_a["val_loss"]] == [0, 3, 4]
    del hist_b["val_loss"][1]
    np.testing.assert_allclose(losses(hist_b["val_loss"]), losses(hist_a["val_loss"]), rtol=1e-5)
    assert_weights_close(weights(resumed), weights(straight))


# --- gradients ------------------------------------------------------------------------------


def test_accumulated_micro_batches_equal_one_big_batch(hp):
    rng = np.random.default_rng(1)
    batches = [random_windows(TOKENS, N_CTX, 2, rng) for _ in range(2)]  # 2 x [2, 17]
    big_model, acc_model = init_model(hp, seed=0), init_model(hp, seed=0)
    default = tf.distribute.get_strategy()
    big = Trainer(big_model, cfg(batch_size=2, accumulate_gradients=1), default)
    acc = Trainer(acc_model, cfg(batch_size=1, accumulate_gradients=2), default)

    # The gradient of the whole batch's mean loss, computed independently.
    with tf.GradientTape() as tape:
        loss = lm_loss(big_model.params, hp, tf.constant(batches[0]))
    names = list(big_model.params)
    grads = dict(zip(names, tape.gradient(loss, list(big_model.params.values())), strict=True))

    for w in batches:
        loss_big = big.step(w[None])  # [1, 2, len]
        loss_acc = acc.step(w[:, None])  # [2, 1, len]
        assert loss_acc == pytest.approx(loss_big, rel=1e-5)
        if w is batches[0]:
            assert loss_big == pytest.approx(float(loss), rel=1e-6)
            for name, g in grads.items():  # m = (1 - beta1) * g after one step
                np.testing.assert_allclose(
                    big.opt.m[name].numpy(), 0.1 * tf.convert_to_tensor(g).numpy(), atol=1e-7
                )
    # m and v depend on the gradient's scale (the first update nearly does not), so a sum
    # instead of a mean over micro-batches would show here (a factor of 2, or 4 in v).
    assert_weights_close(weights(acc_model), weights(big_model))
    # The two differ only in the order of additions: each gradient is a sum over the batch's
    # 2 x 16 positions of terms that went through reductions over the width (32). An element
    # of m or v can be a difference of two larger terms (0.09 g1 + 0.1 g2 with opposite
    # signs), so its error is of the size of the tensor's terms, not of the element itself:
    # an absolute tolerance on the tensor's scale, no relative one.
    n = 2 * N_CTX * hp["n_embd"]
    for name, slot in big.opt.slots().items():
        scale = float(np.abs(slot.numpy()).max())
        np.testing.assert_allclose(acc.opt.slots()[name].numpy(), slot.numpy(), rtol=0,
                                   atol=rounding_atol(n, scale), err_msg=name)  # fmt: skip


MULTI_REPLICA_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from gpt2tune import Gpt2tuneError
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.config.params import TrainParams
    from gpt2tune.train.distribute import make_strategy
    from gpt2tune.train.trainer import Trainer

    hp, cfg = json.loads(sys.argv[1]), TrainParams(**json.loads(sys.argv[2]))
    mirrored = make_strategy("mirrored")  # no GPU: over the two logical CPUs
    assert mirrored.num_replicas_in_sync == 2

    def run(strategy, cfg):
        with strategy.scope():
            model = init_model(hp, seed=0)
        trainer = Trainer(model, cfg, strategy)
        rng = np.random.default_rng(0)
        shape = (cfg.accumulate_gradients, cfg.batch_size, 9)
        losses = [
            trainer.step(rng.integers(0, hp["n_vocab"], shape))
            for _ in range(2)
        ]
        variables = {**model.params, **trainer.opt.slots()}
        out = {n: v.numpy() for n, v in variables.items()}
        if strategy is mirrored:  # every replica's copy must have had the same update
            for n, v in variables.items():
                for copy in v.values[1:]:
                    np.testing.assert_array_equal(copy.numpy(), out[n])
        return losses, out

    # Plain, then with XLA (each replica's forward/backward compiled) and recomputed blocks.
    for c in (cfg, dataclasses.replace(cfg, xla=True, memory_saving_gradients=True)):
        l2, w2 = run(mirrored, c)
        l1, w1 = run(make_strategy("one"), c)
        np.testing.assert_allclose(l2, l1, rtol=1e-5)
        for n in w1:  # weights to 1e-5; Adam's m, v (far smaller numbers) relative to their size
            slot = n.endswith(("/Adam", "/Adam_1"))
            atol = 1e-4 * np.abs(w1[n]).max() if slot else 1e-5
            np.testing.assert_allclose(w2[n], w1[n], atol=atol, rtol=1e-3 if slot else 0, err_msg=n)
        print("SAME")
    with mirrored.scope():
        model = init_model(hp, seed=0)
    try:
        Trainer(model, dataclasses.replace(cfg, batch_size=3), mirrored)
    except Gpt2tuneError as e:
        print("ERROR", e)
    """
)


@pytest.mark.slow  # two trainings on two logical CPU devices: ~25 s
def test_two_replicas_train_like_one(hp):
    # Two micro-batches of 2 windows, one window per replica: sharding and accumulation.
    c = cfg(learning_rate=1e-3, accumulate_gradients=2)
    proc = subprocess.run(
        [sys.executable, "-c", MULTI_REPLICA_SCRIPT, json.dumps(hp),
         json.dumps(dataclasses.asdict(c))],
        capture_output=True, text=True, env=stage_env(), timeout=600,  # minutes under load
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("SAME") == 2
    error = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(error) == 1 and "train.batch_size = 3" in error[0], proc.stdout


# --- errors ---------------------------------------------------------------------------------


def test_n_ctx_beyond_the_model_is_an_error_naming_train_n_ctx(base_dir, tmp_path):
    model = load_model(base_dir)
    with pytest.raises(Gpt2tuneError, match=r"train\.n_ctx = 17: .*\(16\)"):
        fit(model, TOKENS, VAL, cfg(n_ctx=N_CTX + 1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_one_token_corpus_is_a_clear_error(base_dir, tmp_path):
    model = load_model(base_dir)
    with pytest.raises(Gpt2tuneError, match=r"only 1 token\(s\) long.*data\.path"):
        fit(model, TOKENS[:1], VAL, cfg(), tmp_path / "run", progress=False)


def test_no_validation_tokens_trains_without_val_loss(base_dir, tmp_path):
    model = load_model(base_dir)
    calls = []
    metrics, history = fit(
        model, TOKENS[:10], TOKENS[:0], cfg(steps=2, val_every=1), tmp_path / "run",
        log_metrics=lambda m, s: calls.append(m), progress=False,
    )  # fmt: skip
    assert history["val_loss"] == [] and "val_loss" not in metrics
    assert all("val_loss" not in m for m in calls)
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss_last10"])


# A diverging loss (nan) is in test_train_options.py, with the checkpoint it keeps.


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------

CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from gpt2tune.stage import run_stage

    def main(base, run_dir, cfg_json):
        import json
        from gpt2tune import load_model
        from gpt2tune.train import loop as train
        from gpt2tune.config.params import TrainParams

        tokens = np.tile(np.array([5, 17, 42, 99, 7, 63, 200], np.int32), 60)

        def log(metrics, step):
            if "loss" in metrics:
                print(f"STEP {step}", flush=True)

        train.fit(load_model(base), tokens, tokens[:100], TrainParams(**json.loads(cfg_json)),
                  run_dir, run_fingerprint="fp", log_metrics=log, progress=False)

    sys.exit(run_stage(main, *sys.argv[1:]))
    """
)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_the_step_and_exits_then_resumes(
    base_dir, tmp_path, capsys, sig, code
):
    run_dir = tmp_path / "run"
    c = cfg(steps=100_000)
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, str(base_dir), str(run_dir),
         json.dumps(dataclasses.asdict(c))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stage_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        line = proc.stdout.readline()
        while line and not line.startswith("STEP") and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert line.startswith("STEP"), proc.stderr.read()[-3000:]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    steps = [int(s.split()[1]) for s in (line + out).splitlines() if s.startswith("STEP")]
    stopped = [s for s in out.splitlines() if s.startswith("stopped")]
    assert stopped == [
        f"stopped by {sig.name}: step {steps[-1]} saved in {run_dir}; run again to continue"
    ]
    saved = steps[-1]  # the step in flight when Ctrl-C came was finished and saved
    state = json.loads((run_dir / "train_state.json").read_text())
    assert state["step"] == saved and state["fingerprint"] == "fp"
    assert (run_dir / f"model-{saved}.index").exists()

    model = load_model(base_dir)
    _, history = fit(model, TOKENS, VAL, cfg(steps=saved + 2), run_dir, run_fingerprint="fp",
                     progress=False)  # fmt: skip
    assert f"resuming from step {saved}" in capsys.readouterr().out
    assert [s for s, _ in history["loss"]] == list(range(1, saved + 3))


# --- plots ----------------------------------------------------------------------------------


def test_write_plots_writes_tsv_files_for_dvc_plots(tmp_path):
    history = {"loss": [[1, 5.0], [2, 4.25]], "val_loss": [[0, 6.0], [2, 4.5]]}
    write_plots(history, tmp_path / "metrics")
    assert (tmp_path / "metrics" / "loss.tsv").read_text() == (
        "step\tloss\n1\t5.000000\n2\t4.250000\n"
    )
    assert (tmp_path / "metrics" / "val_loss.tsv").read_text() == (
        "step\tval_loss\n0\t6.000000\n2\t4.500000\n"
    )
    write_plots({"loss": [], "val_loss": []}, tmp_path / "metrics")
    assert (tmp_path / "metrics" / "val_loss.tsv").read_text() == "step\tval_loss\n"
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["loss.tsv", "val_loss.tsv"]
