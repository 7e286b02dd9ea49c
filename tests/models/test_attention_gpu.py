"""The GPU flash kernels (Pallas interpret mode on CPU) against the xla reference: forward and q/k/v gradients on
packed, left-, right- and both-sides-padded rows, GQA and MQA, a sliding window, a T that is no tile multiple,
Gemma 2's soft-capped logits; the cuDNN wrapper's row rolling and its fallback; and the Triton lowering for CUDA at
T=4096 (no T x T buffer), soft-capped too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import attention_gpu as ag

N, H = 4, 16
SCALE = H**-0.5  # the reference's own default for H = 16
# Interpret-mode kernels are large HLO programs: XLA:CPU's cheap optimisation levels halve their compile time.
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MIXED_TILES = ag.Tiles(fwd_q=32, fwd_k=16, bwd_q=16, bwd_k=32)  # several tiles per row, q and k tiles unequal


def rows(t: int, layouts: list[list[tuple[int, int]]]) -> np.ndarray:
    """[(segment id, run length), ...] per row, padded on the right with 0 up to t."""
    out = np.zeros((len(layouts), t), np.int32)
    for r, runs in enumerate(layouts):
        pos = 0
        for seg, n in runs:
            out[r, pos : pos + n] = seg
            pos += n
    return out


def mixed(t: int) -> np.ndarray:
    """Packed (and a pad tail), left-padded, right-padded, both sides padded (RL: pad, prompt+completion, pad)."""
    return rows(t, [[(1, 20), (2, 25), (3, t - 49)], [(0, 24), (1, t - 24)], [(1, 37)], [(0, 10), (1, 30)]])


def reference(q, k, v, seg, window, softcap=None, scale=None):  # scale None: jax.nn's default, 1/sqrt(H)
    # the dense mask of the xla path (decoder's `attention_mask`): causal and within one segment, pads included
    idx = jnp.arange(seg.shape[1])
    mask = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])
    if window is not None:
        mask = mask & ((idx[:, None] - idx[None, :]) < window)
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])  # mask [B, 1, T, T]
    # Gemma 2 (HF eager): softcap * tanh(scale q.k / softcap), then the mask and the softmax; KV heads repeated
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = jnp.where(mask[:, None], softcap * jnp.tanh(logits / softcap), -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def compiled(fn, *example):
    return jax.jit(fn).lower(*example).compile(compiler_options=QUICK_COMPILE)


def with_grads(attn, *example):
    """Compiled (q, k, v, seg, cotangent) -> (out, (dq, dk, dv)), for arguments shaped like `example`."""

    def run(q, k, v, seg, ct):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return out, vjp(ct)

    run = compiled(run, *example)
    return lambda *args: jax.device_get(run(*args))


def inputs(b, t, kv, h=H, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda heads: rng.standard_normal((b, t, heads, h), np.float32)
    return normal(N), normal(kv), normal(kv), normal(N)  # q, k, v, output cotangent


def close(a, b, what):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=what)


@pytest.mark.parametrize(
    "kv, window, t, h, tiles, softcap",
    [
        (2, None, 64, H, MIXED_TILES, None),  # GQA, full causal
        (1, 8, 56, H, MIXED_TILES, None),  # MQA, sliding window, T padded to the tile multiple
        (4, 5, 64, 24, None, None),  # MHA, a head dim padded to 32 in the tile, the tiling rule's own tiles
        (2, 8, 64, H, MIXED_TILES, 1.5),  # Gemma 2: soft-capped logits (forward and the tanh' in dq, dk)
    ],
)
def test_flash_matches_reference(kv, window, t, h, tiles, softcap):
    seg = mixed(t)
    q, k, v, ct = inputs(seg.shape[0], t, kv, h)
    args = (q, k, v, seg, ct)
    kernel = with_grads(
        lambda q, k, v, s: ag.attend_gpu(
            q, k, v, s, scale=h**-0.5, window=window, interpret=True, tiles=tiles, softcap=softcap
        ),
        *args,
    )
    out, grads = kernel(*args)
    ref = lambda q, k, v, s: reference(q, k, v, s, window, softcap, h**-0.5)
    ref_out, ref_grads = with_grads(ref, *args)(*args)
    if softcap is not None:  # the cap bends these logits (|scale q.k| reaches several times it)
        uncapped = with_grads(lambda q, k, v, s: reference(q, k, v, s, window), *args)(*args)[0]
        assert np.abs(uncapped - ref_out).max() > 1e-2
    assert out.shape == q.shape and out.dtype == q.dtype
    assert all(np.isfinite(x).all() for x in (out, *grads))  # padding rows included
    close(out, ref_out, "forward")
    for name, g, r in zip("qkv", grads, ref_grads):
        close(g, r, f"d{name}")

    # nothing of a pad token reaches a real row: scramble pad keys/values, real rows keep their output
    pad = (seg == 0)[:, :, None, None]
    out2, _ = kernel(
        q, np.where(pad, 1e3, k).astype(k.dtype), np.where(pad, -1e3, v).astype(v.dtype), seg, ct
    )
    np.testing.assert_array_equal(out2[seg != 0], out[seg != 0])


def test_visible_span_is_exact_for_documents_and_covers_split_ids():
    seg = rows(12, [[(0, 2), (1, 3), (2, 4), (0, 3)], [(5, 4), (7, 4), (5, 4)]])
    (first, last), (first_w, last_w) = jax.device_get(
        jax.jit(lambda s: (ag._visible_span(s, None), ag._visible_span(s, 2)))(seg)
    )
    np.testing.assert_array_equal(first[0], [0, 0, 2, 2, 2, 5, 5, 5, 5, 0, 0, 0])
    np.testing.assert_array_equal(last[0], [11, 11, 4, 4, 4, 8, 8, 8, 8, 11, 11, 11])
    np.testing.assert_array_equal(first[1], [0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(first_w[0], [0, 0, 2, 2, 3, 5, 5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(last_w[0], [1, 2, 3, 4, 4, 6, 7, 8, 8, 10, 11, 11])


def test_unsupported_reasons():
    assert ag.gpu_unsupported(window=None, head_dim=128, seq_len=4096) is None
    assert ag.gpu_unsupported(window=4096, head_dim=80, seq_len=100) is None
    assert "head_dim 512" in ag.gpu_unsupported(window=None, head_dim=512, seq_len=64)
    assert "window 0" in ag.gpu_unsupported(window=0, head_dim=64, seq_len=64)
    assert ag.cudnn_unsupported(dtype=jnp.bfloat16, window=None, head_dim=128, seq_len=2048) is None
    assert ag.cudnn_unsupported(dtype="bfloat16", window=7, head_dim=64, seq_len=2048) is None
    assert "float32" in ag.cudnn_unsupported(dtype=jnp.float32, window=None, head_dim=128, seq_len=2048)
    assert "head_dim" in ag.cudnn_unsupported(dtype=jnp.bfloat16, window=None, head_dim=100, seq_len=2048)
    assert "soft-capping" in ag.cudnn_unsupported(dtype=jnp.bfloat16, window=None, head_dim=64, seq_len=64, softcap=50.0)


def test_cudnn_wrapper_rolls_padded_rows_and_falls_back_for_packed():
    t, window = 32, 6
    one_doc = rows(t, [[(0, 9), (1, 23)], [(1, 17)], [(0, 5), (2, 20)], []])  # left, right, both, all padding
    packed = rows(t, [[(1, 10), (2, 22)], [(1, 17)], [(0, 5), (2, 20)], [(3, 3)]])
    fits = jax.jit(lambda s: ag._one_document_rows(s)[0])
    assert bool(fits(one_doc)) and not bool(fits(packed))  # which lax.cond branch each batch takes
    q, k, v, ct = inputs(4, t, 2, seed=1)
    args = (q, k, v, one_doc, ct)
    cudnn = with_grads(
        lambda q, k, v, s: ag.attend_cudnn(q, k, v, s, scale=SCALE, window=window, interpret=True), *args
    )
    ref = with_grads(lambda q, k, v, s: reference(q, k, v, s, window), *args)
    for seg in (one_doc, packed):
        real = (seg != 0)[:, :, None, None]
        ct_real = np.where(real, ct, 0.0).astype(ct.dtype)  # a loss never reads padding rows
        out, grads = cudnn(q, k, v, seg, ct_real)
        ref_out, ref_grads = ref(q, k, v, seg, ct_real)
        assert not np.where(real, 0.0, out).any()  # padding rows are 0
        close(out[seg != 0], ref_out[seg != 0], "forward (real rows)")
        for name, g, r in zip("qkv", grads, ref_grads):
            close(g, r, f"d{name}")


@pytest.mark.parametrize("softcap", [None, 50.0], ids=["plain", "softcap"])
def test_lowers_to_triton_for_cuda_without_a_t_by_t_buffer(softcap):
    b, t, n, kv, h = 1, 4096, 2, 1, 16
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    kv_ = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)

    def loss_and_grads(q, k, v, seg):
        f = lambda q, k, v: ag.attend_gpu(
            q, k, v, seg, scale=SCALE, window=None, softcap=softcap
        ).astype(jnp.float32).sum()
        return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in ag.TRITON_CALL_TARGETS]
    exported = jax.export.export(jax.jit(loss_and_grads), platforms=["cuda"], disabled_checks=checks)
    text = exported(q, kv_, kv_, seg).mlir_module()
    calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)\(", text)
    assert calls and set(calls) <= set(ag.TRITON_CALL_TARGETS), calls
    assert len(calls) == 3, calls  # forward, dQ, dK/dV
    assert f"{t}x{t}" not in text
