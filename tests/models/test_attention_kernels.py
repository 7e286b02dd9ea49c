"""Splash attention (Pallas, interpret mode on CPU) against the xla path, and the dispatch around it.

The oracle is jaxtune's own xla path (`attention.attend` with the dense causal + segment (+ window) mask that
`attention_mask` builds), in fp32. One [4, T] batch holds every row layout the data pipeline and RL produce:
packed (three documents, then padding), left-padded, right-padded, and padded on both sides (an RL row:
padding, prompt + completion, padding). Outputs are compared on real tokens; the gradients of a loss over
real tokens, in q, k and v, everywhere (a pad row's query is in no loss, and no real token sees a pad key).
Pad rows are also checked finite: segment 0 sees itself, so no softmax row is empty. The decoder's parameter
gradients through both Qwen2 kernels are checked sharded against one device in tests/parallel/test_attention_mesh.py.

The lowering test exports the kernel for TPU (`jax.export`, no TPU needed) at T = 4096 and reads the StableHLO:
the attention is a `tpu_custom_call` and no 4096 x 4096 tensor exists, where the xla path's has one.
"""

from __future__ import annotations

import logging
import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import RunError
from jaxtune.models import attention, kv_cache
from jaxtune.models.arch import ArchConfig, PeftSpec
from jaxtune.models.attention_tpu import attend_tpu
from jaxtune.models.decoder import Decoder, segment_positions
from jaxtune.models.model import init_params
from jaxtune.train import setup

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32: the kernels' online softmax vs one softmax, summation order only
WINDOW = 24  # tokens: smaller than every document below, so the window cuts into each of them


def rows(t: int) -> np.ndarray:
    """[4, t] segment ids: packed, left-padded, right-padded, padded on both sides (0 = padding)."""
    seg = np.zeros((4, t), np.int32)
    a, b, c = 3 * t // 8, t // 4, t // 4
    seg[0, :a], seg[0, a : a + b], seg[0, a + b : a + b + c] = 1, 2, 3
    seg[1, t // 4 :] = 1
    seg[2, : 5 * t // 8] = 1
    seg[3, t // 8 : 5 * t // 8] = 1
    return seg


def qkv(t: int, heads: int, kv_heads: int, head_dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)  # NumPy: each jax.random op would compile on first use
    shapes = [(4, t, heads, head_dim), (4, t, kv_heads, head_dim), (4, t, kv_heads, head_dim)]
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def tiny_params(arch: ArchConfig, seed: int = 0):
    """Random parameters of the init's shapes (drawn in NumPy; norm scales around 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.1, leaf.shape) + (path[-1].key == "scale")
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init_params(arch, 0)))


def token_ids(seg, seed: int = 2):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 64, np.shape(seg)), jnp.int32)


def xla_attention(seg, window, **arch_kw):
    """The reference: the xla path with its dense mask, positions restarting per document."""
    arch = tiny("llama", attention_impl="xla", **arch_kw)
    pos = segment_positions(jnp.asarray(seg))

    def f(q, k, v):
        w = None if window is None else jnp.asarray(window, jnp.int32)
        return attention.attend(arch, attention.inputs(arch, jnp.asarray(seg)), q, k, v, w, pos, pos)

    return f


def tiny(family: str, **kw) -> ArchConfig:
    """4 query heads, 2 KV heads of 16; Qwen2 style: q/k/v biases and a window on the second layer only."""
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16)  # fmt: skip
    if family == "qwen2":
        base.update(qkv_bias=True, layer_windows=(0, WINDOW), tie_word_embeddings=True)
    if family == "gemma2":  # soft-capped attention logits, its own scale, a sliding and a global layer
        base.update(norm_plus_one=True, activation="gelu_tanh", tie_word_embeddings=True, embed_scale=True,
                    sandwich_norms=True, layer_windows=(WINDOW, 0), query_pre_attn_scalar=24.0, attn_softcap=2.0,
                    final_softcap=5.0)  # fmt: skip
    return ArchConfig(model_type=family, **{**base, **kw})


def assert_same(got, want, seg, what):
    real = np.asarray(seg)[..., None, None] > 0
    assert np.isfinite(np.asarray(got)).all(), f"{what}: non-finite values (an empty softmax row?)"
    chex.assert_trees_all_close(np.where(real, got, 0), np.where(real, want, 0), **TOL, custom_message=what)


def run(fn, *args):
    """`fn(*args)` jitted and compiled without LLVM optimisation (`FAST`): the same numbers, a third of the
    compile time of the interpreted kernels."""
    return jax.jit(fn).trace(*args).lower().compile(FAST)(*args)


@pytest.mark.parametrize(
    "kv_heads,window,t,gemma",
    [(2, None, 128, {}), (1, WINDOW, 160, {}), (2, WINDOW, 128, {"attn_softcap": 1.5, "query_pre_attn_scalar": 8.0})],
    # GQA 4:2, no window; MQA 4:1, a window, T padded up to the block; Gemma 2's soft-cap and attention scale
    ids=["gqa", "mqa-window-padded-T", "gemma2-softcap"],
)
def test_splash_equals_xla_forward_and_gradients(kv_heads, window, t, gemma):
    seg = rows(t)
    q, k, v = qkv(t, 4, kv_heads)
    real = jnp.asarray(seg > 0, jnp.float32)[..., None, None]
    cotangent = qkv(t, 4, kv_heads, seed=1)[0] * real  # a loss over real tokens only
    scale = tiny("llama", **gemma).attn_scale  # 1 / sqrt(16) but with query_pre_attn_scalar
    splash = lambda q, k, v: attend_tpu(q, k, v, jnp.asarray(seg), scale=scale, window=window, interpret=True,
                                        softcap=gemma.get("attn_softcap"))  # fmt: skip

    def forward_backward(f):
        def both(q, k, v):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(cotangent)

        return both

    out, grads = run(forward_backward(splash), q, k, v)
    want, want_grads = run(forward_backward(xla_attention(seg, window, **gemma)), q, k, v)
    if gemma:  # the soft-cap bends these logits: without it the reference differs
        plain = run(xla_attention(seg, window, query_pre_attn_scalar=8.0), q, k, v)
        assert float(jnp.abs(plain - want).max()) > 1e-2
    assert_same(out, want, seg, "forward")
    if window is None:  # without a window pad rows agree too (with one they count indices, not positions)
        chex.assert_trees_all_close(out, want, **TOL)
    for name, g, w in zip("qkv", grads, want_grads):
        chex.assert_trees_all_close(g, w, **TOL, custom_message=f"d{name}")


def prefill(arch, params, ids, seg, extra=None):
    """The forward pass that also fills the KV cache (generation's prefill): (hidden [B, T, D], cache)."""
    variables = {"params": params, **(extra or {})}
    hidden, cache = Decoder(arch).apply(
        variables, ids, seg, segment_positions(seg), mutable=[kv_cache.COLLECTION]
    )
    return hidden, cache[kv_cache.COLLECTION]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_decoder_with_splash_equals_xla(family):
    """The whole decoder, scanned layers (Qwen2's and Gemma 2's traced per-layer window picks its kernel by
    `lax.switch`; Gemma 2's kernels soft-cap): hidden states and the keys / values it caches for decoding, on
    real tokens."""
    seg = jnp.asarray(rows(128))
    ids = token_ids(seg)
    params = tiny_params(tiny(family))
    forward = lambda impl: lambda p: prefill(tiny(family, attention_impl=impl), p, ids, seg)
    (hidden, cache), (want_hidden, want_cache) = (run(forward(impl), params) for impl in ("splash", "xla"))
    assert_same(hidden[:, :, None], want_hidden[:, :, None], seg, "hidden")
    cache, want_cache = cache["layers"]["self_attn"], want_cache["layers"]["self_attn"]
    for name in ("key", "value"):  # [L, B, T, K, H]
        for layer in range(2):
            assert_same(cache[name][layer], want_cache[name][layer], seg, f"layer {layer} cached {name}")


def virtual(kind: str, arch: ArchConfig):
    """A prompt-tuning or prefix-tuning collection (3 tokens) with values off zero, and its spec."""
    rng = np.random.default_rng(3)
    if kind == "prompt":
        extra = {"prompt": {"embeddings": jnp.asarray(rng.normal(size=(3, arch.hidden_size)), jnp.float32)}}
        return extra, PeftSpec(prompt_tokens=3)
    shape = (arch.num_layers, 3, arch.num_kv_heads, arch.head_dim)  # [L, P, K, H]: scanned layers
    kv = {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name in ("key", "value")}
    return {"prefix": {"layers": {"self_attn": kv}}}, PeftSpec(prefix_tokens=3)


def fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "falls back to xla" in r.getMessage()]


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_fall_back_to_xla_with_one_line(kind, caplog):
    """The fallback is the xla program itself (the same jaxpr), announced once per trace, not once per layer."""
    seg = jnp.asarray(rows(32))
    ids = token_ids(seg)
    params = tiny_params(tiny("llama"))
    extra, spec = virtual(kind, tiny("llama"))
    program = lambda impl: jax.make_jaxpr(
        lambda p: prefill(tiny("llama", attention_impl=impl, peft=spec), p, ids, seg, extra)
    )(params)
    with caplog.at_level(logging.INFO, logger="jaxtune.models.attention"):
        got = program("splash")
    lines = fallback_lines(caplog)
    assert len(lines) == 1 and kind in lines[0], lines
    assert str(got) == str(program("xla"))


def test_kv_cache_decode_steps_fall_back_to_xla(caplog):
    """A decode step attends over cache slots under the caller's mask: xla's program, with one line."""
    seg = jnp.asarray(np.arange(128)[None] >= np.array([[32], [100]]), jnp.int32)  # left-padded prompts
    ids = token_ids(seg, 5)
    params = tiny_params(tiny("qwen2"))
    _, cache = jax.eval_shape(lambda p: prefill(tiny("qwen2", attention_impl="xla"), p, ids, seg), params)
    cache = jax.eval_shape(lambda c: kv_cache.pad(c, 1), cache)
    token, position = ids[:, -1:], (seg > 0).sum(1, keepdims=True)  # [B, 1]: after each prompt's last token
    valid = jnp.concatenate([seg > 0, jnp.ones((2, 1), bool)], axis=1)[:, None, None, :]  # [B, 1, 1, S]

    def program(impl):
        def step(p, c):
            variables = {"params": p, kv_cache.COLLECTION: c}
            model = Decoder(tiny("qwen2", attention_impl=impl))
            return model.apply(variables, token, jnp.ones_like(token), position, cache_mask=valid,
                               mutable=[kv_cache.COLLECTION])  # fmt: skip

        return jax.make_jaxpr(step)(params, cache)

    with caplog.at_level(logging.INFO, logger="jaxtune.models.attention"):
        got = program("splash")
    lines = fallback_lines(caplog)
    assert len(lines) == 1 and "decode step" in lines[0], lines
    assert str(got) == str(program("xla"))


def test_auto_resolves_by_backend_and_runs_say_which(monkeypatch, caplog):
    assert attention.resolve("auto") == "xla"  # this machine: CPU
    for backend, impl in [("tpu", "splash"), ("gpu", "pallas_gpu"), ("cpu", "xla")]:
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert attention.resolve("auto") == impl
        assert attention.resolve("xla") == "xla"
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="jaxtune.train"):
        assert setup.check_attention_impl("auto") == "xla"
    assert "attention: auto -> xla (JAX backend cpu)" in caplog.text
    with pytest.raises(RunError, match="model.attention_impl=splash needs a TPU .* backend here is 'cpu'"):
        setup.check_attention_impl("splash")
    monkeypatch.setenv(setup.PALLAS_INTERPRET_ENV, "1")  # tests run the Pallas kernels interpreted
    assert setup.check_attention_impl("splash") == "splash"


def test_what_a_path_cannot_take_falls_back_once():
    """cuDNN takes bf16/fp16 only: an fp32 model on `cudnn` runs the Pallas GPU kernel; decode steps, xla."""
    fp32, bf16 = tiny("llama"), tiny("llama", dtype="bfloat16")
    impl, reason = attention._serving(fp32, "cudnn", 128, decoding=False)
    assert impl == "pallas_gpu" and "bf16" in reason
    assert attention._serving(bf16, "cudnn", 128, decoding=False) == ("cudnn", None)
    assert attention._serving(bf16, "cudnn", 1, decoding=True)[0] == "xla"
    assert attention._serving(fp32, "splash", 128, decoding=False) == ("splash", None)
    assert attention.uses_kernel(fp32, "splash", 128) and not attention.uses_kernel(fp32, "auto", 128)  # CPU


def test_cudnn_cannot_softcap_and_runs_the_pallas_gpu_kernel_with_one_line(caplog):
    """Gemma 2 on `cudnn` (bf16): cuDNN has no logit soft-cap, so the pass is the Pallas GPU kernel's, which
    soft-caps (the same program, so the same numbers: tests/models/test_attention_gpu.py checks that kernel's
    soft-cap against the reference), announced once per trace."""
    bf16 = tiny("gemma2", dtype="bfloat16")
    impl, reason = attention._serving(bf16, "cudnn", 128, decoding=False)
    assert impl == "pallas_gpu" and "soft-capping" in reason
    assert attention._serving(tiny("llama", dtype="bfloat16"), "cudnn", 128, decoding=False) == ("cudnn", None)
    seg = jnp.asarray(rows(32))
    ids, pos = token_ids(seg), segment_positions(seg)
    params = tiny_params(bf16)
    program = lambda impl: jax.make_jaxpr(
        lambda p: Decoder(tiny("gemma2", dtype="bfloat16", attention_impl=impl)).apply({"params": p}, ids, seg, pos)
    )(params)
    with caplog.at_level(logging.INFO, logger="jaxtune.models.attention"):
        got = program("cudnn")
    lines = [r.getMessage() for r in caplog.records if "falls back to pallas_gpu" in r.getMessage()]
    assert len(lines) == 1 and "soft-capping" in lines[0], lines
    assert str(got) == str(program("pallas_gpu"))


def test_splash_lowers_to_the_tpu_kernel_without_a_t_by_t_tensor():
    """jax.export for TPU on this CPU machine: forward and backward are `tpu_custom_call`s and nothing is T x T
    (the xla path's export of the same attention holds [B, heads, T, T] scores)."""
    t, n, k, h = 4096, 2, 1, 64
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    args = (
        jax.ShapeDtypeStruct((1, t, n, h), jnp.bfloat16),
        *[jax.ShapeDtypeStruct((1, t, k, h), jnp.bfloat16)] * 2,
    )
    blocks = (512, 512, 512, 512)

    def splash_loss(q, kk, v, seg):
        out = attend_tpu(q, kk, v, seg, scale=h**-0.5, window=None, blocks=blocks)
        return out.astype(jnp.float32).sum()

    def xla_loss(q, kk, v, seg):
        arch = tiny("llama", attention_impl="xla")
        return attention.attend(arch, attention.inputs(arch, seg), q, kk, v, None, None, None).sum()

    def stablehlo(fn):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
        return jax.export.export(step, platforms=["tpu"])(*args, seg).mlir_module()

    text = stablehlo(splash_loss)
    assert text.count("tpu_custom_call") >= 3, "forward, dq and dkv kernels"
    square = re.compile(rf"tensor<[0-9x]*{t}x{t}x")
    assert not square.search(text)
    assert square.search(stablehlo(xla_loss)), "the check above must be able to fail"


def _shapes(jaxpr):
    """Every intermediate shape of a jaxpr, inside scans, conds, custom VJPs and kernels too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _shapes(inner)


def test_the_kernel_path_builds_no_t_by_t_array():
    """The decoder hands a kernel segment ids: no [.., T, T] value anywhere in the forward pass (T = 256, two
    blocks of 128; the xla path's jaxpr has its mask and scores)."""
    seg = jnp.asarray(rows(256))
    ids, pos = jnp.ones_like(seg), segment_positions(seg)
    params = tiny_params(tiny("qwen2"))

    def square(impl):
        fn = lambda p: Decoder(tiny("qwen2", attention_impl=impl)).apply({"params": p}, ids, seg, pos)
        return [s for s in _shapes(jax.make_jaxpr(fn)(params).jaxpr) if s[-2:] == (256, 256)]

    assert square("splash") == []
    assert square("xla"), "the check above must be able to fail"
