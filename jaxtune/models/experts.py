"""The routed experts of a mixture-of-experts block: weights, the grouped matmul, and expert parallelism.

`Experts` owns the fused expert weights, named as transformers 5's runtime `mlp.experts` module holds them
(`gate_up_proj` [E, D, 2F] = gate | up along the last axis, `down_proj` [E, F, D]; ours are [in, out]), and
computes `sum_k w_k * down_e(act(gate_e(x)) * up_e(x))` for each token's top-k experts e without running every
expert on every token: the (token, expert) pairs are sorted by expert and each expert's rows meet only that
expert's matrix through `jax.lax.ragged_dot` (a grouped GEMM on TPU and GPU; on CPU XLA lowers it to a masked
dense product, which is exact but does every expert's FLOPs). No capacity, no dropped tokens: exactly HF.

`grouped_ffn` is a pure function of the weights (a dict of arrays, LoRA included) so that expert parallelism can
run it per shard: when the `expert` logical axis is split over a mesh axis (parallel/rules.py), `experts_ffn`
runs it under `shard_map`. Each shard holds E / n experts; the token exchange is an all-gather of the routed
tokens over the expert mesh axis, the shard's own experts on the pairs routed to them, and a reduce-scatter of
the outputs back to the tokens' own shards. The expert hidden dim (`expert_mlp`) is not split over `tensor`.

LoRA on experts (PEFT `target_parameters`): the `lora` collection of this module holds
{gate_up_proj: {lora_a [E, D, r], lora_b [E, r, 2F]}, down_proj: {lora_a [E, F, r], lora_b [E, r, D]}}, and
each expert's rows get s * (x A_e) B_e — the same grouped matmul at rank r.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtune.models.arch import ArchConfig
from jaxtune.parallel.rules import spec_for

GATE_UP, DOWN = "gate_up_proj", "down_proj"
# The expert hidden dim has its own logical name, unsplit by the rules: a tensor split of the fused gate | up
# axis would give one shard all the gate columns and the other all the up ones. Experts are split by expert.
AXES = {GATE_UP: ("expert", "embed", "expert_mlp"), DOWN: ("expert", "expert_mlp", "embed")}
LORA_AXES = {
    GATE_UP: (("expert", "embed", "lora_rank"), ("expert", "lora_rank", "expert_mlp")),
    DOWN: (("expert", "expert_mlp", "lora_rank"), ("expert", "lora_rank", "embed")),
}
TOKEN_AXES = ("batch", None)  # [N, D] flattened tokens, split like the batch
INIT_STD = 0.02


def lora_key(name: str) -> str:
    """The `PeftSpec.lora_scale` key of an expert parameter (distinct from an ordinary `Proj` named alike)."""
    return f"experts.{name}"


def expert_matmul(x, group_sizes, kernel, lora=None, scale: float = 1.0):
    """x [M, in] sorted by expert, group_sizes [G], kernel [G, in, out] -> [M, out] (+ s * (x A_e) B_e).

    Rows past sum(group_sizes) belong to no group here (another shard's experts): their output is zero."""
    y = jax.lax.ragged_dot(x, kernel.astype(x.dtype), group_sizes)
    if lora is not None:
        after_a = jax.lax.ragged_dot(x, lora["lora_a"].astype(x.dtype), group_sizes)  # [M, r]
        y = y + jax.lax.ragged_dot(after_a, lora["lora_b"].astype(x.dtype), group_sizes) * scale
    return y


def grouped_ffn(weights: dict, x, topk_idx, topk_w, *, arch: ArchConfig, act, first: int = 0):
    """sum_k w_k * expert_{idx_k}(x) for the experts [first, first + G) held in `weights` (G = its leading dim).

    weights: {gate_up_proj [G, D, 2F], down_proj [G, F, D], lora: {name: {lora_a, lora_b}} (optional)};
    x [N, D]; topk_idx [N, k] (global expert ids); topk_w [N, k]. Pairs routed to experts outside the range
    contribute nothing (their rows sort past every group)."""
    n, k = topk_idx.shape
    g = weights[GATE_UP].shape[0]
    dtype = arch.compute_dtype
    local = topk_idx.reshape(-1) - first  # [N*k]
    held = (local >= 0) & (local < g)
    key = jnp.where(held, local, g)  # not held: after every group
    order = jnp.argsort(key, stable=True)  # [N*k]
    group_sizes = jnp.bincount(jnp.where(held, local, 0), weights=held.astype(jnp.int32), length=g)
    group_sizes = group_sizes.astype(jnp.int32)
    token = order // k  # [N*k]: which token each sorted pair belongs to
    xs = x.astype(dtype)[token]  # [N*k, D]
    lora = weights.get("lora") or {}
    scales = {name: arch.peft.scale_for(lora_key(name)) for name in (GATE_UP, DOWN)}
    h = expert_matmul(xs, group_sizes, weights[GATE_UP], lora.get(GATE_UP), scales[GATE_UP])  # [N*k, 2F]
    f = h.shape[-1] // 2
    h = act(h[:, :f]) * h[:, f:]
    y = expert_matmul(h, group_sizes, weights[DOWN], lora.get(DOWN), scales[DOWN])  # [N*k, D]
    w = jnp.where(held, topk_w.reshape(-1), 0)[order][:, None]  # fp32 (Mixtral) or compute dtype (Qwen)
    y = (y * w).astype(dtype)  # as HF: the weighted product, then cast to the hidden dtype
    unsorted = jnp.zeros_like(y).at[order].set(y)  # token-major [N*k, D]
    return unsorted.reshape(n, k, -1).astype(jnp.float32).sum(1).astype(dtype)  # [N, D]


def _expert_mesh_axes(mesh, num_experts: int) -> tuple[str, ...]:
    """The mesh axes the `expert` dim of the weights is split over under this mesh (() = not split)."""
    spec = spec_for((num_experts, 1, 1), AXES[GATE_UP][:1] + (None, None), mesh)
    entry = spec[0] if len(spec) else None
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def experts_ffn(weights: dict, x, topk_idx, topk_w, *, arch: ArchConfig, act):
    """`grouped_ffn` over all experts: plainly, or per shard with the token exchange when experts are split."""
    mesh = jax.sharding.get_abstract_mesh()
    e = weights[GATE_UP].shape[0]
    if mesh.empty or math.prod(mesh.shape.values()) == 1 or not _expert_mesh_axes(mesh, e):
        return grouped_ffn(weights, x, topk_idx, topk_w, arch=arch, act=act)
    ep = _expert_mesh_axes(mesh, e)
    w_specs = {name: spec_for(weights[name].shape, AXES[name], mesh) for name in (GATE_UP, DOWN)}
    if weights.get("lora"):
        w_specs["lora"] = {
            name: {
                "lora_a": spec_for(lora["lora_a"].shape, LORA_AXES[name][0], mesh),
                "lora_b": spec_for(lora["lora_b"].shape, LORA_AXES[name][1], mesh),
            }
            for name, lora in weights["lora"].items()
        }
    tok_spec = spec_for(x.shape, TOKEN_AXES, mesh)
    tok_axes = tok_spec[0] if len(tok_spec) else None
    tok_axes = () if tok_axes is None else ((tok_axes,) if isinstance(tok_axes, str) else tuple(tok_axes))
    if not set(ep) <= set(tok_axes):
        raise ValueError(f"expert axes {ep} must also split the tokens ({tok_axes}) for the token exchange")
    g = e // math.prod(mesh.shape[a] for a in ep)

    def shard(weights, x, idx, w):
        # every token of this expert group, then this shard's experts on the pairs routed to them
        x, idx, w = (jax.lax.all_gather(a, ep, axis=0, tiled=True) for a in (x, idx, w))
        first = jax.lax.axis_index(ep) * g
        y = grouped_ffn(weights, x, idx, w, arch=arch, act=act, first=first)
        return jax.lax.psum_scatter(y, ep, scatter_dimension=0, tiled=True)  # back to the tokens' shards

    tok = PartitionSpec(tok_spec[0] if len(tok_spec) else None, None)
    return jax.shard_map(shard, mesh=mesh, in_specs=(w_specs, tok, tok, tok), out_specs=tok)(
        weights, x, topk_idx, topk_w
    )


class Experts(nn.Module):
    """`mlp.experts`: E gated MLPs of width `moe_intermediate_size`, as fused [E, in, out] kernels."""

    arch: ArchConfig
    act: object = None  # the activation function (layers.ACTIVATIONS[arch.activation])

    @nn.compact
    def __call__(self, x, topk_idx, topk_w):  # x [N, D], topk_idx / topk_w [N, k] -> [N, D]
        a = self.arch
        e, d, f = a.num_experts, a.hidden_size, a.moe_intermediate_size
        init = nn.initializers.normal(INIT_STD)
        weights = {
            GATE_UP: self.param(
                GATE_UP, nn.with_logical_partitioning(init, AXES[GATE_UP]), (e, d, 2 * f), a.weight_dtype
            ),
            DOWN: self.param(DOWN, nn.with_logical_partitioning(init, AXES[DOWN]), (e, f, d), a.weight_dtype),
        }
        if self.has_variable("lora", GATE_UP) or self.has_variable("lora", DOWN):
            weights["lora"] = {
                n: self.variables["lora"][n] for n in (GATE_UP, DOWN) if self.has_variable("lora", n)
            }
        return experts_ffn(weights, x, topk_idx, topk_w, arch=a, act=self.act)
