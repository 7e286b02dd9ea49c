"""Phi-3 / Phi-4 (`phi3`) keep HF's fused `qkv_proj` / `gate_up_proj`: what PEFT selection means on them.

(PEFT interop both ways with all-linear is in test_peft_interop.py, the logits in tests/models.)"""

import jax
import pytest
from peft_helpers import SIZES

import jaxtune
from jaxtune import peft as jpeft
from jaxtune.peft import names
from jaxtune.peft.names import PeftConfigError


@pytest.fixture(scope="module")
def phi3():
    return jaxtune.from_hf_config(dict(model_type="phi3", pad_token_id=0, **SIZES), rng=0)


def test_phi3_selection_names_the_fused_modules(phi3):
    arch = phi3.arch
    d, f, q, kv = 32, 48, 32, 16
    shapes = {m.name: (m.in_features, m.out_features) for m in names.select(arch, "all-linear")}
    assert shapes == {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d), "gate_up_proj": (d, 2 * f), "down_proj": (f, d)}
    assert [m.name for m in names.select(arch, ".*_proj")] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # a part of a fused module is an error pointing to it, never a silently smaller selection
    for target, fused in ((["q_proj", "o_proj"], "qkv_proj"), ("q_proj|v_proj", "qkv_proj"),
                          (["mlp.up_proj"], "gate_up_proj")):  # fmt: skip
        with pytest.raises(PeftConfigError, match=fused):
            names.select(arch, target)
    with pytest.raises(PeftConfigError, match="qkv_proj"):  # the config default (q_proj, v_proj)
        jpeft.prepare(phi3, {"method": "lora"}, jax.random.key(0))
    with pytest.raises(PeftConfigError, match="qkv_proj"):  # PEFT has no (IA)^3 default for phi3
        jpeft.prepare(phi3, {"method": "ia3"}, jax.random.key(0))
    with pytest.raises(PeftConfigError, match="qkv_proj"):
        jpeft.prepare(phi3, {"method": "freeze", "freeze_trainable_modules": ["k_proj"]}, jax.random.key(0))
    # LoRA on a fused module is one ordinary LoRA: A [D, r] shared by q, k, v; B [r, (N + 2K) * head_dim]
    plan = jpeft.prepare(phi3, {"method": "lora", "rank": 4, "target_modules": ["qkv_proj"]}, jax.random.key(0))
    leaf = plan.trainable["lora"]["layers"]["self_attn"]["qkv_proj"]
    assert leaf["lora_a"].shape == (2, d, 4) and leaf["lora_b"].shape == (2, 4, q + 2 * kv)
    ia3 = jpeft.prepare(phi3, {"method": "ia3", "target_modules": ["qkv_proj", "down_proj"]}, jax.random.key(0))
    layers = ia3.trainable["ia3"]["layers"]
    assert layers["self_attn"]["qkv_proj"]["scale_out"].shape == (2, q + 2 * kv)
    assert layers["mlp"]["down_proj"]["scale_in"].shape == (2, f)
