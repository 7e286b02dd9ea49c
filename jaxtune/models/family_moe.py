"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE — config -> `ArchConfig` and tensor maps.

Attention, norms and embeddings are those of the dense family each extends (Mixtral: Mistral without biases;
Qwen2-MoE: Qwen2 with `qkv_bias`; Qwen3-MoE: Qwen3 with `attention_bias`), so their maps come from
`families.py`; what this module adds is the sparse MLP (models/moe.py).

Checkpoints on disk hold one tensor per expert (what `save_pretrained` writes, and what we export):
  mixtral    model.layers.{i}.block_sparse_moe.gate.weight [E, D], ...experts.{e}.w1 (gate) / w3 (up) [F, D],
             w2 (down) [D, F]
  qwen*_moe  model.layers.{i}.mlp.gate.weight, mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight; Qwen2-MoE
             also mlp.shared_expert.{gate,up,down}_proj.weight and mlp.shared_expert_gate.weight [1, D]
Loading stacks them into our [E, ...] leaves (`TensorMap.experts`, gate | up by `TensorMap.concat`); the
fused transformers-5 runtime layout (mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F], router under
`mlp.gate`) is read too when a checkpoint holds it (`checkpoint_maps`).

Registered with `families.py` on import (jaxtune/models/__init__.py imports this module).
"""

from __future__ import annotations

from jaxtune.models import families
from jaxtune.models.arch import ArchConfig
from jaxtune.models.families import TensorMap, UnsupportedModelError

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
DENSE_BASE = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
L = "model.layers.{i}."


def _num_experts(cfg: dict) -> int:
    """HF hub configs say num_experts (Qwen) / num_local_experts (Mixtral); transformers 5's `to_dict` says
    num_local_experts for both (an attribute_map alias)."""
    return int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)


def _all_sparse(cfg: dict, mt: str) -> None:
    if mt == "mixtral":
        if cfg.get("router_jitter_noise"):
            raise UnsupportedModelError(
                f"mixtral router_jitter_noise={cfg['router_jitter_noise']} is not supported (set it to 0)"
            )
        return
    n = cfg["num_hidden_layers"]
    dense = [i for i in cfg.get("mlp_only_layers") or [] if 0 <= i < n]
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense += [i for i in range(n) if (i + 1) % step and i not in dense]
    if dense or not _num_experts(cfg):
        raise UnsupportedModelError(
            f"{mt} with dense MLP layers {sorted(dense)} (mlp_only_layers={cfg.get('mlp_only_layers')}, "
            f"decoder_sparse_step={cfg.get('decoder_sparse_step')}, num_experts={_num_experts(cfg)}) is not "
            "supported: every layer must be sparse (mlp_only_layers=[], decoder_sparse_step=1, num_experts > 0) "
            "so the layers can be stacked"
        )


def _windows(cfg: dict, mt: str, n: int) -> tuple[int, ...]:
    window = cfg.get("sliding_window")
    if not window or (mt != "mixtral" and not cfg.get("use_sliding_window")):
        return ()
    if mt == "qwen2_moe":  # per `layer_types` (HF's default: even layers below max_window_layers)
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < cfg.get("max_window_layers", n) else "full_attention"
            for i in range(n)
        ]
        if "sliding_attention" not in types:
            return ()
        return tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return (int(window),) * n  # Mixtral, Qwen3-MoE: every layer


def arch_from_hf(cfg: dict, **runtime) -> ArchConfig:
    mt = cfg["model_type"]
    _all_sparse(cfg, mt)
    base = {k: v for k, v in cfg.items() if k not in ("sliding_window", "layer_types", "use_sliding_window")}
    dense = families.arch_from_hf({**base, "model_type": DENSE_BASE[mt]}, **runtime)
    n = cfg["num_hidden_layers"]
    bias = bool(cfg.get("qkv_bias", True)) if mt == "qwen2_moe" else bool(cfg.get("attention_bias", False))
    experts = _num_experts(cfg)
    if mt == "mixtral":
        size, norm_topk = cfg["intermediate_size"], True
    else:
        size, norm_topk = cfg["moe_intermediate_size"], bool(cfg.get("norm_topk_prob"))
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
    return dense.replace(
        model_type=mt,
        qkv_bias=bias,
        o_bias=False if mt == "qwen2_moe" else bias,
        layer_windows=_windows(cfg, mt, n),
        num_experts=experts,
        experts_per_token=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(size),
        norm_topk_prob=norm_topk,
        shared_expert_size=shared,
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )


def tensor_maps(arch: ArchConfig) -> list[TensorMap]:
    """The dense base family's maps without its MLP, plus the router, the experts and the shared expert."""
    dense = families.tensor_maps(arch.replace(model_type=DENSE_BASE[arch.model_type], num_experts=0))
    maps = [m for m in dense if not (m.per_layer and m.path[1] == "mlp")]
    e = arch.num_experts
    if arch.model_type == "mixtral":
        moe, gate, up, down = "block_sparse_moe", "w1", "w3", "w2"
    else:
        moe, gate, up, down = "mlp", "gate_proj", "up_proj", "down_proj"
    x = f"{L}{moe}.experts.{{e}}."
    maps += [
        TensorMap(("layers", "mlp", "gate", "kernel"), f"{L}{moe}.gate.weight", transpose=True),
        TensorMap(
            ("layers", "mlp", "experts", "gate_up_proj"), f"{x}{gate}.weight", True, experts=e,
            concat=(f"{x}{up}.weight",),
        ),
        TensorMap(("layers", "mlp", "experts", "down_proj"), f"{x}{down}.weight", True, experts=e),
    ]  # fmt: skip
    if arch.shared_expert_size:
        for name in ("gate_proj", "up_proj", "down_proj"):
            hf = f"{L}mlp.shared_expert.{name}.weight"
            maps.append(TensorMap(("layers", "mlp", "shared_expert", name, "kernel"), hf, transpose=True))
        maps.append(
            TensorMap(("layers", "mlp", "shared_expert_gate", "kernel"), f"{L}mlp.shared_expert_gate.weight", True)
        )
    return maps


def fused_maps(arch: ArchConfig) -> list[TensorMap]:
    """The transformers-5 runtime layout: experts as two [E, out, in] tensors, the router under `mlp.gate`."""
    out = []
    for m in tensor_maps(arch):
        if m.path[1:3] == ("mlp", "experts"):
            m = TensorMap(m.path, f"{L}mlp.experts.{m.path[-1]}", transpose=True)
        elif m.path[1:3] == ("mlp", "gate"):
            m = TensorMap(m.path, f"{L}mlp.gate.weight", transpose=True)
        out.append(m)
    return out


def checkpoint_maps(arch: ArchConfig, maps: list[TensorMap], names) -> list[TensorMap]:
    """`maps`, or the fused layout's when the checkpoint (tensor `names`) holds fused expert tensors."""
    if not arch.num_experts or f"{L.format(i=0)}mlp.experts.gate_up_proj" not in names:
        return maps
    fused = {m.path: m for m in fused_maps(arch)}
    return [fused.get(m.path, m) for m in maps]


families.EXTRA_FAMILIES.update({mt: (arch_from_hf, tensor_maps) for mt in MOE_TYPES})
