"""Speed and memory knobs and several devices: train.precision (with float16 loss scaling),
train.xla, train.memory_saving_gradients and train.strategy. Real TensorFlow on a tiny model
(2 layers, 64 wide) on the CPU; each option has a test that fails if it were ignored."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from helpers.mlflowserver import free_ports
from helpers.training import rounding_atol

from gpt2tune import Gpt2tuneError
from gpt2tune.config.params import TrainParams
from gpt2tune.model.gpt2 import init_model
from gpt2tune.train.distribute import check_tf_config, is_chief, make_strategy, worker_run_dir
from gpt2tune.train.trainer import DynamicLossScale, Trainer

HP = {"n_vocab": 300, "n_ctx": 16, "n_embd": 64, "n_head": 2, "n_layer": 2}
CFG = TrainParams(steps=3, batch_size=2, learning_rate=1e-3, n_ctx=16)
SUBPROCESS_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
# Per block: c_attn, attn c_proj, c_fc, mlp c_proj (MatMul) and q.k, w.v (BatchMatMul).
MATMULS_PER_BLOCK = 6


def windows(seed: int = 0, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, HP["n_vocab"], (1, batch, 13)).astype(np.int32)


def trainer(**changes) -> Trainer:
    return Trainer(init_model(HP, seed=0), dataclasses.replace(CFG, **changes),
                   tf.distribute.get_strategy())  # fmt: skip


def graph_ops(fn: tf.types.experimental.GenericFunction) -> list:
    """Every op of the traced train step, nested functions (recompute_grad, cond) included."""
    graph = fn.get_concrete_function().graph.as_graph_def()
    return list(graph.node) + [n for f in graph.library.function for n in f.node_def]


def matmul_dtypes(fn) -> list[tf.DType]:
    ops = graph_ops(fn)
    return [tf.as_dtype(n.attr["T"].type) for n in ops if n.op.startswith(("MatMul", "BatchMat"))]


def grads_of(t: Trainer, w: tf.Tensor) -> tuple[float, list[np.ndarray]]:
    loss, grads = t._replica_grads(w[0], w[0][:, :-1])
    return float(loss), [g.numpy() for g in grads]


def assert_same_updates(a: Trainer, b: Trainer, steps: int, k: float = 8.0) -> None:
    """a's and b's weights, equal at the start, after `steps` steps of the same windows: the
    bulk within the rounding of their updates (about lr each; the longest reductions are over
    the batch's 2 x 12 positions of the MLP's 4 * n_embd wide layer; k: rounding_atol's), and
    every element within 2 * lr a step, which an element whose gradient is at the rounding
    level may take (Adam divides by the gradient's own size); such elements are few."""
    lr = CFG.learning_rate
    bulk = rounding_atol(2 * 12 * 4 * HP["n_embd"], steps * lr, k=k)
    diff = np.concatenate([
        np.abs(a.model.params[name].numpy() - var.numpy()).ravel()
        for name, var in b.model.params.items()
    ])  # fmt: skip
    assert diff.max() <= 2 * steps * lr, diff.max()
    assert (diff > bulk).mean() <= 1e-3, (bulk, np.sort(diff)[-20:])


def rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True)))
    return float(num / np.sqrt(sum(np.sum(y**2) for y in b)))


# --- memory_saving_gradients ----------------------------------------------------------------


def test_recomputed_blocks_give_the_same_loss_gradients_and_steps():
    plain, saving = trainer(), trainer(memory_saving_gradients=True)
    loss_p, grads_p = grads_of(plain, windows())
    loss_s, grads_s = grads_of(saving, windows())
    assert loss_s == pytest.approx(loss_p, rel=1e-6)
    for gp, gs in zip(grads_p, grads_s, strict=True):
        np.testing.assert_allclose(gs, gp, atol=1e-6, rtol=1e-5)
    for s in range(3):
        assert saving.step(windows(s)) == pytest.approx(plain.step(windows(s)), rel=1e-5)
    # The weights differ only by their updates, summed in another order (k = 8: the same
    # kernels, no XLA). Measured on the 2-core Intel Xeon of docs/benchmarks.md: 26 of 120320
    # beyond the bulk bound (2.2e-7), at most 1.26e-6.
    assert_same_updates(saving, plain, steps=3)
    # The evidence that the blocks are really recomputed: the backward pass of the saving
    # step holds each block's forward matmuls a second time.
    extra = len(matmul_dtypes(saving.train_step)) - len(matmul_dtypes(plain.train_step))
    assert extra == MATMULS_PER_BLOCK * HP["n_layer"]


# --- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, dtype, tolerance",
    [("mixed_bfloat16", tf.bfloat16, 2e-2), ("mixed_float16", tf.float16, 2e-3)],
)
def test_mixed_precision_computes_in_the_low_dtype_close_to_float32(precision, dtype, tolerance):
    full, mixed = trainer(), trainer(precision=precision)
    loss_f, grads_f = grads_of(full, windows())
    loss_m, grads_m = grads_of(mixed, windows())
    assert loss_m == pytest.approx(loss_f, rel=tolerance)
    assert rel_diff(grads_m, grads_f) < 10 * tolerance
    # Really computed in the low dtype: more than float32 rounding apart, and every matmul
    # of the step (forward and backward) in that dtype.
    assert abs(loss_m - loss_f) > 1e-6 * loss_f
    assert set(matmul_dtypes(mixed.train_step)) == {dtype}
    assert set(matmul_dtypes(full.train_step)) == {tf.float32}
    losses = [mixed.step(windows(s)) for s in range(3)]
    np.testing.assert_allclose(losses, [full.step(windows(s)) for s in range(3)],
                               rtol=tolerance)  # fmt: skip
    assert all(v.dtype == tf.float32 for v in mixed.model.params.values())  # checkpoints stay f32
    assert int(mixed.opt.t.numpy()) == 3


def test_float16_loss_scale_is_applied_and_removed():
    t = trainer(precision="mixed_float16")
    assert float(t.loss_scale.scale.numpy()) == 2.0**15
    loss_32, grads_32 = grads_of(trainer(), windows())
    loss_16, grads_16 = grads_of(t, windows())
    assert rel_diff(grads_16, grads_32) < 2e-2  # divided by the scale again
    assert trainer().loss_scale is None and trainer(precision="mixed_bfloat16").loss_scale is None


def test_float16_step_with_overflowing_gradients_is_skipped_and_the_scale_lowered():
    t = trainer(precision="mixed_float16")
    before = {n: v.numpy() for n, v in t.model.params.items()}
    # A scale this large makes the float16 backward pass overflow: real inf gradients.
    t.loss_scale.scale.assign(2.0**40)
    loss = t.step(windows())
    assert np.isfinite(loss)  # the lead's NaN check looks at the loss: a skip is not a failure
    assert float(t.loss_scale.scale.numpy()) == 2.0**39
    assert int(t.opt.t.numpy()) == 0  # Adam did not count the step
    for n, v in t.model.params.items():
        np.testing.assert_array_equal(v.numpy(), before[n], err_msg=n)
        assert not t.opt.m[n].numpy().any()
    t.loss_scale.scale.assign(2.0**15)
    t.step(windows())
    assert int(t.opt.t.numpy()) == 1 and float(t.loss_scale.scale.numpy()) == 2.0**15
    assert any((v.numpy() != before[n]).any() for n, v in t.model.params.items())


def test_loss_scale_doubles_after_a_run_of_finite_steps_and_halves_on_overflow():
    s = DynamicLossScale(initial=8.0, growth_interval=3)
    finite, inf = [tf.ones(2)], [tf.constant([1.0, np.inf])]
    applied = [bool(s.update(g)) for g in (finite, finite, finite, finite, inf, finite)]
    assert applied == [True, True, True, True, False, True]
    assert float(s.scale.numpy()) == 8.0  # 8 -> 16 after 3 finite steps -> 8 on the inf
    assert int(s.good_steps.numpy()) == 1  # the overflow restarted the count
    assert bool(s.update([tf.constant([np.nan])])) is False and float(s.scale.numpy()) == 4.0


# --- xla ------------------------------------------------------------------------------------


def test_xla_compiles_the_train_step_with_the_same_losses():
    plain, xla = trainer(), trainer(xla=True)
    assert xla.train_step.get_concrete_function().function_def.attr["_XlaMustCompile"].b
    assert not plain.train_step.get_concrete_function().function_def.attr["_XlaMustCompile"].b
    # XLA really compiled it: its HLO can be had for these inputs.
    assert "HloModule" in xla.train_step.experimental_get_compiler_ir(
        tf.constant(windows()), tf.constant(windows()[..., :-1])
    )(stage="hlo")
    losses = [xla.step(windows(s)) for s in range(3)]
    np.testing.assert_allclose(losses, [plain.step(windows(s)) for s in range(3)],
                               rtol=1e-5)  # fmt: skip
    # The weights start equal, so they differ only by their updates. XLA fuses the step, so
    # its additions come in another order, and it brings its own exp/log/tanh (a few ulps
    # each: k = 32 instead of 8). Elements whose gradient is at the rounding level (terms
    # that cancel) are few (measured: 7 of 120320 beyond 1e-6).
    assert_same_updates(xla, plain, steps=3, k=32)


# --- strategies -----------------------------------------------------------------------------


def test_strategy_one_and_auto_without_gpus_are_the_default_strategy():
    assert make_strategy("one") is tf.distribute.get_strategy()
    assert make_strategy("auto") is tf.distribute.get_strategy()  # no GPU on this machine
    assert is_chief(make_strategy("one"))


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, r"train\.strategy = multi_worker needs the TF_CONFIG variable, e\.g\. TF_CONFIG="),
        ("{not json", r"TF_CONFIG = '\{not json' is not a valid worker cluster, e\.g\."),
        ('{"cluster": {"worker": ["a:1"]}}', "is not a valid worker cluster"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "not a valid"),
        ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "not a valid"),
    ],
)
def test_multi_worker_without_a_valid_tf_config_is_a_one_line_error(
    tf_config, message, monkeypatch
):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(Gpt2tuneError, match=message) as e:
        make_strategy("multi_worker")
    assert "\n" not in str(e.value)


def test_a_valid_tf_config_is_accepted():
    text = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    assert check_tf_config(text)["task"]["index"] == 1


def test_a_non_chief_worker_saves_into_a_copy_of_the_run_folder(tmp_path):
    run_dir, tmp = tmp_path / "checkpoint" / "run1", tmp_path / "tmp"
    tmp.mkdir()
    fresh = worker_run_dir(run_dir, tmp)  # nothing to resume: an empty place of its own
    assert fresh.parent == tmp and not fresh.exists()
    run_dir.mkdir(parents=True)
    (run_dir / "train_state.json").write_text('{"step": 3}')
    (tmp / "b").mkdir()
    copy = worker_run_dir(run_dir, tmp / "b")  # resumes from the chief's step, writes apart
    assert (copy / "train_state.json").read_text() == '{"step": 3}'
    (copy / "train_state.json").write_text('{"step": 4}')
    assert (run_dir / "train_state.json").read_text() == '{"step": 3}'


MULTI_WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.config.params import TrainParams
    from gpt2tune.train.distribute import is_chief, make_strategy
    from gpt2tune.train.trainer import Trainer

    hp, cfg = json.loads(sys.argv[1]), TrainParams(**json.loads(sys.argv[2]))
    strategy = make_strategy(sys.argv[3])
    with strategy.scope():
        model = init_model(hp, seed=0)
    trainer = Trainer(model, cfg, strategy)
    rng = np.random.default_rng(0)  # every worker draws the same global batch
    shape = (cfg.accumulate_gradients, cfg.batch_size, 9)
    losses = [
        trainer.step(rng.integers(0, hp["n_vocab"], shape))
        for _ in range(3)
    ]
    print(json.dumps({"losses": losses, "replicas": strategy.num_replicas_in_sync,
                      "chief": is_chief(strategy),
                      "wte": model.params["model/wte"].numpy()[:5].tolist()}))
    """
)


def run_script(strategy: str, cfg: TrainParams, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", MULTI_WORKER_SCRIPT, json.dumps(HP),
         json.dumps(dataclasses.asdict(cfg)), strategy],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # two TensorFlow workers over gRPC: ~20 s
def test_two_workers_on_loopback_train_like_one_process():
    """A real MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 configured by
    TF_CONFIG, global batch 2 (one window each), versus one process at batch 2."""
    cfg = dataclasses.replace(CFG, batch_size=2)
    hosts = [f"127.0.0.1:{p}" for p in free_ports(2)]
    workers = []
    for i in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
        env = dict(SUBPROCESS_ENV, TF_CONFIG=json.dumps(tf_config))
        workers.append(run_script("multi_worker", cfg, env))
    single = result(run_script("one", cfg, SUBPROCESS_ENV))
    chief, other = (result(w) for w in workers)
    assert chief["replicas"] == other["replicas"] == 2 and single["replicas"] == 1
    assert chief["chief"] and not other["chief"]  # only worker 0 keeps files
    np.testing.assert_allclose(chief["losses"], single["losses"], rtol=1e-5)
    assert chief["losses"] == other["losses"]
    np.testing.assert_allclose(chief["wte"], single["wte"], atol=1e-6)
    np.testing.assert_array_equal(chief["wte"], other["wte"])
