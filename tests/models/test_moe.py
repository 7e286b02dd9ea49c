"""Mixture of experts (models/moe.py): the sparse block against a dense reference, the router losses against
transformers, and the tiny MoE training under SFT, DPO and GRPO with the router losses in the objective."""

import json
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import build_hf, padded_batch

import jaxtune
from jaxtune.models import moe
from jaxtune.models.arch import ArchConfig
from jaxtune.models.decoder import Decoder
from jaxtune.models.model import prepare_inputs


def _arch(**kw) -> ArchConfig:
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=8, num_experts=4, experts_per_token=2,
                moe_intermediate_size=8, norm_topk_prob=False, shared_expert_size=12)  # fmt: skip
    return ArchConfig(**{**base, **kw})


def dense_reference(arch: ArchConfig, p, x):
    """Every expert on every token, weighted by the routing (0 for unselected experts), in plain jnp."""
    f = arch.moe_intermediate_size
    logits = x @ p["gate"]["kernel"]  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    k = arch.experts_per_token
    kth = jnp.sort(probs, axis=-1)[:, -k][:, None]
    w = jnp.where(probs >= kth, probs, 0.0)  # [N, E]
    if arch.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    gu, down = p["experts"]["gate_up_proj"], p["experts"]["down_proj"]
    h = jnp.einsum("nd,edf->enf", x, gu)  # [E, N, 2F]
    out = jnp.einsum("enf,efd->end", jax.nn.silu(h[..., :f]) * h[..., f:], down)  # [E, N, D]
    y = jnp.einsum("ne,end->nd", w, out)
    if arch.shared_expert_size:
        s = p["shared_expert"]
        shared = (jax.nn.silu(x @ s["gate_proj"]["kernel"]) * (x @ s["up_proj"]["kernel"])) @ s["down_proj"]["kernel"]
        y = y + jax.nn.sigmoid(x @ p["shared_expert_gate"]["kernel"]) * shared
    return y


def test_sparse_block_equals_the_dense_reference_with_gradients():
    for arch in (_arch(), _arch(model_type="mixtral", norm_topk_prob=True, shared_expert_size=0)):
        x = jax.random.normal(jax.random.key(1), (2, 5, arch.hidden_size))
        block = moe.MoE(arch)
        params = nn.meta.unbox(block.init(jax.random.key(0), x))["params"]
        params = jax.tree.map(lambda a: a * 10.0, params)  # spread the router so top-k is decisive
        c = jax.random.normal(jax.random.key(2), x.shape)

        def ours(p, x, block=block, c=c):
            return (block.apply({"params": p}, x) * c).sum()

        def ref(p, x, arch=arch, c=c):
            return (dense_reference(arch, p, x.reshape(-1, x.shape[-1])).reshape(x.shape) * c).sum()

        np.testing.assert_allclose(
            block.apply({"params": params}, x),
            dense_reference(arch, params, x.reshape(10, -1)).reshape(x.shape),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        g_ours, g_ref = jax.grad(ours, (0, 1))(params, x), jax.grad(ref, (0, 1))(params, x)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_ours, g_ref)


def test_router_losses_match_transformers_on_a_padded_batch(tmp_path):
    """aux_loss = transformers' load_balancing_loss_func (the model's own `aux_loss` with output_router_logits
    and the attention mask); z_loss = mean over layers and real tokens of logsumexp(router logits)^2. Mixtral
    through the scanned stack, Qwen2-MoE unrolled with remat (the statistics of both layouts)."""
    import torch

    for family, runtime in (("mixtral", {}), ("qwen2_moe", {"scan_layers": False, "remat": "full"})):
        hf = build_hf(family)
        hf.save_pretrained(tmp_path / family)
        model = jaxtune.load_model(tmp_path / family, **runtime)
        ids, mask = padded_batch()
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos), output_router_logits=True)  # fmt: skip
        ids_, seg, pos_ = prepare_inputs(ids, mask)
        _, state = Decoder(model.arch).apply({"params": model.params}, ids_, seg, pos_, mutable=[moe.COLLECTION])
        losses = moe.moe_losses(model.arch, state[moe.COLLECTION])
        np.testing.assert_allclose(float(losses["aux_loss"]), float(out.aux_loss), rtol=1e-5, err_msg=family)
        logits = np.stack([r.float().numpy() for r in out.router_logits])  # [L, B*T, E]
        lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))  # [L, B*T]
        real = mask.reshape(-1).astype(bool)
        want = np.mean(np.square(lse[:, real]))
        np.testing.assert_allclose(float(losses["z_loss"]), want, rtol=1e-5, err_msg=family)
        assert float(losses["aux_loss"]) > 0.5  # HF's counts sum to k per token: k (= 2) for balanced routing
        # the fused transformers-5 runtime layout (mlp.experts.gate_up_proj [E, 2F, D], ...) loads the same
        from safetensors.torch import save_file

        fused = tmp_path / f"{family}_fused"
        fused.mkdir()
        shutil.copy(tmp_path / family / "config.json", fused / "config.json")
        state = hf.state_dict()
        assert "model.layers.0.mlp.experts.gate_up_proj" in state
        save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
        chex.assert_trees_all_equal(jaxtune.load_model(fused, **runtime).params, model.params)


def test_estimate_counts_every_expert_and_the_active_ones_and_dense_layers_are_refused():
    from jaxtune.config import load_config
    from jaxtune.estimate import estimate
    from jaxtune.models.families import UnsupportedModelError, arch_from_hf

    shape = {**MOE, "vocab_size": 128}
    cfg = load_config({"model": {"random_init": shape}, "method": {"name": "full"}, "training": {"batch_size": 2},
                       "data": {"cutoff_len": 16}, "parallel": {"data": 1}})  # fmt: skip
    out = estimate(cfg, compile=False)
    model = jaxtune.from_hf_config(shape)
    assert out["base_params"] == sum(x.size for x in jax.tree.leaves(model.params)) == model.arch.num_params()
    layers, experts, k, d, f = 2, 4, 2, 64, 32
    assert out["active_params"] == out["base_params"] - layers * (experts - k) * 3 * d * f
    assert out["experts"] == "2 of 4"
    from transformers import AutoConfig

    for bad in ({"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}):
        hf_cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, **bad).to_dict()
        with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
            arch_from_hf(hf_cfg)


MOE = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
       "max_position_embeddings": 64, "router_aux_loss_coef": 0.02}  # fmt: skip
QUIET = {"log_every": 1, "progress": False, "tensorboard": False, "plot": False}


def _run(tmp_path, name, stage, data, **sections):
    from jaxtune.config import load_config
    from jaxtune.train.loop import run

    cfg = {
        "stage": stage, "output_dir": str(tmp_path / name),
        "model": {"tokenizer": "builtin:chars", "random_init": MOE, "moe_z_loss_coef": 1e-3},
        "data": {"train": [str(data)], "cutoff_len": 16, "bucket_multiple": 8},
        "method": {"name": "full"},
        "training": {"learning_rate": 3e-3, "batch_size": 4, "max_steps": 6, "save_every": 0, "export_hf": False},
        "logging": QUIET,
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    run(load_config(cfg))
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_tiny_moe_trains_with_sft_dpo_and_grpo(tmp_path):
    rng = np.random.RandomState(0)
    words = ["".join(rng.choice(list("abcdefgh"), 2)) for _ in range(64)]
    (tmp_path / "sft.json").write_text(json.dumps([{"instruction": w, "output": w.upper()} for w in words]))
    (tmp_path / "pairs.json").write_text(json.dumps(
        [{"prompt": w, "chosen": w.upper(), "rejected": w[::-1]} for w in words]))  # fmt: skip
    for name, stage, data, extra in (
        ("sft", "sft", "sft.json", {"training": {"max_steps": 8}}),
        ("dpo", "dpo", "pairs.json", {"method": {"name": "lora", "rank": 4}, "training": {"max_steps": 3}}),
        ("grpo", "grpo", "sft.json", {"grpo": {"num_generations": 2, "reward_fns": ["exact_match"]},
                                      "generation": {"max_new_tokens": 3, "temperature": 0.7},
                                      "training": {"max_steps": 1, "eval_generate": 0}}),
    ):  # fmt: skip
        rows = [m for m in _run(tmp_path, name, stage, tmp_path / data, **extra) if m.get("split") == "train"]
        assert rows, name
        for m in rows:
            assert np.isfinite(m["loss"]) and m["moe/aux_loss"] > 0.5 and m["moe/z_loss"] > 0, (name, m)
        if stage == "sft":
            assert rows[-1]["loss"] < rows[0]["loss"], [m["loss"] for m in rows]
