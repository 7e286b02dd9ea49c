"""Hugging Face `model_type` -> `ArchConfig`, and each family's tensor-name map.

Supported: llama (1, 2, 3, 3.1, 3.2), mistral, qwen2 (2.5), qwen3, gemma, gemma2, gemma3_text, gemma3 (its language
model: `language_model_config`), phi3 (Phi-3, Phi-3.5, Phi-4, Phi-4-mini), gpt2, and (family_moe.py) mixtral,
qwen2_moe, qwen3_moe. Our parameter paths mirror HF's runtime module names, so for the Llama-like families the map
is the identity up to the `model.` prefix and the [out, in] -> [in, out] transpose of Linear weights; phi3's fused
`qkv_proj` / `gate_up_proj` stay fused (one kernel each, split in the layer). GPT-2 is the exception: its `Conv1D`
stores weights [in, out] already, and `c_attn` fuses q, k and v along the output axis (split on load).

Gemma 2 / 3 configs are read with transformers' own defaults for the keys a config.json may leave out (`GEMMA_DEFAULTS`:
Gemma 2's soft-caps default to 50 / 30 when absent, and the text_config of a Gemma 3 multimodal checkpoint names
little more than its sizes).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from jaxtune.errors import JaxtuneError
from jaxtune.models.arch import ArchConfig

log = logging.getLogger(__name__)

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


# transformers' Gemma2Config / Gemma3TextConfig defaults of the keys read below (a key present as null stays null)
GEMMA_DEFAULTS = {
    "gemma2": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=None, attn_logit_softcapping=None,
    ),
}  # fmt: skip
GEMMA3_ROPE_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta


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
    return float(theta), _rope_items(params)


def _gemma3_rope(cfg: dict) -> tuple[tuple[float, tuple], tuple[float, tuple]]:
    """((theta, scaling) of the global layers, (theta, scaling) of the sliding ones). transformers>=5 keeps one
    `rope_parameters` entry per layer type; older configs say rope_theta + rope_scaling (global layers only) +
    rope_local_base_freq (the sliding layers, never scaled)."""
    params = cfg.get("rope_parameters") or {}
    if not ({"full_attention", "sliding_attention"} & set(params)):  # the older keys
        params = {
            "full_attention": {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta")},
            "sliding_attention": {"rope_theta": cfg.get("rope_local_base_freq")},
        }
    out = []
    for kind in ("full_attention", "sliding_attention"):
        p = dict(params.get(kind) or {})
        theta = p.pop("rope_theta", None) or GEMMA3_ROPE_THETA[kind]
        out.append((float(theta), _rope_items(p)))
    return out[0], out[1]


def _rope_items(params: dict) -> tuple:
    """The scaling items of one RoPE (rope_theta taken out), checked to be a scaling jaxtune implements."""
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"rope_type {kind!r} is not supported (supported: default, linear, llama3)"
        )
    return tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))


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
    # Gemma 2/3: `layer_types`, or transformers' default pattern (Gemma 2 alternates from a sliding layer 0;
    # Gemma 3 has `sliding_window_pattern - 1` sliding layers, then a global one: 5:1).
    types = cfg.get("layer_types")
    if types is None and model_type in GEMMA_DEFAULTS:
        every = 2 if model_type == "gemma2" else int(cfg.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
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


def supported() -> list[str]:
    """Every model_type jaxtune loads, sorted (the dense families and those registered in EXTRA_FAMILIES)."""
    return sorted((*SUPPORTED, *EXTRA_FAMILIES))


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
    if mt == "gemma3":
        cfg = language_model_config(cfg, quiet=True)
        mt = cfg["model_type"]
    if mt not in LLAMA_LIKE:
        raise UnsupportedModelError(f"model_type {mt!r} is not supported; jaxtune supports: {', '.join(supported())}")
    if mt in GEMMA_DEFAULTS:
        return _gemma(cfg, mt, runtime)
    attn_bias = bool(cfg.get("attention_bias", False)) and mt != "phi3"  # Phi3 Linears never have biases
    theta, rope = _phi3_rope(cfg, _sizes(cfg)["head_dim"]) if mt == "phi3" else _rope(cfg)
    return ArchConfig(
        model_type=mt,
        **_sizes(cfg),
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


def _sizes(cfg: dict) -> dict:
    """The ArchConfig sizes of a Llama-style config.json (every family but GPT-2 names them alike)."""
    heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    )


def _gemma(cfg: dict, mt: str, runtime: dict) -> ArchConfig:
    """Gemma 2 and Gemma 3 (text): Gemma's `1 + w` RMSNorm, GeGLU and sqrt(d)-scaled tied embeddings, plus the
    sandwich norms, query_pre_attn_scalar, alternating sliding / global layers and the final-logit soft-cap;
    Gemma 2 soft-caps the attention logits too (transformers' Gemma 3 attention ignores attn_logit_softcapping),
    Gemma 3 adds q/k norms and its sliding layers' own RoPE."""
    cfg = {**GEMMA_DEFAULTS[mt], **cfg}
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{mt} with use_bidirectional_attention=true (an encoder) is not supported")
    if mt == "gemma3_text":
        (theta, rope), (local_theta, local_rope) = _gemma3_rope(cfg)
    else:
        (theta, rope), local_theta, local_rope = _rope(cfg), 0.0, ()
    attn_bias = bool(cfg.get("attention_bias", False))
    return ArchConfig(
        model_type=mt,
        **_sizes(cfg),
        max_position_embeddings=cfg["max_position_embeddings"],
        norm_eps=cfg["rms_norm_eps"],
        norm_plus_one=True,
        activation=_activation(cfg, "hidden_activation", "hidden_act"),
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        qk_norm=mt == "gemma3_text",
        rope_theta=theta,
        rope_scaling=rope,
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        embed_scale=True,
        layer_windows=_windows(cfg, cfg["num_hidden_layers"], mt),
        rope_local_theta=local_theta,
        rope_local_scaling=local_rope,
        sandwich_norms=True,
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0) if mt == "gemma2" else 0.0,
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        **runtime,
    )


def language_model_config(cfg: dict, quiet: bool = False) -> dict:
    """A multimodal Gemma 3 config.json (`gemma3`: Gemma3ForConditionalGeneration) -> the config.json of its
    language model as the text-only `gemma3_text` (Gemma3ForCausalLM) that jaxtune loads, trains and exports (the
    vision tower and projector are not loaded); any other config is returned unchanged.

    The outer config's tie_word_embeddings and special token ids win over the text_config's (transformers reads
    them there). Gemma3ForConditionalGeneration applies no final-logit soft-cap whatever its text_config says, so
    the text config gets final_logit_softcapping=null: the exported Gemma3ForCausalLM computes what the
    multimodal model's language model computed."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    seq_cls = any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or ())
    arch = "Gemma3TextForSequenceClassification" if seq_cls else "Gemma3ForCausalLM"  # a reward model stays one
    text = {**cfg.get("text_config", {}), "model_type": "gemma3_text", "architectures": [arch]}
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
                "id2label", "label2id"):  # fmt: skip
        if cfg.get(key) is not None:
            text[key] = cfg[key]
    if text.get("final_logit_softcapping") is not None:
        text["final_logit_softcapping"] = None
    if not quiet:
        log.info(
            "gemma3 (Gemma3ForConditionalGeneration) checkpoint: loading its language model only (vision tower and "
            "projector ignored); it trains and exports as gemma3_text (Gemma3ForCausalLM), and PEFT adapters "
            "trained on it name that text model's modules (merge them, or load them over a gemma3_text export)"
        )
    return text


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
SUPPORTED = (*LLAMA_LIKE, "gemma3", "gpt2")


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
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for norm in norms:
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
