"""LoRA on mixture-of-experts experts, as PEFT's `target_parameters` (`lora.ParamWrapper`) expresses it.

transformers 5 stores each layer's experts as two stacked parameters of `mlp.experts`: `gate_up_proj` [E, 2F, D]
and `down_proj` [E, D, F] (torch layout [E, out, in]). PEFT wraps each targeted parameter in a `ParamWrapper`
holding one `lora_A` [r*E, in] and one `lora_B` [out, r*E] for all experts, with (peft/tuners/lora/layer.py,
`get_delta_weight`; in/out swapped because the parameter is [E, out, in])

    A_e = lora_A.reshape(E, r, in)[e]            [r, in]
    B_e = lora_B.reshape(out, r, E)[:, :, e]     [out, r]      ΔW_e = s · B_e A_e   [out, in]

i.e. A is expert-major, B expert-minor. Ours (models/experts.py) are per expert in our [in, out] layout:
lora_a [E, in, r] = A_eᵀ and lora_b [E, r, out] = B_eᵀ, so ΔW_e(ours) = s · lora_a[e] @ lora_b[e] = ΔW_eᵀ.

The wrappers nest in the order transformers defines the parameters (`gate_up_proj`, then `down_proj`): with both
targeted the saved keys are `mlp.experts.base_layer.lora_A.weight` (gate_up_proj, the inner wrapper) and
`mlp.experts.lora_A.weight` (down_proj); with one, `mlp.experts.lora_A.weight`. PEFT refuses dropout, DoRA and
fan_in_fan_out on a ParamWrapper, and so do we. The router (`mlp.gate`, a 2-D parameter of a custom module) is a
ParamWrapper with one "expert": its tensors are an ordinary linear LoRA's, only listed under target_parameters.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.peft import names
from jaxtune.peft.names import ROUTED, PeftConfigError

log = logging.getLogger("jaxtune.peft")
ORDER = ("gate_up_proj", "down_proj")  # transformers' parameter order in mlp.experts = PEFT's nesting order


def check_lora(cfg, chosen: list[names.Module], dora: bool) -> None:
    """PEFT's ParamWrapper limits (lora_dropout, DoRA) and ours (PiSSA) for routed weights (experts, router)."""
    routed = [m.ours.split("{i}.", 1)[-1] for m in chosen if m.kind in ROUTED]
    if not routed:
        return
    what = f"LoRA on {', '.join(routed)} (PEFT target_parameters)"
    if cfg.dropout > 0:
        raise PeftConfigError(
            f"{what} does not work with method.dropout={cfg.dropout} (PEFT's ParamWrapper refuses lora_dropout != 0: "
            "the dropout cannot be factored out of a weight delta); set method.dropout: 0"
        )
    if dora:
        raise PeftConfigError(
            f"{what} does not work with DoRA (PEFT's ParamWrapper refuses use_dora); turn dora off"
        )
    if cfg.pissa:
        raise PeftConfigError(f"{what} does not support PiSSA initialisation; set method.pissa: false")


def note_all_linear(cfg, arch, chosen: list[names.Module]) -> None:
    """One log line where jaxtune's all-linear differs from PEFT's on an MoE model (module docstring of names)."""
    all_linear = cfg.target_modules == names.ALL_LINEAR or names.ALL_LINEAR in cfg.target_modules
    if arch.num_experts and all_linear and not any(m.kind == "router" for m in chosen):
        log.info(
            "target_modules=all-linear on %s: attention, shared-expert and expert weights get LoRA, the router "
            "mlp.gate stays frozen (name 'gate' to adapt it; PEFT's own all-linear on Mixtral / Qwen3-MoE also "
            "adapts the router and gives experts.gate_up_proj rank 2r)",
            arch.model_type,
        )


def init_leaf(key, m: names.Module, arch, r: int, dtype) -> dict:
    """PEFT's init per expert: A ~ kaiming-uniform(a=√5) on [r*E, in] = U(±1/√in), B = 0; [L, E, ...] stacked."""
    lead = (arch.num_layers, arch.num_experts)
    bound = 1.0 / math.sqrt(m.in_features)
    return {
        "lora_a": jax.random.uniform(key, (*lead, m.in_features, r), dtype, -bound, bound),
        "lora_b": jnp.zeros((*lead, r, m.out_features), dtype),
    }


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's lora_a [E, in, r], lora_b [E, r, out] -> PEFT's lora_A [E*r, in], lora_B [out, r*E]."""
    e, n_in, r = a.shape
    return a.transpose(0, 2, 1).reshape(e * r, n_in), b.transpose(2, 1, 0).reshape(b.shape[2], r * e)


def from_peft(big_a: np.ndarray, big_b: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `to_peft`: lora_A [E*r, in], lora_B [out, r*E] -> lora_a [E, in, r], lora_b [E, r, out]."""
    r = big_a.shape[0] // e
    a = big_a.reshape(e, r, big_a.shape[1]).transpose(0, 2, 1)
    b = big_b.reshape(big_b.shape[0], r, e).transpose(2, 1, 0)
    return a, b


def key_prefixes(targeted: list[str]) -> dict[str, str]:
    """{parameter: `base_layer.` repeats} of the nested ParamWrappers, innermost (first defined) deepest."""
    order = [n for n in ORDER if n in targeted]
    return {n: "base_layer." * (len(order) - 1 - k) for k, n in enumerate(order)}


def tensor_name(prefix: str, layer: int, nesting: str, factor: str) -> str:
    return f"{prefix}model.layers.{layer}.mlp.experts.{nesting}{factor}.weight"


def expert_modules(arch) -> list[names.Module]:
    return [m for m in names.modules(arch) if m.kind == "experts"]


def export(lora: dict, arch, prefix: str) -> tuple[list[tuple[str, np.ndarray]], dict[str, int]]:
    """([(tensor name, array)], {short parameter name: rank}) of the expert LoRA in `lora` (PEFT's layout)."""
    mods = [(m, leaf) for m in expert_modules(arch) if (leaf := _leaf(lora, m.path)) is not None]
    nest = key_prefixes([m.name for m, _ in mods])
    out, ranks = [], {}
    for m, leaf in mods:
        a_all = np.asarray(jax.device_get(leaf["lora_a"]), np.float32)  # [L, E, in, r]
        b_all = np.asarray(jax.device_get(leaf["lora_b"]), np.float32)  # [L, E, r, out]
        ranks[m.hf.split("{i}.", 1)[1]] = int(a_all.shape[-1])
        for i in range(arch.num_layers):
            big_a, big_b = to_peft(a_all[i], b_all[i])
            out += [
                (tensor_name(prefix, i, nest[m.name], "lora_A"), big_a),
                (tensor_name(prefix, i, nest[m.name], "lora_B"), big_b),
            ]
    return out, ranks


def targeted(arch, config: dict) -> list[names.Module]:
    """The expert parameters a PEFT config's `target_parameters` names (PEFT's exact-or-suffix match)."""
    target = config.get("target_parameters") or []
    return [m for m in expert_modules(arch) if any(names.matches([t], m.hf.format(i=0)) for t in target)]


def load(arch, config: dict, tensors, prefix: str, setting, rslora: bool) -> tuple[dict, dict]:
    """A PEFT adapter's expert LoRA -> ({path: leaf}, {scale key: scale}).

    `tensors.take(name)` returns the array (marking it placed) or None; `setting(pattern, default, hf)` resolves
    r / lora_alpha per parameter (rank_pattern / alpha_pattern). Per-layer ranks are zero-padded to the largest and
    per-layer scales folded into B, as adapter_load does for modules (both exact)."""
    mods = targeted(arch, config)
    nest = key_prefixes([m.name for m in mods])
    e = arch.num_experts
    leaves, scales = {}, {}
    for m in mods:
        a_l, b_l, s_l = [], [], []
        for i in range(arch.num_layers):
            hf = m.hf.format(i=i)
            r, r_from = setting("rank_pattern", "r", hf)
            alpha, _ = setting("alpha_pattern", "lora_alpha", hf)
            pair = []
            for factor, want in (("lora_A", (r * e, m.in_features)), ("lora_B", (m.out_features, r * e))):
                name = tensor_name(prefix, i, nest[m.name], factor)
                x = tensors.take(name)
                if x is None:
                    raise PeftConfigError(
                        f"{tensors.file}: no tensor {name!r}, which target_parameters={config['target_parameters']!r} "
                        "needs (PEFT nests the expert wrappers: gate_up_proj under base_layer when down_proj is "
                        "targeted too)"
                    )
                if tuple(x.shape) != want:
                    raise PeftConfigError(
                        f"{tensors.file}: {name} is {list(x.shape)}, but {r_from}, {e} experts and this model's {hf} "
                        f"({m.in_features} -> {m.out_features}) make it {list(want)}"
                    )
                pair.append(np.asarray(x, np.float32))
            a, b = from_peft(pair[0], pair[1], e)
            a_l.append(a)
            b_l.append(b)
            s_l.append(float(alpha) / (math.sqrt(r) if rslora else r))
        scale = max(s_l, key=abs)
        rank = max(a.shape[-1] for a in a_l)
        a_l = [np.pad(a, ((0, 0), (0, 0), (0, rank - a.shape[-1]))) for a in a_l]
        b_l = [
            np.pad(b * (s / scale if s != scale else 1.0), ((0, 0), (0, rank - b.shape[1]), (0, 0)))
            for b, s in zip(b_l, s_l)
        ]
        leaf = {"lora_a": np.stack(a_l), "lora_b": np.stack(b_l)}
        leaves[m.path] = jax.tree.map(lambda x: jnp.asarray(x, arch.weight_dtype), leaf)
        scales[m.scale_key] = scale
    return leaves, scales


def log_unquantized(arch) -> None:
    """QLoRA on an MoE model: the expert parameters and the router stay in full precision (bitsandbytes replaces
    nn.Linear only, and transformers 5 holds neither as one)."""
    if arch.num_experts:
        log.info(
            "QLoRA on %s: the expert weights (mlp.experts.*) and the router (mlp.gate) stay unquantised, as "
            "bitsandbytes leaves them (they are not nn.Linear layers in transformers 5)",
            arch.model_type,
        )


def _leaf(tree: dict, path):
    try:
        return names.get_path(tree, path)
    except (KeyError, TypeError):
        return None
