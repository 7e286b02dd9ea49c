"""GRPO on 8 fake CPU devices against the same run on one device: the RL loop trains on the configured mesh.

A tiny random-init llama, 4 prompts x 4 completions per rollout iteration, 2 iterations, each of 2 passes over
2 shuffled mini-batches of 8 completions (4 sharded updates per iteration, so the ratio leaves 1 and the KL to
the reference grows). The rollouts run on the sharded weights through plain `jax.jit` and must sample exactly the
single-device completions: the sampling noise depends on the key only, and a float difference of ~1e-7 in the
logits flips a sampled token only when two perturbed logits tie that closely (the run is seeded, so this either
always holds here or never). Identical rollouts are asserted through the rewards and completion lengths (equal,
not close), and the update's numbers (loss, KL, policy loss, gradient norm) must agree to reduction-order noise.

The reward is the fraction of completion characters with an odd code point: random-init completions spread over
it, so every group has a non-zero advantage (a group of equal rewards would make the policy term vanish).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.config import load_config
from jaxtune.parallel import make_mesh
from jaxtune.train import rl_loop
from jaxtune.train import run as run_lib

COMPARED = ("loss", "policy_loss", "kl", "grad_norm", "clip_fraction")
EXACT = ("reward", "reward_std", "completion_length", "stopped", "tokens")
RTOL = 1e-4


def odd_chars(prompts, completions, answers) -> list[float]:
    """Fraction of the completion's characters whose code point is odd (0 for an empty completion)."""
    return [sum(ord(c) % 2 for c in text) / max(len(text), 1) for text in completions]


def config(tmp_path, out: str, method: dict, parallel: dict, steps: int = 2) -> dict:
    prompts = tmp_path / "prompts.json"
    if not prompts.exists():
        rng = np.random.RandomState(0)
        words = ["".join(rng.choice(list("abcdefgh"), 2)) for _ in range(32)]
        prompts.write_text(json.dumps([{"instruction": w, "output": w.upper()} for w in words]))
    return {
        "stage": "grpo",
        "output_dir": str(tmp_path / out),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"train": [str(prompts)], "cutoff_len": 16, "bucket_multiple": 8},
        "method": method,
        "training": {"learning_rate": 1e-2, "adam_eps": 1e-6, "lr_scheduler": "constant", "batch_size": 4,
                     "max_steps": steps, "save_every": 0, "eval_generate": 0, "export_hf": False},
        "generation": {"max_new_tokens": 4, "temperature": 1.0},
        "grpo": {"num_generations": 4, "num_iterations": 2, "mini_batch_size": 8, "beta": 0.1,
                 "reward_fns": ["test_rl_mesh:odd_chars"]},
        "parallel": parallel,
        "logging": {"log_every": 1, "progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip


def train(tmp_path, monkeypatch, out: str, method: dict, shape: tuple[int, int, int] | None, steps: int = 2):
    """One run; returns (its logged train metrics by iteration, the last step's state, frozen and batch)."""
    seen = {}
    make_train_step = run_lib.make_train_step

    def spy(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def wrapped(state, frozen, batch):
            state, out = step(state, frozen, batch)
            seen.update(state=state, frozen=frozen, batch=batch)
            return state, out

        return wrapped

    with monkeypatch.context() as mp:
        mp.setattr(run_lib, "make_train_step", spy)
        # the oracle: a one-device mesh (parallel.* would span all 8 devices of this process)
        if shape is None:
            mp.setattr(run_lib, "mesh_from_config", lambda _: make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        parallel = dict(zip(("data", "fsdp", "tensor"), shape or (-1, 1, 1)))
        rl_loop.run(load_config(config(tmp_path, out, method, parallel, steps)))
    rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if r["split"] == "train"}
    assert sorted(logged) == list(range(1, steps + 1))
    return logged, seen


def assert_same_run(sharded: dict, single: dict, label: str):
    for it in (1, 2):
        a, b = sharded[it], single[it]
        for key in EXACT:  # the same completions were sampled
            assert a[key] == b[key], (label, it, key, a[key], b[key])
        for key in COMPARED:
            np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=1e-7, err_msg=f"{label} it {it} {key}")
    # the comparison has something to compare: spread rewards, a policy term, a KL that grew, distinct rollouts
    assert min(single[1]["reward_std"], single[2]["reward_std"]) > 0.05, single
    assert abs(single[1]["policy_loss"]) > 1e-3 and abs(single[2]["policy_loss"]) > 1e-3, single
    assert single[2]["kl"] > 1e-3, single
    assert single[1]["reward"] != single[2]["reward"] or single[1]["loss"] != single[2]["loss"], single


def assert_sharded(leaf, spec, mesh):
    want = NamedSharding(mesh, spec)
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, spec)


def test_grpo_on_a_mesh_matches_one_device(eight_devices, tmp_path, monkeypatch):
    """LoRA on (data 1, fsdp 4, tensor 2) and full fine-tuning on (2, 2, 2): 2 GRPO iterations each log what
    the one-device run logs, and the train state, frozen base and mini-batches are laid out on the mesh."""
    lora = {"name": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"}
    single, _ = train(tmp_path, monkeypatch, "lora_1", lora, None)
    sharded, seen = train(tmp_path, monkeypatch, "lora_142", lora, (1, 4, 2))
    assert_same_run(sharded, single, "lora (1, 4, 2)")
    mesh = seen["state"].step.sharding.mesh
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    q = seen["state"].trainable["lora"]["layers"]["self_attn"]["q_proj"]
    assert_sharded(q["lora_a"], P(None, "fsdp", None), mesh)  # (layers, embed, rank)
    assert_sharded(q["lora_b"], P(None, None, "tensor"), mesh)  # (layers, rank, heads)
    assert {s.data.shape for s in q["lora_a"].addressable_shards} == {(2, 32 // 4, 4)}
    kernel = seen["frozen"]["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert_sharded(kernel, P(None, "fsdp", "tensor"), mesh)
    assert_sharded(seen["batch"].tokens.input_ids, P("fsdp"), mesh)  # 8 rows, 2 per fsdp shard

    # stopped after iteration 1 (checkpoint), resumed on the mesh into the sharded state: the straight run's log
    train(tmp_path, monkeypatch, "lora_142_resumed", lora, (1, 4, 2), steps=1)
    resumed, seen = train(tmp_path, monkeypatch, "lora_142_resumed", lora, (1, 4, 2))
    for key in COMPARED + EXACT:
        np.testing.assert_allclose(resumed[2][key], sharded[2][key], rtol=RTOL, atol=1e-7, err_msg=key)
    q = seen["state"].trainable["lora"]["layers"]["self_attn"]["q_proj"]
    assert_sharded(q["lora_a"], P(None, "fsdp", None), mesh)

    single, _ = train(tmp_path, monkeypatch, "full_1", {"name": "full"}, None)
    sharded, seen = train(tmp_path, monkeypatch, "full_222", {"name": "full"}, (2, 2, 2))
    assert_same_run(sharded, single, "full (2, 2, 2)")
    mesh = seen["state"].step.sharding.mesh
    params = seen["state"].trainable["params"]
    reference = seen["frozen"]["reference"]  # the frozen copy of the initial weights shards like them
    for tree in (params, reference):
        assert_sharded(tree["layers"]["mlp"]["down_proj"]["kernel"], P(None, "tensor", "fsdp"), mesh)
    assert_sharded(seen["batch"].advantages, P(("data", "fsdp")), mesh)


def test_rl_refuses_several_processes(tmp_path, monkeypatch):
    """Multi-process RL is not supported yet: a clear error before any work, not a failure deep inside jax."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    cfg = config(tmp_path, "multi", {"name": "lora", "rank": 4}, {})
    with pytest.raises(ValueError, match="stage grpo .*multi-process.*one process on one host"):
        rl_loop.run(load_config(cfg))
    assert not (tmp_path / "multi").exists()
