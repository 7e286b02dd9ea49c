"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE), dropless as transformers.

Parameters mirror transformers 5's runtime modules (the same names for the three families):
  mlp/gate/kernel                 [D, E]      the router (a `Proj`, so adapters can reach it)
  mlp/experts/gate_up_proj        [E, D, 2F]  gate | up along the last axis
  mlp/experts/down_proj           [E, F, D]
  mlp/shared_expert/{gate,up,down}_proj, mlp/shared_expert_gate/kernel [D, 1]    Qwen2-MoE only

Routing (HF `*TopKRouter`): logits = x W_g in the compute dtype, softmax in fp32, top-k of the probabilities,
renormalised over the k (Mixtral always; Qwen: `norm_topk_prob`). Mixtral keeps the routing weights in fp32
(the expert output is weighted in fp32, then cast); Qwen casts them to the compute dtype first.

Expert compute: models/experts.py (`Experts`, the sorted-token grouped matmul and expert parallelism). No
capacity, no token dropping: every token reaches its k experts.

Router statistics (`moe` collection, sown only when the caller makes it mutable): per layer, over the real
tokens (segment id != 0), the top-k assignment counts [E], the summed router probabilities [E], the number of
tokens, and the summed squared log-sum-exp of the router logits; `moe_losses` turns them into the Switch
load-balancing loss exactly as transformers' `load_balancing_loss_func` and the ST-MoE router z-loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxtune.models.arch import ArchConfig
from jaxtune.models.experts import Experts
from jaxtune.models.layers import ACTIVATIONS, MLP, Proj

COLLECTION = "moe"  # the sown router statistics (decoder.py scans it over layers)
STATS = "router"


def route(arch: ArchConfig, logits):
    """Router logits [N, E] (compute dtype) -> (top-k expert ids [N, k] int32, routing weights [N, k], probs
    [N, E] fp32), with HF's casts: softmax in fp32, renormalise, Mixtral keeps fp32, Qwen casts back."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_idx = jax.lax.top_k(probs, arch.experts_per_token)
    if arch.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdims=True)
    if arch.model_type != "mixtral":
        top_w = top_w.astype(logits.dtype)
    return top_idx.astype(jnp.int32), top_w, probs


class MoE(nn.Module):
    """The block's `mlp` when `arch.num_experts > 0`: router, experts, optional (gated) shared expert."""

    arch: ArchConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, real=None):  # x [B, T, D]; real [B, T] bool (segment id != 0), for the statistics
        a = self.arch
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        kw = dict(use_bias=False, arch=a, deterministic=self.deterministic)
        logits = Proj(a.num_experts, ("embed", None), name="gate", **kw)(flat)  # [N, E]
        topk_idx, topk_w, probs = route(a, logits)
        if self.is_mutable_collection(COLLECTION):
            self.sow(COLLECTION, STATS, router_stats(a, logits, probs, topk_idx, real, b * t))
        y = Experts(a, ACTIVATIONS[a.activation], name="experts")(flat, topk_idx, topk_w)  # [N, D]
        if a.shared_expert_size:
            shared_arch = a.replace(intermediate_size=a.shared_expert_size, num_experts=0, mlp_bias=False)
            shared = MLP(shared_arch, self.deterministic, name="shared_expert")(flat)
            gate = Proj(1, ("embed", None), name="shared_expert_gate", **kw)(flat)  # [N, 1]
            y = y + jax.nn.sigmoid(gate) * shared
        return y.reshape(b, t, d)


def router_stats(arch: ArchConfig, logits, probs, topk_idx, real, n: int) -> dict:
    """What the losses need from one layer, over real tokens only (HF: the attention mask)."""
    w = jnp.ones((n,), jnp.float32) if real is None else real.reshape(n).astype(jnp.float32)
    onehot = jax.nn.one_hot(topk_idx, arch.num_experts, dtype=jnp.float32)  # [N, k, E]
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [N]
    return {
        "counts": jnp.einsum("n,nke->e", w, onehot),  # top-k assignments per expert [E]
        "probs": jnp.einsum("n,ne->e", w, probs),  # summed router probabilities per expert [E]
        "tokens": w.sum(),  # real tokens
        "lse2": (w * jnp.square(lse)).sum(),  # summed squared router log-sum-exp
    }


def moe_losses(arch: ArchConfig, stats) -> dict:
    """Sown statistics (the `moe` collection, any nesting: scanned, unrolled, split stacks) ->
    {"aux_loss", "z_loss"}.

    aux_loss is transformers' `load_balancing_loss_func` over all layers at once: counts and probabilities are
    summed over the layers first, each divided by (layers x real tokens), then E * sum_e counts_e * probs_e
    (not the mean of per-layer losses). z_loss (ST-MoE, Zoph et al. 2022, eq. 5) is the mean over layers and
    real tokens of logsumexp(router logits)^2."""
    flat = traverse_util.flatten_dict(_unbox_tuple(stats))
    sums = {"counts": 0.0, "probs": 0.0, "tokens": 0.0, "lse2": 0.0}
    for path, leaf in flat.items():
        name = path[-1]
        if name not in sums:
            continue
        leaf = jnp.asarray(leaf, jnp.float32)
        if name in ("counts", "probs"):
            sums[name] = sums[name] + leaf.reshape(-1, arch.num_experts).sum(0)
        else:
            sums[name] = sums[name] + leaf.sum()
    total = jnp.maximum(jnp.asarray(sums["tokens"], jnp.float32), 1.0)
    aux = arch.num_experts * jnp.sum((sums["counts"] / total) * (sums["probs"] / total))
    return {"aux_loss": aux, "z_loss": sums["lse2"] / total}


def _unbox_tuple(tree):
    """Sown values are tuples (one entry per `sow`); flatten_dict sees them as leaves, so open them."""
    if isinstance(tree, Mapping):  # dict or FrozenDict
        return {k: _unbox_tuple(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return {str(i): _unbox_tuple(v) for i, v in enumerate(tree)}
    return tree
