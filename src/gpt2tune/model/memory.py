"""How much memory a job needs and how much there is: refuse up front what would not fit.

Training (`training_bytes`) and generation (`generation_memory`) are estimated here, from the
model's shapes (LoRA's from gpt2tune.model.lora), and compared with `available_memory`.

The training formula is the one docs/distributed.md's "which model fits which GPU" table comes
from (`bench/memory.py`), checked there against measured peaks: it overestimates a float32 CPU
training step by 10-20%. gpt2tune compares it with free RAM before training on a CPU, so a
`batch_size` far too large is one clear line instead of an out-of-memory kill hours in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from gpt2tune.model.gpt2 import CACHE_STEP, variable_shapes
from gpt2tune.model.lora import adapter_shapes
from gpt2tune.model.precision import is_dense_weight, weight_bytes
from gpt2tune.train.optim import OPTIMIZERS


def n_params(hparams: Mapping[str, int]) -> int:
    return sum(math.prod(s) for s in variable_shapes(hparams).values())


def step_bytes(
    hparams: Mapping[str, int], tokens: int, seq: int, recompute: bool, act_bytes: int
) -> int:
    """Activations a train step keeps for the backward pass of `tokens` tokens in windows of
    `seq`, plus the logits.

    Per token and layer the block keeps ~24 n_embd values (ln_1 in/out, q k v, merged heads,
    residual, ln_2 out, c_fc out, two gelu temporaries and its output, 4 n_embd each) of
    `act_bytes` each, and 2 n_head seq attention values (scores and softmax, float32 whatever
    the precision). With recompute a layer keeps only its input (n_embd values), plus one
    layer's worth while it is recomputed. The logits cost ~12 bytes per vocabulary entry per
    token (float32 logits, softmax and its gradient).
    """
    e, a, layers = hparams["n_embd"], hparams["n_head"], hparams["n_layer"]
    layer = act_bytes * 24 * e + 4 * 2 * a * seq
    kept = layers * act_bytes * e + layer if recompute else layers * layer
    return tokens * (kept + 12 * hparams["n_vocab"])


def lora_params(hparams: Mapping[str, int], rank: int, targets) -> int:
    """Numbers in LoRA's adapters: rank * (in + out) per targeted layer of every block."""
    return sum(math.prod(s) for s in adapter_shapes(hparams, rank, targets).values())


def training_bytes(hparams: Mapping[str, int], cfg, replicas: int = 1) -> int:
    """Bytes one device needs to train with the `train` section `cfg`, weights included:
    float32 weights and gradients, the optimizer's float32 slots (OPTIMIZERS: two for Adam), a
    low-precision copy of the weights under mixed precision, and one micro-batch's activations.

    With LoRA (train.lora_rank) the model is frozen: its weights cost 4 bytes/param (+2 for the
    mixed copy), with no gradient and no slots; the adapters cost what trained weights cost.
    The activations are the same as full fine-tuning's: the backward pass still goes through
    every layer, to reach the adapters below it, and needs each layer's input and the gradient
    of its output. The adapters add rank values per target per token and layer (x A).
    """
    trained = 8 + 4 * len(OPTIMIZERS[cfg.optimizer].slots)
    mixed = cfg.precision != "float32"
    low = 2 if mixed else 0
    windows = max(1, cfg.batch_size // replicas)
    tokens = windows * cfg.n_ctx
    act = 2 if mixed else 4
    acts = step_bytes(hparams, tokens, cfg.n_ctx, cfg.memory_saving_gradients, act)
    if not cfg.lora_rank:
        return n_params(hparams) * (trained + low) + acts
    adapters = lora_params(hparams, cfg.lora_rank, cfg.lora_targets)
    x_a = tokens * hparams["n_layer"] * cfg.lora_rank * len(cfg.lora_targets) * act
    return n_params(hparams) * (4 + low) + adapters * (trained + low) + acts + x_a


# Generation's terms, measured with bench/generation_memory.py (peak RSS of one
# generate_tokens call over the resident size before it, on the shared 2-core AMD EPYC):
# a compiled loop and TensorFlow's runtime of ~170 MiB + ~12 MiB a layer whatever the batch
# (varying by up to ~300 MiB between runs at 124M's shape, hence the slack in the constant),
# the key/value caches held about three times at their padded size (the prompt pass's, the
# padded copy, the loop's input and output), and ~6 vocabulary-sized float32 vectors per
# sample and step for sampling (logits, softmax, top-k, the seen-token set).
GENERATION_FIXED = 250 * 2**20
GENERATION_PER_LAYER = 12 * 2**20
CACHE_COPIES = 3
# precision.prepare's peak besides its result: bfloat16 casts each matrix straight to its copy;
# int8's quantize_rows holds two float32 temporaries of a matrix at once (w / scale, rounded),
# the largest being the output embedding's. 124M at batch 1 measured (bench/
# generation_memory.py --precision int8, the 2-core Intel Xeon): 707 MiB against float32's
# 349, where the int8 copies are 118 MiB and two temporaries 294.
PREPARE_TEMPORARIES = {"bfloat16": 0, "int8": 2}
SAMPLING_VECTORS = 6
GENERATION_MARGIN = 1.1  # over the measured sum: what the terms above do not model


def prepared_bytes(hparams: Mapping[str, int], precision: str) -> int:
    """Bytes of the weights precision.prepare makes for `precision` (0 for float32): every
    dense matrix and the output embedding's copy at weight_bytes(precision) per weight, and
    int8's float32 scale per output row."""
    if precision == "float32":
        return 0
    total = 0
    for name, shape in variable_shapes(hparams).items():
        if is_dense_weight(name) or name == "model/wte":
            rows = shape[0] if name == "model/wte" else shape[-1]
            total += weight_bytes(precision) * math.prod(shape)
            total += 4 * rows if precision == "int8" else 0
    return total


def generation_memory(
    hparams: dict[str, int], nsamples: int, context: int, length: int, copies: str = "float32"
) -> int:
    """Bytes that generating `length` tokens after `context` for `nsamples` samples at once
    needs on top of the weights, checked against free memory before any work; `copies`: the
    precision whose prepared weights this call makes first ("float32": none).

    The prompt's forward pass holds, for the layer being computed, the attention weights
    (n_head * context^2 per sample) and the MLP's hidden layer (4 * n_embd per position), and
    at the end the logits of every position (n_vocab each); the decoding loop holds the
    output embedding transposed (n_vocab * n_embd, once per call), the key/value caches
    (2 * n_layer * n_embd per sample and position, up to the context rounded up to
    CACHE_STEP, in CACHE_COPIES copies) and SAMPLING_VECTORS vocabulary-sized vectors per
    sample; plus the compiled loop's fixed cost; plus, the first time a model generates at
    bfloat16 or int8, the prepared copies (`prepared_bytes`) and the float32 matrices of the
    output embedding's size that making them holds at once (PREPARE_TEMPORARIES).
    bench/generation_memory.py measures it (see GENERATION_FIXED's comment for what it
    measured).
    """
    n_ctx, n_layer, n_embd = hparams["n_ctx"], hparams["n_layer"], hparams["n_embd"]
    n_vocab = hparams["n_vocab"]
    positions = min(n_ctx, -(-(context + length) // CACHE_STEP) * CACHE_STEP)
    cache = 4 * nsamples * n_layer * 2 * positions * n_embd
    prompt = 4 * nsamples * context * (hparams["n_head"] * context + 4 * n_embd + n_vocab)
    sampling = 4 * nsamples * SAMPLING_VECTORS * n_vocab
    fixed = GENERATION_FIXED + GENERATION_PER_LAYER * n_layer + 4 * n_vocab * n_embd
    if copies != "float32":
        temporaries = PREPARE_TEMPORARIES[copies] * 4 * n_vocab * n_embd
        fixed += prepared_bytes(hparams, copies) + temporaries
    return int(GENERATION_MARGIN * (fixed + prompt + CACHE_COPIES * cache + sampling))


def available_memory() -> int | None:
    """Bytes of RAM this process may still use: MemAvailable, or a cgroup limit's headroom if
    that is lower; None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit.isdigit():
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None
