"""Where adapter collections enter the functional model — the only PEFT knowledge `models/` has.

A model is applied as `apply({"params": base, "lora": ..., "prefix": ...}, ...)`. Each hook below looks for its
collection in the calling module's scope and, when it is absent, is the identity: the same call without the
adapter collections *is* the base (and DPO/PPO reference) model. The static settings (LoRA scales, dropout,
activation, virtual-token counts) come from `ArchConfig.peft`; the trainable values from the collections.
`jaxtune/peft/` builds the collections and checks each hook against the PEFT library.

Collections and where they live (paths mirror HF module names, so PEFT's `target_modules` apply unchanged; the
per-layer ones carry the leading `layers` axis of `nn.scan`):
  lora    {<proj>: {lora_a [in, r], lora_b [r, out], magnitude [out] (DoRA)}}   in any `Proj`
          {embed_tokens: {lora_a [V, r], lora_b [r, D]}}                       at the decoder root
          {lm_head: {lora_a [D, r], lora_b [r, V]}}          at the root too when the head is tied
          {gate_up_proj|down_proj: {lora_a [E, in, r], lora_b [E, r, out]}}   in an MoE `experts` module
  ia3     {<proj>: {scale_out [out]} | {scale_in [in]}}                          (IA)^3, in any `Proj`
  bitfit  {<proj>: {bias [out]}}                     BitFit biases added to projections that have none
  adapter {attn_adapter|mlp_adapter: {down: {kernel, bias}, up: {kernel, bias}}}  Houlsby / Pfeiffer
  prefix  {self_attn: {key [P, K, H], value [P, K, H]}}                          prefix / P-tuning v2
  prompt  {embeddings [P, D]} at the decoder root                                prompt tuning / P-tuning
  quant   {<proj>: {codes, scales, ...}} replaces `params/<proj>/kernel`        QLoRA (peft/quant.py)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.errors import RunError

# The one list of adapter collections: a model applied without them is the base (and the DPO / PPO / GRPO
# reference). `quant` is not an adapter: it is how a quantised base stores its kernels, so it stays.
ADAPTER_COLLECTIONS = ("lora", "ia3", "bitfit", "adapter", "prefix", "prompt")
COLLECTIONS = (*ADAPTER_COLLECTIONS, "quant")  # every collection a decoder reads besides params / cache
UNMERGEABLE = ("prompt", "prefix", "adapter")  # add tokens or layers: no plain HF checkpoint can hold them


def without_adapters(variables: dict) -> dict:
    """The reference model: the same weights without any adapter collection (no second copy)."""
    return {k: v for k, v in variables.items() if k not in ADAPTER_COLLECTIONS}
VIRTUAL_SEGMENT = -1  # segment id of prompt-tuning virtual tokens: visible to every later token of the row

# Dequantisers registered by jaxtune.peft.quant: {format: fn(quant vars, shape, dtype) -> kernel [in, out]}.
# `models/` never imports `peft/` (dependencies point one way); the format name comes from ArchConfig.peft.
DEQUANTIZERS: dict = {}


def _kernel(module, in_features: int):
    """The base kernel: a plain param, or dequantised on the fly from the `quant` collection (QLoRA)."""
    fmt = module.arch.peft.quant
    if fmt != "none" and module.has_variable("quant", "codes"):
        shape = (in_features, module.features)
        return DEQUANTIZERS[fmt](module.variables["quant"], shape, module.arch.compute_dtype)
    return module.base_kernel(in_features)


def project(module, x):
    """`Proj.__call__`: x @ W (+ b), plus LoRA / DoRA, (IA)^3 and BitFit when their collections hold this module."""
    a = module.arch
    dtype = a.compute_dtype
    x = x.astype(dtype)
    if module.has_variable("ia3", "scale_in"):
        # (IA)^3 on a feed-forward module scales its input (PEFT IA3 `is_feedforward`: down_proj).
        x = x * module.variables["ia3"]["scale_in"].astype(dtype)
    kernel = _kernel(module, x.shape[-1]).astype(dtype)
    bias = module.base_bias()
    y = jnp.dot(x, kernel)  # [..., out]
    if module.has_variable("lora", "lora_a"):
        lora = module.variables["lora"]
        scale = a.peft.scale_for(module.name)
        xd = x
        if a.peft.lora_dropout > 0 and not module.deterministic:
            xd = nn.Dropout(a.peft.lora_dropout)(x, deterministic=False)
        delta = jnp.dot(jnp.dot(xd, lora["lora_a"].astype(dtype)), lora["lora_b"].astype(dtype)) * scale
        if "magnitude" in lora:
            # DoRA (Liu et al. 2024, eq. 5): W' = m * (W + sBA) / ||W + sBA||_c, the norm over each output
            # column and treated as a constant in backprop (sec. 4.3), exactly as PEFT's DoRA layer does.
            merged = kernel.astype(jnp.float32) + scale * jnp.dot(
                lora["lora_a"].astype(jnp.float32), lora["lora_b"].astype(jnp.float32)
            )
            norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))  # [out]
            mag = (lora["magnitude"].astype(jnp.float32) / norm).astype(dtype)
            # PEFT: result = base(x) + (mag - 1) * base(x_dropped) + mag * lora(x_dropped); with dropout off
            # x_dropped == x, which reduces to mag * (x W + s x A B).
            base_d = jnp.dot(xd, kernel)
            y = y + (mag - 1) * base_d + mag * delta
        else:
            y = y + delta
    if bias is not None:
        y = y + bias.astype(dtype)
    if module.has_variable("bitfit", "bias"):
        y = y + module.variables["bitfit"]["bias"].astype(dtype)
    if module.has_variable("ia3", "scale_out"):
        # (IA)^3 on k/v-like modules scales the output, bias included (PEFT: base_layer(x) * ia3_l).
        y = y * module.variables["ia3"]["scale_out"].astype(dtype)
    return y


def expert_project(module, name: str, x, group_sizes, kernel):
    """One grouped expert matmul (models/moe.py): rows of `x` [N, in] sorted by expert, `group_sizes` [E] rows per
    expert, `kernel` [E, in, out] -> [N, out], via `jax.lax.ragged_dot` (each row meets only its own expert's
    matrix). Plus per-expert LoRA when the `lora` collection of `module` holds `name`:
    {lora_a [E, in, r], lora_b [E, r, out]} -> + s * (x A_e) B_e, the same grouped matmul twice at rank r. Its
    scale is `PeftSpec.lora_scale["experts.<name>"]`, apart from any ordinary Proj called `name` (Phi-3's
    `mlp.gate_up_proj`); callers pass the bare parameter name."""
    dtype = module.arch.compute_dtype
    x = x.astype(dtype)
    y = jax.lax.ragged_dot(x, kernel.astype(dtype), group_sizes)  # [N, out]
    if module.has_variable("lora", name):
        p = module.variables["lora"][name]
        after_a = jax.lax.ragged_dot(x, p["lora_a"].astype(dtype), group_sizes)  # [N, r]
        delta = jax.lax.ragged_dot(after_a, p["lora_b"].astype(dtype), group_sizes)  # [N, out]
        y = y + delta * module.arch.peft.scale_for(f"experts.{name}")
    return y


def embed(module, input_ids, x):
    """LoRA on `embed_tokens` (PEFT `lora.Embedding`): x + s * A[ids] @ B, with A [V, r] and B [r, D]."""
    if not module.has_variable("lora", "embed_tokens"):
        return x
    p = module.variables["lora"]["embed_tokens"]
    scale = module.arch.peft.scale_for("embed_tokens")
    after_a = jnp.take(p["lora_a"], input_ids, axis=0).astype(x.dtype)  # [B, T, r]
    return x + jnp.dot(after_a, p["lora_b"].astype(x.dtype)) * scale  # [B, T, D]


def tied_head(module, hidden, logits):
    """LoRA on `lm_head` of a tied model (PEFT wraps the tied head in a `lora.Linear`, leaving the embedding
    as it is): logits + s * dropout(h) A B, with A [D, r] and B [r, V]; the base head is embed_tokens' matrix."""
    if not module.has_variable("lora", "lm_head"):
        return logits
    a = module.arch
    p = module.variables["lora"]["lm_head"]
    h = hidden.astype(logits.dtype)
    if a.peft.lora_dropout > 0 and not module.deterministic:  # as `project`'s nn.Dropout (no submodule here)
        keep = 1.0 - a.peft.lora_dropout
        kept = jax.random.bernoulli(module.make_rng("dropout"), keep, h.shape)
        h = jnp.where(kept, h / keep, 0).astype(h.dtype)
    delta = jnp.dot(jnp.dot(h, p["lora_a"].astype(h.dtype)), p["lora_b"].astype(h.dtype))
    return logits + delta * a.peft.scale_for("lm_head")  # [B, T, V]


def virtual_tokens(module, x, segment_ids, positions):
    """Prompt tuning / P-tuning: prepend P learned embeddings to every row, as PEFT concatenates them to
    `inputs_embeds`. Also shifts real positions by the number of virtual tokens (prompt or prefix) the way
    HF numbers tokens after P virtual ones, so that a document sees exactly [virtual tokens, its own tokens].

    Virtual tokens get segment id -1 (`attention_mask` lets every later token see them) and positions 0..P-1;
    packed documents each restart at P. Returns (x [B, P+T, D], segment_ids, positions) and, for
    `strip_virtual`, nothing else: P is a static shape.
    """
    offset = module.arch.peft.prompt_tokens + module.arch.peft.prefix_tokens
    if offset:
        positions = positions + offset
    if not module.has_variable("prompt", "embeddings"):
        return x, segment_ids, positions
    emb = module.variables["prompt"]["embeddings"]  # [P, D]
    b, p = x.shape[0], emb.shape[0]
    if p != module.arch.peft.prompt_tokens:
        raise RunError(
            f"prompt/embeddings holds {p} virtual tokens but PeftSpec.prompt_tokens is "
            f"{module.arch.peft.prompt_tokens}: build both with jaxtune.peft.prepare / init"
        )
    virtual = jnp.broadcast_to(emb.astype(x.dtype)[None], (b, *emb.shape))  # [B, P, D]
    seg = jnp.full((b, p), VIRTUAL_SEGMENT, segment_ids.dtype)
    pos = jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (b, p))
    return (
        jnp.concatenate([virtual, x], axis=1),
        jnp.concatenate([seg, segment_ids], axis=1),
        jnp.concatenate([pos, positions], axis=1),
    )


def position_offset(arch) -> int:
    """Virtual tokens and prefixes come before the real tokens, which HF numbers from here on."""
    return arch.peft.prompt_tokens + arch.peft.prefix_tokens


def strip_virtual(module, hidden):
    """Drop the virtual-token outputs, so hidden states and logits stay [B, T, ...] like the input ids."""
    return hidden[:, module.arch.peft.prompt_tokens :] if module.arch.peft.prompt_tokens else hidden


def bottleneck(module, h, name: str, deterministic: bool):
    """Houlsby/Pfeiffer adapter on a sub-layer output: h + up(act(down(h))), identity while `up` is zero."""
    if not module.has_variable("adapter", name):
        return h
    p = module.variables["adapter"][name]
    act = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}[
        module.arch.peft.adapter_activation
    ]
    dtype = h.dtype
    z = jnp.dot(h, p["down"]["kernel"].astype(dtype)) + p["down"]["bias"].astype(dtype)  # [B, T, bottleneck]
    z = jnp.dot(act(z), p["up"]["kernel"].astype(dtype)) + p["up"]["bias"].astype(dtype)  # [B, T, D]
    return h + module.arch.peft.adapter_scale * z


def prefix_kv(module, key, value, mask, key_positions):
    """Prefix tuning: prepend learned per-layer keys/values [P, K, H], visible to every query.

    Prefix keys are used as given (no RoPE) and sit at positions 0..P-1, as PEFT feeds them to HF models
    through `past_key_values` (the real tokens then start at position P: see `virtual_tokens`).
    """
    if not module.has_variable("prefix", "key"):
        return key, value, mask, key_positions
    p = module.variables["prefix"]
    b, t, n = key.shape[0], mask.shape[2], p["key"].shape[0]
    pk = jnp.broadcast_to(p["key"].astype(key.dtype)[None], (b, *p["key"].shape))  # [B, P, K, H]
    pv = jnp.broadcast_to(p["value"].astype(value.dtype)[None], (b, *p["value"].shape))
    visible = jnp.ones((b, 1, t, n), dtype=bool)  # [B, 1, T, P]
    prefix_pos = jnp.broadcast_to(jnp.arange(n, dtype=key_positions.dtype), (b, n))
    return (
        jnp.concatenate([pk, key], axis=1),
        jnp.concatenate([pv, value], axis=1),
        jnp.concatenate([visible, jnp.broadcast_to(mask, (b, 1, t, mask.shape[-1]))], axis=-1),
        jnp.concatenate([prefix_pos, key_positions], axis=1),
    )
