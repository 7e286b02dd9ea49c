"""Batched, jitted decoding for evaluation, chat and RL rollouts.

`generate` runs a fixed-size buffer [B, P + N] through a `lax.fori_loop`: each step recomputes the forward
pass over the buffer and writes the next token. This full-recompute decoder is the reference that a KV-cache
decoder must match token for token; it is exact for every PEFT method, since it is the training forward.
Prompts are left-padded so every row's next token lands in the same column.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.decoder import Decoder, segment_positions


def sample_token(logits, rng, temperature: float, top_k: int, top_p: float):
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else top-k / top-p (nucleus) sampling."""
    if temperature <= 0:
        return jnp.argmax(logits, -1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.sort(logits, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(order, -1), -1)
        # smallest logit still inside the nucleus: keep tokens whose preceding mass is < top_p
        cutoff = jnp.take_along_axis(order, jnp.sum(cum - jax.nn.softmax(order, -1) < top_p, -1, keepdims=True) - 1, -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, -1)


@partial(jax.jit, static_argnames=("arch", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(arch, variables, prompt_ids, prompt_mask, stop_ids, rng, max_new_tokens, temperature, top_k, top_p):
    b, p = prompt_ids.shape
    total = p + max_new_tokens
    ids = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_ids)
    seg = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_mask.astype(jnp.int32))
    done = jnp.zeros((b,), bool)
    model = Decoder(arch)

    def body(i, carry):
        ids, seg, done, rng = carry
        rng, sub = jax.random.split(rng)
        pos = segment_positions(seg)
        logits = model.apply(variables, ids, seg, pos, method=Decoder.forward_logits)  # [B, total, V]
        nxt = sample_token(logits[:, p + i - 1], sub, temperature, top_k, top_p)
        nxt = jnp.where(done, 0, nxt)
        ids = ids.at[:, p + i].set(nxt)
        seg = seg.at[:, p + i].set(jnp.where(done, 0, 1))
        done = done | jnp.isin(nxt, stop_ids)
        return ids, seg, done, rng

    ids, seg, done, _ = jax.lax.fori_loop(0, max_new_tokens, body, (ids, seg, done, rng))
    return ids[:, p:], seg[:, p:]


def left_pad(sequences: list[list[int]], pad_id: int = 0, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids, mask) [B, P], left-padded to a multiple (few distinct compiled shapes)."""
    width = max(len(s) for s in sequences)
    width = -(-width // multiple) * multiple
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, s in enumerate(sequences):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask


def generate(arch, variables, prompts: list[list[int]], max_new_tokens=64, stop_ids=(), temperature=0.0,
             top_k=0, top_p=1.0, seed=0) -> list[list[int]]:
    """Token-id prompts -> generated token ids per prompt (stop token included, padding removed)."""
    ids, mask = left_pad(prompts)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    out, keep = _generate(arch, variables, ids, mask, stop, jax.random.PRNGKey(seed), max_new_tokens,
                          float(temperature), int(top_k), float(top_p))
    out, keep = np.asarray(out), np.asarray(keep)
    return [row[k > 0].tolist() for row, k in zip(out, keep)]
