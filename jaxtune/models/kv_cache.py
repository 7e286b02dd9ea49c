"""The key/value cache of decoding, as a Flax collection `cache` beside `params` (one entry per attention layer).

    hidden, vars = Decoder(arch).apply(variables, ids, seg, pos, mutable=["cache"])        # prefill
    cache = kv_cache.pad(vars["cache"], n)                                                 # room for n tokens
    hidden, vars = Decoder(arch).apply({**variables, "cache": cache}, tok, ones, pos,
                                       cache_mask=mask, mutable=["cache"])                 # one decode step

Prefill is the training forward pass itself: each attention layer stores the keys and values it attended over
(prefix-tuning prefixes first, then prompt-tuning virtual tokens, then the left-padded prompt), so the cache
holds exactly what full recomputation would see. A decode step writes its new keys/values at slot `index` and
attends over all slots under a caller-given mask ([B, 1, T, S]: which slots are real tokens), so neither
virtual tokens nor prefixes are added again. `nn.scan` stacks the entries: `key`/`value` are
[layers, B, S, kv_heads, head_dim], `positions` [layers, B, S] (key positions, for sliding windows) and
`index` [layers]; all rows share one write slot because prompts are left-padded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.errors import RunError

COLLECTION = "cache"


def decoding(module) -> bool:
    """True when this attention layer runs a decode step against an existing cache."""
    return module.has_variable(COLLECTION, "key")


def store(module, key, value, key_positions) -> None:
    """Prefill: keep the keys/values [B, S, K, H] and key positions [B, S] this layer attended over."""
    if not module.is_mutable_collection(COLLECTION):
        return
    module.put_variable(COLLECTION, "key", key)
    module.put_variable(COLLECTION, "value", value)
    module.put_variable(COLLECTION, "positions", key_positions.astype(jnp.int32))
    module.put_variable(COLLECTION, "index", jnp.asarray(key.shape[1], jnp.int32))


def append(module, key, value, positions):
    """Decode: write the new keys/values [B, T, K, H] (positions [B, T]) at slot `index`; return the whole
    cache (keys, values [B, S, K, H], key positions [B, S]) for attention."""
    if not module.is_mutable_collection(COLLECTION):
        raise RunError("a decode step updates the KV cache: apply the decoder with mutable=['cache']")
    c = module.variables[COLLECTION]
    i = c["index"]
    k = jax.lax.dynamic_update_slice_in_dim(c["key"], key.astype(c["key"].dtype), i, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(c["value"], value.astype(c["value"].dtype), i, axis=1)
    pos = jax.lax.dynamic_update_slice_in_dim(c["positions"], positions.astype(jnp.int32), i, axis=1)
    module.put_variable(COLLECTION, "key", k)
    module.put_variable(COLLECTION, "value", v)
    module.put_variable(COLLECTION, "positions", pos)
    module.put_variable(COLLECTION, "index", i + key.shape[1])
    return k, v, pos


def pad(cache: dict, extra: int) -> dict:
    """Append `extra` empty slots to a prefilled cache (any layer layout: scanned, split or unrolled)."""

    def grow(path, x):
        name = path[-1].key
        if name in ("key", "value"):  # [..., B, S, K, H]
            widths = [(0, 0)] * x.ndim
            widths[-3] = (0, extra)
            return jnp.pad(x, widths)
        if name == "positions":  # [..., B, S]
            widths = [(0, 0)] * x.ndim
            widths[-1] = (0, extra)
            return jnp.pad(x, widths)
        return x  # index

    return jax.tree_util.tree_map_with_path(grow, cache)


def slots(cache: dict) -> int:
    """Number of slots S of a cache."""
    for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if path[-1].key == "positions":
            return x.shape[-1]
    raise RunError("not a KV cache: no `positions` entry")
