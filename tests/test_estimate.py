"""`jaxtune estimate`: exact parameter / optimiser counts without allocating, sharding arithmetic, XLA figure."""

import jax
import numpy as np
import pytest

import jaxtune
from jaxtune import peft
from jaxtune.cli import main as cli_main
from jaxtune.config import load_config
from jaxtune.estimate import activation_bytes, estimate

SHAPE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)


def config(overrides=(), **method):
    return load_config({"model": {"random_init": SHAPE}, "method": method or {"name": "lora", "rank": 8},
                        "training": {"batch_size": 4, "optimizer": "adamw"}, "data": {"cutoff_len": 32},
                        "parallel": {"data": 1}}, overrides)


def test_counts_equal_the_real_plan():
    cfg = config(name="lora", rank=8, target_modules="all-linear")
    out = estimate(cfg)
    model = jaxtune.from_hf_config(SHAPE, rng=0)
    plan = peft.prepare(model, cfg.method, jax.random.PRNGKey(0))
    n_trainable = sum(x.size for x in jax.tree.leaves(plan.trainable))
    assert out["trainable_params"] == n_trainable
    assert out["base_params"] == sum(x.size for x in jax.tree.leaves(model.params))
    # AdamW keeps two fp32 moments per trainable parameter (plus scalar counts)
    assert 8 * n_trainable <= out["optimizer_bytes"] <= 8 * n_trainable + 64
    assert out["grad_bytes"] == 4 * n_trainable
    assert out["xla_total_bytes"] > out["xla_temp_bytes"] > 0


def test_fsdp_divides_the_state_and_nf4_shrinks_the_base():
    one = estimate(config(name="full"), compile=False)
    four = estimate(config(["parallel.fsdp=4"], name="full"), compile=False)
    state = one["frozen_bytes"] + one["trainable_bytes"] + one["grad_bytes"] + one["optimizer_bytes"]
    assert four["per_device_bytes"] - four["activation_bytes_per_device"] == state // 4
    q = estimate(config(["model.quantization=nf4"], name="qlora", rank=8), compile=False)
    plain = estimate(config(name="lora", rank=8), compile=False)
    assert q["frozen_bytes"] < plain["frozen_bytes"]


def test_activation_formula_matches_korthikanti_counts():
    """16-bit, no recompute: per layer 34·s·b·h + 5·a·s²·b bytes; with flash attention the s² term goes."""
    arch = jaxtune.from_hf_config(SHAPE).arch
    s, b, h, a, layers = 32, 2, 64, 4, 2
    assert activation_bytes(arch, b, s, "none", flash=False) == layers * (34 * s * b * h + 5 * a * s * s * b)
    assert activation_bytes(arch, b, s, "none", flash=True) == layers * 34 * s * b * h
    assert activation_bytes(arch, b, s, "full", flash=True) < activation_bytes(arch, b, s, "dots", flash=True)
    assert activation_bytes(arch, b, s, "dots", flash=True) < activation_bytes(arch, b, s, "none", flash=True)


def test_cli_prints_the_table(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {random_init: {model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, vocab_size: 128}}\n"
                    "method: {name: full}\ntraining: {batch_size: 2}\ndata: {cutoff_len: 16}\n")
    assert cli_main(["estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "method full" in out and "optimizer (adamw)" in out and "XLA compiled step" in out
    assert np.isfinite(float(out.split("total / device")[1].split("GB")[0]))
    assert cli_main(["estimate", str(path), "method.name=lora", "method.combine=[prefix]", "method.target_modules=[c_attn]"]) == 0
    assert "method lora+prefix: " in capsys.readouterr().out  # a combination is named whole


def test_a_gpu_config_estimates_on_cpu_and_counts_flash_attention():
    """cuDNN attention only exists on NVIDIA GPUs; estimating a GPU config elsewhere traces with XLA's kernel
    (same shapes) and still counts the configured kernel's activations (no s² score matrix)."""
    flash = estimate(config(["model.attention_impl=cudnn", "model.remat=none"]), compile=False)
    plain = estimate(config(["model.attention_impl=xla", "model.remat=none"]), compile=False)
    assert flash["trainable_params"] == plain["trainable_params"]
    assert flash["activation_bytes_per_device"] < plain["activation_bytes_per_device"]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU cudnn is a valid choice")
def test_training_with_cudnn_attention_off_gpu_is_a_one_line_error(tmp_path, capsys):
    args = ["train", "configs/demo.yaml", "model.attention_impl=cudnn", f"output_dir={tmp_path}"]
    assert cli_main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "jaxtune: error: model.attention_impl=cudnn needs an NVIDIA GPU with cuDNN, but JAX's backend here is "
        "'cpu': set model.attention_impl=xla on this machine (command-line override 'model.attention_impl=cudnn')."
    )
