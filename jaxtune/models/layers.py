"""Building blocks of the decoder: norms, RoPE (default / linear / llama3; partial and longrope: longrope.py),
attention, MLPs, and `Proj`.

Every parameter is created with logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `head_dim`)
so `parallel/rules.py` can shard it; `nn.scan` in `decoder.py` prepends `layers`. Numerics follow Hugging Face
exactly (norms in fp32, RoPE tables in fp32 then cast, HF's rotate-half layout) so fp32 logits agree to 1e-5.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.errors import RunError
from jaxtune.models import adapters_hook, attention, kv_cache, longrope
from jaxtune.models.arch import ArchConfig

INIT_STD = 0.02
Axes = tuple[str | None, ...]


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: Axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Norm(nn.Module):
    """RMSNorm (Llama/Qwen/Mistral, Gemma's `1 + w` variant) or LayerNorm (GPT-2), computed in fp32."""

    arch: ArchConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):  # [..., D]
        a = self.arch
        d = x.shape[-1]
        scale_init = nn.initializers.zeros if a.norm_plus_one else nn.initializers.ones
        scale = param_with_axes(self, "scale", scale_init, (d,), a.weight_dtype, (self.axis_name,))
        h = x.astype(jnp.float32)
        if a.norm == "layer":
            bias = param_with_axes(
                self, "bias", nn.initializers.zeros, (d,), a.weight_dtype, (self.axis_name,)
            )
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + a.norm_eps)
            return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + a.norm_eps)
        if a.norm_plus_one:
            # Gemma scales in fp32 before the cast (HF GemmaRMSNorm), Llama casts first (LlamaRMSNorm).
            return (h * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale.astype(x.dtype) * h.astype(x.dtype)


def rope_inv_freq(arch: ArchConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies [rotary_dim // 2], with HF's `rope_type` scalings (default, linear, llama3); `local`:
    those of the sliding-window layers when they have their own RoPE (Gemma 3's `rope_local_theta`)."""
    rope = dict(arch.rope_local_scaling) if local else arch.rope
    theta = arch.rope_local_theta if local else arch.rope_theta
    dim = longrope.rotary_dim(arch)  # head_dim unless partial_rotary_factor < 1 (phi3)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth ramp in between.
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise RunError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_tables(
    arch: ArchConfig, positions: jax.Array, dtype, segment_ids=None, local: bool = False
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, rotary_dim] for integer positions [B, T] (fp32 math, cast like HF)."""
    if arch.rope.get("rope_type") == "longrope" and not local:  # phi3: factors by the batch's length (longrope.py)
        return longrope.tables(arch, positions, dtype, segment_ids)
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(arch, local)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, hd]: HF's rotate-half layout
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def layer_rope_tables(arch: ArchConfig, positions: jax.Array, dtype, segment_ids=None) -> tuple[jax.Array, jax.Array]:
    """The decoder's tables, once per pass: cos/sin [B, T, H], or [2, B, T, H] (global, local) when the
    sliding-window layers have their own RoPE and both kinds of layer exist (`pick_rope` selects per layer)."""
    cos, sin = rope_tables(arch, positions, dtype, segment_ids)
    if not arch.rope_local_theta or not any(arch.layer_windows):
        return cos, sin  # one RoPE, or no sliding layer to use the local one
    local_cos, local_sin = rope_tables(arch, positions, dtype, segment_ids, local=True)
    if all(arch.layer_windows):
        return local_cos, local_sin
    return jnp.stack([cos, local_cos]), jnp.stack([sin, local_sin])


def pick_rope(arch: ArchConfig, cos, sin, window):
    """This layer's cos/sin [B, T, H] from `layer_rope_tables`: the local pair iff its window is > 0 (a traced
    scalar under `nn.scan`: a dynamic index into the stacked pair, no recomputation)."""
    if cos.ndim == 3:
        return cos, sin
    local = (window > 0).astype(jnp.int32)
    pick = lambda t: jax.lax.dynamic_index_in_dim(t, local, axis=0, keepdims=False)
    return pick(cos), pick(sin)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]; cos/sin [B, T, R]: the first R <= H dims rotate, the rest pass through (HF)."""
    if cos.shape[-1] < x.shape[-1]:  # partial_rotary_factor < 1 (phi3)
        rot = cos.shape[-1]
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Proj(nn.Module):
    """A linear projection `x @ W (+ b)` whose name mirrors the HF module (`q_proj`, `down_proj`, ...).

    This is the one hook through which weight-space adapters enter the model: `adapters_hook.project`
    reads the adapter collections (`lora`, `ia3`, `quant`) of this module, when present, and otherwise
    computes the plain matmul. Kernels are stored [in, out] (HF Linear weights are [out, in]).
    """

    features: int
    axes: Axes  # logical names of (in, out)
    use_bias: bool
    arch: ArchConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):  # [..., in] -> [..., out]
        return adapters_hook.project(self, x)

    def base_kernel(self, in_features: int):
        a = self.arch
        init = nn.initializers.normal(INIT_STD)
        return param_with_axes(self, "kernel", init, (in_features, self.features), a.weight_dtype, self.axes)

    def base_bias(self):
        if not self.use_bias:
            return None
        a = self.arch
        return param_with_axes(
            self, "bias", nn.initializers.zeros, (self.features,), a.weight_dtype, self.axes[1:]
        )


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class MLP(nn.Module):
    arch: ArchConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        a = self.arch
        act = ACTIVATIONS[a.activation]
        kw = dict(use_bias=a.mlp_bias, arch=a, deterministic=self.deterministic)
        if a.fused_gate_up:  # phi3: one [gate | up] projection, as HF's (and PEFT's) gate_up_proj
            gate_up = Proj(2 * a.intermediate_size, ("embed", "mlp"), name="gate_up_proj", **kw)(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)  # [B, T, F] each
            return Proj(a.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(act(gate) * up)
        up = Proj(a.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)  # [B, T, F]
        if a.gated_mlp:
            gate = Proj(a.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
            h = act(gate) * up
        else:
            h = act(up)
        return Proj(a.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)  # [B, T, D]


class Attention(nn.Module):
    """Multi-head / grouped-query attention; `attention.py` picks the implementation (xla, cuDNN, a kernel)."""

    arch: ArchConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, attn, cos, sin, positions, window):  # x [B, T, D]; attn: attention.Inputs
        a = self.arch
        b, t, _ = x.shape
        n, k, hd = a.num_heads, a.num_kv_heads, a.head_dim
        kw = dict(use_bias=a.qkv_bias, arch=a, deterministic=self.deterministic)
        if a.fused_qkv:  # phi3: one [q | k | v] projection, as HF's (and PEFT's) qkv_proj
            # its output dim is split over `tensor` as one "heads" dim, so the q / k / v slices do not fall on
            # shard boundaries: GSPMD reshards them (correct for any layout; HF's TP plan gathers it too)
            qkv = Proj((n + 2 * k) * hd, ("embed", "heads"), name="qkv_proj", **kw)(x)
            q, key, val = jnp.split(qkv, [n * hd, (n + k) * hd], axis=-1)
            q, key, val = q.reshape(b, t, n, hd), key.reshape(b, t, k, hd), val.reshape(b, t, k, hd)
        else:
            q = Proj(n * hd, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, t, n, hd)  # [B, T, N, H]
            key = Proj(k * hd, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, t, k, hd)  # [B, T, K, H]
            val = Proj(k * hd, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, t, k, hd)  # [B, T, K, H]
        if a.qk_norm:
            q = Norm(a, axis_name="head_dim", name="q_norm")(q)
            key = Norm(a, axis_name="head_dim", name="k_norm")(key)
        if a.positions == "rope":
            cos, sin = pick_rope(a, cos, sin, window)
            q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        if kv_cache.decoding(self):  # decode step: the cache already holds the prefixes and earlier tokens
            key, val, key_pos = kv_cache.append(self, key, val, positions)  # [B, S, K, H]
        else:
            # prefix tuning / P-tuning v2: learned keys/values at positions 0..P-1 before the real ones
            key, val, mask, key_pos = adapters_hook.prefix_kv(self, key, val, attn.mask, positions)
            attn = attn.replace(mask=mask)  # unchanged without prefixes (and None on a kernel path)
            kv_cache.store(self, key, val, key_pos)  # prefill, when the `cache` collection is mutable
        out = attention.attend(a, attn, q, key, val, window, positions, key_pos)  # [B, T, N, H]
        out = out.reshape(b, t, n * hd)
        o_kw = dict(use_bias=a.o_bias, arch=a, deterministic=self.deterministic)
        return Proj(a.hidden_size, ("heads", "embed"), name="o_proj", **o_kw)(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x)) (+ bottleneck adapters).

    Gemma 2/3 (`sandwich_norms`) also normalise each sublayer's output before the residual add, with HF's names:
    x + post_attention_layernorm(attn(input_layernorm(x))); x + post_feedforward_layernorm(mlp(
    pre_feedforward_layernorm(x))). (Elsewhere `post_attention_layernorm` is the norm before the MLP.)"""

    arch: ArchConfig
    deterministic: bool = True
    mlp_cls: type = MLP  # the feed-forward module: decoder.py passes moe.MoE when arch.num_experts > 0

    @nn.compact
    def __call__(self, x, attn, cos, sin, positions, window):  # [B, T, D]
        a, det = self.arch, self.deterministic
        h = Norm(a, name="input_layernorm")(x)
        h = Attention(a, det, name="self_attn")(h, attn, cos, sin, positions, window)
        if a.sandwich_norms:
            h = Norm(a, name="post_attention_layernorm")(h)
        h = adapters_hook.bottleneck(self, h, "attn_adapter", det)  # Houlsby: after attention
        x = x + h
        moe_args = (attn.real,) if a.num_experts else ()  # MoE: which tokens count for the router statistics
        pre_mlp = "pre_feedforward_layernorm" if a.sandwich_norms else "post_attention_layernorm"
        h = self.mlp_cls(a, det, name="mlp")(Norm(a, name=pre_mlp)(x), *moe_args)
        if a.sandwich_norms:
            h = Norm(a, name="post_feedforward_layernorm")(h)
        h = adapters_hook.bottleneck(self, h, "mlp_adapter", det)  # Houlsby / Pfeiffer: after the MLP
        return x + h
