"""Attention dispatch: which implementation serves a forward pass, and what it is given (`ArchConfig.attention_impl`).

    xla         jax.nn.dot_product_attention with a dense [B, 1, T, S] mask: the reference, every platform
    splash      Pallas splash attention over segment ids (TPU; attention_tpu.py)
    pallas_gpu  the Pallas (Triton) flash kernel over segment ids (GPU; attention_gpu.attend_gpu)
    cudnn       cuDNN flash attention for rows of one document each, else the Pallas kernel (GPU;
                attention_gpu.attend_cudnn, which checks that on the device; what cuDNN cannot take
                statically, fp32, heads over 128 or a soft-cap, goes to pallas_gpu with one logged line)
    auto        by `jax.default_backend()`: tpu -> splash, gpu -> pallas_gpu, otherwise xla

The kernels never see a `T x T` mask: the decoder hands every layer the segment ids (`inputs`), and the dense
mask is built only for xla and for what a kernel cannot serve, which falls back to xla with one logged line
per trace: KV-cache decode steps (attending over cache slots under the caller's mask), prefix tuning (learned
keys every query sees) and prompt tuning (virtual tokens, segment -1, that every document sees). Gemma 2's
attention-logit soft-cap (`ArchConfig.attn_softcap`) runs in splash and the Pallas GPU kernel; cuDNN has none
(its passes go to pallas_gpu with one line), and on xla, whose `jax.nn.dot_product_attention` cannot soft-cap,
the softmax is written out (`_softcapped`). Every path scales the logits by `ArchConfig.attn_scale`. Sliding
windows are static in the kernels; a per-layer window under `nn.scan` is a traced scalar, so the layer picks
among one kernel per distinct window of `ArchConfig.layer_windows` with `lax.switch` (Qwen2 and Gemma 2/3 have
two: full and windowed). Under a mesh a kernel runs per shard in `shard_map`: batch over (data, fsdp),
heads over tensor, as `parallel/rules.py` places the activations.
"""

from __future__ import annotations

import functools
import logging
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtune.models import adapters_hook
from jaxtune.models.arch import ArchConfig
from jaxtune.parallel.rules import spec_for

log = logging.getLogger(__name__)

KERNELS = ("splash", "pallas_gpu", "cudnn")  # take segment ids; xla takes the dense mask
PLATFORM = {"splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}  # where each non-xla path runs natively
AUTO = {"tpu": "splash", "gpu": "pallas_gpu"}  # auto: the kernel of each backend; xla elsewhere
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def resolve(impl: str) -> str:
    """`auto` -> the implementation for this process's backend; anything else as given."""
    return AUTO.get(jax.default_backend(), "xla") if impl == "auto" else impl


def interpreted(impl: str) -> bool:
    """Pallas kernels run through the interpreter off their own platform (CPU tests)."""
    return jax.default_backend() != PLATFORM[impl]


def attention_mask(segment_ids: jax.Array, virtual: bool = False) -> jax.Array:
    """[B, T] segment ids (0 = padding) -> [B, 1, T, T] bool: causal and within one document.

    Padding tokens share segment 0, so each pad row still sees itself (no all-masked rows, hence no NaN),
    and no real token ever sees a pad or another packed document.
    """
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    if virtual:  # prompt tuning: virtual tokens (segment -1, first in the row) are seen by every segment
        same = same | (segment_ids[:, None, :] == adapters_hook.VIRTUAL_SEGMENT)
    return (same & causal)[:, None]  # [B, 1, T, T]


@flax.struct.dataclass
class Inputs:
    """What every attention layer of one forward pass attends with: the dense mask or the segment ids."""

    impl: str = flax.struct.field(pytree_node=False)  # resolved: xla | splash | pallas_gpu | cudnn
    mask: jax.Array | None = None  # [B, 1, T, S] bool (xla)
    segment_ids: jax.Array | None = None  # [B, T] int (kernels)
    real: jax.Array | None = None  # [B, T] bool, segment id != 0: the tokens MoE router statistics count


def _windows(arch: ArchConfig) -> tuple[int | None, ...]:
    """The distinct static windows of the layers (None = full attention)."""
    return tuple(sorted({w or None for w in arch.layer_windows}, key=lambda w: w or 0)) or (None,)


def _gpu_kernel():
    # imported on demand: it needs JAX's Triton backend, which a CPU/TPU-only install may lack (then: xla)
    from jaxtune.models import attention_gpu

    return attention_gpu


def _unserved(arch: ArchConfig, impl: str, seq_len: int, decoding: bool) -> str | None:
    """Why `impl` cannot serve this forward pass (None: it can)."""
    if decoding:
        return "a KV-cache decode step attends over cache slots under the caller's mask"
    if arch.peft.prefix_tokens:
        return "prefix tuning's learned keys are seen by every query (no segment-id form)"
    if arch.peft.prompt_tokens:
        return "prompt tuning's virtual tokens (segment -1) are seen by every document (no segment-id form)"
    if impl in ("pallas_gpu", "cudnn"):
        try:
            gpu = _gpu_kernel()
        except ImportError as e:
            return f"jaxtune.models.attention_gpu does not import ({e})"
        for w in _windows(arch):
            shape = dict(window=w, head_dim=arch.head_dim, seq_len=seq_len)
            reason = (
                gpu.gpu_unsupported(**shape)
                if impl == "pallas_gpu"
                else gpu.cudnn_unsupported(dtype=arch.compute_dtype, softcap=arch.attn_softcap, **shape)
            )
            if reason:
                return reason
    return None


def _serving(arch: ArchConfig, impl: str, seq_len: int, decoding: bool) -> tuple[str, str | None]:
    """(the implementation that serves this pass, why it is not `impl` or None). What cuDNN cannot take
    (fp32, large heads) goes to the Pallas GPU kernel when that can; everything else unserved to xla."""
    if impl not in KERNELS:
        return impl, None
    reason = _unserved(arch, impl, seq_len, decoding)
    if reason is None:
        return impl, None
    if impl == "cudnn" and _unserved(arch, "pallas_gpu", seq_len, decoding) is None:
        return "pallas_gpu", reason
    return "xla", reason


def uses_kernel(arch: ArchConfig, impl: str, seq_len: int) -> bool:
    """Whether a training pass of `arch` at `seq_len` runs a kernel under `impl` (for `jaxtune estimate`)."""
    return _serving(arch, resolve(impl), seq_len, decoding=False)[0] in KERNELS


def inputs(arch: ArchConfig, segment_ids: jax.Array, cache_mask: jax.Array | None = None) -> Inputs:
    """Once per forward pass (the decoder calls it before the layers): segment ids for a kernel that serves
    this pass, else the dense mask (`cache_mask` [B, 1, T, S] for a decode step, causal+segments otherwise)."""
    wanted = resolve(arch.attention_impl)
    impl, reason = _serving(arch, wanted, segment_ids.shape[1], cache_mask is not None)
    if reason is not None:
        log.info("attention: %s falls back to %s here: %s", wanted, impl, reason)
    if impl in KERNELS:
        return Inputs(impl, segment_ids=segment_ids)
    if cache_mask is not None:
        return Inputs(impl, mask=cache_mask)
    return Inputs(impl, mask=attention_mask(segment_ids, virtual=arch.peft.prompt_tokens > 0))


def attend(arch: ArchConfig, attn: Inputs, q, k, v, window, q_pos, k_pos) -> jax.Array:
    """Masked softmax attention: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H].

    `window` is None (no sliding window in this model), or this layer's window (0 = full), traced under
    `nn.scan`. On the dense path key j is visible from query i iff pos_i - pos_j < window: positions, not row
    indices, so a packed or padded document (and its virtual tokens / prefix, at positions 0..P-1) sees
    exactly what it would see alone; within one document the two coincide, which is what the kernels count.
    """
    if attn.impl == "xla":
        mask = attn.mask  # [B, 1, T, S]: causality, segments and padding already
        if window is not None:
            dist = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
            mask = mask & ((window <= 0) | (dist < window))[:, None]
        if arch.attn_softcap:
            return _softcapped(q, k, v, mask, arch.attn_scale, arch.attn_softcap)
        scale = arch.attn_scale if arch.query_pre_attn_scalar else None  # None: 1 / sqrt(head_dim), its default
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    windows = _windows(arch) if window is not None else (None,)
    index = jnp.zeros((), jnp.int32)
    if len(windows) > 1:  # this layer's window among the model's distinct ones
        index = jnp.argmax(jnp.asarray([w or 0 for w in windows]) == window).astype(jnp.int32)
    return sharded(_kernel_fn(arch, attn.impl, windows), q, k, v, attn.segment_ids, index)


def _softcapped(q, k, v, mask, scale: float, cap: float) -> jax.Array:
    """softmax(cap * tanh(scale * q k^T / cap), masked) v, as HF's eager Gemma 2 attention: q [B, T, N, H],
    k/v [B, S, K, H] (query head n reads KV head n // (N / K)), mask [B, 1, T, S] -> [B, T, N, H]. Logits and
    softmax in fp32, the probabilities cast to v's dtype for the second matmul (jax.nn's xla path does the same)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)  # [B, 1, 1, T, S] mask
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h).astype(q.dtype)


def _kernel_fn(arch: ArchConfig, impl: str, windows: tuple[int | None, ...]):
    """fn(q, k, v, segment_ids, index) on one shard: the kernel with the index-th static window."""
    scale = arch.attn_scale  # 1 / sqrt(head_dim), jax.nn.dot_product_attention's default, unless Gemma 2/3
    if impl == "splash":
        from jaxtune.models.attention_tpu import attend_tpu

        kernel = functools.partial(attend_tpu, blocks=arch.attention_blocks)
    elif impl == "pallas_gpu":
        kernel = _gpu_kernel().attend_gpu
    else:
        kernel = _gpu_kernel().attend_cudnn
    kernel = functools.partial(kernel, scale=scale, interpret=interpreted(impl))
    if arch.attn_softcap:  # splash and pallas_gpu (cuDNN passes with a soft-cap were sent to pallas_gpu)
        kernel = functools.partial(kernel, softcap=arch.attn_softcap)
    branches = [functools.partial(kernel, window=w) for w in windows]

    def fn(q, k, v, segment_ids, index):
        if len(branches) == 1:
            return branches[0](q, k, v, segment_ids)
        return jax.lax.switch(index, branches, q, k, v, segment_ids)

    return fn


def sharded(fn, q, k, v, segment_ids, index):
    """`fn` per shard under the context mesh (`shard_map`: batch over (data, fsdp), heads over tensor, as the
    rules place them); plainly without one. When the KV heads cannot split like the query heads (fewer KV
    heads than tensor shards), each is repeated just enough that every shard holds the ones its queries read."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return fn(q, k, v, segment_ids, index)
    q_spec = spec_for(q.shape, Q_AXES, mesh)
    kv_spec = spec_for(k.shape, KV_AXES, mesh)
    if q_spec[2] != kv_spec[2]:
        heads_axes = (q_spec[2],) if isinstance(q_spec[2], str) else tuple(q_spec[2] or ())
        split = math.prod(mesh.shape[a] for a in heads_axes)
        repeat = split // math.gcd(k.shape[2], split)  # K * repeat = lcm(K, split), which divides N
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)  # KV head j -> j // repeat
        kv_spec = spec_for(k.shape, KV_AXES, mesh)
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec, PartitionSpec()),
        out_specs=q_spec,
        check_vma=False,  # Pallas kernels carry no varying-manual-axes types
    )(q, k, v, segment_ids, index)
