"""Hugging Face `model_type` -> `ArchConfig`, and each family's tensor-name map.

Supported: llama (1, 2, 3, 3.1, 3.2), mistral, qwen2 (2.5), qwen3, gemma, phi3 (Phi-3, Phi-3.5, Phi-4,
Phi-4-mini), gpt2. Our parameter paths mirror HF module names, so for the Llama-like families the map is the
identity up to the `model.` prefix and the [out, in] -> [in, out] transpose of Linear weights; phi3's fused
`qkv_proj` / `gate_up_proj` stay fused (one kernel each, split in the layer). GPT-2 is the exception: its
`Conv1D` stores weights [in, out] already, and `c_attn` fuses q, k and v along the output axis (split on load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxtune.errors import JaxtuneError
from jaxtune.models.arch import ArchConfig

ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


class UnsupportedModelError(JaxtuneError, ValueError):
    pass


@dataclass(frozen=True)
class TensorMap:
    """One parameter leaf <-> one HF tensor (or one part of a fused HF tensor)."""

    path: tuple[str, ...]  # our path; leaves under ("layers", ...) are stacked over the layer axis
    hf: str  # HF tensor name; "{i}" stands for the layer index
    transpose: bool = False  # torch Linear [out, in] <-> our kernel [in, out]
    part: tuple[int, int] | None = None  # (index, parts) of a tensor fused along its last axis (GPT-2 c_attn)
    # a leaf assembled from several tensors (MoE, family_moe.py): `experts` > 0 stacks one tensor per expert
    # ("{e}" in the names) along the leaf's first axis; `concat` names further tensors joined after `hf`'s
    # along the last axis of our layout (Mixtral's w1 | w3 -> gate_up_proj). `transpose` swaps the last two axes.
    experts: int = 0
    concat: tuple[str, ...] = ()

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"

    def names(self, i: int | None = None) -> list[str]:
        """Every HF tensor this leaf is read from, for layer `i`."""
        pieces = (self.hf, *self.concat)
        if not self.experts:
            return [p.format(i=i) for p in pieces]
        return [p.format(i=i, e=e) for e in range(self.experts) for p in pieces]


def _get(cfg: dict, *names, default=None):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _activation(cfg: dict, *names) -> str:
    act = _get(cfg, *names, default="silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def _rope(cfg: dict) -> tuple[float, tuple]:
    """(theta, scaling items) from either transformers>=5 `rope_parameters` or the older rope_theta/rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    if not params and cfg.get("rope_scaling"):
        params = dict(cfg["rope_scaling"])
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"rope_type {kind!r} is not supported (supported: default, linear, llama3)"
        )
    return float(theta), tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))


def _phi3_rope(cfg: dict, head_dim: int) -> tuple[float, tuple]:
    """phi3's RoPE as transformers' Phi3Config reads it: `rope_scaling` (else `rope_parameters`), with top-level
    rope_theta / partial_rotary_factor as defaults, `su` / `yarn` renamed `longrope`, and the top-level
    original_max_position_embeddings (default 4096) overriding the dict's (`standardize_rope_params`)."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    if not 0.0 < partial <= 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} must be in (0, 1]")
    kind = params.get("rope_type", params.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind
    out = {"rope_type": kind, "partial_rotary_factor": partial}
    if kind == "longrope":
        dim = int(head_dim * partial)
        for name in ("short_factor", "long_factor"):
            factors = params.get(name)
            if not isinstance(factors, (list, tuple)) or len(factors) != dim // 2:
                raise UnsupportedModelError(
                    f"rope_scaling.{name} must be a list of rotary_dim / 2 = {dim // 2} numbers, got {factors!r}"
                )
            out[name] = tuple(float(x) for x in factors)
        original = int(cfg.get("original_max_position_embeddings") or 4096)
        factor = params.get("factor")
        factor = cfg.get("max_position_embeddings", 4096) / original if factor is None else float(factor)
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        out.update(original_max_position_embeddings=original, attention_factor=float(attention))
    elif kind != "default":
        raise UnsupportedModelError(
            f"rope_scaling.rope_type {kind!r} is not supported for phi3 (supported: default, longrope, su, yarn)"
        )
    return float(theta), tuple(sorted(out.items()))


def _windows(cfg: dict, n_layers: int, model_type: str) -> tuple[int, ...]:
    window = cfg.get("sliding_window")
    if not window:
        return ()
    if model_type in ("mistral", "phi3"):  # every layer
        return (int(window),) * n_layers
    # Qwen2/Qwen3: only the layers that `layer_types` (or use_sliding_window + max_window_layers) mark.
    types = cfg.get("layer_types")
    if types is None:
        if not cfg.get("use_sliding_window"):
            return ()
        first = cfg.get("max_window_layers", n_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if "sliding_attention" not in types:
        return ()
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


# model_type -> (arch_from_hf, tensor_maps) of families mapped in their own modules, which register here on
# import (jaxtune/models/__init__.py imports them): family_moe.py (mixtral, qwen2_moe, qwen3_moe)
EXTRA_FAMILIES: dict = {}


def arch_from_hf(cfg: dict, **runtime) -> ArchConfig:
    """Build the ArchConfig for a HF `config.json` dict; `runtime` sets dtype, param_dtype, remat, ..."""
    mt = cfg.get("model_type")
    if mt in EXTRA_FAMILIES:
        return EXTRA_FAMILIES[mt][0](cfg, **runtime)
    if mt == "gpt2":
        d = cfg["n_embd"]
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            raise UnsupportedModelError("gpt2 with scale_attn_by_inverse_layer_idx=true is not supported")
        return ArchConfig(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=d,
            intermediate_size=cfg.get("n_inner") or 4 * d,
            num_layers=cfg["n_layer"],
            num_heads=cfg["n_head"],
            num_kv_heads=cfg["n_head"],
            head_dim=d // cfg["n_head"],
            max_position_embeddings=cfg["n_positions"],
            norm="layer",
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            activation=_activation(cfg, "activation_function"),
            gated_mlp=False,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            positions="learned",
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            **runtime,
        )
    if mt not in LLAMA_LIKE:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; jaxtune supports: {', '.join(sorted((*SUPPORTED, *EXTRA_FAMILIES)))}"
        )
    heads = cfg["num_attention_heads"]
    attn_bias = bool(cfg.get("attention_bias", False)) and mt != "phi3"  # Phi3 Linears never have biases
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta, rope = _phi3_rope(cfg, head_dim) if mt == "phi3" else _rope(cfg)
    return ArchConfig(
        model_type=mt,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096 if mt == "phi3" else 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-5 if mt == "phi3" else 1e-6),
        norm_plus_one=mt == "gemma",
        activation=_activation(cfg, "hidden_activation", "hidden_act")
        if mt == "gemma"
        else _activation(cfg, "hidden_act"),
        qkv_bias=True if mt == "qwen2" else attn_bias,  # Qwen2 always has q/k/v biases, never an o bias
        o_bias=False if mt == "qwen2" else attn_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) and mt != "phi3",
        qk_norm=mt == "qwen3",
        fused_qkv=mt == "phi3",
        fused_gate_up=mt == "phi3",
        rope_theta=theta,
        rope_scaling=rope,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt == "gemma")),
        embed_scale=mt == "gemma",
        layer_windows=_windows(cfg, cfg["num_hidden_layers"], mt),
        **runtime,
    )


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
SUPPORTED = (*LLAMA_LIKE, "gpt2")


def tensor_maps(arch: ArchConfig) -> list[TensorMap]:
    """Every parameter leaf of `arch` and the HF tensor it comes from."""
    if arch.model_type == "gpt2":
        return _gpt2_maps(arch)
    if arch.model_type in EXTRA_FAMILIES:
        return EXTRA_FAMILIES[arch.model_type][1](arch)
    L = "model.layers.{i}."
    maps = [TensorMap(("embed_tokens", "embedding"), "model.embed_tokens.weight")]
    projs = [
        ("self_attn", "q_proj", arch.qkv_bias),
        ("self_attn", "k_proj", arch.qkv_bias),
        ("self_attn", "v_proj", arch.qkv_bias),
        ("self_attn", "o_proj", arch.o_bias),
        ("mlp", "gate_proj", arch.mlp_bias),
        ("mlp", "up_proj", arch.mlp_bias),
        ("mlp", "down_proj", arch.mlp_bias),
    ]
    if arch.fused_qkv:  # phi3: HF's fused tensors load straight into the fused kernels
        projs[:3] = [("self_attn", "qkv_proj", arch.qkv_bias)]
    if arch.fused_gate_up:
        projs = [p for p in projs if p[1] not in ("gate_proj", "up_proj")]
        projs.insert(-1, ("mlp", "gate_up_proj", arch.mlp_bias))
    for parent, name, bias in projs:
        maps.append(
            TensorMap(("layers", parent, name, "kernel"), f"{L}{parent}.{name}.weight", transpose=True)
        )
        if bias:
            maps.append(TensorMap(("layers", parent, name, "bias"), f"{L}{parent}.{name}.bias"))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        maps.append(TensorMap(("layers", norm, "scale"), f"{L}{norm}.weight"))
    if arch.qk_norm:
        for norm in ("q_norm", "k_norm"):
            maps.append(TensorMap(("layers", "self_attn", norm, "scale"), f"{L}self_attn.{norm}.weight"))
    maps.append(TensorMap(("norm", "scale"), "model.norm.weight"))
    if not arch.tie_word_embeddings:
        maps.append(TensorMap(("lm_head", "kernel"), "lm_head.weight", transpose=True))
    return maps


def _gpt2_maps(arch: ArchConfig) -> list[TensorMap]:
    H = "transformer.h.{i}."
    maps = [
        TensorMap(("embed_tokens", "embedding"), "transformer.wte.weight"),
        TensorMap(("embed_positions", "embedding"), "transformer.wpe.weight"),
        TensorMap(("norm", "scale"), "transformer.ln_f.weight"),
        TensorMap(("norm", "bias"), "transformer.ln_f.bias"),
    ]
    for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
        maps += [
            TensorMap(("layers", ours, "scale"), f"{H}{theirs}.weight"),
            TensorMap(("layers", ours, "bias"), f"{H}{theirs}.bias"),
        ]
    # Conv1D weights are [in, out] like our kernels: no transpose. c_attn = [q | k | v] along the output axis.
    for idx, name in enumerate(("q_proj", "k_proj", "v_proj")):
        for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
            maps.append(
                TensorMap(("layers", "self_attn", name, leaf), f"{H}attn.c_attn.{suffix}", part=(idx, 3))
            )
    for parent, ours, theirs in (
        ("self_attn", "o_proj", "attn.c_proj"),
        ("mlp", "up_proj", "mlp.c_fc"),
        ("mlp", "down_proj", "mlp.c_proj"),
    ):
        maps += [
            TensorMap(("layers", parent, ours, "kernel"), f"{H}{theirs}.weight"),
            TensorMap(("layers", parent, ours, "bias"), f"{H}{theirs}.bias"),
        ]
    if not arch.tie_word_embeddings:
        maps.append(TensorMap(("lm_head", "kernel"), "lm_head.weight", transpose=True))
    return maps


# Checkpoint entries that carry no weights of ours (buffers some old exports saved).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
