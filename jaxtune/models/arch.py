"""`ArchConfig`: the sizes and switches of a decoder-only transformer, the only config layers ever see.

One decoder serves every supported family (Llama 1-3.2, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2, Gemma 3 text,
Phi-3/Phi-4, GPT-2, and the mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE); what differs between them is expressed
here as switches (norm type, activation, biases, q/k norm, positions, RoPE scaling, partial rotary, a second RoPE
for sliding-window layers, fused projections, tied head, sliding windows, the sandwich norms of Gemma 2/3, tanh
soft-capping of attention and output logits, the attention scale, routed experts). `families.py` maps a Hugging Face
`config.json` onto these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import jax.numpy as jnp

from jaxtune.errors import RunError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass(frozen=True)
class PeftSpec:
    """Static (non-trainable) settings of the adapter collections a model is applied with.

    The trainable values live in the adapter pytree; what must be known at trace time (scales, flags,
    activation names) lives here, hashed into the jitted function. `models/` reads only these fields.
    """

    lora_scale: tuple[tuple[str, float], ...] = ()  # (module name, alpha / r  or alpha / sqrt(r))
    lora_dropout: float = 0.0
    dora: bool = False
    lora_rslora: bool = False  # the scales above are alpha / sqrt(r) (kept so exports can say use_rslora)
    adapter_activation: str = "relu"
    adapter_scale: float = 1.0
    prompt_tokens: int = 0  # virtual tokens prepended to the input (prompt tuning / P-tuning)
    prefix_tokens: int = 0  # learned key/value prefixes per layer (prefix tuning / P-tuning v2)
    layer_split: int = 0  # > 0: the layer stack runs as two scans, `layers` [0, k) and `top_layers` [k, L),
    # so freeze-tuning can train one group without any weight gradient for the other
    quant: str = "none"  # storage format of the frozen base kernels in the `quant` collection (nf4, int8)

    def scale_for(self, name: str) -> float:
        for module, scale in self.lora_scale:
            if module == name:
                return scale
        return 1.0


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    # --- structure switches (set from the HF config by families.py) ---
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w)
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU / GeGLU (gate_proj * up_proj) vs plain up -> act -> down
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] = ()  # HF rope_parameters as sorted items (hashable)
    tie_word_embeddings: bool = False
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    layer_windows: tuple[int, ...] = ()  # per-layer sliding window (0 = full attention); () = all full
    # --- Phi-3 / Phi-4 (phi3): HF's fused projections stay fused (PEFT targets each as one module) ---
    fused_qkv: bool = False  # self_attn.qkv_proj = [q | k | v] along the output axis, split in the layer
    fused_gate_up: bool = False  # mlp.gate_up_proj = [gate | up] along the output axis
    # --- mixture of experts (models/moe.py; family_moe.py maps Mixtral / Qwen2-MoE / Qwen3-MoE) ---
    num_experts: int = 0  # 0 = dense MLP
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's hidden size
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training
    router_z_loss_coef: float = 0.0  # weight of the router z-loss in training
    # Gemma 3: the sliding-window layers rotate with their own RoPE (base and scaling); 0 = every layer uses the above
    rope_local_theta: float = 0.0
    rope_local_scaling: tuple[tuple[str, object], ...] = ()
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention / MLP outputs too (4 per block)
    query_pre_attn_scalar: float = 0.0  # Gemma 2/3: attention scale query_pre_attn_scalar**-0.5; 0 = head_dim**-0.5
    attn_softcap: float = 0.0  # Gemma 2: attention logits -> cap * tanh(logits / cap) before the mask; 0 = off
    final_softcap: float = 0.0  # Gemma 2/3: the same on the LM head's output logits; 0 = off
    # --- runtime switches (not from HF) ---
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"] = "auto"  # models/attention.py
    attention_blocks: tuple[int, ...] = ()  # splash (q, kv, q_bwd, kv_bwd) block sizes; () = splash's defaults
    remat: Literal["none", "full", "dots", "offload"] = "none"
    scan_layers: bool = True
    neftune_alpha: float = 0.0  # NEFTune (Jain et al. 2023): uniform noise on input embeddings while training
    peft: PeftSpec = field(default_factory=PeftSpec)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise RunError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise RunError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise RunError(f"experts_per_token={self.experts_per_token} must be in 1..num_experts={self.num_experts}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise RunError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def attn_scale(self) -> float:
        """The softmax scale of the attention logits (jax.nn.dot_product_attention's default unless Gemma 2/3)."""
        if self.query_pre_attn_scalar:
            return float(self.query_pre_attn_scalar) ** -0.5
        return 1.0 / math.sqrt(self.head_dim)

    def replace(self, **changes) -> ArchConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from the sizes alone (used by MFU and `jaxtune estimate`)."""
        d, f, h, k, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd * 2 + d * k * hd * 2
        if self.qkv_bias:
            attn += h * hd + 2 * k * hd
        if self.o_bias:
            attn += d
        mlp = d * f * (3 if self.gated_mlp else 2) + (
            f * (2 if self.gated_mlp else 1) + d if self.mlp_bias else 0
        )
        if self.num_experts:  # router + every expert (total, not active: see active_params)
            mlp = self._moe_mlp(self.num_experts)
        norms = (4 if self.sandwich_norms else 2) * d * (2 if self.norm == "layer" else 1)
        norms += 2 * hd if self.qk_norm else 0
        n = self.num_layers * (attn + mlp + norms) + d * (2 if self.norm == "layer" else 1)
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
            if self.positions == "learned":
                n += self.max_position_embeddings * d
        return n

    def _moe_mlp(self, experts: int) -> int:
        d = self.hidden_size
        shared = 3 * d * self.shared_expert_size + d if self.shared_expert_size else 0
        return d * self.num_experts + experts * 3 * d * self.moe_intermediate_size + shared

    def active_params(self, include_embeddings: bool = True) -> int:
        """Parameters one token meets: for a mixture of experts only its `experts_per_token` experts count
        (the FLOPs per token and MFU use this); equal to `num_params` for a dense model."""
        n = self.num_params(include_embeddings)
        if self.num_experts:
            n -= self.num_layers * (self._moe_mlp(self.num_experts) - self._moe_mlp(self.experts_per_token))
        return n
