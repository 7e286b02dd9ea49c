"""Tiny random Hugging Face models built locally (no hub): config -> torch model -> perturb -> save_pretrained.

Every tensor is perturbed away from its init so norm weights are not 1 and biases not 0: a mapping bug that
swaps, drops or mis-transposes a tensor then shows up in the logits instead of hiding behind an identity.
"""

from __future__ import annotations

import numpy as np

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
PHI = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Phi3Config's defaults (32000) exceed VOCAB

# family name -> HF config kwargs (each a real architecture switch of that family)
FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **COMMON),
    # Llama 3.2 style: llama3 rope scaling, tied head, GQA, attention/mlp biases off
    "llama3": dict(
        model_type="llama",
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        rope_theta=500000.0,
        **COMMON,
    ),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=4, **COMMON),
    "qwen2": dict(
        model_type="qwen2",
        num_key_value_heads=2,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        **COMMON,
    ),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, **COMMON),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=16, **COMMON),
    # Phi-3 / Phi-4: fused qkv_proj / gate_up_proj, GQA, partial rotary (Phi-4-mini: 0.75), sliding window
    "phi3": dict(model_type="phi3", num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=5, **PHI, **COMMON),
    # Phi-3.5-mini / Phi-4-mini 128k: longrope (short/long factors per rotary dim pair); original length 8, so
    # the 12-token padded batches take the long factors and the packed test's 7- and 5-token documents the short
    "phi3_longrope": dict(
        model_type="phi3",
        num_key_value_heads=1,
        tie_word_embeddings=True,
        partial_rotary_factor=0.75,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
        },
        **PHI,
        **COMMON,
    ),
    # Gemma 2: sandwich norms, layer 0 sliding (window 4 < the tests' 12 tokens) and layer 1 global (transformers'
    # default pattern), attention scale 24**-0.5 (not head_dim's), attention and final-logit soft-caps small
    # enough to bend the perturbed weights' logits
    "gemma2": dict(
        model_type="gemma2",
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
        **COMMON,
    ),
    # Gemma 3 (text): q/k norms, two sliding layers then a global one, the sliding layers' own RoPE base, linear
    # RoPE scaling on the global layer only, final-logit soft-cap (given as the older rope keys; the saved
    # config.json has transformers 5's per-layer-type rope_parameters)
    "gemma3": dict(
        model_type="gemma3_text",
        num_key_value_heads=2,
        head_dim=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=4,
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        query_pre_attn_scalar=24,
        final_logit_softcapping=5.0,
        **dict(COMMON, num_hidden_layers=3),
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    # mixtures of experts: 4 experts, top-2, experts of 32 (Mixtral: intermediate_size is the expert size)
    "mixtral": dict(
        model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        **{**COMMON, "intermediate_size": 32},
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False, **COMMON,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, **COMMON,
    ),
}  # fmt: skip


def perturb(model):
    """Every parameter moved by N(0, 0.1^2) noise (module docstring), in place, drawing from the torch RNG the
    caller seeded before building the model (so init and noise both follow that seed)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def acting_adapters(model, method, rng: int = 1):
    """`jaxtune.peft.init(model, method)` with LoRA's B moved off zero: a fresh LoRA is an identity adapter, so a
    code path that skipped it would still match; this one changes the logits."""
    import jax

    import jaxtune

    adapters = jaxtune.peft.init(model, method, rng=rng)
    noise = lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape) if p[-1].key == "lora_b" else x
    return adapters.replace(variables=jax.tree_util.tree_map_with_path(noise, adapters.variables))


def build_hf(family: str, seed: int = 0, **overrides):
    """A perturbed random transformers model (eval mode, fp32) for one family."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**FAMILIES[family], **overrides}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return perturb(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval())


def build_hf_gemma3_multimodal(seed: int = 0, **text_overrides):
    """A perturbed random Gemma3ForConditionalGeneration (eval, fp32): FAMILIES["gemma3"] as its text_config, a
    one-layer SigLIP vision tower and the projector (tensors a language-model load must leave alone)."""
    import torch
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    text = {**FAMILIES["gemma3"], **text_overrides}
    text_config = AutoConfig.for_model(text.pop("model_type"), **text).to_dict()
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    config = AutoConfig.for_model("gemma3", text_config=text_config, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(seed)
    return perturb(Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager").eval())


def save_hf(family: str, directory, seed: int = 0, **overrides):
    model = build_hf(family, seed, **overrides)
    model.save_pretrained(directory)
    return model


def hf_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """transformers logits with explicit positions (HF does not derive them from a left-padded mask)."""
    import torch

    ids = torch.tensor(np.asarray(input_ids))
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    if position_ids is None and attention_mask is not None:
        position_ids = np.clip(np.asarray(attention_mask).cumsum(-1) - 1, 0, None)
    pos = None if position_ids is None else torch.tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().numpy()


def padded_batch(seed: int = 0, length: int = 12):
    """Two rows: one left-padded by 3, one right-padded by 4 (the cases generation and training produce)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, VOCAB, size=(2, length))
    mask = np.ones((2, length), dtype=np.int64)
    mask[0, :3] = 0
    mask[1, length - 4 :] = 0
    return ids, mask
