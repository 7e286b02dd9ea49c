"""The decoder: embed -> nn.scan(nn.remat(Block)) -> norm, and the LM head. One implementation for every family.

Layers are stacked with `nn.scan`, so compile time does not grow with depth and every layer parameter has a
leading `layers` axis; `scan_layers=False` builds the same blocks unrolled (`layers_0`, `layers_1`, ...) for
reference checks and debugging. `remat` trades compute for activation memory ("full" saves nothing inside a
block, "dots" keeps the matmul outputs that have no batch dimension, as MaxText's "minimal" policy).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models import adapters_hook, attention, kv_cache, moe
from jaxtune.models.arch import ArchConfig
from jaxtune.models.layers import INIT_STD, MLP, Block, Norm, Proj, layer_rope_tables
from jaxtune.parallel.rules import constrain

# The residual stream between layers: split over the batch (data, fsdp), whole along length and embed. A no-op
# outside a mesh (single device); under one it pins the layout XLA would otherwise have to guess.
RESIDUAL = ("batch", "length", "embed")

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the dots "dots" keeps, moved to host memory after the forward and back for the backward
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class _ScanBlock(Block):
    """`nn.scan` wants (carry, x) -> (carry, y): the residual stream is the carry."""

    def __call__(self, x, attn, cos, sin, positions, window):
        return constrain(super().__call__(x, attn, cos, sin, positions, window), RESIDUAL), None


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its own segment: restarts at 0 at every segment change. [B, T]"""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def neftune_noise(rng, x, segment_ids, alpha: float):
    """NEFTune (Jain et al. 2023, Alg. 1): Uniform(-1, 1) * alpha / sqrt(L * d), L = the row's real tokens."""
    real = (segment_ids != 0).astype(jnp.float32)  # [B, T]
    length = jnp.maximum(real.sum(-1, keepdims=True), 1.0)[..., None]  # [B, 1, 1]
    scale = alpha / jnp.sqrt(length * x.shape[-1])
    noise = jax.random.uniform(rng, x.shape, jnp.float32, -1.0, 1.0) * scale * real[..., None]
    return noise.astype(x.dtype)


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """Gemma 2/3's tanh soft-cap, cap * tanh(logits / cap) (in fp32, back in the logits' dtype); cap 0: off."""
    if not cap:
        return logits
    return (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)


class Decoder(nn.Module):
    arch: ArchConfig
    deterministic: bool = True

    def setup(self):
        a = self.arch
        embed_init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed"))
        self.embed_tokens = nn.Embed(
            a.vocab_size,
            a.hidden_size,
            embedding_init=embed_init,
            param_dtype=a.weight_dtype,
            dtype=a.compute_dtype,
        )
        if a.positions == "learned":
            pos_init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("length", "embed"))
            self.embed_positions = nn.Embed(
                a.max_position_embeddings,
                a.hidden_size,
                embedding_init=pos_init,
                param_dtype=a.weight_dtype,
                dtype=a.compute_dtype,
            )
        block = Block
        if a.scan_layers:
            block = _ScanBlock
        if a.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[a.remat], prevent_cse=not a.scan_layers)
        mlp_cls = moe.MoE if a.num_experts else MLP
        if a.scan_layers:
            collections = ("params", kv_cache.COLLECTION, moe.COLLECTION, *adapters_hook.COLLECTIONS)
            stack = lambda n: nn.scan(
                block,
                variable_axes={c: 0 for c in collections},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=n,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(a, self.deterministic, mlp_cls)
            split = a.peft.layer_split  # freeze-tuning: two stacks, so one can stay frozen without weight grads
            self.layers = stack(split or a.num_layers)
            if split:
                self.top_layers = stack(a.num_layers - split)
        else:
            self.layers = [block(a, self.deterministic, mlp_cls) for _ in range(a.num_layers)]
        self.norm = Norm(a)
        if not a.tie_word_embeddings:
            self.lm_head = Proj(
                a.vocab_size, ("embed", "vocab"), use_bias=False, arch=a, deterministic=self.deterministic
            )

    def __call__(self, input_ids, segment_ids, positions, cache_mask=None):  # [B, T] ints -> hidden [B, T, D]
        """`cache_mask` [B, 1, T, S] (which KV-cache slots each new token sees) makes this a decode step
        against the `cache` collection (see kv_cache.py); without it, the plain (or prefill) forward pass."""
        a = self.arch
        x = self.embed_tokens(input_ids)  # [B, T, D]
        x = adapters_hook.embed(self, input_ids, x)  # LoRA on embed_tokens
        if cache_mask is None:
            # prompt tuning / P-tuning: [B, P + T, D] with P virtual tokens first; positions shifted by P
            x, segment_ids, positions = adapters_hook.virtual_tokens(self, x, segment_ids, positions)
        else:  # decoding: the cache holds the virtual tokens already; positions still count them
            positions = positions + adapters_hook.position_offset(a)
        if a.embed_scale:
            # Gemma: the normaliser is cast to the activation dtype first (HF GemmaModel).
            x = x * jnp.asarray(a.hidden_size**0.5, dtype=x.dtype)
        if a.neftune_alpha and not self.deterministic:
            x = x + neftune_noise(self.make_rng("dropout"), x, segment_ids, a.neftune_alpha)
        if a.positions == "learned":
            x = x + self.embed_positions(positions)
        x = constrain(x, RESIDUAL)
        # once per pass: segment ids for a kernel, else the dense mask (a decode step's: the cache slots the
        # caller marks); what a kernel cannot serve falls back to xla with one logged line (attention.py)
        attn = attention.inputs(a, segment_ids, cache_mask)
        if a.num_experts:  # the tokens MoE router statistics count (HF: the attention mask)
            attn = attn.replace(real=segment_ids != 0)
        cos = sin = None
        if a.positions == "rope":
            cos, sin = layer_rope_tables(a, positions, a.compute_dtype, segment_ids)  # [B, T, H] ([2, B, T, H]: Gemma 3)
        windows = jnp.asarray(a.layer_windows or (0,) * a.num_layers, jnp.int32)  # [L]
        if a.scan_layers:
            split = a.peft.layer_split or a.num_layers
            x, _ = self.layers(x, attn, cos, sin, positions, windows[:split] if a.layer_windows else None)
            if a.peft.layer_split:
                x, _ = self.top_layers(x, attn, cos, sin, positions, windows[split:] if a.layer_windows else None)
        else:
            for i, layer in enumerate(self.layers):
                x = constrain(layer(x, attn, cos, sin, positions, windows[i] if a.layer_windows else None), RESIDUAL)
        if cache_mask is not None:
            return self.norm(x)  # [B, T, D]
        return adapters_hook.strip_virtual(self, self.norm(x))  # [B, T, D]

    def logits(self, hidden):  # [B, T, D] -> [B, T, V]
        """The LM head (every consumer of logits comes here: Model.logits, the chunked log-probs, generation)."""
        if self.arch.tie_word_embeddings:
            logits = adapters_hook.tied_head(self, hidden, self.embed_tokens.attend(hidden))  # + LoRA on lm_head
        else:
            logits = self.lm_head(hidden)
        return softcap(logits, self.arch.final_softcap)

    def forward_logits(self, input_ids, segment_ids, positions):
        return self.logits(self(input_ids, segment_ids, positions))
