"""Sharded training on 8 fake CPU devices against the single-device run, the oracle being the unsharded step.

A mesh changes where numbers live, never what they are: on every mesh shape the loss and the updated weights
after 3 AdamW steps equal the plain single-device `jax.jit` step to fp32 reduction-order noise (tolerance 1e-5).
Adam's eps is 1e-6 rather than 1e-8: its update g / (sqrt(v) + eps) is ill-conditioned for a gradient entry near
zero (d update / d g ~ lr / eps), which turns a reduction-order difference of 1e-10 in such an entry (a LoRA
factor right after B = 0) into 2e-5 at eps 1e-8; at 1e-6 the largest difference over all meshes is 5e-7.

Also here: every parameter / optimiser leaf carries the sharding the rules table gives it (written out by hand
below), the compiled FSDP step holds ~1/8 of the unsharded step's arrays per device, and a checkpoint written on
one mesh restores onto others and training continues as if never stopped.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxtune
from jaxtune import peft
from jaxtune.config import load_config
from jaxtune.data.batch import TokenBatch
from jaxtune.methods import sft
from jaxtune.methods.forward import LM
from jaxtune.parallel import make_mesh, place
from jaxtune.train import optim
from jaxtune.train import state as state_lib
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.sharding import RunShardings, bytes_per_device, global_batch, run_shardings
from jaxtune.train.step import make_train_step

# vocab 64, width 32, MLP 48, 4 query heads and 2 KV heads of 8: every dim splits over fsdp=8 and tensor=2.
TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"},
}
SHAPES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
TOL = 1e-5
BATCH, LENGTH = 8, 12


def token_batch(seed: int) -> TokenBatch:
    """8 rows with uneven numbers of trained tokens (row 0 none at all), right padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, TINY["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    lengths = rng.randint(3, LENGTH + 1, BATCH)
    t = np.arange(LENGTH)[None]
    seg = (t < lengths[:, None]).astype(np.int32)
    targets = np.where(t < lengths[:, None] - 1, np.roll(ids, -1, 1), 0).astype(np.int32)
    prompt = rng.randint(0, 3, BATCH)
    mask = ((t >= prompt[:, None]) & (t < lengths[:, None] - 1)).astype(np.float32)
    mask[0] = 0
    return TokenBatch(ids * seg, targets, mask, seg, np.where(seg > 0, t, 0).astype(np.int32))


@functools.cache
def base_model():
    """The oracle's weights: created by the same jitted init as every mesh's, on one device."""
    return jaxtune.from_hf_config(TINY, rng=0, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def run_config():
    return load_config({"training": dict(batch_size=BATCH, learning_rate=1e-3, adam_eps=1e-6)})


@dataclass
class Trainer:
    """One method on one mesh (None: a single device, no shardings), its step compiled once per test module."""

    step: Any
    shardings: RunShardings | None
    trainable: dict
    frozen: dict
    optimizer: Any

    def fresh(self):
        # the step donates its state: copies, never the model's own arrays
        trainable = jax.tree.map(jnp.copy, self.trainable)
        shardings = None if self.shardings is None else self.shardings.state
        return state_lib.create(trainable, self.optimizer, 0, shardings=shardings)

    def batch(self, i: int):
        batch = token_batch(i)
        return batch if self.shardings is None else global_batch(batch, self.shardings.mesh)

    def train(self, state, steps):
        losses = []
        for i in steps:
            state, metrics = self.step(state, self.frozen, self.batch(i))
            losses.append(float(metrics["loss"]))
        return state, losses


@functools.cache
def trainer(method: str, shape: tuple[int, int, int] | None, accum: int = 1) -> Trainer:
    cfg = run_config()
    plan = peft.prepare(base_model(), METHODS[method], jax.random.key(1))
    optimizer, lr = optim.build(cfg.training, plan.trainable, total_steps=10)
    shardings = None
    frozen = plan.frozen
    if shape is not None:
        shardings = run_shardings(make_mesh(*shape), plan.arch, plan.trainable, plan.frozen, optimizer)
        frozen = place(plan.frozen, shardings.frozen)
    step = make_train_step(sft.SFT, LM(plan.arch), cfg, optimizer, lr, accum=accum, shardings=shardings)
    return Trainer(step, shardings, plan.trainable, frozen, optimizer)


@functools.cache
def single_device_run(method: str):
    state, losses = trainer(method, None).train(trainer(method, None).fresh(), range(3))
    return losses, jax.device_get(state.trainable)


# --- the same numbers on every mesh ------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_every_mesh_computes_the_single_device_step(eight_devices, method):
    """Loss and updated weights after 3 steps, 4 mesh shapes (and accumulation across replicas), vs 1 device.

    The batch's trained tokens are spread unevenly over the data shards, so normalising per replica (a mean of
    per-device means) would give a different loss: only the global token count reproduces the oracle."""
    ref_losses, ref_params = single_device_run(method)
    counts = token_batch(0).loss_mask.reshape(4, -1).sum(1)  # the 4 batch shards of (2, 2, 2) / (1, 4, 2)
    assert len(set(counts.tolist())) > 1
    initial = jax.device_get(trainer(method, None).trainable)
    moved = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(initial))
    )
    assert moved > 100 * TOL  # three steps move the weights far beyond the tolerance
    runs = [(shape, 1) for shape in SHAPES] + ([((2, 2, 2), 2)] if method == "full" else [])
    for shape, accum in runs:
        tr = trainer(method, shape, accum)
        state, losses = tr.train(tr.fresh(), range(3))
        np.testing.assert_allclose(losses, ref_losses, rtol=TOL, err_msg=f"mesh {shape} accum {accum}")
        chex.assert_trees_all_close(jax.device_get(state.trainable), ref_params, atol=TOL, rtol=0)
        assert int(state.step) == 3


# --- every leaf where the rules say ------------------------------------------------------------------------

# Mesh (data=1, fsdp=4, tensor=2), the table read by hand: `embed -> fsdp`; `heads`, `kv_heads`, `mlp`,
# `vocab -> tensor`; `layers`, `lora_rank -> None`. The norms' scales are declared over `embed`.
EMBED_MLP, MLP_EMBED = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
BASE_SPECS = {
    "embed_tokens/embedding": P("tensor", "fsdp"),  # (vocab, embed)
    "layers/input_layernorm/scale": P(None, "fsdp"),  # (layers, embed)
    "layers/post_attention_layernorm/scale": P(None, "fsdp"),
    "layers/self_attn/q_proj/kernel": EMBED_MLP,  # (layers, embed, heads)
    "layers/self_attn/k_proj/kernel": EMBED_MLP,  # (layers, embed, kv_heads)
    "layers/self_attn/v_proj/kernel": EMBED_MLP,
    "layers/self_attn/o_proj/kernel": MLP_EMBED,  # (layers, heads, embed)
    "layers/mlp/gate_proj/kernel": EMBED_MLP,  # (layers, embed, mlp)
    "layers/mlp/up_proj/kernel": EMBED_MLP,
    "layers/mlp/down_proj/kernel": MLP_EMBED,  # (layers, mlp, embed)
    "norm/scale": P("fsdp"),
    "lm_head/kernel": P("fsdp", "tensor"),  # (embed, vocab)
}
# LoRA factors take their kernel's input / output axis beside `lora_rank` (replicated).
LORA_SPECS = {
    **{f"layers/{m}/lora_a": P(None, "fsdp", None) for m in ("self_attn/q_proj", "self_attn/k_proj",
                                                            "self_attn/v_proj", "mlp/gate_proj", "mlp/up_proj")},
    **{f"layers/{m}/lora_b": P(None, None, "tensor") for m in ("self_attn/q_proj", "self_attn/k_proj",
                                                              "self_attn/v_proj", "mlp/gate_proj", "mlp/up_proj")},
    "layers/self_attn/o_proj/lora_a": P(None, "tensor", None),
    "layers/self_attn/o_proj/lora_b": P(None, None, "fsdp"),
    "layers/mlp/down_proj/lora_a": P(None, "tensor", None),
    "layers/mlp/down_proj/lora_b": P(None, None, "fsdp"),
}  # fmt: skip


def dict_path(path) -> str:
    """The '/'-joined dict keys of a key path (optax containers in front of a parameter path drop out)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def assert_specs(tree, expected: dict[str, P], mesh, prefix: str = ""):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    assert sorted(dict_path(p).removeprefix(prefix) for p, _ in leaves) == sorted(expected)
    for path, leaf in leaves:
        want = NamedSharding(mesh, expected[dict_path(path).removeprefix(prefix)])
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
            dict_path(path),
            leaf.sharding.spec,
            want.spec,
        )


def assert_opt_state_follows(opt_state, expected: dict[str, P], mesh, prefix: str):
    """Adam's moments shard like their parameter; counts and other non-parameter leaves are replicated."""
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        key = dict_path(path).removeprefix(prefix)
        want = NamedSharding(mesh, expected[key] if key else P())
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
            jax.tree_util.keystr(path),
            leaf.sharding.spec,
        )
        moments += bool(key)
    assert moments == 2 * len(expected)  # mu and nu of every trainable leaf


def test_every_leaf_is_sharded_as_the_rules_say(eight_devices):
    mesh = make_mesh(1, 4, 2)
    # created straight into the shards: the same values as the unsharded init, every leaf in its place
    model = jaxtune.from_hf_config(TINY, rng=0, mesh=mesh)
    assert_specs(model.params, BASE_SPECS, mesh)
    chex.assert_trees_all_equal(jax.device_get(model.params), jax.device_get(base_model().params))
    q = model.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32 // 4, 32 // 2)}

    full = trainer("full", (1, 4, 2))
    state = full.fresh()
    assert_specs(state.trainable, BASE_SPECS, mesh, prefix="params/")
    assert_opt_state_follows(state.opt_state, BASE_SPECS, mesh, prefix="params/")
    for leaf in (state.step, state.rng):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), leaf.ndim)

    lora = trainer("lora", (1, 4, 2))
    state = lora.fresh()
    assert_specs(state.trainable, LORA_SPECS, mesh, prefix="lora/")
    assert_opt_state_follows(state.opt_state, LORA_SPECS, mesh, prefix="lora/")
    assert_specs(lora.frozen, BASE_SPECS, mesh, prefix="params/")  # the frozen base shards like full FT's
    batch = lora.batch(0)
    # batch -> (data, fsdp), and data has size 1 here
    assert batch.input_ids.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 2)


# --- memory: FSDP holds 1/N per device ---------------------------------------------------------------------


def memory(tr: Trainer) -> dict[str, int]:
    state = tr.fresh()
    stats = tr.step.lower(state, tr.frozen, tr.batch(0)).compile().memory_analysis()
    out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["state_bytes_per_device"] = bytes_per_device(
        tr.shardings.state if tr.shardings else jax.tree.map(lambda x: x.sharding, state), state
    )
    return out


def test_fsdp_step_holds_one_eighth_per_device(eight_devices):
    """Full fine-tuning, AdamW: the compiled step's arguments (params + 2 moments + batch) per device on
    fsdp=8 are ~1/8 of one device's. Only the step counter, the rng key and Adam's count stay replicated."""
    single, fsdp = memory(trainer("full", None)), memory(trainer("full", (1, 8, 1)))
    print(json.dumps({"mesh (1,1,1) single device": single, "mesh (1,8,1) fsdp=8": fsdp}, indent=1))
    assert single["state_bytes_per_device"] / fsdp["state_bytes_per_device"] > 7.9
    ratio = single["argument"] / fsdp["argument"]
    assert 7.5 < ratio <= 8.0, (ratio, single, fsdp)
    assert fsdp["alias"] > 0  # the state is donated: its buffers are reused for the new state


# --- checkpoints move between meshes -----------------------------------------------------------------------


def test_checkpoint_from_one_mesh_restores_on_others(eight_devices, tmp_path):
    """Save after 2 steps on (1, 8, 1); restore onto (2, 4, 1) and (8, 1, 1): the restored arrays are laid out
    for the new mesh and the next 2 steps give the uninterrupted (1, 8, 1) run's losses and weights."""
    source = trainer("full", (1, 8, 1))
    state, _ = source.train(source.fresh(), range(2))
    ckpt = Checkpointer(tmp_path / "ckpt", run_config().training, is_async=False)
    ckpt.save(2, state, {"epoch": 0}, {"note": "saved on (1, 8, 1)"})
    ckpt.wait()
    saved = jax.device_get(state.trainable)
    uninterrupted, straight_losses = source.train(state, range(2, 4))
    straight = jax.device_get(uninterrupted.trainable)
    for shape in [(2, 4, 1), (8, 1, 1)]:
        target = trainer("full", shape)
        restored, data_state, meta = ckpt.restore(2, target.fresh())
        assert data_state == {"epoch": 0} and meta["note"] == "saved on (1, 8, 1)"
        assert int(restored.step) == 2
        chex.assert_trees_all_equal(jax.device_get(restored.trainable), saved)
        for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(target.shardings.state)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        continued, losses = target.train(restored, range(2, 4))
        np.testing.assert_allclose(losses, straight_losses, rtol=TOL, err_msg=str(shape))
        chex.assert_trees_all_close(jax.device_get(continued.trainable), straight, atol=TOL, rtol=0)
    ckpt.close()


def test_a_micro_batch_that_does_not_split_over_the_mesh_is_refused(eight_devices, tmp_path):
    """batch 16 splits over fsdp=8, its accumulation micro-batches of 4 do not: one error naming the field
    (before, each micro-batch's rows were silently copied to every device)."""
    from jaxtune.errors import RunError
    from jaxtune.train.run import build_run

    cfg = load_config({
        "output_dir": str(tmp_path / "run"), "parallel": {"fsdp": 8},
        "model": {"tokenizer": "builtin:chars", "random_init": {"model_type": "llama", "hidden_size": 32,
                  "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}},
        "data": {"train": ["builtin:demo"]}, "method": {"name": "full"},
        "training": {"batch_size": 16, "micro_batch_size": 4},
    })  # fmt: skip
    with pytest.raises(RunError, match=r"training.micro_batch_size=4 does not split over the 8 batch-parallel devices"):
        build_run(cfg)
