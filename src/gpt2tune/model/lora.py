"""LoRA (Hu et al., 2021): fine-tune a frozen GPT-2 through small low-rank adapters.

Each targeted dense layer W [in, out] of every block (`train.lora_targets`) gets two trained
matrices A [in, rank] and B [rank, out], and computes x W + b + (alpha / rank) x A B. B starts
at 0, so training starts exactly at the base model; A starts Kaiming-uniform,
U(-1/sqrt(in), 1/sqrt(in)) (Microsoft's loralib and PEFT), so B's first gradients are not 0.
Only the adapters train and have optimizer slots, so a 1558M model trains in the memory of its
float32 weights plus activations, and the run folder holds rank * (in + out) numbers per layer
(and their slots) instead of a copy of the model; `merge` folds them into the base weights,
w[0] += alpha / rank * A B, for an ordinary OpenAI-format model folder.

Names: `model/h<i>/<target>/lora_a` and `.../lora_b`, beside the layer's `w` and `b`; the run
folder also keeps `lora_scale` (alpha / rank), so that assembling needs no params.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from gpt2tune.config.params import LORA_TARGETS as TARGETS
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.gpt2 import GPT2, variable_shapes

SCALE_NAME = "lora_scale"


def adapter_shapes(
    hparams: Mapping[str, int], rank: int, targets: tuple[str, ...] | list[str]
) -> dict[str, tuple[int, int]]:
    """The adapters' names and shapes, block by block: A [in, rank], B [rank, out]."""
    shapes = variable_shapes(hparams)
    out = {}
    for i in range(hparams["n_layer"]):
        for t in TARGETS:  # in the model's order, whatever order the list has
            if t in targets:
                _, nx, nf = shapes[f"model/h{i}/{t}/w"]
                out[f"model/h{i}/{t}/lora_a"] = (nx, rank)
                out[f"model/h{i}/{t}/lora_b"] = (rank, nf)
    return out


def init_adapters(
    hparams: Mapping[str, int], rank: int, targets: tuple[str, ...] | list[str], seed: int
) -> dict[str, np.ndarray]:
    """Fresh adapters: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (the model is unchanged).

    Drawn from their own generator of `seed`, so the same seed gives the same adapters."""
    rng = np.random.default_rng([seed, 0x10A])
    out = {}
    for name, shape in adapter_shapes(hparams, rank, targets).items():
        if name.endswith("/lora_a"):
            bound = 1 / math.sqrt(shape[0])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def scaled(tensors: Mapping[str, tf.Tensor], scale: float) -> dict[str, tf.Tensor]:
    """What `model.forward` reads: the same tensors with each B multiplied by alpha / rank
    (`model.conv1d` adds x A B). Done inside the traced step, so B's gradient carries the
    scale, as in the paper: alpha scales the update, not the learning rate of B."""
    return {n: v * scale if n.endswith("/lora_b") else v for n, v in tensors.items()}


class Adapters:
    """The trained adapter variables of one LoRA run (create under the strategy's scope)."""

    def __init__(self, hparams: Mapping[str, int], rank: int, alpha: float, targets, seed: int):
        self.scale = alpha / rank
        self.variables: dict[str, tf.Variable] = {
            n: tf.Variable(v, name=n)
            for n, v in init_adapters(hparams, rank, targets, seed).items()
        }
        # Saved with the adapters (never trained): what `merge` multiplies A B by.
        self.scale_var = tf.Variable(self.scale, dtype=tf.float32, trainable=False)

    def tensors(self) -> dict[str, tf.Tensor]:
        return scaled(self.variables, self.scale)

    def saved(self) -> dict[str, tf.Variable]:
        """What a run folder keeps of them: A, B and the scale."""
        return {**self.variables, SCALE_NAME: self.scale_var}


def attach(model: GPT2, adapters: Adapters) -> None:
    """Make `model`'s forward pass, sampling and evaluation use the adapters too."""
    model.set_extra_tensors(adapters.tensors)


# --- merging: what `assemble` does with a LoRA run folder --------------------------------


def read_adapters(
    prefix: str | os.PathLike, hparams: Mapping[str, int]
) -> tuple[dict[str, np.ndarray], float] | None:
    """The adapters and scale of the checkpoint at `prefix`, None if it holds no LoRA run;
    each adapter checked against the layer of `hparams` it adapts."""
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        names = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError, IndexError):
        return None  # unreadable: reading the weights says so, with the file's name
    if SCALE_NAME not in names:
        return None
    shapes = variable_shapes(hparams)
    adapters = {}
    for a in (n for n in names if n.endswith("/lora_a")):
        layer = a[: -len("/lora_a")]
        b = layer + "/lora_b"
        w = shapes.get(layer + "/w")
        sa, sb = tuple(names[a]), tuple(names.get(b, ()))
        if w is None or len(sa) != 2 or sa[0] != w[1] or sb != (sa[1], w[2]):
            raise Gpt2tuneError(
                f"{prefix}: adapter {a} {list(sa)} / {b} {list(sb)} does not fit the base "
                f"model's {layer}/w {list(w or ())}: was it trained from another model.name?"
            )
        adapters[a], adapters[b] = reader.get_tensor(a), reader.get_tensor(b)
    return adapters, float(reader.get_tensor(SCALE_NAME))


def merge(
    weights: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], scale: float
) -> dict[str, np.ndarray]:
    """The base weights with each adapter folded in: w[0] += scale * A B (in float64, then
    float32 as OpenAI's checkpoint holds it). The other tensors are the base's, unchanged."""
    out = dict(weights)
    for a in (n for n in adapters if n.endswith("/lora_a")):
        layer = a[: -len("/lora_a")]
        delta = scale * (adapters[a].astype(np.float64) @ adapters[layer + "/lora_b"])
        out[layer + "/w"] = (weights[layer + "/w"] + delta[None]).astype(np.float32)
    return out
