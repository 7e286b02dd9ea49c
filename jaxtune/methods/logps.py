"""Per-token log-probabilities of the targets, computed from hidden states in chunks over the sequence.

This is the single home of the vocabulary-sized math. The LM head is applied to `chunk` positions at a time
inside a rematerialised `lax.map`, so the full [B, T, V] fp32 logits never exist — with 150k-token vocabularies
they would be the memory peak of a step (B=8, T=2048, V=152k: 10 GB). The backward pass recomputes each
chunk's logits instead of storing them.

For every position the chunk yields: log p(target), log-sum-exp (for z-loss), the mean logit (for label
smoothing: mean_v -log p_v = lse - mean_v logit_v), and whether the argmax is the target (token accuracy).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStats(NamedTuple):
    logp: jax.Array  # [B, T] log p(target_t)
    lse: jax.Array  # [B, T] log-sum-exp of the logits
    mean_logit: jax.Array  # [B, T]
    correct: jax.Array  # [B, T] bool: argmax == target


def auto_chunk(batch: int, length: int, vocab: int, budget_bytes: int = 256 * 2**20) -> int:
    """Largest power-of-two chunk (<= length) whose fp32 logits [B, chunk, V] fit the budget."""
    chunk = 1
    while chunk * 2 <= length and batch * chunk * 2 * vocab * 4 <= budget_bytes:
        chunk *= 2
    return chunk


def token_stats(head_fn, hidden: jax.Array, targets: jax.Array, chunk: int | None = None) -> TokenStats:
    """`head_fn(hidden [B, C, D]) -> logits [B, C, V]`; hidden [B, T, D]; targets [B, T] int."""
    b, t, _ = hidden.shape

    @jax.checkpoint  # recompute the chunk's logits in the backward pass rather than keep them
    def one(args):
        h, y = args  # [B, C, D], [B, C]
        logits = head_fn(h).astype(jnp.float32)  # [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        correct = jnp.argmax(logits, axis=-1) == y
        return TokenStats(target_logit - lse, lse, logits.mean(-1), correct)

    if chunk is None:
        # Probe the vocabulary size without running the head.
        vocab = jax.eval_shape(head_fn, hidden[:, :1]).shape[-1]
        chunk = auto_chunk(b, t, vocab)
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, -1).swapaxes(0, 1)  # [n, B, C, D]
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]
    stats = jax.lax.map(one, (h, y))  # each field [n, B, C]
    return TokenStats(*(s.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for s in stats))


def token_losses(stats: TokenStats, label_smoothing: float = 0.0, z_loss: float = 0.0) -> jax.Array:
    """Per-token loss [B, T]: cross-entropy with optional label smoothing and z-loss (PaLM, sec. 5)."""
    nll = -stats.logp
    if label_smoothing:
        # (1 - eps) * CE(target) + eps * mean over the vocabulary of CE(v)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (stats.lse - stats.mean_logit)
    if z_loss:
        nll = nll + z_loss * jnp.square(stats.lse)
    return nll


def sequence_logps(stats: TokenStats, loss_mask: jax.Array, segment_ids: jax.Array | None = None, num_segments: int = 1):
    """Sum of target log-probs per row [B] (or per packed segment [B, S]) over the trained tokens."""
    weighted = stats.logp * loss_mask
    if segment_ids is None or num_segments == 1:
        return weighted.sum(-1)
    onehot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=weighted.dtype)  # [B, T, S]; pads -> zeros
    return jnp.einsum("bt,bts->bs", weighted, onehot)
