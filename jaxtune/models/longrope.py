"""Partial rotary embeddings and LongRoPE (Phi-3 / Phi-4 `phi3`), following transformers' numerics exactly.

- `partial_rotary_factor` (Phi-4-mini: 0.75): only the first `rotary_dim = int(head_dim * factor)` dims of q
  and k are rotated (HF's rotate-half layout within them); the rest pass through unchanged. The cos/sin tables
  are [B, T, rotary_dim] and `layers.apply_rope` splits q/k by the table's width, as HF's
  `apply_rotary_pos_emb` does.
- `longrope` (the 128k variants; `su` / `yarn` in old Phi-3 configs, which HF's Phi3Config renames to
  longrope): inverse frequencies `1 / (ext * theta ** (2i / rotary_dim))` with `ext` = `short_factor` or
  `long_factor`, and cos/sin multiplied by `attention_factor` (default sqrt(1 + ln(s) / ln(original_max)),
  s = max_position_embeddings / original_max_position_embeddings, or `factor`), as
  `modeling_rope_utils._compute_longrope_parameters`.

Long vs short factors: HF (`dynamic_rope_update` -> `longrope_frequency_update`) picks the long set for the
whole forward pass when `max(position_ids) + 1 > original_max_position_embeddings`, the max taken over the
whole batch. We do the same, traced (one `jnp.where`, no recompilation): the max over the batch's real tokens
(segment id != 0) of their positions. Positions restart in every packed document, so a packed row picks
what its longest document alone would when that document decides the batch's max — exactly HF's result for
the same `position_ids` (HF's padded-batch positions, cumsum(mask) - 1, put pads at a real token's position).
A decode step sees the new tokens' positions, i.e. the total length so far, like HF's rotary module per step.
HF's `generate` also drops its KV cache once, when the length first crosses original_max_position_embeddings,
and recomputes everything with the long factors; cached keys of ours would keep the short factors, so
`generate.generate` decodes such a generation without the cache (`cache_crossing`; exact, slower). RL rollouts
(`methods/rollout.py`, cached `sample`) do not: their keys keep the short factors past that length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.models.arch import ArchConfig


def rotary_dim(arch: ArchConfig) -> int:
    """How many leading dims of each head RoPE rotates (HF: int(head_dim * partial_rotary_factor))."""
    return int(arch.head_dim * float(arch.rope.get("partial_rotary_factor", 1.0)))


def inv_freq(arch: ArchConfig, factors) -> jax.Array:
    """[rotary_dim // 2]: 1 / (ext * theta ** (arange(0, dim, 2) / dim)), fp32 (HF longrope)."""
    dim = rotary_dim(arch)
    ext = jnp.asarray(factors, jnp.float32)
    shape = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (ext * arch.rope_theta**shape)


def tables(arch: ArchConfig, positions: jax.Array, dtype, segment_ids=None) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, rotary_dim] for longrope: long factors when the batch's longest sequence is longer than
    original_max_position_embeddings (see the module docstring), each scaled by attention_factor."""
    rope = arch.rope
    real = positions if segment_ids is None else jnp.where(segment_ids != 0, positions, 0)
    long = jnp.max(real) + 1 > rope["original_max_position_embeddings"]
    freq = jnp.where(long, inv_freq(arch, rope["long_factor"]), inv_freq(arch, rope["short_factor"]))
    freqs = positions.astype(jnp.float32)[..., None] * freq  # [B, T, rotary_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = float(rope["attention_factor"])
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def cache_crossing(arch: ArchConfig, prompt_len: int, total_len: int) -> str | None:
    """Why a KV-cached generation of a longrope model cannot match transformers' `generate`, or None: the
    longest prompt (short factors) is at most original_max_position_embeddings long and the generation passes
    that length, where HF drops its cache and recomputes the whole sequence with the long factors."""
    rope = arch.rope
    if rope.get("rope_type") != "longrope":
        return None
    limit = rope["original_max_position_embeddings"]
    if prompt_len <= limit < total_len:
        return (
            f"longrope: generation crosses original_max_position_embeddings={limit} (prompt {prompt_len} -> "
            f"{total_len} tokens), where the RoPE factors switch from short to long for every position, as "
            "transformers does: decoding without the KV cache (each step recomputes the sequence)"
        )
    return None
