"""Flash attention on NVIDIA GPUs for packed and padded rows: a segment-aware Pallas (Triton) kernel, and cuDNN.

`attend_gpu` never builds a `T x T` mask. It takes the row's segment ids (1, 2, ... per packed document, 0 =
padding, left, right or both) and masks each tile in the kernel: key j is visible from query i iff they share a
segment id, j <= i, and (with a sliding window) i - j < window: exactly the xla path's dense `attention_mask`
(& the window by index), padding rows included (a pad token sees the earlier pads, so no row is ever empty,
and nothing is NaN).

Why our own kernels rather than `jax.experimental.pallas.ops.gpu.attention.mha` (read for its layout and its
log2-domain online softmax): `mha` has no sliding window and no GQA (its K/V block index is the query head, so
K < N heads would have to be repeated N/K times in memory, and dK/dV summed back), it visits every key tile left
of the diagonal even when the tile belongs to an earlier packed document, and it requires T to be a multiple of
its tiles. Here:
- GQA is regrouped, not repeated: the forward and dQ kernels read K/V head `n // (N/K)`; the dK/dV kernel runs
  once per KV head and loops over the N/K query heads of its group, so dK/dV are written once, never summed.
- Tiles are skipped by the mask's structure: for each query tile the loop starts at the first key any of its
  queries can see (its document's first token, or the window's left edge), and stops at the diagonal; for each
  key tile the dK/dV loop stops at the last query that can see it. Within the visited tiles the exact mask above
  applies, so skipping only saves work (`_visible_span` computes the bounds for any ids, in O(T log T)).
- T is padded up to a tile multiple with a segment id of its own (the pad is after every real query, so
  causality alone keeps it invisible) and sliced off.

`attend_cudnn` serves rows that hold one document each (any left/right padding) through
`jax.nn.dot_product_attention(implementation="cudnn")`, which only knows right padding by sequence lengths;
see its docstring for the precondition and how a batch that breaks it is still served correctly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)
# Finite, so an all-masked tile never turns the running max into NaN (masked scores are also zeroed).
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
_MAX_HEAD_DIM = 256
_CUDNN_MAX_HEAD_DIM = 128  # 256 needs Hopper and is only checked on the device; 128 holds on every cuDNN GPU
# The names the Pallas Triton lowering gives its custom call (jaxlib <= 0.10.2, and the FFI one after it).
TRITON_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes along T (powers of two, >= 16): forward queries/keys, backward queries/keys."""

    fwd_q: int
    fwd_k: int
    bwd_q: int
    bwd_k: int

    def multiple(self) -> int:
        return max(self.fwd_q, self.fwd_k, self.bwd_q, self.bwd_k)


def _head_tile(head_dim: int) -> int:
    return max(16, pl.next_power_of_2(head_dim))  # Triton dots need >= 16; the extra columns load as 0


def choose_tiles(seq_len: int, head_dim: int) -> Tiles:
    """The tiling rule (a function of the shapes, not a setting): 128-token forward tiles (64 for heads over 128,
    to stay in registers), 32-token backward tiles (the backward holds K, V, dK, dV of a tile at once), never
    larger than the sequence itself."""
    cap = max(16, pl.next_power_of_2(seq_len))
    fwd = 128 if _head_tile(head_dim) <= 128 else 64
    return Tiles(min(fwd, cap), min(fwd, cap), min(32, cap), min(32, cap))


def gpu_unsupported(*, window: int | None, head_dim: int, seq_len: int) -> str | None:
    """None when `attend_gpu` serves the case, else the one-line reason to log before falling back to xla."""
    if head_dim > _MAX_HEAD_DIM:
        return f"the Pallas GPU flash kernel keeps a head in registers: head_dim {head_dim} > {_MAX_HEAD_DIM}"
    if window is not None and window < 1:
        return f"sliding window {window} < 1 token"
    if seq_len < 1:
        return f"sequence length {seq_len} < 1"
    return None


def cudnn_unsupported(*, dtype, window: int | None, head_dim: int, seq_len: int, softcap: float = 0.0) -> str | None:
    """None when `attend_cudnn` serves the case (statically), else the one-line reason to log."""
    reason = gpu_unsupported(window=window, head_dim=head_dim, seq_len=seq_len)  # its fallback branch
    if reason is not None:
        return reason
    if softcap:
        return f"cuDNN flash attention has no logit soft-capping (attn_softcap {softcap})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bf16/fp16, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f"cuDNN flash attention needs head_dim a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, not {head_dim}"
    return None


def _visible_span(segment_ids: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """[B, T] -> (first, last) [B, T] int32: the first key query i can see, the last query that can see key j.

    first[i] = first index of segment_ids[i] in its row (then clipped to the window), last[j] = last index of
    segment_ids[j] (clipped): exact for contiguous documents, conservative for an id split in several runs
    (a pad 0 on both sides), correct for any ids. A stable sort groups equal ids in index order.
    """
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    order = jnp.argsort(segment_ids, axis=1, stable=True).astype(jnp.int32)
    ids = jnp.take_along_axis(segment_ids, order, axis=1)
    edge = ids[:, 1:] != ids[:, :-1]
    ones = jnp.ones((b, 1), bool)
    group_head = lax.cummax(jnp.where(jnp.concatenate([ones, edge], 1), idx, 0), axis=1)
    group_tail = lax.cummin(jnp.where(jnp.concatenate([edge, ones], 1), idx, t - 1), axis=1, reverse=True)
    rows = jnp.arange(b)[:, None]
    first = jnp.zeros_like(idx).at[rows, order].set(jnp.take_along_axis(order, group_head, axis=1))
    last = jnp.zeros_like(idx).at[rows, order].set(jnp.take_along_axis(order, group_tail, axis=1))
    if window is not None:
        first, last = jnp.maximum(first, idx - (window - 1)), jnp.minimum(last, idx + (window - 1))
    return first, last


def _visible(q_seg, q_pos, k_seg, k_pos, window):
    """[bq, bk] bool: the exact mask of one tile."""
    ok = (q_seg[:, None] == k_seg[None, :]) & (q_pos[:, None] >= k_pos[None, :])
    if window is not None:
        ok = ok & (q_pos[:, None] - k_pos[None, :] < window)
    return ok


def _logits(q, kt, scale, softcap):
    """One tile's log2-domain logits [bq, bk], and d capped / d uncapped (None without a soft-cap): with Gemma 2's
    `softcap`, s = softcap * tanh(scale * q.k / softcap), whose derivative in scale * q.k is 1 - tanh^2."""
    dot = pl.dot(q, kt, trans_b=True)
    if softcap is None:
        return dot * (scale * _LOG2E), None
    t = jnp.tanh(dot * (scale / softcap))
    return t * (softcap * _LOG2E), 1.0 - t * t


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, first_ref, o_ref, lse_ref, *, scale, softcap, window, bq, bk,
                head_dim):  # fmt: skip
    i = pl.program_id(0)
    hmask = (jnp.arange(q_ref.shape[-1]) < head_dim)[None, :]
    q = plgpu.load(q_ref, mask=hmask, other=0.0)  # [bq, Hp]
    rows = pl.ds(i * bq, bq)
    q_pos, q_seg = i * bq + jnp.arange(bq), seg_ref[rows]
    lo = lax.div(jnp.min(first_ref[rows]), bk)  # the first key tile any query of this tile sees
    hi = lax.div((i + 1) * bq - 1, bk) + 1  # causal: up to the diagonal tile

    def tile(j, carry):
        acc, m, rowsum = carry
        cols = pl.ds(j * bk, bk)
        kt = plgpu.load(k_ref.at[cols, :], mask=hmask, other=0.0)
        s, _ = _logits(q, kt, scale, softcap)  # log2-domain logits [bq, bk]
        ok = _visible(q_seg, q_pos, seg_ref[cols], j * bk + jnp.arange(bk), window)
        s = jnp.where(ok, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(ok, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        vt = plgpu.load(v_ref.at[cols, :], mask=hmask, other=0.0)
        acc = acc * alpha[:, None] + pl.dot(p.astype(vt.dtype), vt)
        return acc, m_new, rowsum * alpha + jnp.sum(p, axis=-1)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), _NEG, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, rowsum = lax.fori_loop(lo, hi, tile, init)  # rowsum > 0: every query sees itself
    lse_ref[...] = m + jnp.log2(rowsum)
    plgpu.store(o_ref, (acc / rowsum[:, None]).astype(o_ref.dtype), mask=hmask)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    seg_ref,
    first_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    scale,
    softcap,
    window,
    bq,
    bk,
    head_dim,
):
    i = pl.program_id(0)
    hmask = (jnp.arange(q_ref.shape[-1]) < head_dim)[None, :]
    q = plgpu.load(q_ref, mask=hmask, other=0.0)
    do = plgpu.load(do_ref, mask=hmask, other=0.0)
    lse, delta = lse_ref[...], delta_ref[...]
    rows = pl.ds(i * bq, bq)
    q_pos, q_seg = i * bq + jnp.arange(bq), seg_ref[rows]
    lo = lax.div(jnp.min(first_ref[rows]), bk)
    hi = lax.div((i + 1) * bq - 1, bk) + 1

    def tile(j, dq):
        cols = pl.ds(j * bk, bk)
        kt = plgpu.load(k_ref.at[cols, :], mask=hmask, other=0.0)
        vt = plgpu.load(v_ref.at[cols, :], mask=hmask, other=0.0)
        ok = _visible(q_seg, q_pos, seg_ref[cols], j * bk + jnp.arange(bk), window)
        s, capped = _logits(q, kt, scale, softcap)
        p = jnp.where(ok, jnp.exp2(s - lse[:, None]), 0.0)
        ds = p * (pl.dot(do, vt, trans_b=True) - delta[:, None])  # d loss / d logits
        if capped is not None:
            ds = ds * capped
        return dq + pl.dot(ds.astype(kt.dtype), kt)

    dq = lax.fori_loop(lo, hi, tile, jnp.zeros(q.shape, jnp.float32))
    plgpu.store(dq_ref, (dq * scale).astype(dq_ref.dtype), mask=hmask)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    seg_ref,
    last_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    softcap,
    window,
    bq,
    bk,
    head_dim,
    group,
):
    j = pl.program_id(
        0
    )  # one key tile of one KV head; q/do/lse/delta hold the `group` query heads sharing it
    hmask = (jnp.arange(k_ref.shape[-1]) < head_dim)[None, :]
    kt = plgpu.load(k_ref, mask=hmask, other=0.0)
    vt = plgpu.load(v_ref, mask=hmask, other=0.0)
    cols = pl.ds(j * bk, bk)
    k_pos, k_seg = j * bk + jnp.arange(bk), seg_ref[cols]
    lo = lax.div(j * bk, bq)  # causal: from the diagonal tile
    hi = lax.div(jnp.max(last_ref[cols]), bq) + 1  # to the last query tile that sees a key of this tile

    def q_tile(i, carry):
        rows = pl.ds(i * bq, bq)
        ok = _visible(seg_ref[rows], i * bq + jnp.arange(bq), k_seg, k_pos, window)

        def head(g, carry):
            dk, dv = carry
            q = plgpu.load(q_ref.at[rows, g, :], mask=hmask, other=0.0)
            do = plgpu.load(do_ref.at[rows, g, :], mask=hmask, other=0.0)
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            s, capped = _logits(q, kt, scale, softcap)
            p = jnp.where(ok, jnp.exp2(s - lse[:, None]), 0.0)
            dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (pl.dot(do, vt, trans_b=True) - delta[:, None])
            if capped is not None:
                ds = ds * capped
            return dk + pl.dot(ds.astype(q.dtype), q, trans_a=True), dv

        return lax.fori_loop(0, group, head, carry)

    zeros = jnp.zeros(kt.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, q_tile, (zeros, zeros))
    plgpu.store(dk_ref, (dk * scale).astype(dk_ref.dtype), mask=hmask)
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype), mask=hmask)


def _params(tile: int, hp: int):
    return plgpu.CompilerParams(num_warps=4 if tile * hp <= 64 * 64 else 8, num_stages=2)


def _forward(q, k, v, seg, first, scale, softcap, window, tiles, interpret):
    b, t, n, h = q.shape
    hp, group, bq = _head_tile(h), n // k.shape[2], tiles.fwd_q
    row = pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0))
    kv = pl.BlockSpec((None, t, None, hp), lambda i, bi, ni: (bi, 0, ni // group, 0))
    q_tile = pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kernel = functools.partial(
        _fwd_kernel, scale=scale, softcap=softcap, window=window, bq=bq, bk=tiles.fwd_k, head_dim=h
    )
    return pl.pallas_call(
        kernel,
        grid=(t // bq, b, n),
        in_specs=[q_tile, kv, kv, row, row],
        out_specs=[q_tile, pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_params(bq, hp),
        interpret=interpret,
        name="jaxtune_flash_fwd",
    )(q, k, v, seg, first)


def _backward(q, k, v, seg, first, last, o, lse, do, scale, softcap, window, tiles, interpret):
    b, t, n, h = q.shape
    nk = k.shape[2]
    hp, group, bq, bk = _head_tile(h), n // nk, tiles.bwd_q, tiles.bwd_k
    delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))  # rowsum(dO * O)
    row = pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0))
    kw = dict(scale=scale, softcap=softcap, window=window, bq=bq, bk=bk, head_dim=h)

    q_tile = pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, i, ni, 0))
    kv_full = pl.BlockSpec((None, t, None, hp), lambda i, bi, ni: (bi, 0, ni // group, 0))
    stat = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(t // bq, b, n),
        in_specs=[q_tile, kv_full, kv_full, row, row, q_tile, stat, stat],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(bq, hp),
        interpret=interpret,
        name="jaxtune_flash_dq",
    )(q, k, v, seg, first, do, lse, delta)

    grouped = (b, t, nk, group, h)  # query head n = kv head * group + g (the layout repeat_kv assumes)
    q_group = pl.BlockSpec((None, t, None, group, hp), lambda j, bi, ki: (bi, 0, ki, 0, 0))
    stat_group = pl.BlockSpec((None, None, group, t), lambda j, bi, ki: (bi, ki, 0, 0))
    kv_tile = pl.BlockSpec((None, bk, None, hp), lambda j, bi, ki: (bi, j, ki, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=group, **kw),
        grid=(t // bk, b, nk),
        in_specs=[q_group, kv_tile, kv_tile, row, row, q_group, stat_group, stat_group],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(bk, hp),
        interpret=interpret,
        name="jaxtune_flash_dkv",
    )(
        q.reshape(grouped),
        k,
        v,
        seg,
        last,
        do.reshape(grouped),
        lse.reshape(b, nk, group, t),
        delta.reshape(b, nk, group, t),
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, seg, first, last, scale, softcap, window, tiles, interpret):
    return _forward(q, k, v, seg, first, scale, softcap, window, tiles, interpret)[0]


def _flash_fwd(q, k, v, seg, first, last, scale, softcap, window, tiles, interpret):
    o, lse = _forward(q, k, v, seg, first, scale, softcap, window, tiles, interpret)
    return o, (q, k, v, seg, first, last, o, lse)


def _flash_bwd(scale, softcap, window, tiles, interpret, res, do):
    q, k, v, seg, first, last, o, lse = res
    dq, dk, dv = _backward(q, k, v, seg, first, last, o, lse, do, scale, softcap, window, tiles, interpret)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend_gpu(
    q,
    k,
    v,
    segment_ids,
    *,
    scale: float,
    window: int | None,
    interpret: bool = False,
    tiles: Tiles | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal attention within each segment: q [B, T, N, H]; k, v [B, T, K, H] (N a multiple of K);
    segment_ids [B, T] int32 (1, 2, ... per document, 0 = padding). Returns [B, T, N, H] in q's dtype.

    `window` (static): key j is visible from query i iff i - j < window (None: no window). `softcap` (static,
    Gemma 2): the logits are softcap * tanh(scale * q.k / softcap) before the mask (None: off). `interpret` runs the
    kernels in Pallas interpret mode (CPU tests). `tiles`: None picks `choose_tiles(T, H)`. Differentiable in
    q, k, v (a Pallas backward; no second derivative). Check `gpu_unsupported` first.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(
            f"attend_gpu: q {q.shape}, k {k.shape}, v {v.shape}: need k, v [B, T, K, H], N % K == 0"
        )
    tiles = tiles or choose_tiles(t, h)
    pad = -t % tiles.multiple()
    seg = segment_ids.astype(jnp.int32)
    if pad:  # a segment of its own after every real query: causality keeps it out of every real row
        fresh = jnp.max(seg, axis=1, keepdims=True) + 1
        seg = jnp.concatenate([seg, jnp.broadcast_to(fresh, (b, pad))], axis=1)
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    first, last = _visible_span(seg, window)
    softcap = float(softcap) if softcap else None
    out = _flash(q, k, v, seg, first, last, float(scale), softcap, window, tiles, interpret)
    return out[:, :t] if pad else out


def _one_document_rows(segment_ids: jax.Array):
    """[B, T] -> (ok, start, length): ok when every row is [0]*P + [s]*L + [0]*R (one document, s != 0)."""
    t = segment_ids.shape[1]
    real = segment_ids != 0
    length = real.sum(axis=1).astype(jnp.int32)
    start = jnp.argmax(real, axis=1).astype(jnp.int32)  # 0 for a row of padding only
    idx = jnp.arange(t)[None, :]
    inside = (idx >= start[:, None]) & (idx < (start + length)[:, None])
    doc = jnp.take_along_axis(segment_ids, start[:, None], axis=1)
    ok = jnp.all((real == inside) & (~real | (segment_ids == doc)))
    return ok, start, length


def _roll_rows(x, shift):
    """x [B, T, ...] -> row b rolled left by shift[b] (out[b, i] = x[b, (i + shift[b]) % T])."""
    t = x.shape[1]
    src = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)


def attend_cudnn(
    q, k, v, segment_ids, *, scale: float, window: int | None, interpret: bool = False
) -> jax.Array:
    """`attend_gpu`'s contract through cuDNN flash attention, for batches of one document per row.

    Precondition for the fast branch (what the dispatcher checks statically: unpacked batches, and
    `cudnn_unsupported(...)` is None): every row is `[0]*P + [s]*L + [0]*R`, one document with any left and/or
    right padding (prompt and completion of an RL row in one segment). Each row is rolled left by P so cuDNN's
    right padding (`query_seq_lengths` = `key_value_seq_lengths` = L) and causal mask hold, then rolled back.

    Never silently wrong: the same precondition is checked on the device, and a batch that breaks it (packed
    rows, two documents in a row) runs the whole `lax.cond` other branch, `attend_gpu`, instead.

    Padding rows (segment 0) return 0 on both branches (they are no document; nothing reads them), so only
    real rows equal `attend_gpu` / the xla reference. `interpret=True` (CPU tests): the same
    `jax.nn.dot_product_attention` call with implementation="xla" (cuDNN has no CPU or interpret mode), and
    `attend_gpu` in interpret mode for the other branch.
    """
    ok, start, length = _one_document_rows(segment_ids)
    real = (segment_ids != 0)[:, :, None, None]

    def one_document(q, k, v):
        rolled = [_roll_rows(x, start) for x in (q, k, v)]
        lengths = jnp.maximum(length, 1)  # an all-padding row: one visible key, finite, zeroed below
        out = jax.nn.dot_product_attention(
            *rolled,
            scale=scale,
            is_causal=True,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            local_window_size=None if window is None else (window - 1, 0),
            implementation="xla" if interpret else "cudnn",
        )
        return _roll_rows(out.astype(q.dtype), (-start) % q.shape[1])

    def packed(q, k, v):
        return attend_gpu(q, k, v, segment_ids, scale=scale, window=window, interpret=interpret)

    out = lax.cond(ok, one_document, packed, q, k, v)
    return jnp.where(real, out, jnp.zeros((), out.dtype))
