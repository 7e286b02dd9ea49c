"""Evaluation: loss / perplexity / token accuracy over the eval iterator, and exact-match generation."""

from __future__ import annotations

import jax
import numpy as np

from jaxtune.data.records import TRAINED_ROLES, Conversation


def eval_loss(eval_step, method, trainable, frozen, eval_it, max_batches: int | None = None) -> dict:
    """Token-weighted metrics over the eval set (the iterator is rewound first, so each eval is identical)."""
    eval_it.set_state({"epoch": 0, "window": 0, "row": 0, "cursor": None, "seed": eval_it.seed})
    totals, denom = None, 0.0
    for i, batch in enumerate(eval_it):
        if max_batches is not None and i >= max_batches:
            break
        sums, d = eval_step(trainable, frozen, batch)
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        denom += float(d)
    if totals is None:
        return {}
    out = {k: float(v) / max(denom, 1.0) for k, v in totals.items()}
    if "nll" in out:
        out["perplexity"] = float(np.exp(out["nll"]))
    return out


def generation_eval(
    arch, variables, tokenizer, records, template=None, n: int = 64, max_new_tokens: int = 32, template_kwargs=None
):
    """Greedy answers to the first `n` conversations' prompts, scored by exact match with the reference reply.

    Returns (accuracy, [(prompt text, reference, generated), ...]).
    """
    from jaxtune.data.tokenize import encode_prompt
    from jaxtune.generate import generate

    pairs = []
    for r in records:
        if isinstance(r, Conversation) and r.messages and r.messages[-1].role in TRAINED_ROLES:
            pairs.append((r, r.messages[-1].content))
        if len(pairs) == n:
            break
    if not pairs:
        return None, []
    prompts = [encode_prompt(r, tokenizer, template, template_kwargs).tolist() for r, _ in pairs]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    outputs = generate(arch, variables, prompts, max_new_tokens=max_new_tokens, stop_ids=stop)
    rows = []
    for (record, ref), ids in zip(pairs, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        rows.append((record.messages[-2].content if len(record.messages) > 1 else "", ref, text))
    accuracy = float(np.mean([ref.strip() == out for _, ref, out in rows]))
    return accuracy, rows
