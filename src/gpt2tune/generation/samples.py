"""The sample stage's records and Markdown, and the interactive prompt, over
gpt2tune.generation.sampler."""

from __future__ import annotations

import dataclasses
import json
import sys

from gpt2tune.config.params import SampleParams, Sampling
from gpt2tune.data.index import report
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.generation.checks import check_request
from gpt2tune.generation.sampler import copies_to_make, generate, generate_many
from gpt2tune.model.gpt2 import GPT2
from gpt2tune.stage import say


def _generate_with(model: GPT2, prompt: str | None, sampling: Sampling) -> list[str]:
    """`generate` with these settings; unconditional samples end at <|endoftext|>,
    completions run the full length (or to a `stop` string)."""
    return generate(model, prompt, sampling=sampling, stop_at_endoftext=not prompt)


# sample.prompts_from: val completes the first this many validation records' prompts.
VAL_PROMPTS = 8


def val_prompts(cfg: SampleParams, records: list[dict], source: str) -> tuple[SampleParams, list]:
    """(cfg with the prompts of the first VAL_PROMPTS validation `records` (prompt ->
    completion, from `source`, data/encoded/val_records.jsonl), their completions): for
    sample_records' prompts and references (sample.prompts_from: val)."""
    if not records:
        raise Gpt2tuneError(
            f"sample.prompts_from = val: {source} holds no validation records; set "
            "data.val_fraction above 0 (or data.val_path) and run `dvc repro encode`"
        )
    chosen = records[:VAL_PROMPTS]
    if not all(r["prompt"].strip() for r in chosen):
        i = next(i for i, r in enumerate(chosen) if not r["prompt"].strip())
        raise Gpt2tuneError(
            f"sample.prompts_from = val: validation record {i + 1} of {source} has an empty "
            "prompt, which gives the model nothing to complete; give every record a prompt"
        )
    prompts = tuple(r["prompt"] for r in chosen)
    return dataclasses.replace(cfg, prompts=prompts), [r["completion"] for r in chosen]


def sample_records(
    model: GPT2, cfg: SampleParams, references: list[str] | None = None
) -> list[dict]:
    """`cfg.nsamples` unconditional samples, then as many completions of each prompt, the
    prompts `cfg.batch_size` at a time (see `generate_many`: the texts do not depend on it).

    `cfg` is the `sample` section of params.yaml (`gpt2tune.config.params.SampleParams`).
    `references`: one reference completion per prompt (`val_prompts`), kept in each of its
    records as "reference".
    """
    # Every prompt is checked before the first sample is made, so a bad one fails at once;
    # a batch holds up to batch_size prompts of one length, nsamples rows each.
    rows = cfg.nsamples * min(cfg.batch_size, max(1, len(cfg.prompts)))
    what = "sample.prompts" if references is None else "validation record prompts"
    copies = copies_to_make(model, cfg.precision, rows)
    for i, prompt in enumerate(cfg.prompts):
        n = len(model.encoder.encode(prompt))
        check_request(model.hparams, n, cfg.length, rows, f"{what}[{i}]", copies)
    copies = copies_to_make(model, cfg.precision, cfg.nsamples)
    check_request(model.hparams, 1, cfg.length, cfg.nsamples, "the unconditional start", copies)
    # Minutes at 124M on a CPU: say what is going on (stderr, so stdout stays the result).
    say(f"sampling {cfg.nsamples} x {len(cfg.prompts) + 1} text(s)...")
    texts = [_generate_with(model, None, cfg)]
    texts += generate_many(model, cfg.prompts, sampling=cfg, batch_size=cfg.batch_size)
    records = [
        {"prompt": prompt, "index": i, "text": t}
        for prompt, samples in zip((None, *cfg.prompts), texts, strict=True)
        for i, t in enumerate(samples)
    ]
    if references is not None:  # the unconditional samples come first and have none
        per_prompt = iter(r for r in references for _ in range(cfg.nsamples))
        for r in records[cfg.nsamples :]:
            r["reference"] = next(per_prompt)
    return records


def memorization(index, encoder, text: str, min_tokens: int | None = None) -> dict:
    """The memorization columns of one sample text (gpt2tune.data.index.report), its tokens
    as the encode stage would make them."""
    return report(index, encoder.encode(text, allow_endoftext=True), encoder.decode, min_tokens)


def add_memorization(records: list[dict], index, encoder, min_tokens: int) -> dict:
    """Add the memorization columns to each record; return the stage's metrics:
    copied_fraction (of all sample tokens, those inside a run of >= min_tokens shared
    verbatim with train.npy) and longest_copied_tokens."""
    tokens = copied = longest = 0
    for r in records:
        ids = encoder.encode(r["text"], allow_endoftext=True)
        r.update(report(index, ids, encoder.decode, min_tokens))
        tokens, copied = tokens + len(ids), copied + round(r["copied_fraction"] * len(ids))
        longest = max(longest, r["copied_tokens"])
    return {"copied_fraction": copied / tokens if tokens else 0.0,
            "longest_copied_tokens": longest}  # fmt: skip


def records_markdown(records: list[dict], cfg: Sampling) -> str:
    # Every setting but nsamples (the samples themselves show it), in Sampling's order.
    settings = [f.name for f in dataclasses.fields(Sampling) if f.name != "nsamples"]
    parts = ["# Samples\n\n" + ", ".join(f"{k} {_show(getattr(cfg, k))}" for k in settings) + "\n"]
    for r in records:
        title = "Unconditional" if r["prompt"] is None else f"Prompt: {r['prompt']}"
        body = r["text"] if r["prompt"] is None else f"**{r['prompt']}**{r['text']}"
        if "reference" in r:  # sample.prompts_from: val: the validation record's completion
            body += f"\n\nReference: **{r['prompt']}**{r['reference']}"
        parts.append(f"## {title} — sample {r['index'] + 1}\n\n{body}\n")
        if "copied_tokens" in r:  # the memorization report
            parts.append(_copied_line(r))
    return "\n".join(parts)


def _copied_line(r: dict) -> str:
    if not r["copied_tokens"]:
        return "*Shares no token with the training text.*\n"
    snippet = json.dumps(r["copied_snippet"], ensure_ascii=False)
    return (f"*Longest run shared with the training text: {r['copied_tokens']} tokens, at "
            f"token {r['copied_offset']} of train.npy ({r['copied_document']}): {snippet}; "
            f"copied fraction {r['copied_fraction']:.3f}.*\n")  # fmt: skip


def _show(value: object) -> str:
    # The stop list as params.yaml would spell it, quotes and \n visible.
    return json.dumps(list(value), ensure_ascii=False) if isinstance(value, tuple) else str(value)


def read_line(prompt: str) -> str:
    """`input(prompt)`, but from a pipe each line is decoded on its own, so a line the
    locale's codec cannot decode is reported (UnicodeDecodeError) and the next one still read
    (input() would have decoded, and lost, the whole buffered rest of the input with it)."""
    if sys.stdin.isatty() or not hasattr(sys.stdin, "buffer"):
        return input(prompt)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    raw = sys.stdin.buffer.readline()
    if not raw:
        raise EOFError
    return raw.decode(sys.stdin.encoding or "utf-8").rstrip("\r\n")


def interactive(model: GPT2, cfg: Sampling, read=read_line, write=print) -> None:
    """The notebooks' interactive completion: type a context, get completions, again.

    Ctrl-D (end of input) or Ctrl-C leaves cleanly. An empty line samples unconditionally.
    """
    write("Type a context and press Enter (Ctrl-D or Ctrl-C to quit).")
    seed = cfg.seed
    while True:
        try:
            prompt = read("Model prompt >>> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        except UnicodeDecodeError as e:  # bytes the terminal's locale cannot decode
            write(f"error: that line is not valid {e.encoding} text ({e.reason}); type it again")
            continue
        try:
            texts = _generate_with(model, prompt, dataclasses.replace(cfg, seed=seed))
        except KeyboardInterrupt:
            write("")
            return
        except Gpt2tuneError as e:
            write(f"error: {e}")
            continue
        seed += 1  # the same context twice gives new completions
        for i, text in enumerate(texts, 1):
            write(f"{'=' * 40} SAMPLE {i} {'=' * 40}\n{text}")
        write("=" * 90)
