"""Batched, jitted decoding with a KV cache, for chat, evaluation and RL rollouts.

    texts = generate(arch, variables, [[1, 5, 9], [4, 2]], max_new_tokens=32, stop_ids=[eos])  # id lists
    tokens, keep = sample(arch, variables, ids, mask, rng, stop, max_new_tokens=32, temperature=1.0)  # arrays
    for token in stream(arch, variables, [1, 5, 9], stop_ids=[eos], max_new_tokens=32): ...  # one at a time

Prompts are left-padded, so every row's next token lands in the same column and all rows share one cache
slot per step. `sample` prefills the cache with a single forward pass over the prompts — the training forward,
which also stores every layer's keys and values (models/kv_cache.py) — then decodes one token per step inside
a `lax.while_loop` that ends once every row has produced a stop token. Sampling is greedy (temperature 0) or
from softmax(logits / temperature), optionally restricted to the top-k tokens and to the nucleus of mass top-p
(Holtzman et al. 2020). Every PEFT method works: prefix-tuning keys/values and prompt-tuning virtual tokens
enter the cache during the prefill; weight-space adapters (LoRA, DoRA, IA3, bottlenecks) act in every step.

`sample_recompute` decodes by re-running the full forward pass over the growing buffer at every step. It is
exact by construction (it is the training forward) and slow: the reference the cached decoder must match
token for token (tests/generate). Stop strings are applied to the decoded text, outside jit (`cut_at_stop`);
stop tokens inside the loop.

`stream` runs `sample`'s prefill and decode step (the same functions, `_prefill` and `_decode_step`) as two
jitted calls for one prompt and hands each token to Python as it is decoded, so a chat page can show the
reply as it grows; the tokens are `sample`'s, draw for draw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.errors import RunError
from jaxtune.models import kv_cache, longrope
from jaxtune.models.decoder import Decoder, segment_positions

SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p")


def sample_token(logits, rng, temperature: float, top_k: int, top_p: float):
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature <= 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]: the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, -1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of the strictly more likely tokens
        kept = jnp.sum(before < top_p, -1, keepdims=True)  # >= 1: the most likely token always stays
        cutoff = jnp.take_along_axis(ordered, kept - 1, -1)  # [B, 1]: the smallest logit in the nucleus
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def _inference(arch):
    """No activation checkpointing (no backward pass here) and no training noise."""
    return arch.replace(remat="none", neftune_alpha=0.0)


def _last_logits(model, variables, hidden):  # hidden [B, T, D] -> logits of the last column [B, V]
    return model.apply(variables, hidden[:, -1:], method=Decoder.logits)[:, 0].astype(jnp.float32)


def _prefill(model, variables, prompt_ids, prompt_mask, rng, n: int, temperature, top_k, top_p):
    """One forward pass over the left-padded prompts [B, P] -> (cache with n - 1 free slots, valid [B, S]: the
    slots a new token may attend to, lengths [B]: the position of the first generated token, filled: the
    cache slots before the free ones (a Python int), first token [B], rng)."""
    b, p = prompt_ids.shape
    seg = prompt_mask.astype(jnp.int32)
    hidden, state = model.apply(
        variables, prompt_ids, seg, segment_positions(seg), mutable=[kv_cache.COLLECTION]
    )
    cache = kv_cache.pad(state[kv_cache.COLLECTION], n - 1)  # the last token is sampled, never fed back
    filled = kv_cache.slots(cache) - (n - 1)  # prefixes + virtual tokens + prompt columns
    valid = jnp.concatenate(
        [jnp.ones((b, filled - p), bool), prompt_mask > 0, jnp.zeros((b, n - 1), bool)], axis=1
    )
    lengths = seg.sum(-1)
    rng, sub = jax.random.split(rng)
    first = sample_token(_last_logits(model, variables, hidden), sub, temperature, top_k, top_p)
    return cache, valid, lengths, filled, first, rng


def _decode_step(model, variables, cache, valid, fed, slot, pos, rng, temperature, top_k, top_p):
    """Feed token `fed` [B] at cache slot `slot` (scalar) and position `pos` [B]; sample the next one.
    -> (cache, valid, next token [B], rng). The one decode step of `sample` and of `stream`."""
    valid = valid.at[:, slot].set(True)  # the slot the fed token is written to
    hidden, state = model.apply(
        {**variables, kv_cache.COLLECTION: cache}, fed[:, None], jnp.ones_like(fed)[:, None], pos[:, None],
        cache_mask=valid[:, None, None, :], mutable=[kv_cache.COLLECTION],
    )  # fmt: skip
    rng, sub = jax.random.split(rng)
    nxt = sample_token(_last_logits(model, variables, hidden), sub, temperature, top_k, top_p)
    return state[kv_cache.COLLECTION], valid, nxt, rng


@partial(jax.jit, static_argnames=("arch", *SAMPLING))
def sample(arch, variables, prompt_ids, prompt_mask, rng, stop_ids, *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):  # fmt: skip
    """Left-padded prompts [B, P] (mask 1 = token) -> (tokens [B, N] int32, keep [B, N] bool).

    `keep` marks the generated tokens up to and including each row's first stop token (`stop_ids` [M] int32;
    pass [-1] for none); later columns hold 0. Decoding with the KV cache.
    """
    model = Decoder(_inference(arch))
    b, n = prompt_ids.shape[0], max_new_tokens
    cache, valid, lengths, filled, first, rng = _prefill(
        model, variables, prompt_ids, prompt_mask, rng, n, temperature, top_k, top_p
    )
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first)
    keep = jnp.zeros((b, n), bool).at[:, 0].set(True)
    done = jnp.isin(first, stop_ids)

    def cond(carry):
        i, *_, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, valid, tokens, keep, done, rng = carry
        fed = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)  # [B]
        slot, pos = filled + i - 1, lengths + i - 1
        cache, valid, nxt, rng = _decode_step(
            model, variables, cache, valid, fed, slot, pos, rng, temperature, top_k, top_p
        )
        nxt = jnp.where(done, 0, nxt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
        keep = jax.lax.dynamic_update_slice_in_dim(keep, ~done[:, None], i, axis=1)
        done = done | jnp.isin(nxt, stop_ids)
        return i + 1, cache, valid, tokens, keep, done, rng

    carry = (jnp.asarray(1, jnp.int32), cache, valid, tokens, keep, done, rng)
    _, _, _, tokens, keep, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, keep


@partial(jax.jit, static_argnames=("arch", *SAMPLING))
def sample_recompute(arch, variables, prompt_ids, prompt_mask, rng, stop_ids, *, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):  # fmt: skip
    """`sample` without a cache: every step runs the full forward pass over [prompt, generated so far]."""
    arch = _inference(arch)
    model = Decoder(arch)
    b, p = prompt_ids.shape
    n = max_new_tokens
    ids = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt_ids)
    seg = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt_mask.astype(jnp.int32))
    done = jnp.zeros((b,), bool)

    def body(i, carry):
        ids, seg, done, rng = carry
        rng, sub = jax.random.split(rng)
        hidden = model.apply(variables, ids, seg, segment_positions(seg))  # [B, P + N, D]
        logits = model.apply(variables, jax.lax.dynamic_slice_in_dim(hidden, p + i - 1, 1, axis=1),
                             method=Decoder.logits)[:, 0].astype(jnp.float32)  # fmt: skip
        nxt = jnp.where(done, 0, sample_token(logits, sub, temperature, top_k, top_p))
        ids = ids.at[:, p + i].set(nxt)
        seg = seg.at[:, p + i].set(jnp.where(done, 0, 1))  # tokens after a stop stay padding
        return ids, seg, done | jnp.isin(nxt, stop_ids), rng

    ids, seg, _, _ = jax.lax.fori_loop(0, n, body, (ids, seg, done, rng))
    return ids[:, p:], seg[:, p:] > 0


def left_pad(sequences: list[list[int]], pad_id: int = 0, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids, mask) [B, P], left-padded to a multiple of `multiple` (few distinct compiled shapes)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise RunError("generate: every prompt needs at least one token (got an empty prompt or none)")
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, s in enumerate(sequences):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask


def stop_array(stop_ids, multiple: int = 8) -> jnp.ndarray:
    """Stop token ids as an int32 array padded with -1 (never a token) to a multiple of 8: one compiled shape."""
    ids = sorted({int(s) for s in stop_ids})
    width = max(1, -(-len(ids) // multiple)) * multiple
    return jnp.asarray(ids + [-1] * (width - len(ids)), jnp.int32)


def generate(arch, variables, prompts: list[list[int]], max_new_tokens: int = 64, stop_ids=(), temperature=0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             pad_multiple: int = 8) -> list[list[int]]:  # fmt: skip
    """Token-id prompts -> generated token ids per prompt (a stop token, when reached, included last).

    Prompts are left-padded to a multiple of `pad_multiple`: each new width compiles the decoder once more."""
    ids, mask = left_pad(prompts, multiple=pad_multiple)
    longest = max((len(p) for p in prompts), default=0)
    note = longrope.cache_crossing(arch, longest, longest + int(max_new_tokens)) if use_cache else None
    if note:  # phi3 128k: the cache would keep short-factor keys where transformers recomputes them
        logging.getLogger(__name__).warning(note)
    fn = sample if use_cache and not note else sample_recompute
    out, keep = fn(arch, variables, ids, mask, jax.random.PRNGKey(seed), stop_array(stop_ids),
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p))  # fmt: skip
    out, keep = np.asarray(out), np.asarray(keep)
    return [row[k].tolist() for row, k in zip(out, keep)]


@partial(jax.jit, static_argnames=("arch", *SAMPLING))
def _stream_prefill(arch, variables, prompt_ids, prompt_mask, rng, *, max_new_tokens: int, temperature: float,
                    top_k: int, top_p: float):  # fmt: skip
    """`sample`'s prefill -> the decoding state of `stream`: (cache, valid, first token, slot, pos, rng)."""
    cache, valid, lengths, filled, first, rng = _prefill(
        Decoder(_inference(arch)), variables, prompt_ids, prompt_mask, rng, max_new_tokens, temperature, top_k,
        top_p,
    )  # fmt: skip
    return cache, valid, first, jnp.asarray(filled, jnp.int32), lengths, rng


@partial(jax.jit, static_argnames=("arch", *SAMPLING[1:]), donate_argnames=("cache", "valid"))
def _stream_step(arch, variables, cache, valid, token, slot, pos, rng, *, temperature: float, top_k: int,
                 top_p: float):  # fmt: skip
    """One step of `sample`'s loop; slot and position advance on the device (no transfer per token)."""
    cache, valid, nxt, rng = _decode_step(
        Decoder(_inference(arch)), variables, cache, valid, token, slot, pos, rng, temperature, top_k, top_p
    )
    return cache, valid, nxt, slot + 1, pos + 1, rng


def stream(arch, variables, prompt_ids: list[int], stop_ids=(), *, max_new_tokens: int = 64,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           pad_multiple: int = 32) -> Iterator[int]:  # fmt: skip
    """One prompt's generated token ids, one at a time as they are decoded: the tokens `generate` returns for
    it with the same settings (a stop token, when reached, yielded last).

    The prefill and the decode step are compiled once per prompt width (a multiple of `pad_multiple`) and
    sampling setting; the cache has `sample`'s fixed size, so no token compiles anything. While the caller
    handles a token, the device already computes the next one."""
    ids, mask = left_pad([list(prompt_ids)], multiple=pad_multiple)
    n = int(max_new_tokens)
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    rng = jax.random.PRNGKey(seed)
    note = longrope.cache_crossing(arch, len(prompt_ids), len(prompt_ids) + n)
    if note:  # as in `generate`: decode without the cache, then hand the tokens out one by one
        logging.getLogger(__name__).warning(note)
        out, keep = sample_recompute(arch, variables, ids, mask, rng, stop_array(stop_ids), max_new_tokens=n,
                                     **sampling)  # fmt: skip
        yield from np.asarray(out)[0][np.asarray(keep)[0]].tolist()
        return
    stops = {int(s) for s in stop_ids}
    cache, valid, token, slot, pos, rng = _stream_prefill(arch, variables, ids, mask, rng, max_new_tokens=n,
                                                          **sampling)  # fmt: skip
    for i in range(1, n + 1):
        if i < n:  # dispatched before the host waits for `token`: the device runs ahead by one step
            cache, valid, following, slot, pos, rng = _stream_step(
                arch, variables, cache, valid, token, slot, pos, rng, **sampling
            )
        t = int(np.asarray(token)[0])
        yield t
        if t in stops:
            return
        if i < n:
            token = following


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
