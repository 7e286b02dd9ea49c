"""Expert parallelism on 8 fake CPU devices against one device, the oracle being the unsharded computation.

A tiny Mixtral with 8 experts: the rules table splits the expert dim of the expert weights over `fsdp`, so on
(1, 8, 1) every device holds one expert, on (1, 4, 2) and (2, 2, 2) two or four, and the routed tokens reach
their experts through the all-gather / reduce-scatter exchange of models/experts.py. The SFT loss (cross-entropy
plus the load-balancing auxiliary loss, which is large enough here to matter) and the gradient of every
trainable leaf equal the single-device ones to fp32 reduction-order noise, for full fine-tuning and for LoRA on
every linear layer and the experts.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxtune
from jaxtune import peft
from jaxtune.config import load_config
from jaxtune.data.batch import TokenBatch
from jaxtune.methods import sft
from jaxtune.methods.forward import LM
from jaxtune.parallel import make_mesh, place
from jaxtune.peft.plan import merge_variables
from jaxtune.train import optim
from jaxtune.train.sharding import global_batch, run_shardings

TINY_MOE = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                router_aux_loss_coef=0.5)  # fmt: skip
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"},
}
# one expert per device (1, 8, 1); experts over fsdp beside tensor and data parallelism, with LoRA on (1, 4, 2)
RUNS = {"full": [(1, 8, 1), (2, 2, 2)], "lora": [(1, 4, 2)]}
TOL = 1e-5
BATCH, LENGTH = 8, 12


def token_batch(seed: int = 0) -> TokenBatch:
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, TINY_MOE["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    lengths = rng.randint(4, LENGTH + 1, BATCH)
    t = np.arange(LENGTH)[None]
    seg = (t < lengths[:, None]).astype(np.int32)
    targets = np.where(t < lengths[:, None] - 1, np.roll(ids, -1, 1), 0).astype(np.int32)
    mask = (t < lengths[:, None] - 1).astype(np.float32)
    return TokenBatch(ids * seg, targets, mask, seg, np.where(seg > 0, t, 0).astype(np.int32))


@functools.cache
def base_model():
    return jaxtune.from_hf_config(TINY_MOE, rng=0, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def loss_and_grads(method: str, shape):
    """(loss, metric sums, grads) of one SFT micro-step, on one device (shape None) or on a mesh."""
    cfg = load_config({"training": dict(batch_size=BATCH, learning_rate=1e-3)})
    plan = peft.prepare(base_model(), METHODS[method], jax.random.key(1))
    lm = LM(plan.arch)
    batch = token_batch()
    denom = float(sft.denominator(batch))
    # perturb LoRA's B (zero at init) so the experts' LoRA path carries gradient into A too
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))
        if "lora_b" in jax.tree_util.keystr(p)
        else x,
        plan.trainable,
    )

    def f(trainable, frozen, batch):
        loss, sums = sft.loss_fn(lm, merge_variables(frozen, trainable), batch, None, cfg)
        return loss / denom, sums

    fn = jax.value_and_grad(f, has_aux=True)
    if shape is None:
        (loss, sums), grads = jax.jit(fn)(trainable, plan.frozen, batch)
        return plan, float(loss), jax.device_get(sums), jax.device_get(grads)
    optimizer, _ = optim.build(cfg.training, trainable, total_steps=1)
    sh = run_shardings(make_mesh(*shape), plan.arch, trainable, plan.frozen, optimizer)

    def traced(*args):
        with jax.sharding.use_abstract_mesh(sh.mesh.abstract_mesh):
            return fn(*args)

    step = jax.jit(traced, in_shardings=(sh.state.trainable, sh.frozen, sh.batch))
    (loss, sums), grads = step(
        place(trainable, sh.state.trainable), place(plan.frozen, sh.frozen), global_batch(batch, sh.mesh)
    )
    return plan, float(loss), jax.device_get(sums), jax.device_get(grads), sh, step, trainable


def test_expert_parallel_loss_and_gradients_equal_one_device(eight_devices):
    for method in METHODS:
        plan, ref_loss, ref_sums, ref_grads = loss_and_grads(method, None)
        assert float(ref_sums["moe/aux_loss"]) > 0
        experts = [k for k in jax.tree_util.tree_leaves_with_path(ref_grads) if "experts" in jax.tree_util.keystr(k[0])]
        assert experts and all(float(np.abs(g).max()) > 0 for _, g in experts)  # the experts do train
        for shape in RUNS[method]:
            _, loss, sums, grads, sh, step, trainable = loss_and_grads(method, shape)
            where = f"{method} on mesh {shape}"
            np.testing.assert_allclose(loss, ref_loss, rtol=TOL, err_msg=where)
            np.testing.assert_allclose(sums["moe/aux_loss"], ref_sums["moe/aux_loss"], rtol=TOL, err_msg=where)
            chex.assert_trees_all_close(grads, ref_grads, atol=TOL, rtol=TOL)
            # the expert weights (full) / their LoRA factors (lora) are split by expert over fsdp
            flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(sh.state.trainable)}
            key = next(k for k in flat if "experts" in k and "gate_up_proj" in k)
            assert flat[key].spec[1] == "fsdp", (where, key, flat[key].spec)
            if shape == (1, 8, 1):  # and the step really exchanges tokens (shard_map collectives)
                hlo = step.lower(
                    place(trainable, sh.state.trainable), place(plan.frozen, sh.frozen),
                    global_batch(token_batch(), sh.mesh),
                ).as_text()  # fmt: skip
                assert "all_gather" in hlo and "reduce_scatter" in hlo, where
