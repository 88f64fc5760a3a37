"""Checks made before any generation: settings in range, the prompt within the model's
context, the batch within free memory. A bad request is one Gpt2tuneError before the first
token, rather than a failure in TensorFlow part-way through."""

from __future__ import annotations

import dataclasses

import numpy as np

from gpt2tune.config.params import Sampling
from gpt2tune.config.schema import BAD, coerce, types_of
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.memory import available_memory, generation_memory

# What `generate` and `generate_tokens` use for settings a call does not give.
API_DEFAULTS = Sampling(nsamples=1, length=100, temperature=1.0, top_k=0, top_p=0.0, seed=None)


def resolve_sampling(sampling: Sampling | None, length: int | None, overrides: dict) -> Sampling:
    """`sampling` (None: API_DEFAULTS; a `SampleParams` is fine) with `length` and the
    keyword overrides applied, checked. Seed None means fresh randomness."""
    names = [f.name for f in dataclasses.fields(Sampling)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {names}")
    if length is not None:
        overrides["length"] = length
    s = dataclasses.replace(API_DEFAULTS if sampling is None else sampling, **overrides)
    check_sampling(s)
    return dataclasses.replace(s, stop=tuple(s.stop))  # a list from the caller, kept hashable


def check_request(
    hparams: dict[str, int],
    context: int,
    length: int,
    nsamples: int,
    what: str = "the prompt",
    copies: str = "float32",
) -> None:
    """Refuse, before any work, a prompt longer than the model's context or a batch whose
    generation would not fit in memory (rather than dying in TensorFlow part-way); `copies`:
    the precision whose weights the call prepares first (sampler.copies_to_make)."""
    n_ctx = hparams["n_ctx"]
    if context > n_ctx:
        raise Gpt2tuneError(
            f"{what} is {context} tokens but the model's context is {n_ctx} tokens; shorten it"
        )
    need = generation_memory(hparams, nsamples, context, length, copies)
    free = available_memory()
    if free is not None and need > free:
        raise Gpt2tuneError(
            f"generating {nsamples} sample(s) of {length} tokens after {what} needs about "
            f"{need / 2**30:.1f} GiB of memory, but {free / 2**30:.1f} GiB is free; lower "
            "sample.nsamples (samples are generated together) or sample.length"
        )


def check_sampling(s: Sampling) -> None:
    """Raise Gpt2tuneError naming the first setting of `s` out of range: the rules are the
    ones params.yaml's `sample` keys are declared with (gpt2tune.config.params.Sampling), so the API
    and the file accept the same values. `seed=None` (fresh randomness) is the API's own."""
    types = types_of(Sampling)
    for f in dataclasses.fields(Sampling):
        value, rule = getattr(s, f.name), f.metadata["rule"]
        if f.name == "seed" and value is None:
            continue
        if isinstance(value, np.integer | np.floating):  # numpy scalars from callers' arrays
            value = value.item()
        if isinstance(value, tuple):  # the API's own form of a list (Sampling's defaults)
            value = list(value)
        typed = coerce(value, types[f.name])
        if typed is BAD or not rule.ok(typed):
            raise Gpt2tuneError(f"{f.name} = {value!r}: must be {rule.allowed}")
