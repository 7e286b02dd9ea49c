"""Adapters in the PEFT library's format, both ways, against `peft` 0.21 on the matching `transformers` model.

Per family (Llama: untied head; Qwen2: q/k/v biases, tied head, sliding window; GPT-2: Conv1D [in, out] weights
and the fused `c_attn`; Phi-3: HF's fused `qkv_proj` / `gate_up_proj`, all-linear; Gemma 2 / Gemma 3: sandwich norms,
soft-caps, q/k norms and two RoPEs, LoRA only) and variant (LoRA, rsLoRA with a per-module rank, DoRA, PiSSA, (IA)^3, prompt tuning,
prefix tuning):
- jaxtune -> PEFT: non-zero trained-looking adapters (LoRA B and DoRA magnitudes randomised) written by
  `save_adapter` load with `PeftModel.from_pretrained` and give jaxtune's logits (<= 1e-4, fp32);
- PEFT -> jaxtune: a PEFT model with every adapter parameter randomised, saved with `save_pretrained`, loads
  with `load_adapter` and gives PEFT's logits;
- merged: `merge_and_export` writes a plain HF model that `transformers` loads with the same logits, and
  merge then un-merge restores the base kernels.
"""

import copy

import jax
import numpy as np
import pytest
import torch
from peft_helpers import logits
from tiny_models import hf_logits

import jaxtune
from jaxtune import peft as jpeft
from jaxtune.peft import lora

VARIANTS = {
    "lora": ({"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
             dict(r=4, lora_alpha=8)),
    "rslora": ({"method": "lora", "rank": 4, "alpha": 8, "rslora": True, "target_modules": "all-linear",
                "rank_pattern": {"down_proj": 2}}, dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2})),
    "dora": ({"method": "dora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "up_proj"]},
             dict(r=4, lora_alpha=8, use_dora=True)),
    "pissa": ({"method": "lora", "rank": 4, "alpha": 4, "pissa": True, "target_modules": ["q_proj", "v_proj"]}, None),
    "ia3": ({"method": "ia3"}, {}),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 3}, {"num_virtual_tokens": 3}),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 3}, {"num_virtual_tokens": 3}),
}  # fmt: skip
GPT2_TARGETS = {"lora": ["c_attn", "attn.c_proj", "mlp.c_proj"], "dora": ["c_attn", "c_fc"]}
# phi3 keeps HF's fused qkv_proj / gate_up_proj: all-linear = qkv_proj, o_proj, gate_up_proj, down_proj
PHI3_TARGETS = {"lora": "all-linear"}
CASES = [(f, v) for f in ("llama", "qwen2") for v in ("lora", "rslora", "dora")]
CASES += [("gpt2", "lora"), ("gpt2", "dora"), ("llama", "pissa"), ("llama", "ia3"), ("llama", "prompt"),
          ("llama", "prefix"), ("phi3", "lora"), ("gemma2", "lora"), ("gemma3", "lora")]  # fmt: skip
IDS = np.random.RandomState(0).randint(1, 128, (2, 9))
ATOL = 1e-4


def _randomise(tree, seed):
    """Trained-looking adapters: LoRA B, DoRA magnitudes, (IA)^3 scales, prompts and prefixes moved off init."""
    rng = np.random.RandomState(seed)

    def move(path, x):
        name = path[-1].key
        noise = rng.normal(0, 1, x.shape).astype(np.float32)
        if name == "lora_b":
            return x + 0.1 * noise
        if name in ("magnitude", "scale_in", "scale_out"):
            return x * (1 + 0.2 * noise)
        return x + 0.1 * noise if name in ("embeddings", "key", "value") else x

    return jax.tree_util.tree_map_with_path(move, tree)


def _jaxtune_cfg(family, variant):
    cfg = dict(VARIANTS[variant][0])
    if family == "gpt2" and variant in GPT2_TARGETS:
        cfg["target_modules"] = GPT2_TARGETS[variant]
    if family == "phi3" and variant in PHI3_TARGETS:
        cfg["target_modules"] = PHI3_TARGETS[variant]
    return cfg


def _peft_config(family, variant):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    kw = dict(VARIANTS[variant][1], task_type="CAUSAL_LM")
    if variant == "ia3":
        return IA3Config(**kw)
    if variant == "prompt":
        return PromptTuningConfig(**kw)
    if variant == "prefix":
        return PrefixTuningConfig(**kw)
    targets = _jaxtune_cfg(family, variant)["target_modules"]
    return LoraConfig(target_modules=targets, fan_in_fan_out=family == "gpt2", **kw)


def _peft_logits(model, n_virtual=0):
    out = hf_logits(model, IDS)
    return out[:, n_virtual:]  # prompt tuning returns logits for the virtual tokens too


@pytest.mark.parametrize("family, variant", CASES)
def test_jaxtune_adapter_loads_in_peft_and_merges(family, variant, hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf, directory = hf_dir(family)
    model = jaxtune.load_model(directory)
    plan = jpeft.prepare(model, _jaxtune_cfg(family, variant), 0)
    trainable = _randomise(plan.trainable, seed=1)
    adapters = plan.adapters(trainable)
    ours = logits(model, IDS, adapters)
    assert np.abs(ours - logits(model, IDS)).max() > 1e-2  # the adapter really changes the model
    if variant == "pissa":
        # the plan's own view (residual base + rank-r factors) agrees with the rank-2r export relative to W
        residual = type(model)(model.arch, plan.frozen["params"])
        own = logits(residual, IDS, jaxtune.models.Adapters(plan.fold(trainable), adapters.spec))
        np.testing.assert_allclose(own, ours, atol=ATOL, rtol=0)
    jpeft.save_adapter(model, adapters, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    n_virtual = plan.spec.prompt_tokens
    np.testing.assert_allclose(ours, _peft_logits(theirs, n_virtual), atol=ATOL, rtol=0)
    if variant in ("prompt", "prefix"):
        return  # virtual tokens cannot be merged into weights
    jpeft.merge_and_export(model, adapters, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(ours, hf_logits(merged, IDS), atol=ATOL, rtol=0)
    if "lora" in adapters.variables:  # merge then un-merge gives the base kernels back (fp32 rounding only)
        params, norms = lora.merge(model.params, adapters.variables["lora"], adapters.spec, model.arch, True)
        back = lora.unmerge(params, adapters.variables["lora"], adapters.spec, model.arch, norms)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), back, model.params)


@pytest.mark.parametrize("family, variant", [c for c in CASES if VARIANTS[c[1]][1] is not None])
def test_peft_adapter_loads_in_jaxtune(family, variant, hf_dir, tmp_path):
    from peft import get_peft_model

    hf, directory = hf_dir(family)
    torch.manual_seed(2)
    theirs = get_peft_model(copy.deepcopy(hf), _peft_config(family, variant)).eval()
    with torch.no_grad():  # non-zero adapters: every trainable PEFT parameter moved off its init
        for name, p in theirs.named_parameters():
            if p.requires_grad and ("ia3" in name or "magnitude" in name):
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    model = jaxtune.load_model(directory)
    adapters = jpeft.load_adapter(model, tmp_path / "peft")
    ours = logits(model, IDS, adapters)
    assert np.abs(ours - logits(model, IDS)).max() > 1e-2
    np.testing.assert_allclose(ours, _peft_logits(theirs, adapters.spec.prompt_tokens), atol=ATOL, rtol=0)
