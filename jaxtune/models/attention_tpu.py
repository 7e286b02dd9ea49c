"""TPU attention: Pallas splash attention over segment ids, with no `T x T` mask anywhere.

    attend_tpu(q, k, v, segment_ids, *, scale, window, blocks=(), interpret=False, softcap=None) -> [B, T, N, H]

q [B, T, N, H]; k, v [B, T, K, H] (GQA: N a multiple of K, served natively by splash's MHA form, query head h
reading KV head h // (N / K) as `jax.nn.dot_product_attention` and HF's `repeat_kv` do); segment_ids [B, T]
(1, 2, ... per packed document, 0 = padding). Causal within each document (`SegmentIds` ANDed with a
`CausalMask`, or a `LocalMask` for a sliding window: key j visible from query i iff i - j < window).
`softcap` (Gemma 2): splash's `attn_logits_soft_cap`, softcap * tanh(logits / softcap) on the scaled logits
before the mask, forward and backward. Padding rows share segment 0, so each sees at least itself: no all-masked
row, no NaN, and no real token ever sees a pad. The sliding window counts row indices, the xla path counts
positions: inside a document positions are consecutive, so the two agree for every real token (pad rows, which
no real token sees, may differ).

Splash's masks are static, their block tables built in NumPy per (length, heads, window, blocks). Sequences are
padded up to a multiple of the block size (splash tiles whole blocks; the tail is padding that only later pad
rows could see) and the result sliced back. `interpret=True` runs the same kernel through the Pallas
interpreter on any backend (CPU tests); `jax.export(..., platforms=["tpu"])` lowers it to `tpu_custom_call`.
Source: jax.experimental.pallas.ops.tpu.splash_attention (MaxText's `tpu_flash_attention` uses it the same way).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

LANES = 128  # splash tiles the KV axis in multiples of the TPU lane width


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def block_sizes(seq_len: int, blocks: tuple[int, ...] = ()) -> tuple[int, splash.BlockSizes]:
    """(padded length, splash BlockSizes) for a sequence: `blocks` = (q, kv, q_bwd, kv_bwd), () = splash's
    defaults; each is clipped to the sequence (rounded up to the lane width) and the sequence padded to a
    multiple of all of them."""
    if not blocks:
        d = splash.BlockSizes.get_default()
        blocks = (d.block_q, d.block_kv, d.block_q_dkv, d.block_kv_dkv)
    short = _round_up(seq_len, LANES)
    bq, bkv, bq_bwd, bkv_bwd = (min(b, short) for b in blocks)
    padded = _round_up(seq_len, math.lcm(bq, bkv, bq_bwd, bkv_bwd))
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq_bwd,
        block_kv_dkv=bkv_bwd,
        block_kv_dkv_compute=bkv_bwd,
        block_q_dq=bq_bwd,
        block_kv_dq=bkv_bwd,
    )
    return padded, sizes


def _kernel(seq_len: int, heads: int, window: int | None, sizes: splash.BlockSizes, interpret: bool,
            softcap: float | None = None):  # fmt: skip
    """The splash kernel for one static mask. Built at every trace: its block tables become constants of that
    trace (a kernel kept across traces would leak tracers out of `nn.scan`'s), and the NumPy work behind them
    is cached by splash itself (`process_mask` is an lru_cache keyed by the mask and block shape)."""
    shape = (seq_len, seq_len)
    if window is None or window >= seq_len:
        mask = splash_mask.CausalMask(shape)
    else:  # kv >= q - (window - 1) and kv <= q: causal, `window` keys wide
        mask = splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * heads),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def attend_tpu(q, k, v, segment_ids, *, scale: float, window: int | None, blocks: tuple[int, ...] = (),
               interpret: bool = False, softcap: float | None = None) -> jax.Array:  # fmt: skip
    """Causal, segment-masked softmax(q k^T * scale) v through splash attention; [B, T, N, H] in q's dtype."""
    b, t, n, _ = q.shape
    padded, sizes = block_sizes(t, blocks)
    # splash takes no scale: fold it into q (in fp32, then q's dtype, as the logits are scaled on the xla path)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    if padded != t:
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - t)))  # segment 0: padding
    window = None if window is None or window <= 0 else int(window)
    kernel = _kernel(padded, n, window, sizes, interpret, float(softcap) if softcap else None)

    def one(q, k, v, seg):  # one row: q [N, T, H], k/v [K, T, H], seg [T]
        return kernel(q, k, v, splash.SegmentIds(q=seg, kv=seg))

    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, N, H] <-> [B, N, T, H]
    out = jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), segment_ids.astype(jnp.int32))
    return heads_first(out)[:, :t].astype(q.dtype)  # [B, T, N, H]
