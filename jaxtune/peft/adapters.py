"""Bottleneck adapters (Houlsby / Pfeiffer) and (IA)^3: the `adapter` and `ia3` collections.

Houlsby et al. 2019 (sec. 2.1, fig. 2): a bottleneck h + up(act(down(h))) after the attention output and after
the MLP, each before its residual add. Pfeiffer et al. 2021 (AdapterFusion, sec. 3.1): the MLP one only. `up`
starts at zero, so the model starts exactly at the base ("near-identity initialisation", Houlsby sec. 2.1),
and `down` ~ N(0, 0.01^2). The PEFT library has no bottleneck adapters and they are not linear, so they can be
neither written in PEFT's format nor merged: they live in jaxtune's checkpoints (and `save_adapter`'s native
fallback, see interop.py).

(IA)^3 (Liu et al. 2022, sec. 3.3): learned vectors rescaling the keys, the values and the input of the MLP's
down projection, initialised to ones. Same modules and semantics as PEFT's `IA3Config` defaults
(`k_proj`, `v_proj` outputs, `down_proj` input; GPT-2: the fused `c_attn` output and `mlp.c_proj` input),
including PEFT's choice to scale an output *with* its bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.config import MethodConfig
from jaxtune.peft import names
from jaxtune.peft.names import PeftConfigError
from jaxtune.peft.parts import Context, Part

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")  # what `adapters_hook.bottleneck` implements
DOWN_STD = 1e-2
# PEFT TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES / _FEEDFORWARD_MODULES for the families we support
IA3_TARGETS = {"gpt2": ["c_attn", "mlp.c_proj"]}
IA3_DEFAULT = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = {"gpt2": ["mlp.c_proj"]}
IA3_FEEDFORWARD_DEFAULT = ["down_proj"]


def build_bottleneck(ctx: Context) -> Part:
    cfg, arch = ctx.cfg, ctx.model.arch
    if cfg.adapter_activation not in ACTIVATIONS:
        raise PeftConfigError(
            f"adapter_activation={cfg.adapter_activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    where = ["attn_adapter", "mlp_adapter"] if cfg.adapter_type == "houlsby" else ["mlp_adapter"]
    d, m, n = arch.hidden_size, cfg.adapter_size, arch.num_layers
    dtype = arch.weight_dtype
    tree = {}
    for name, key in zip(where, jax.random.split(ctx.rng, len(where))):
        tree[name] = {
            "down": {
                "kernel": DOWN_STD * jax.random.normal(key, (n, d, m), dtype),
                "bias": jnp.zeros((n, m), dtype),
            },
            "up": {"kernel": jnp.zeros((n, m, d), dtype), "bias": jnp.zeros((n, d), dtype)},
        }
    spec = {"adapter_activation": cfg.adapter_activation}
    return Part(trainable={"adapter": {"layers": tree}}, spec=spec)


def ia3_targets(cfg: MethodConfig, arch) -> tuple[list, list]:
    """(target_modules, feedforward_modules): PEFT's defaults unless the config names other targets. On an MoE
    model the feed-forward module is the shared expert's down_proj where there is one (the experts are not linear
    layers: PEFT's default `w2` / `down_proj` meets no nn.Linear in transformers 5), else none."""
    feedforward = IA3_FEEDFORWARD.get(arch.model_type, IA3_FEEDFORWARD_DEFAULT)
    if arch.num_experts:
        feedforward = ["shared_expert.down_proj"] if arch.shared_expert_size else []
    default = MethodConfig().target_modules
    if tuple(cfg.target_modules) != tuple(default) and cfg.target_modules != default:
        return cfg.target_modules, feedforward
    if arch.fused_qkv:  # phi3: PEFT has no (IA)^3 default for it (k and v are fused with q) and raises
        raise PeftConfigError(
            f"(IA)^3 has no default target_modules for {arch.model_type} (PEFT has none either: k_proj and "
            "v_proj are fused into qkv_proj with q_proj); set target_modules, e.g. [qkv_proj, down_proj] "
            "(down_proj's input is scaled as PEFT's feedforward_modules default)"
        )
    if arch.num_experts:
        return ["k_proj", "v_proj", *feedforward], feedforward
    return IA3_TARGETS.get(arch.model_type, IA3_DEFAULT), feedforward


def ia3_tree(arch, targets, feedforward, dtype) -> dict:
    """Ones for every targeted projection: `scale_in` [L, in] for feed-forward modules, else `scale_out`."""
    ff = names.select(arch, feedforward, "feedforward_modules", linear_only=True) if feedforward else []
    ff_names = {m.name for m in ff}
    tree = {}
    for m in names.select(arch, targets, "target_modules", linear_only=True):
        lead = (arch.num_layers,) if m.per_layer else ()
        leaf = (
            {"scale_in": jnp.ones((*lead, m.in_features), dtype)}
            if m.name in ff_names
            else {"scale_out": jnp.ones((*lead, m.out_features), dtype)}
        )
        tree = names.set_path(tree, m.path, leaf)
    return tree


def build_ia3(ctx: Context) -> Part:
    arch = ctx.model.arch
    targets, feedforward = ia3_targets(ctx.cfg, arch)
    return Part(trainable={"ia3": ia3_tree(arch, targets, feedforward, arch.weight_dtype)})


def merge_ia3(params: dict, ia3: dict, arch) -> dict:
    """Fold (IA)^3 into the kernels (PEFT `IA3Layer.merge`): scale rows (inputs) or columns and bias (outputs)."""
    for m in names.modules(arch):
        try:
            leaf = names.get_path(ia3, m.path)
        except KeyError:
            continue
        p = dict(names.get_path(params, m.path))
        if "scale_in" in leaf:
            p["kernel"] = (p["kernel"] * leaf["scale_in"][..., :, None]).astype(p["kernel"].dtype)
        else:
            p["kernel"] = (p["kernel"] * leaf["scale_out"][..., None, :]).astype(p["kernel"].dtype)
            if "bias" in p:
                p["bias"] = (p["bias"] * leaf["scale_out"]).astype(p["bias"].dtype)
        params = names.set_path(params, m.path, p)
    return params
