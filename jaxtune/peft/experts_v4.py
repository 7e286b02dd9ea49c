"""PEFT adapters saved against transformers 4 MoE models, whose experts were separate nn.Linear modules.

transformers 4 named Mixtral's experts `model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}` (gate, up,
down) and its router `block_sparse_moe.gate`; Qwen2-MoE / Qwen3-MoE `mlp.experts.{e}.{gate_proj,up_proj,down_proj}`
and `mlp.gate`. A LoRA on them is one ordinary LoRA per expert: lora_A [r, in], lora_B [out, r]. PEFT 0.21 loads
such an adapter into a transformers 5 model by fusing it (peft/utils/transformers_weight_conversion.py): gate and
up become one gate_up_proj LoRA of rank 2r with alpha 2 lora_alpha, A stacked along the rank and B block-diagonal
(so each branch keeps its own delta and scale alpha / r), down_proj keeps rank r. We do the same, straight into
our per-expert layout: lora_a[e] = [A_gate; A_up]ᵀ [D, 2r], lora_b[e] = blockdiag(B_gate, B_up)ᵀ [2r, 2F].

PEFT ignores the config's rank_pattern / alpha_pattern for these fused experts (it resolves the v5 names), so the
expert tensors must have rank `r` and take lora_alpha / r; rsLoRA is refused, since PEFT's fused rank 2r would
change its alpha / sqrt(r) scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxtune.peft.names import PeftConfigError

# model_type -> (v4 MoE block name, (gate, up, down) expert module names)
V4_EXPERTS = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def v4_module_names(arch) -> list[str]:
    """Layer-0, expert-0 v4 module names (for checking a config's target_modules)."""
    if arch.model_type not in V4_EXPERTS:
        return []
    block, projs = V4_EXPERTS[arch.model_type]
    return [f"model.layers.0.{block}.experts.0.{p}" for p in projs] + [f"model.layers.0.{block}.gate"]


def load(arch, config: dict, tensors, prefix: str, rslora: bool) -> dict:
    """{path: leaf} of the v4 per-expert LoRA tensors in the file (the router too, when its v4 name differs from
    transformers 5's); {} when the file has none. Every expert of every layer must be present."""
    if arch.model_type not in V4_EXPERTS or not arch.num_experts:
        return {}
    block, projs = V4_EXPERTS[arch.model_type]
    name = lambda i, e, p, f: f"{prefix}model.layers.{i}.{block}.experts.{e}.{p}.{f}.weight"  # noqa: E731
    present = [p for p in projs if name(0, 0, p, "lora_A") in tensors.arrays]
    out = {}
    if present:
        if rslora:
            raise PeftConfigError(
                f"{tensors.file}: a transformers-4 expert LoRA with use_rslora: PEFT fuses gate and up into rank 2r, "
                "which changes the rsLoRA scale alpha / sqrt(r); load it in PEFT and save it from transformers 5"
            )
        gate, up, down = projs
        if (gate in present) != (up in present):
            raise PeftConfigError(
                f"{tensors.file}: LoRA on {gate if gate in present else up} without {up if gate in present else gate}: "
                "they are fused into experts.gate_up_proj (PEFT refuses this too)"
            )
        r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
        scale = float(alpha) / r
        e_n, d, f = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size

        def factors(i, e, p, n_in, n_out):
            a = tensors.take(name(i, e, p, "lora_A"))
            b = tensors.take(name(i, e, p, "lora_B"))
            for x, want, what in ((a, (r, n_in), "lora_A"), (b, (n_out, r), "lora_B")):
                if x is None or tuple(x.shape) != want:
                    got = "missing" if x is None else f"{list(x.shape)}"
                    raise PeftConfigError(
                        f"{tensors.file}: {name(i, e, p, what)} is {got}; a transformers-4 expert LoRA needs "
                        f"{list(want)} in every layer and expert (r={r}; rank_pattern does not apply to them in PEFT)"
                    )
            return np.asarray(a, np.float32).T, np.asarray(b, np.float32).T  # [in, r], [r, out]

        if gate in present:
            a_all = np.zeros((arch.num_layers, e_n, d, 2 * r), np.float32)
            b_all = np.zeros((arch.num_layers, e_n, 2 * r, 2 * f), np.float32)
            for i in range(arch.num_layers):
                for e in range(e_n):
                    for k, p in enumerate((gate, up)):
                        a, b = factors(i, e, p, d, f)
                        a_all[i, e, :, k * r : (k + 1) * r] = a
                        b_all[i, e, k * r : (k + 1) * r, k * f : (k + 1) * f] = b  # block diagonal
            out[("layers", "mlp", "experts", "gate_up_proj")] = (a_all, b_all, scale)
        if down in present:
            pairs = [[factors(i, e, down, f, d) for e in range(e_n)] for i in range(arch.num_layers)]
            a_all = np.stack([np.stack([a for a, _ in row]) for row in pairs])
            b_all = np.stack([np.stack([b for _, b in row]) for row in pairs])
            out[("layers", "mlp", "experts", "down_proj")] = (a_all, b_all, scale)
    return {
        path: ({"lora_a": jnp.asarray(a, arch.weight_dtype), "lora_b": jnp.asarray(b, arch.weight_dtype)}, s)
        for path, (a, b, s) in out.items()
    }


def router_name(arch) -> str | None:
    """The v4 router module name when it differs from transformers 5's `mlp.gate` (Mixtral), else None."""
    block = V4_EXPERTS.get(arch.model_type, ("mlp",))[0]
    return None if block == "mlp" else f"model.layers.{{i}}.{block}.gate"
